"""bench/teacher_reviews.py: the teacher writes more demo reviews (issue 15, "more data").
What it keeps must not be, or nearly be, a review the demo evaluates on."""

from __future__ import annotations

import json

import pytest
from bench_scripts import BENCH, load

from shrink.demo.task import reviews, split_rows

RECORDED = BENCH / "results" / "teacher-reviews-20261202-105327.jsonl"


def test_keep_new_drops_short_repeated_copied_and_near_copied_texts():
    tr = load("teacher_reviews")
    splits = {"train": [{"text": "The kettle boils fast and looks lovely on the counter."}],
              "dev": [{"text": "Battery died after a week and support never wrote back."}],
              "test": [{"text": "The soup was cold and the waiter ignored us all night."}]}
    cands = [{"text": t} for t in (
        "Too short.",                                                        # length
        "A fine pair of boots that kept my feet dry all winter.",            # kept
        "A fine pair of boots that kept my feet dry all winter!",            # repeat (same words)
        "the kettle boils FAST, and looks lovely on the counter",            # copy of a training review
        "The soup was cold and the waiter ignored us all evening.",          # near copy of a test review
        "Battery died after one week, support never wrote back to me.",      # near copy of a dev review
        "The kettle boils fast and looks lovely, my old one was slow.",      # like a training review, under 0.8
    )]
    kept, why = tr.keep_new(cands, splits)
    assert [c["text"] for c in kept] == [cands[1]["text"], cands[6]["text"]]
    assert why == {"length": 1, "repeat": 1, "copy of a review": 1, "near copy of a review": 2}


@pytest.mark.skipif(not RECORDED.is_file(), reason="the recorded run's reviews are not in this checkout")
def test_the_recorded_teacher_reviews_are_no_dev_or_test_review():
    """The 958 reviews the demo's teacher wrote (bench/RESULTS.md) hold no copy or near
    copy (word-set Jaccard >= 0.6) of a dev or test review, and their prompts came from
    training reviews only: every domain is a training domain."""
    tr = load("teacher_reviews")
    tw = load("teacher_writing")
    rows = [json.loads(line) for line in RECORDED.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 958 and {r["label"] for r in rows} == {"positive", "negative"}
    assert all(r["confidence"] >= tr.MIN_CONFIDENCE for r in rows)
    splits = split_rows(reviews())
    held_out = [set(tw.words(r["text"])) for r in splits["dev"] + splits["test"]]
    for r in rows:
        w = set(tw.words(r["text"]))
        assert max(tw.jaccard(w, s) for s in held_out) < 0.6, r["text"]
    assert {r["domain"] for r in rows} <= {r["domain"] for r in splits["train"]}


def test_the_teacher_writes_through_llama_cpp_from_training_reviews_only(teacher, tmp_path):
    """write_candidates samples a GGUF teacher in llama.cpp: `count` rows, each asked for a
    (domain, label) the training reviews have three of, and the same rows again with the
    same seed."""
    from shrink.export.gguf_convert import convert_hf_to_gguf

    tr = load("teacher_reviews")
    gguf = tmp_path / "teacher.gguf"
    convert_hf_to_gguf(teacher, gguf, "f16")
    train = [{"text": f"review number {i} of the shop", "domain": d, "label": lab}
             for i, (d, lab) in enumerate([("toy", "positive")] * 3 + [("pet", "negative")] * 4 + [("gym", "positive")] * 2)]
    first = tr.write_candidates(gguf, train, 6, seed=3, threads=1)
    assert len(first) == 6 and all(isinstance(c["text"], str) for c in first)
    assert {(c["domain"], c["asked_label"]) for c in first} <= {("toy", "positive"), ("pet", "negative")}
    assert tr.write_candidates(gguf, train, 6, seed=3, threads=1) == first
