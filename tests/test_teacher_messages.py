"""bench/teacher_messages.py: the teacher writes more extract-demo messages (issue 15, "more
data"). What it keeps must not be, or nearly be, a message the demo evaluates on, nor hold a
name or city the demo keeps for evaluation."""

from __future__ import annotations

import json

import pytest
from bench_scripts import BENCH, load

from shrink.demo import extract

RECORDED = sorted((BENCH / "results").glob("teacher-messages-*.jsonl"))
HELD_OUT = set(extract.DEV_FIRST + extract.DEV_LAST + extract.DEV_CITIES
               + extract.TEST_FIRST + extract.TEST_LAST + extract.TEST_CITIES)


def test_keep_new_drops_short_repeated_copied_held_out_and_orderless_texts():
    tm = load("teacher_messages")
    splits = {"train": ["Hi, this is Maria Lopez from Denver. My kettle arrived broken, order K2961."],
              "dev": ["Ola Berg from Oslo - quick question about order A1234, when will the lamp ship?"],
              "test": ["Dear support team, please cancel order B9079. I no longer need the yoga mat. Regards, Ana of Lima."]}
    cands = [
        "Order K1234 late.",                                                                   # length
        "Kalo Brimi in Tosa asks where order P5521 is, the drill was due on Monday.",          # kept
        "kalo brimi in tosa asks where order P5521 is the drill was due on monday",            # repeat (same words)
        "Hi, this is Maria Lopez from Denver. My kettle arrived broken, order K2961!",         # copy of a training message
        "Dear support team, please cancel order B9079. I no longer need the yoga mat. Regards, Ana of Quito.",  # near copy of test
        "Grace Dorsa from Tosa: order M4410 came without its lid, please send one.",           # a test first name
        "Sami from Porto here again, the toaster still does not work and nobody answers.",     # no order number
    ]
    kept, why = tm.keep_new(cands, splits, HELD_OUT)
    assert kept == [cands[1]]
    assert why == {"length": 1, "repeat": 1, "copy of a message": 1, "near copy of a message": 1,
                   "a dev or test name or city": 1, "no order number": 1}


@pytest.mark.parametrize("answer, ok", [
    ('{"name": "Kalo Brimi", "city": "Tosa", "order": "P5521"}', True),
    ('{"name": "Lina Berg", "city": "Oslo", "order": "W7340"}', False),   # the prefix's example, not the message's
    ('{"name": "Kalo Brimi", "city": "", "order": "P5521"}', False),      # a field left empty
    ('{"name": "Kalo Brimi", "order": "P5521"}', False),                  # a field missing
    ('{"name": "Kalo Brimi", "city": "Tosa", "order": 5521}', False),     # not a string
    ('{"name": "Kalo Brimi", "city": "Tosa"', False),                     # not JSON
    ('["Kalo Brimi", "Tosa", "P5521"]', False),                          # not an object
])
def test_an_answer_is_kept_only_when_it_copies_the_three_fields_from_the_message(answer, ok):
    tm = load("teacher_messages")
    text = "Kalo Brimi in Tosa asks where order P5521 is, the drill was due on Monday."
    assert tm.copied_fields(text, " " + answer) is ok


def test_the_teacher_writes_through_llama_cpp_from_training_messages_only(teacher, tmp_path):
    """write_candidates samples a GGUF teacher in llama.cpp: `count` texts, each continuing
    three of the given messages, and the same texts again with the same seed."""
    from shrink.export.gguf_convert import convert_hf_to_gguf

    tm = load("teacher_messages")
    gguf = tmp_path / "teacher.gguf"
    convert_hf_to_gguf(teacher, gguf, "f16")
    train = [f"message number {i} about order K{1000 + i}" for i in range(5)]
    first = tm.write_candidates(gguf, train, 4, seed=3, threads=1)
    assert len(first) == 4 and all(isinstance(t, str) and "\n" not in t for t in first)
    assert tm.write_candidates(gguf, train, 4, seed=3, threads=1) == first
    prompt = tm.prompt_for(train[:3])
    assert prompt.endswith("Message: message number 2 about order K1002\n\nMessage:")


@pytest.mark.skipif(not RECORDED, reason="no recorded run of the teacher's messages in this checkout")
def test_the_recorded_teacher_messages_are_no_dev_or_test_message():
    """The messages the demo's teacher wrote and labeled (bench/RESULTS.md) hold no copy or
    near copy (word-set Jaccard >= 0.6) of a dev or test message, no dev or test name or
    city word, and answers that copy their three fields."""
    tm = load("teacher_messages")
    tw = load("teacher_writing")
    rows = [json.loads(line) for line in RECORDED[-1].read_text(encoding="utf-8").splitlines()]
    assert rows
    held_out = [set(tw.words(tm.message_text(r["prompt"]))) for s in ("dev", "test") for r in extract.rows(s)]
    banned = {w.lower() for w in HELD_OUT}
    for r in rows:
        text = tm.message_text(r["prompt"])
        w = set(tw.words(text))
        assert max(tw.jaccard(w, s) for s in held_out) < 0.6, text
        assert not banned & w, text
        assert tm.copied_fields(text, r["completion"]), r
