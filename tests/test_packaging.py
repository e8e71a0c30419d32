"""What a user installs: TRL is a benchmark baseline, not a dependency; torch is a range, so a user's torch (or the
one an extra needs) is kept, while the project's own commands pin the tested version."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_trl_is_only_in_the_bench_extra_and_gipo_never_imports_it():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(dep.startswith("trl") for dep in project["dependencies"])
    assert any(dep.startswith("trl") for dep in project["optional-dependencies"]["bench"])
    for path in (ROOT / "gipo").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "trl" or n.startswith("trl.") for n in names), path


def test_torch_is_a_range_and_the_makefile_installs_the_tested_version_first():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (torch,) = [dep for dep in project["dependencies"] if re.match(r"torch\b", dep)]
    assert "==" not in torch and ">=" in torch
    makefile = (ROOT / "Makefile").read_text()
    assert makefile.index("pip install -q torch==2.13.0") < makefile.index('-e ".[dev')


def test_reasoning_gym_is_an_extra_that_import_gipo_does_not_load():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(dep.startswith("reasoning") for dep in project["dependencies"])
    assert any(dep.startswith("reasoning-gym") for dep in project["optional-dependencies"]["reasoning"])
    assert '.[dev,bench,reasoning]"' in (ROOT / "Makefile").read_text()  # make test runs its tests
    loaded = subprocess.run([sys.executable, "-c", "import sys, gipo; print('reasoning_gym' in sys.modules, "
                             "'math_verify' in sys.modules)"], capture_output=True, text=True, check=True)
    assert loaded.stdout.split() == ["False", "False"]
