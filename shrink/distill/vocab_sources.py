"""The texts a pruned vocabulary must cover (shrink.distill.prune_vocab).

The training data, and any --vocab-data files: unlabeled in-domain text the user wants
encoded in whole pieces. Never the evaluation data: a student whose vocabulary was
chosen on its test set would carry that set's words into the measurement. Other text
still encodes, in smaller pieces (byte fallback).

A --vocab-data file is JSON lines when its name ends in .jsonl (rows with a `prompt`
and optionally a `completion` and `choices`, as task data, every text a row has being
used) and plain text otherwise (every non-empty line is a text).
"""

from __future__ import annotations

import json
from pathlib import Path

from shrink.errors import ShrinkError, TaskDataError


def row_texts(prompt: str, completion: str | None = None, choices=()) -> list[str]:
    """What the student is shown of one row: the prompt alone, with its completion and
    with each choice (as evaluation scores them)."""
    return [prompt] + ([prompt + completion] if completion is not None else []) + [prompt + c for c in choices]


def task_texts(examples) -> list[str]:
    """Every text of task examples (shrink.tasks.Example)."""
    return [t for ex in examples for t in row_texts(ex.prompt, ex.completion, ex.choices or ())]


def read_vocab_data(path: Path) -> list[str]:
    """The texts of one --vocab-data file; TaskDataError naming file:line on a bad row."""
    path = Path(path)
    if not path.is_file():
        raise ShrinkError(f"--vocab-data: no such file {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise TaskDataError(f"{path}:{line}: not UTF-8 ({e.reason} at byte {e.start})") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise TaskDataError(f"{path}: empty file (expected text to cover, one per line)")
    if path.suffix != ".jsonl":
        return [line for _, line in lines]
    return [t for n, line in lines for t in _jsonl_row_texts(line, f"{path}:{n}")]


def _jsonl_row_texts(line: str, where: str) -> list[str]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise TaskDataError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise TaskDataError(f"{where}: expected a JSON object with a string 'prompt'")
    completion, choices = row.get("completion"), row.get("choices", [])
    if completion is not None and not isinstance(completion, str):
        raise TaskDataError(f"{where}: 'completion' must be a string, got {type(completion).__name__}")
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise TaskDataError(f"{where}: 'choices' must be a list of strings")
    return row_texts(row["prompt"], completion, choices)
