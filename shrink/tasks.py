"""Task data: JSONL, one example per line.

    {"prompt": "Review: great phone\\nSentiment:", "completion": " positive",
     "choices": [" positive", " negative"]}

`prompt` and `completion` must not be empty (a model needs a prompt to continue).
`choices` is optional; when present, `completion` must be one of them. Other keys are
ignored. Every problem is reported with the file and line it is on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from shrink.errors import TaskDataError

T = TypeVar("T")


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str
    choices: tuple[str, ...] | None = None  # candidate completions; None = free generation


def load_task(path: str | Path) -> list[Example]:
    """Read and validate a task file; raise TaskDataError naming file:line on the first problem."""
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"{path}: no such file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise TaskDataError(f"{path}:{line}: not UTF-8 ({e.reason} at byte {e.start})") from None

    examples = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        examples.append(_parse_line(line, f"{path}:{lineno}"))
    if not examples:
        raise TaskDataError(f"{path}: empty file (expected one JSON object per line)")
    return examples


def _parse_line(line: str, where: str) -> Example:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise TaskDataError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise TaskDataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("prompt", "completion"):
        if key not in obj:
            raise TaskDataError(f"{where}: missing key '{key}'")
        if not isinstance(obj[key], str):
            raise TaskDataError(f"{where}: '{key}' must be a string, got {type(obj[key]).__name__}")
    for key in ("prompt", "completion"):
        if obj[key] == "":
            raise TaskDataError(f"{where}: '{key}' is empty")
    choices = obj.get("choices")
    if choices is not None:
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise TaskDataError(f"{where}: 'choices' must be a non-empty list of non-empty strings")
        if obj["completion"] not in choices:
            raise TaskDataError(f"{where}: completion {obj['completion']!r} is not among the choices {choices!r}")
        choices = tuple(choices)
    return Example(prompt=obj["prompt"], completion=obj["completion"], choices=choices)


def spread(items: Sequence[T], n: int) -> list[T]:
    """`n` of `items` evenly spaced over the whole list, in order; all of them when there
    are at most `n`. Item k is the first of the k-th of n equal shares, so every region
    of a file is sampled (its first item and its last share too, whatever its length),
    not just its first lines. Deterministic, so calibration is reproducible."""
    if n < 1:
        raise ValueError(f"spread: n must be at least 1, got {n}")
    if len(items) <= n:
        return list(items)
    return [items[k * len(items) // n] for k in range(n)]


def with_prefix(examples, prefix: str):
    """The examples as the teacher reads them: `prefix` (few-shot examples, instructions)
    before every prompt."""
    import dataclasses

    return [dataclasses.replace(ex, prompt=prefix + ex.prompt) for ex in examples]
