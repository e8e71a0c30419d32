"""Answer extraction: the part of a reply a verifiable reward checks, behind a registry.

An extractor is a pure function ``reply -> answer | None``; ``None`` means the reply holds no answer in
that form (so it fails the format, and its answer scores 0). Built in:

- ``whole``: the reply stripped of surrounding white space (and of one trailing period);
- ``answer_tags``: the text inside the last ``<answer>...</answer>`` pair;
- ``last_number``: the last number in the reply (``-12``, ``3.5``, ``1,024`` read as ``1024``);
- ``boxed``: the contents of the last ``\\boxed{...}`` (nested braces allowed), as math models write it;
- ``first_line``: the first non-empty line, stripped of one trailing period.

Add one with :func:`register_extractor`; a dataset option (``extract=NAME``) picks it by name.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from gipo.registry import Registry

Extractor = Callable[[str], "str | None"]

_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
_ANSWER_TAGS = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def _strip_period(text: str) -> str:
    text = text.strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def whole_reply(reply: str) -> str | None:
    answer = _strip_period(reply)
    return answer or None


def answer_tags(reply: str) -> str | None:
    found = _ANSWER_TAGS.findall(reply)
    return found[-1].strip() if found else None


def last_number(reply: str) -> str | None:
    found = _NUMBER.findall(reply)
    return found[-1].replace(",", "") if found else None


def boxed(reply: str) -> str | None:
    start = reply.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(reply)):
        if reply[i] == "{":
            depth += 1
        elif reply[i] == "}":
            if depth == 0:
                return reply[begin:i].strip()
            depth -= 1
    return None  # an unclosed box is no answer


def first_line(reply: str) -> str | None:
    lines = [line for line in reply.splitlines() if line.strip()]
    return _strip_period(lines[0]) if lines else None


EXTRACTORS: Registry[Extractor] = Registry("answer extractor", "extract", lambda spec, function: function)
EXTRACTORS.register("whole", whole_reply, "the whole reply, stripped")
EXTRACTORS.register("answer_tags", answer_tags, "inside the last <answer>...</answer>")
EXTRACTORS.register("last_number", last_number, "the last number in the reply")
EXTRACTORS.register("boxed", boxed, "inside the last \\boxed{...}")
EXTRACTORS.register("first_line", first_line, "the first non-empty line")


def register_extractor(name: str, extractor: Extractor, about: str = "", *, replace: bool = False) -> None:
    """Add an extractor ``reply -> answer | None``, found by name in a dataset's ``extract`` option."""
    EXTRACTORS.register(name, extractor, about, replace=replace)


def extract_answer(name: str, reply: str) -> str | None:
    return EXTRACTORS.get(name)(reply)
