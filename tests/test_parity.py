"""Export parity: a faithful GGUF passes and is marked valid; a planted mismatch (the GGUF
built from a corrupted copy of the student) fails with exit 1, naming the worst example."""

from __future__ import annotations

import json

from click.testing import CliRunner

import tiny

from shrink import artifact
from shrink.cli import cli


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
    m = artifact.read_manifest(tmp_path / "q8")
    assert m["valid"] is False and m["metrics"]["parity"]["passed"] is False

    # A threshold loose enough lets it through, and says so in the manifest.
    r = export(teacher, tmp_path / "q8b", task_files["eval"], "--min-top1", "0", "--max-kl", "1000")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["metrics"]["parity"]["thresholds"] == {"min_top1": 0.0, "max_kl": 1000.0, "min_token_match": 1.0}


def test_thresholds_need_eval(teacher, tmp_path):
    r = CliRunner().invoke(cli, ["export", str(teacher), "--target", "gguf", "--out", str(tmp_path / "q"), "--min-top1", "0.5"])
    assert r.exit_code == 2 and "need --eval" in r.stderr
    assert not (tmp_path / "q").exists()
