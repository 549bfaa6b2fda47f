"""Shared fixtures: one tiny trained teacher and its task files, built once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402


@pytest.fixture(scope="session")
def task_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("task")
    return {
        "train": tiny.write_jsonl(d / "train.jsonl", tiny.toy_examples(600, seed=1)),
        "eval": tiny.write_jsonl(d / "eval.jsonl", tiny.toy_examples(100, seed=99)),
        "eval_gen": tiny.write_jsonl(d / "eval_gen.jsonl", tiny.toy_examples(30, seed=98, choices=False)),
    }


@pytest.fixture(scope="session")
def teacher(tmp_path_factory, task_files) -> Path:
    """A 4-layer, 256-wide Llama trained on the toy task (about 15 s on 2 cores)."""
    import json

    rows = [json.loads(line) for line in task_files["train"].read_text().splitlines()]
    return tiny.make_teacher(tmp_path_factory.mktemp("teacher") / "teacher", rows)


@pytest.fixture(scope="session")
def wide_teacher(tmp_path_factory):
    """family -> a 2-layer, 512-wide tiny teacher of that family (tests/tiny_families.py),
    briefly trained, built on first use: wide enough to prune its hidden size to 256."""
    import tiny_families

    made = {}

    def get(family: str) -> Path:
        if family not in made:
            rows = tiny.toy_examples(160, seed=1)
            folder = tmp_path_factory.mktemp(f"wide-{family}") / f"{family}-teacher"
            made[family] = tiny_families.make_teacher(folder, family, rows, steps=8, layers=2, hidden=512)
        return made[family]

    return get
