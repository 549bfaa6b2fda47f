"""`shrink export --target onnx` through the CLI: the artifact, its parity against the
student, eval and run through onnxruntime, and a planted mismatch caught by parity."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import tiny

from shrink.cli import cli
from shrink.manifest import Manifest

pytest.importorskip("onnxruntime")


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def onnx_int8(tmp_path_factory, teacher, task_files):
    out = tmp_path_factory.mktemp("onnx") / "int8"
    r = invoke("export", teacher, "--target", "onnx", "--eval", task_files["eval"], "--out", out, "--json")
    assert r.exit_code == 0, r.output
    return out, json.loads(r.stdout)


def test_onnx_artifact_is_faithful(onnx_int8, teacher):
    out, m = onnx_int8
    assert m["format"] == "onnx" and m["settings"]["quant"] == "int8" and m["valid"] is True  # int8 is the default
    assert {"model.onnx", "config.json", "tokenizer.json"} <= set(m["files"])
    assert m["files"]["model.onnx"]["bytes"] < 0.5 * (teacher / "model.safetensors").stat().st_size
    p = m["metrics"]["parity"]
    assert p["passed"] and p["token_id_match"] == 1.0 and p["top1_agreement"] >= 0.95
    assert m["metrics"]["eval_runtime"] == "onnxruntime" and m["metrics"]["accuracy"] >= 0.9


def test_eval_and_run_on_onnx(onnx_int8, task_files):
    out, m = onnx_int8
    res = json.loads(invoke("eval", out, "--data", task_files["eval"], "--json", "--threads", "1").stdout)
    assert res["results"][0]["runtime"] == "onnxruntime" and res["results"][0]["accuracy"] == m["metrics"]["accuracy"]
    assert res["results"][0]["size_bytes"] == m["files"]["model.onnx"]["bytes"]
    r = invoke("run", out, "Review: the coffee was wonderful\nSentiment:", "--max-tokens", "3")
    assert r.exit_code == 0 and r.stdout.strip().startswith("positive")


def test_planted_mismatch_is_caught(teacher, task_files, tmp_path, monkeypatch):
    import shrink.export.onnx_export as ox

    broken = tiny.corrupted_copy(teacher, tmp_path / "broken")
    real = ox.export_onnx
    monkeypatch.setattr(ox, "export_onnx", lambda student, *a, **k: real(broken, *a, **k))

    out = tmp_path / "fp32"
    r = invoke("export", teacher, "--target", "onnx", "--quant", "fp32", "--eval", task_files["eval"], "--out", out)
    assert r.exit_code == 1, r.output
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"Error: {out}: parity with {teacher} failed (") and "top-1 agreement" in line
    assert Manifest.read(out).valid is False


def test_unknown_onnx_quant_is_refused(teacher, tmp_path):
    r = invoke("export", teacher, "--target", "onnx", "--quant", "int3", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--quant int3: not an ONNX quantization (valid: fp32, int8, int4)" in r.stderr
    assert not (tmp_path / "o").exists()
