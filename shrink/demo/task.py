"""The demo task: sentiment of customer reviews, as shrink task files.

The reviews (shrink/demo/data/reviews.jsonl, see the README beside it) were written for
this project. The first EVAL_SIZE lines (the file is shuffled once, with a fixed seed)
are the evaluation set, the rest the training set.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

EVAL_SIZE = 300  # evaluation examples; the remaining 1,501 are for training
CHOICES = (" positive", " negative")
TEMPLATE = "Review: {text}\nSentiment:"  # the student's prompt; it answers with one word
# The teacher (a base model) is shown four worked examples first: Gemma 3 270M scored
# 69% on 80 reviews with TEMPLATE alone and 92.5% with these (measured 2026-11-22).
# The student learns to answer without them (distill --teacher-prefix).
TEACHER_PREFIX = (
    "Review: The battery lasts all day and the screen is gorgeous.\nSentiment: positive\n\n"
    "Review: It broke after two days and support never answered.\nSentiment: negative\n\n"
    "Review: Friendly staff, quick service, and the soup was delicious.\nSentiment: positive\n\n"
    "Review: Overpriced, noisy, and the room smelled of smoke.\nSentiment: negative\n\n"
)


def reviews() -> list[dict]:
    text = resources.files("shrink.demo").joinpath("data/reviews.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def to_example(review: dict) -> dict:
    return {
        "prompt": TEMPLATE.format(text=review["text"]),
        "completion": f" {review['label']}",
        "choices": list(CHOICES),
        "domain": review["domain"],
    }


def write_task_files(folder: Path) -> tuple[Path, Path, Path]:
    """train.jsonl, eval.jsonl (shrink's task format) and teacher_prefix.txt in `folder`."""
    rows = [to_example(r) for r in reviews()]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, part in (("train.jsonl", rows[EVAL_SIZE:]), ("eval.jsonl", rows[:EVAL_SIZE])):
        path = folder / name
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
        paths.append(path)
    prefix = folder / "teacher_prefix.txt"
    prefix.write_text(TEACHER_PREFIX, encoding="utf-8")
    return paths[0], paths[1], prefix
