"""`shrink label`: the teacher answers inputs without answers; distill trains on them."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

import tiny
from shrink.cli import cli
from shrink.evaluate import Generation, answer, choose
from shrink.label import manifest_path
from shrink.manifest import Manifest
from shrink.runtime import open_runtime
from shrink.tasks import load_task


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    rows = tiny.toy_examples(24, seed=7)
    choice_rows = [{"prompt": r["prompt"], "choices": r["choices"], "id": i} for i, r in enumerate(rows)]
    free_rows = [{"prompt": r["prompt"], "id": i} for i, r in enumerate(rows[:10])]
    return {"choices": tiny.write_jsonl(d / "choices.jsonl", choice_rows),
            "free": tiny.write_jsonl(d / "free.jsonl", free_rows)}


def test_choice_rows_get_the_teachers_choice_and_its_probability(teacher, inputs, tmp_path):
    out = tmp_path / "labeled.jsonl"
    r = invoke("label", "--teacher", teacher, "--data", inputs["choices"], "--out", out, "--json")
    assert r.exit_code == 0, r.output
    rows = read_rows(out)
    assert [row["id"] for row in rows] == list(range(24))  # other keys kept, order kept
    rt = open_runtime(teacher, device="cpu")
    for row, ex in zip(rows, load_task(inputs["choices"], need_completion=False)):
        choice, scores = choose(rt, ex)
        assert row["completion"] == choice
        assert row["confidence"] == pytest.approx(math.exp(max(scores)) / sum(map(math.exp, scores)), abs=1e-5)
        assert 0.5 <= row["confidence"] <= 1
    m = Manifest.read_from(manifest_path(out))
    assert (m.kind, m.format) == ("labels", "jsonl")
    assert m.metrics["rows"] == m.metrics["labeled"] == 24 and m.metrics["dropped_low_confidence"] == 0
    assert m.files["labeled.jsonl"].bytes == out.stat().st_size
    assert len(m.settings["teacher_sha256"]) == 64 and len(m.settings["data_sha256"]) == 64
    assert json.loads(r.stdout)["kind"] == "labels"
    # The labeled file is a task file: the teacher's labels are what the teacher chooses,
    # and the teacher (trained on the toy task) is mostly right.
    truth = [ex["completion"] for ex in tiny.toy_examples(24, seed=7)]
    assert sum(row["completion"] == t for row, t in zip(rows, truth)) >= 20
    assert len(load_task(out)) == 24


def test_free_rows_get_the_teachers_greedy_answer(teacher, inputs, tmp_path):
    """A torch teacher answers in batches: the same answers as one at a time."""
    out = tmp_path / "labeled.jsonl"
    assert invoke("label", "--teacher", teacher, "--data", inputs["free"], "--out", out,
                  "--max-new-tokens", 4).exit_code == 0
    rows = read_rows(out)
    rt = open_runtime(teacher, device="cpu")
    for row, ex in zip(rows, load_task(inputs["free"], need_completion=False)):
        assert row["completion"] == answer(rt, ex, Generation(max_new_tokens=4))
        assert 0 < row["confidence"] <= 1


def test_min_confidence_leaves_rows_out_and_says_how_many(teacher, inputs, tmp_path):
    out = tmp_path / "labeled.jsonl"
    r = invoke("label", "--teacher", teacher, "--data", inputs["choices"], "--out", out, "--min-confidence", 0.999999)
    assert r.exit_code == 0, r.output
    m = Manifest.read_from(manifest_path(out))
    kept = read_rows(out)
    assert len(kept) == m.metrics["labeled"] and m.metrics["dropped_low_confidence"] == 24 - len(kept) > 0
    assert all(row["confidence"] >= 0.999999 for row in kept)
    assert f"left out {24 - len(kept)} of 24 rows the teacher was less than 100% sure of" in r.output


def test_a_stopped_run_continues_where_it_stopped(teacher, inputs, tmp_path, monkeypatch):
    import shrink.evaluate as evaluate

    whole = tmp_path / "whole.jsonl"
    assert invoke("label", "--teacher", teacher, "--data", inputs["choices"], "--out", whole).exit_code == 0

    calls, real = [], evaluate.choose

    def stop_after_ten(rt, ex):
        if len(calls) == 10:
            raise KeyboardInterrupt
        calls.append(ex)
        return real(rt, ex)

    out = tmp_path / "labeled.jsonl"
    monkeypatch.setattr(evaluate, "choose", stop_after_ten)
    r = CliRunner().invoke(cli, ["label", "--teacher", str(teacher), "--data", str(inputs["choices"]), "--out", str(out)])
    assert r.exit_code != 0 and not out.exists()  # nothing half-written
    assert len(read_rows(out.with_name("labeled.jsonl.partial"))) == 10
    monkeypatch.setattr(evaluate, "choose", lambda rt, ex: calls.append(ex) or real(rt, ex))
    r = invoke("label", "--teacher", teacher, "--data", inputs["choices"], "--out", out)
    assert r.exit_code == 0 and "resuming: 10 rows already labeled" in r.output
    assert len(calls) == 24  # 10, then the other 14
    assert out.read_text() == whole.read_text()
    assert not out.with_name("labeled.jsonl.partial").exists()


def test_distill_trains_on_the_labels(teacher, inputs, tmp_path):
    out = tmp_path / "labeled.jsonl"
    assert invoke("label", "--teacher", teacher, "--data", inputs["choices"], "--out", out).exit_code == 0
    r = invoke("distill", "--teacher", teacher, "--data", out, "--out", tmp_path / "student", "--layers", 2,
               "--steps", 2, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert Manifest.read(tmp_path / "student").kind == "student"


@pytest.mark.parametrize("args, error", [
    (["--min-confidence", "2"], "Error: Invalid value for '--min-confidence': 2.0 is not in the range 0<=x<=1."),
    (["--teacher-prefix", "nope.txt"], "Error: --teacher-prefix: no such file nope.txt"),
])
def test_bad_options(teacher, inputs, tmp_path, args, error):
    r = CliRunner().invoke(cli, ["label", "--teacher", str(teacher), "--data", str(inputs["choices"]),
                                 "--out", str(tmp_path / "o.jsonl"), *args])
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1] == error
    assert not (tmp_path / "o.jsonl").exists()


def test_a_row_without_prompt_or_messages(teacher, tmp_path):
    data = tiny.write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, {"text": "b"}])
    r = CliRunner().invoke(cli, ["label", "--teacher", str(teacher), "--data", str(data), "--out", str(tmp_path / "o.jsonl")])
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1] == f"Error: {data}:2: missing key 'prompt' (or 'messages')"


def test_samples_give_distinct_answers_per_input(teacher, inputs, tmp_path):
    out = tmp_path / "labeled.jsonl"
    r = invoke("label", "--teacher", teacher, "--data", inputs["free"], "--out", out, "--max-new-tokens", 3,
               "--samples", 4, "--temperature", 3.0, "--seed", 1)
    assert r.exit_code == 0, r.output
    rows = read_rows(out)
    by_input = {}
    for row in rows:
        assert not any(k.startswith("_") for k in row)
        by_input.setdefault(row["id"], []).append(row["completion"])
    assert sorted(by_input) == list(range(10))
    assert all(len(set(a)) == len(a) <= 4 for a in by_input.values())  # distinct answers only
    assert sum(map(len, by_input.values())) > 10  # hot sampling gives more than one answer somewhere
    again = tmp_path / "again.jsonl"
    invoke("label", "--teacher", teacher, "--data", inputs["free"], "--out", again, "--max-new-tokens", 3,
           "--samples", 4, "--temperature", 3.0, "--seed", 1)
    assert again.read_text() == out.read_text()  # seeded


@pytest.mark.parametrize("option, error", [
    (["--samples", "3"], "Error: --samples: more than one answer per input needs --temperature above 0 "
                         "(greedy answers are all the same)"),
    (["--top-p", "0.9"], "Error: --top-p: sampling from the nucleus needs --temperature above 0 "
                         "(greedy answers ignore it)"),
])
def test_sampling_options_need_a_temperature(teacher, inputs, tmp_path, option, error):
    r = CliRunner().invoke(cli, ["label", "--teacher", str(teacher), "--data", str(inputs["free"]),
                                 "--out", str(tmp_path / "o.jsonl"), *option])
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1] == error


def test_top_p_samples_from_the_nucleus_after_the_temperature():
    import numpy as np

    from shrink.runtime.base import Sampler

    logits = np.log([0.5, 0.3, 0.15, 0.05])
    assert Sampler(1.0, 0).probabilities(logits) == pytest.approx([0.5, 0.3, 0.15, 0.05])
    # The smallest set of most probable tokens holding top_p, renormalized.
    assert Sampler(1.0, 0, top_p=0.7).probabilities(logits) == pytest.approx([0.625, 0.375, 0, 0])
    assert Sampler(1.0, 0, top_p=0.85).probabilities(logits) == pytest.approx([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])
    assert Sampler(1.0, 0, top_p=0.1).probabilities(logits) == pytest.approx([1, 0, 0, 0])
    # Temperature first: at T = 4 the distribution is flatter, so 0.7 takes three tokens.
    hot = np.exp(logits / 4) / np.exp(logits / 4).sum()
    assert hot[0] + hot[1] < 0.7 <= hot[0] + hot[1] + hot[2]
    assert Sampler(4.0, 0, top_p=0.7).probabilities(logits) == pytest.approx(list(hot[:3] / hot[:3].sum()) + [0])
    sampler = Sampler(1.0, 5, top_p=0.7)
    draws = np.bincount([sampler(logits) for _ in range(4000)], minlength=4)
    assert draws[2] == draws[3] == 0
    assert draws[0] / 4000 == pytest.approx(0.625, abs=0.03)
    with pytest.raises(ValueError):
        Sampler(1.0, 0, top_p=0)


def test_a_tiny_top_p_samples_the_greedy_answers(teacher, inputs, tmp_path):
    greedy, nucleus = tmp_path / "greedy.jsonl", tmp_path / "nucleus.jsonl"
    assert invoke("label", "--teacher", teacher, "--data", inputs["free"], "--out", greedy, "--max-new-tokens", 3).exit_code == 0
    r = invoke("label", "--teacher", teacher, "--data", inputs["free"], "--out", nucleus, "--max-new-tokens", 3,
               "--samples", 4, "--temperature", 3.0, "--top-p", 1e-6, "--seed", 1)
    assert r.exit_code == 0, r.output
    # A nucleus of one token is the most probable one: every sample is the greedy answer.
    assert [(row["id"], row["completion"]) for row in read_rows(nucleus)] == \
           [(row["id"], row["completion"]) for row in read_rows(greedy)]
    assert Manifest.read_from(manifest_path(nucleus)).settings["top_p"] == 1e-6


def test_copied_only_keeps_answers_found_in_their_input():
    from shrink.label import copied

    message = 'Message: Hi, Ada Quill from Zorbu here, order K1234.\nJSON:'
    assert copied(' {"name": "Ada Quill", "city": "Zorbu", "order": "K1234"}', message)
    assert not copied(' {"name": "Ada Quill", "city": "London", "order": "K1234"}', message)  # invented
    assert not copied(' {"name": "Ada Quil", "city": "Zorbu", "order": "K1234"}', message)  # misspelt
    assert copied(' {"people": [{"name": "Ada Quill"}], "n": 1}', message)  # any depth; numbers are not checked
    assert not copied(' {"people": [{"name": "Ada"}, {"name": "Bo"}]}', message)
    assert copied(' Zorbu', message) and not copied(' London', message) and not copied('  ', message)
    assert copied('K1234', message) and not copied('1234', message)  # whole words; a JSON number too


def test_copied_only_leaves_out_answers_not_copied_and_says_how_many(teacher, tmp_path):
    # Half the prompts hold both answers the toy teacher gives, half neither.
    rows = [{"prompt": ("positive or negative? " if i % 2 else "") + r["prompt"], "id": i}
            for i, r in enumerate(tiny.toy_examples(12, seed=3))]
    data = tiny.write_jsonl(tmp_path / "inputs.jsonl", rows)
    every, out = tmp_path / "every.jsonl", tmp_path / "copied.jsonl"
    assert invoke("label", "--teacher", teacher, "--data", data, "--out", every, "--max-new-tokens", 1).exit_code == 0
    r = invoke("label", "--teacher", teacher, "--data", data, "--out", out, "--max-new-tokens", 1, "--copied-only")
    assert r.exit_code == 0, r.output
    labeled = read_rows(every)
    assert {row["completion"].strip() for row in labeled} <= {"positive", "negative"}
    expected = [row for row in labeled if row["completion"].strip() in row["prompt"]]
    assert read_rows(out) == expected and {row["id"] % 2 for row in expected} == {1} and len(expected) >= 4
    dropped = len(labeled) - len(expected)
    m = Manifest.read_from(manifest_path(out))
    assert m.metrics["dropped_not_copied"] == dropped >= 6 and m.metrics["labeled"] == len(expected)
    assert m.settings["copied_only"] is True and not Manifest.read_from(manifest_path(every)).settings["copied_only"]
    assert f"left out {dropped} answers not copied from their input (--copied-only)" in r.output


def test_copied_only_refuses_choice_rows(teacher, inputs, tmp_path):
    r = CliRunner().invoke(cli, ["label", "--teacher", str(teacher), "--data", str(inputs["choices"]),
                                 "--out", str(tmp_path / "x.jsonl"), "--copied-only"])
    assert r.exit_code == 2 and "Error: --copied-only:" in r.output and "choices.jsonl:1 has choices" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x.jsonl").exists()
