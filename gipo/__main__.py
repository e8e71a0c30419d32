"""``python -m gipo`` (and ``accelerate launch -m gipo``) runs the command line."""

import sys

from gipo.cli import main

sys.exit(main())
