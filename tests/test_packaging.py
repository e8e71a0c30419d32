"""What a user installs: TRL is a benchmark baseline, not a dependency; torch is a range, so a user's torch (or the
one an extra needs) is kept, while the project's own commands pin the tested version."""

from __future__ import annotations

import ast
import re
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
