"""GPTQ export through GPTQModel on the CPU: a standard checkpoint that transformers loads,
evaluated and run through it, with parity against the student; a planted mismatch fails."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import tiny
from shrink import artifact
from shrink.cli import cli
from shrink.errors import ShrinkError
from shrink.hf import load_causal_lm
from shrink.manifest import Manifest

pytest.importorskip("gptqmodel")


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def small_eval(tmp_path_factory):
    """30 held-out examples: GPTQModel's plain-torch CPU kernel is slow, and parity needs few."""
    return tiny.write_jsonl(tmp_path_factory.mktemp("gptq") / "eval30.jsonl", tiny.toy_examples(30, seed=97))


@pytest.fixture(scope="module")
def gptq4(tmp_path_factory, teacher, small_eval, task_files):
    out = tmp_path_factory.mktemp("gptq4") / "q4"
    cwd = sorted(Path.cwd().iterdir())
    r = invoke("export", teacher, "--target", "gptq", "--bits", "4", "--group-size", "64",
               "--calibration", task_files["train"], "--eval", small_eval, "--out", out, "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert sorted(Path.cwd().iterdir()) == cwd  # GPTQModel's ./logs is kept out of the working directory
    return out, json.loads(r.stdout)


def test_gptq_checkpoint_is_standard_and_faithful(gptq4, teacher, task_files):
    out, m = gptq4
    assert m["format"] == "gptq" and m["valid"] is True
    s = m["settings"]
    assert (s["bits"], s["group_size"], s["desc_act"]) == (4, 64, False)
    assert s["calibration"] == str(task_files["train"]) and s["calibration_examples"] == 256
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"]) == ("gptq", 4, 64)
    assert "quant_log.csv" not in m["files"] and "model.safetensors" in m["files"]

    # Packed 4-bit weights: the decoder's linear layers shrink about 4x (embeddings and
    # head stay 16/32-bit, so the whole file less).
    fp32 = (teacher / "model.safetensors").stat().st_size
    assert m["files"]["model.safetensors"]["bytes"] < 0.5 * fp32

    p = m["metrics"]["parity"]
    assert p["passed"] and p["token_id_match"] == 1.0 and p["top1_agreement"] >= 0.95 and p["mean_kl"] < 0.02
    assert m["metrics"]["eval_runtime"] == "torch+gptqmodel" and m["metrics"]["accuracy"] >= 0.9

    # transformers loads it with GPTQModel's layers in place of nn.Linear.
    model = load_causal_lm(out)
    assert type(model.model.layers[0].mlp.down_proj).__module__.startswith("gptqmodel")


def test_eval_and_run_on_gptq(gptq4, small_eval):
    out, m = gptq4
    r = invoke("eval", out, "--data", small_eval, "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    row = json.loads(r.stdout)["results"][0]
    assert row["runtime"] == "torch+gptqmodel" and row["accuracy"] == m["metrics"]["accuracy"]
    r = invoke("run", out, "Review: the coffee was wonderful\nSentiment:", "--max-tokens", "3", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().startswith("positive")


def test_planted_mismatch_is_caught(teacher, small_eval, task_files, tmp_path, monkeypatch):
    """An 8-bit GPTQ made from a corrupted copy of the student fails parity, exits 1,
    names the worst example and is marked not valid."""
    import shrink.quantize.gptq as gq

    broken = tiny.corrupted_copy(teacher, tmp_path / "broken")
    real = gq.quantize_gptq
    monkeypatch.setattr(gq, "quantize_gptq", lambda student, *a: real(broken, *a))

    out = tmp_path / "q8"
    r = invoke("export", teacher, "--target", "gptq", "--bits", "8", "--calibration", small_eval,
               "--eval", small_eval, "--out", out, "--device", "cpu")
    assert r.exit_code == 1, r.output
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"Error: {out}: parity with {teacher} failed (") and f"worst example {small_eval}:" in line
    m = Manifest.read(out)
    assert m.valid is False and m.metrics["parity"]["thresholds"]["min_top1"] == 0.97


def test_calibration_source_order(tmp_path, task_files):
    from shrink.export.flow import ExportOptions
    from shrink.export.gptq_artifact import calibration_source

    train = tmp_path / "train.jsonl"
    shutil.copy(task_files["train"], train)
    opts = ExportOptions("gptq")
    manifest = Manifest(kind="student", format="hf",
                        settings={"data": str(train), "data_sha256": artifact.sha256_file(train)})
    assert calibration_source(opts, manifest, task_files["eval"]) == train  # the student's own training data
    flag = ExportOptions("gptq", calibration=task_files["eval_gen"])
    assert calibration_source(flag, manifest, task_files["eval"]) == task_files["eval_gen"]
    train.write_text(train.read_text().splitlines()[0] + "\n")  # changed since distill
    assert calibration_source(opts, manifest, task_files["eval"]) == task_files["eval"]
    with pytest.raises(ShrinkError, match="--calibration"):
        calibration_source(opts, manifest, None)


@pytest.mark.parametrize("args, message", [
    (["--target", "gptq", "--quant", "Q4_K_M"], "--quant is for gguf and onnx; GPTQ takes --bits and --group-size"),
    (["--target", "gptq", "--bits", "3"], "Invalid value for '--bits': '3' is not one of '4', '8'."),
    (["--target", "gptq", "--group-size", "100"], "--group-size 100: use -1 or a power of two >= 16 (32, 64, 128)"),
    (["--target", "gguf", "--bits", "4"], "--bits: only for --target gptq, not gguf"),
    (["--target", "onnx", "--calibration", "x.jsonl"], "--calibration: only for --target gptq or gguf, not onnx"),
    (["--target", "gguf", "--calibration", "x.jsonl"],
     "--calibration: for gguf only with --imatrix (the importance matrix's data)"),
    (["--target", "gptq", "--imatrix"], "--imatrix: only for --target gguf, not gptq"),
    (["--target", "gptq"], "GPTQ needs calibration data: pass --calibration FILE (task JSONL) or --eval FILE"),
])
def test_option_errors(teacher, tmp_path, args, message):
    r = invoke("export", teacher, "--out", tmp_path / "out", *args)
    assert r.exit_code == 2, r.output
    assert r.stderr.strip().splitlines() == [f"Error: {message}"] and "Traceback" not in r.output
    assert not (tmp_path / "out").exists()
