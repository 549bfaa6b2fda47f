"""Export parity: a faithful GGUF passes and is marked valid; a planted mismatch (the GGUF
built from a corrupted copy of the student) fails with exit 1, naming the worst example."""

from __future__ import annotations

import json

from click.testing import CliRunner

import tiny

from shrink.cli import cli
from shrink.export.parity import DRIFT_SUITE, Thresholds, drift, drifted, verdict
from shrink.manifest import Manifest


def export(student, out, eval_file, *extra):
    return CliRunner().invoke(cli, [str(a) for a in (
        "export", student, "--target", "gguf", "--quant", "Q8_0", "--eval", eval_file, "--out", out, "--json", *extra)])


def test_faithful_export_passes(teacher, task_files, tmp_path):
    r = export(teacher, tmp_path / "q8", task_files["eval"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    p = m["metrics"]["parity"]
    assert m["valid"] is True and p["passed"] is True
    assert p["token_id_match"] == 1.0 and p["top1_agreement"] >= 0.97 and p["mean_kl"] < 0.02
    assert p["prompts"] == 64 and p["worst_example"]["where"].startswith(str(task_files["eval"]))
    # The drift suite, with the student's own special tokens as text last: one text drifts, a
    # warning. llama.cpp's SentencePiece tokenizer joins any two pieces whose text is a token,
    # control tokens included; this vocabulary has '<' and '/s>', so "<s></s>" typed as text
    # ends in the EOS id there, and in '<', '/s>' in Hugging Face's.
    specials = "<s> </s> <unk> <pad> <s></s><unk><pad>"
    assert p["suite"]["total"] == len(DRIFT_SUITE) + 1 and p["suite"]["texts"][-1]["text"] == specials
    assert [t["text"] for t in p["suite"]["texts"] if not t["ids_equal"]] == [specials]
    assert "on 1 of 23 drift-suite texts" in r.stderr and repr(specials) in r.stderr


def test_planted_mismatch_is_caught(teacher, task_files, tmp_path, monkeypatch):
    import shrink.export.gguf_artifact as ga

    broken = tiny.corrupted_copy(teacher, tmp_path / "broken")
    real_build = ga._build
    monkeypatch.setattr(ga, "_build", lambda student, dst, *a: real_build(broken, dst, *a))

    r = export(teacher, tmp_path / "q8", task_files["eval"])
    assert r.exit_code == 1, r.output
    line = r.stderr.strip().splitlines()[-1]  # after the evaluation progress bar
    assert line.startswith(f"Error: {tmp_path / 'q8'}: parity with {teacher} failed (")
    assert "top-1 agreement" in line and f"worst example {task_files['eval']}:" in line
    m = Manifest.read(tmp_path / "q8")
    assert m.valid is False and m.metrics["parity"]["passed"] is False

    # A threshold loose enough lets it through, and says so in the manifest.
    r = export(teacher, tmp_path / "q8b", task_files["eval"], "--min-top1", "0", "--max-kl", "1000")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["metrics"]["parity"]["thresholds"] == {"min_top1": 0.0, "max_kl": 1000.0, "min_token_match": 1.0,
                                                                       "min_suite_match": 0.0}


def test_thresholds_need_eval(teacher, tmp_path):
    for flag in (["--min-top1", "0.5"], ["--strict-tokenizer"]):
        r = CliRunner().invoke(cli, ["export", str(teacher), "--target", "gguf", "--out", str(tmp_path / "q"), *flag])
        assert r.exit_code == 2 and r.stderr == ("Error: --min-top1/--max-kl/--strict-tokenizer need --eval (parity "
                                                 "is measured on the evaluation prompts)\n")
    assert not (tmp_path / "q").exists()


class Encoder:
    """A Runtime's tokenizer half: ids from a function."""

    def __init__(self, fn):
        self.encode = fn


def test_drift_is_recorded_per_text_and_fails_only_when_strict():
    reference = Encoder(lambda text: [ord(c) for c in text])
    candidate = Encoder(lambda text: [ord(c) for c in text.lstrip(" ")])  # drops leading spaces
    texts = ["a", " b", "  c"]
    suite = drift(reference, candidate, texts)
    assert suite == {"texts": [{"text": "a", "ids_equal": True}, {"text": " b", "ids_equal": False},
                               {"text": "  c", "ids_equal": False}], "equal": 1, "total": 3, "token_id_match": 0.3333}
    figures = {"token_id_match": 1.0, "top1_agreement": 1.0, "mean_kl": 0.0, "suite": suite}
    assert drifted(figures) == [" b", "  c"]
    assert verdict(figures, Thresholds(0.9, 0.1)) == []
    assert verdict(figures, Thresholds(0.9, 0.1, min_suite_match=1.0)) == [
        "tokenizer ids differ on 2 of 3 drift-suite texts (' b', '  c')"]


class Chars:
    """A Runtime over characters: BOS 0, then each character's code. Its logits put `peak`
    on the next character's code, and on `pick(ids, i)` instead where that gives a token."""

    def __init__(self, pick=lambda ids, i: None, tie=False):
        self.pick, self.tie = pick, tie

    def encode(self, text, special=False):
        return [0] + [ord(c) for c in text]

    def logits(self, ids):
        import numpy as np

        out = np.zeros((len(ids), 128), dtype=np.float32)
        for i, tok in enumerate(ids):
            chosen = self.pick(ids, i)
            out[i, chosen if chosen is not None else (tok + 1) % 128] = 10.0
            if self.tie:  # a second token 0.001 nats from the best: the student does not decide
                out[i, (tok + 2) % 128] = 9.999
        return out


def test_parity_is_judged_where_serving_reads_the_model():
    from shrink.export.parity import measure
    from shrink.tasks import Example

    rows = [Example("ABC:", " xy"), Example("DE:", " p", choices=(" p", " q"))]  # labeled: scored as choices
    where = ["eval.jsonl:1", "eval.jsonl:2"]
    student = Chars()

    def prompt_only(ids, i):  # disagrees on a prompt's own letters (and BOS), never after them
        return 5 if ids[i] == 0 or chr(ids[i]).isupper() else None

    # Judged: ':' (it picks the first answer token), ' ', 'x', 'y' (it decides to stop);
    # the choices' ':' once and each one's ' ', never a choice's last token. The prompts'
    # own positions are recorded only: a completion-only student never learned them.
    p = measure(student, Chars(prompt_only), rows, where, suite=[])
    assert p["judged"] == "answer positions" and p["positions"] == 4 + 1 + 2
    assert p["top1_agreement"] == 1.0 and p["mean_kl"] < 1e-4
    assert p["prompt_positions"]["positions"] == 4 + 3 and p["prompt_positions"]["top1_agreement"] == 0.0
    assert verdict(p, Thresholds(0.85, 0.15)) == []

    def answers_too(ids, i):  # also wrong on the answers' tokens
        return 5 if ids[i] == 0 or chr(ids[i]).isupper() or chr(ids[i]) in "xy" else None

    p = measure(student, Chars(answers_too), rows, where, suite=[])
    assert p["top1_agreement"] == round((7 - 2) / 7, 4) and p["worst_example"]["where"] == "eval.jsonl:1"
    assert verdict(p, Thresholds(0.85, 0.15)) == ["top-1 agreement 71.4% < 85%", f"mean KL {p['mean_kl']:.4f} > 0.15"]

    # A near-tie in the student is not a disagreement, whichever of the two the export picks.
    tied = Chars(tie=True)
    p = measure(tied, Chars(lambda ids, i: (ids[i] + 2) % 128), rows, where, suite=[])
    assert p["top1_agreement"] == 1.0 and p["prompt_positions"]["top1_agreement"] == 1.0

    # Rows without answers are judged on their prompts' positions.
    p = measure(student, Chars(prompt_only), [Example("ABC:", None)], where, suite=[])
    assert p["judged"] == "prompt positions" and p["positions"] == 5 and p["top1_agreement"] == 0.2
