"""The documentation stays true: links resolve, the README stays a front door, its Python example runs,
the example reward function does what the README says."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

import gipo
from gipo.tasks import get_task
from tests.conftest import QUIET

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_LIMIT = 12_000

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target), with an optional "title"; the text may span lines.
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _repo_files() -> set[str] | None:
    """Paths git tracks or would track (ignored files, such as `runs/` folders, do not count); None without git."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                             capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    files = {f for f in out.decode().split("\0") if f}
    return files or None


def _exists(target: Path, files: set[str] | None) -> bool:
    if not target.exists():
        return False
    if files is None:
        return True
    rel = target.resolve().relative_to(ROOT).as_posix()
    return rel in ("", ".") or rel in files or any(f.startswith(rel + "/") for f in files)


def _markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


def _links(text: str) -> list[str]:
    text = INLINE_CODE.sub("", FENCE.sub("", text))
    return LINK.findall(text)


def test_relative_links_resolve():
    files = _repo_files()
    broken = []
    for doc in _markdown_files():
        for link in _links(doc.read_text(encoding="utf-8")):
            if link.startswith(("http://", "https://", "mailto:", "#")):
                continue
            path = unquote(link.split("#", 1)[0])
            target = (doc.parent / path).resolve()
            if not target.is_relative_to(ROOT) or not _exists(target, files):
                broken.append(f"{doc.relative_to(ROOT)}: {link}")
    assert not broken, "Links to files that are not in the repository:\n" + "\n".join(broken)


def test_readme_is_short():
    size = len(README.read_text(encoding="utf-8"))
    assert size <= README_LIMIT, f"README.md has {size} characters; at most {README_LIMIT} (move details to docs/)."


def test_readme_layout_names_every_module():
    text = README.read_text(encoding="utf-8")
    missing = [p.name for p in sorted((ROOT / "gipo").glob("*.py")) if f"`gipo/{p.name}`" not in text]
    assert not missing, f"README's layout table does not name: {missing}"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def test_readme_python_example_runs(tiny_pipeline, tmp_path, monkeypatch):
    blocks = _python_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "README.md has no ```python example"
    # The example reads the models `make demo` writes; the session's tiny SFT and reward models stand in.
    for stage in ("sft", "rm"):
        (tmp_path / "runs" / "demo" / stage).mkdir(parents=True)
        (tmp_path / "runs" / "demo" / stage / "final").symlink_to(tiny_pipeline[stage] / "final")
    # The example's 50 iterations and 64 held-out prompts per group are a reader's; a test on 2 CPU cores runs
    # the same code for 2 iterations on 4 prompts per group: its PPOConfig is wrapped to override those sizes.
    real = gipo.PPOConfig
    tiny = {**QUIET, "max_steps": 2, "eval_prompts": 4}
    monkeypatch.setattr(gipo, "PPOConfig", lambda *args, **kwargs: real(*args, **{**kwargs, **tiny}))
    monkeypatch.chdir(tmp_path)
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), {"__name__": "readme_example"})
    assert (tmp_path / "runs" / "my-gipo" / "final").is_dir()
    assert (tmp_path / "my-policy" / "config.json").is_file()


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_custom_reward_exact_match():
    exact_match = _load_example("custom_reward").exact_match
    records = [{"prompt": "add 2+3=", "group": "add", "target": "5"},
               {"prompt": "copy abc=", "group": "copy", "target": "abc"}]
    assert exact_match([r["prompt"] for r in records], [" 5\n", "abd"], records) == [1.0, 0.0]
    # The built-in suite's records carry the `target` it checks: their own answers score 1.
    builtin = get_task("builtin").prompts("test", 2, seed=0)
    assert exact_match([r["prompt"] for r in builtin], [r["target"] for r in builtin], builtin) == [1.0] * 8
    with pytest.raises(KeyError, match="target"):
        exact_match(["x"], ["y"], [{"prompt": "x", "group": "all"}])
