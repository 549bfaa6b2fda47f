"""`shrink eval --metric`, the generation budget, and `--reference teacher`."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import tiny
from shrink.cli import cli
from shrink.evaluate import Generation, answers, evaluate
from shrink.metrics import METRICS
from shrink.runtime import open_runtime
from shrink.tasks import load_task


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("metric", ["exact", "f1", "chrf", "rouge-l"])
def test_each_metric_scores_the_runtimes_answers(teacher, task_files, metric):
    r = run("eval", teacher, "--data", task_files["eval_gen"], "--metric", metric, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["metric"] == metric and res["results"][0]["metric"] == metric
    examples = load_task(task_files["eval_gen"])
    predicted = answers(open_runtime(teacher, device="cpu"), examples)
    expected = METRICS[metric].score(predicted, [ex.completion for ex in examples])
    assert res["results"][0]["accuracy"] == pytest.approx(expected)
    assert 0.5 < expected <= 1  # the teacher learned the toy task


def test_the_budget_is_an_option_not_the_references_length(teacher, task_files, tmp_path):
    rows = tiny.toy_examples(6, seed=98, choices=False)
    short = tiny.write_jsonl(tmp_path / "short.jsonl", rows)
    long = tiny.write_jsonl(tmp_path / "long.jsonl", [{**r, "completion": r["completion"] * 20} for r in rows])
    rt = open_runtime(teacher, device="cpu")
    budgets = []
    real = rt.generate
    rt.generate = lambda prompt, max_tokens, stop=(), stop_ids=frozenset(), sampler=None: (
        budgets.append((max_tokens, stop)) or real(prompt, max_tokens, stop, stop_ids, sampler))
    evaluate(rt, load_task(short))
    evaluate(rt, load_task(long))
    evaluate(rt, load_task(short), generation=Generation(max_new_tokens=3, stop=("",)))
    assert budgets == [(64, ("\n",))] * 12 + [(3, ())] * 6


def test_reference_teacher_scores_agreement_without_labels(teacher, tmp_path):
    inputs = tiny.write_jsonl(tmp_path / "in.jsonl", [{"prompt": r["prompt"]} for r in
                                                     tiny.toy_examples(8, seed=98, choices=False)])
    r = run("eval", teacher, "--data", inputs, "--teacher", teacher, "--reference", "teacher", "--metric", "chrf",
            "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    art, tea = res["results"]
    assert (art["role"], tea["role"], res["reference"]) == ("artifact", "teacher", "teacher")
    assert art["accuracy"] == pytest.approx(1.0)  # the same model agrees with itself
    table = run("eval", teacher, "--data", inputs, "--teacher", teacher, "--reference", "teacher")
    assert "agreement with the teacher (exact): 100.0%" in table.output  # exact: the default for answers


@pytest.mark.parametrize("args, error", [
    (["--metric", "json"], "Error: {data}:1: --metric json needs a JSON object as the reference, and this one is "
                           "not JSON (Expecting value at column 2)"),
    (["--metric", "choice"], "Error: {data}:1: --metric choice needs 'choices' in every row"),
    (["--reference", "teacher"], "Error: --reference teacher needs --teacher"),
    (["--chat-template", "auto"], "Error: --chat-template auto: {teacher} has no chat template (give a Jinja file, "
                                  "or --chat-template none for raw prompts)"),
])
def test_bad_metric_settings_are_one_line(teacher, task_files, args, error):
    r = run("eval", teacher, "--data", task_files["eval_gen"], *args)
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines()[-1] == error.format(data=task_files["eval_gen"], teacher=teacher)


def test_an_unknown_metric_is_refused(teacher, task_files):
    r = run("eval", teacher, "--data", task_files["eval_gen"], "--metric", "bleu")
    assert r.exit_code == 2
    assert "Invalid value for '--metric': 'bleu' is not one of 'choice', 'exact', 'f1', 'chrf', 'rouge-l', 'json'" \
        in r.output.strip().splitlines()[-1]


def test_messages_without_a_template_name_the_line(teacher, tmp_path):
    data = tiny.write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                                    {"role": "assistant", "content": "x"}]}])
    r = run("eval", teacher, "--data", data, "--chat-template", "none")
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1] == (f"Error: {data}:1: a row with 'messages' needs a chat template "
                                                 "(--chat-template auto or FILE)")
