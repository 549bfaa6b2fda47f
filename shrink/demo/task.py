"""The demo task: sentiment of customer reviews, as shrink task files.

The reviews (shrink/demo/data/reviews.jsonl, see the README beside it) were written for
this project and shuffled once with a fixed seed. They are split three ways, in file
order:

- dev (the first DEV_SIZE lines): where every demo setting was chosen (learning rate,
  epochs, alpha, the teacher's few-shot prefix; bench/demo_tune.py);
- test (the next TEST_SIZE lines): what the demo reports; nothing was tuned on it, and it
  does not shape the student (its vocabulary is pruned to the training text only);
- train (the rest): what the student is distilled on.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

DEV_SIZE = 300  # settings are chosen on these
TEST_SIZE = 300  # the figures the demo reports; the remaining 1,201 lines are for training
CHOICES = (" positive", " negative")
TEMPLATE = "Review: {text}\nSentiment:"  # the student's prompt; it answers with one word
# The teacher (a base model) is shown four worked examples first: Gemma 3 270M scored
# 69% on 80 dev reviews with TEMPLATE alone and 92.5% with these (measured 2026-11-22).
# The student learns to answer without them (distill --teacher-prefix).
TEACHER_PREFIX = (
    "Review: The battery lasts all day and the screen is gorgeous.\nSentiment: positive\n\n"
    "Review: It broke after two days and support never answered.\nSentiment: negative\n\n"
    "Review: Friendly staff, quick service, and the soup was delicious.\nSentiment: positive\n\n"
    "Review: Overpriced, noisy, and the room smelled of smoke.\nSentiment: negative\n\n"
)
SPLITS = ("train", "dev", "test")


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


def split_rows(rows: list) -> dict[str, list]:
    """The dev, test and train parts of the (shuffled) review list, in file order."""
    return {"dev": rows[:DEV_SIZE], "test": rows[DEV_SIZE : DEV_SIZE + TEST_SIZE],
            "train": rows[DEV_SIZE + TEST_SIZE :]}


def write_task_files(folder: Path) -> dict[str, Path]:
    """train.jsonl, dev.jsonl, test.jsonl (shrink's task format) and teacher_prefix.txt in
    `folder`, by name: "train", "dev", "test" and "prefix"."""
    parts = split_rows([to_example(r) for r in reviews()])
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in SPLITS:
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in parts[name]), encoding="utf-8")
        paths[name] = path
    paths["prefix"] = folder / "teacher_prefix.txt"
    paths["prefix"].write_text(TEACHER_PREFIX, encoding="utf-8")
    return paths
