"""bench/augment_reviews.py: reviews recombined from the training reviews (issue 15, "more
data"). They add no word the training split lacks, and none is a review the demo evaluates
on or a near copy of one."""

from __future__ import annotations

from bench_scripts import load

from shrink.demo.task import reviews, split_rows


def test_sentences_and_clauses_cut_where_a_reader_would():
    ar = load("augment_reviews")
    assert ar.sentences("Great kettle. Boils fast! Would buy again?  Yes.") == [
        "Great kettle.", "Boils fast!", "Would buy again?", "Yes."]
    assert ar.clauses("The pan heats evenly, cleans easily but the handle gets hot.") == [
        "The pan heats evenly.", "The pan heats evenly, cleans easily."]
    assert ar.clauses("Too hot, sadly.") == []  # under 4 words before every cut


def test_recombined_reviews_use_training_words_only_and_are_reproducible():
    ar = load("augment_reviews")
    tw = load("teacher_writing")
    train = split_rows(reviews())["train"]
    cands = ar.recombine(train, 600, seed=3)
    assert len(cands) == 600 and {c["op"] for c in cands} == set(ar.OPS)
    vocab = {w for r in train for w in tw.words(r["text"])}
    for c in cands:
        assert set(tw.words(c["text"])) <= vocab, c
    assert [c["text"] for c in ar.recombine(train, 600, seed=3)] == [c["text"] for c in cands]
    assert [c["text"] for c in ar.recombine(train, 600, seed=4)] != [c["text"] for c in cands]
    # a drop is a training review of its domain with one of its sentences left out
    def one_less(short: list[str], full: list[str]) -> bool:
        return any(full[:i] + full[i + 1:] == short for i in range(len(full)))

    drops = [c for c in cands if c["op"] == "drop"]
    assert drops and all(any(r["domain"] == c["domain"] and one_less(ar.sentences(c["text"]), ar.sentences(r["text"]))
                             for r in train) for c in drops)


def test_keep_edited_drops_copies_of_any_review_and_near_copies_of_held_out_ones():
    tw = load("teacher_writing")
    splits = {"train": [{"text": "The kettle boils fast and looks lovely on the counter."}],
              "dev": [{"text": "Battery died after a week and support never wrote back."}],
              "test": [{"text": "The soup was cold and the waiter ignored us all night."}]}
    cands = [{"text": t} for t in (
        "Too short.",                                                         # length
        "The kettle boils fast and looks lovely.",                            # kept: near a training review
        "The kettle boils fast, and looks lovely!",                           # repeat
        "the kettle boils FAST and looks lovely on the counter",              # copy of a training review
        "The soup was cold and the waiter ignored us all evening.",           # near copy of a test review
        "Battery died after one week, support never wrote back to me.",       # near copy of a dev review
    )]
    kept, why = tw.keep_edited(cands, splits)
    assert [c["text"] for c in kept] == [cands[1]["text"]]
    assert why == {"length": 1, "repeat": 1, "copy of a review": 1, "near copy of a review": 2}


def test_recorded_task_rows_are_the_recorded_reviews_in_the_students_prompt():
    """bench/results' -task.jsonl (the --extra-train input of the nineteenth session's
    figures) holds exactly the 1,497 recombined reviews the teacher labeled, each in the
    student's prompt with the teacher's label, and none is a dev or test review."""
    import json
    from pathlib import Path

    from shrink.demo.task import CHOICES, TEMPLATE

    results = Path(__file__).resolve().parents[1] / "bench" / "results"
    recorded = [json.loads(line) for line in
                (results / "augmented-reviews-20261203-092524.jsonl").read_text(encoding="utf-8").splitlines()]
    task = [json.loads(line) for line in
            (results / "augmented-reviews-20261203-092524-task.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(task) == len(recorded) == 1497
    assert task == [{"prompt": TEMPLATE.format(text=r["text"]), "completion": f" {r['label']}",
                     "choices": list(CHOICES)} for r in recorded]
    splits = split_rows(reviews())
    held_out = {r["text"] for name in ("dev", "test") for r in splits[name]}
    assert not held_out & {r["text"] for r in recorded}
