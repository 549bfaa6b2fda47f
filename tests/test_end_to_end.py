"""The whole path through the CLI: distill -> export GGUF (Q8_0, Q4_K_M) -> eval -> run."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from shrink import artifact
from shrink.cli import cli
from shrink.manifest import Manifest


def ok(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def built(tmp_path_factory, teacher, task_files):
    d = tmp_path_factory.mktemp("e2e")
    r = ok("distill", "--teacher", teacher, "--data", task_files["train"], "--eval", task_files["eval"],
           "--out", d / "student", "--layers", "2", "--steps", "80", "--batch-size", "16", "--lr", "1e-3",
           "--device", "cpu", "--json")
    student_manifest = json.loads(r.stdout)
    exports = {}
    for quant in ("Q8_0", "Q4_K_M"):
        r = ok("export", d / "student", "--target", "gguf", "--quant", quant, "--eval", task_files["eval"],
               "--out", d / quant, "--json")
        exports[quant] = json.loads(r.stdout)
    return d, student_manifest, exports


def test_student_manifest_and_accuracy(built):
    d, m, _ = built
    assert m["metrics"]["teacher_accuracy"] >= 0.9  # the tiny teacher knows the toy task
    assert m["metrics"]["accuracy"] >= 0.9
    assert m["metrics"]["retention"] == pytest.approx(m["metrics"]["accuracy"] / m["metrics"]["teacher_accuracy"], abs=1e-3)
    assert m["metrics"]["parameters"] < m["metrics"]["teacher_parameters"]
    assert Manifest.read(d / "student").to_dict() == m


def test_exports_are_complete_artifacts(built):
    d, student, exports = built
    sizes = {}
    for quant, m in exports.items():
        folder = d / quant
        assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", f"model-{quant}.gguf"]
        assert m["kind"] == "export" and m["format"] == "gguf" and m["settings"]["quant"] == quant
        f = m["files"][f"model-{quant}.gguf"]
        assert f["sha256"] == artifact.sha256_file(folder / f"model-{quant}.gguf")
        assert m["source"]["manifest_sha256"] == artifact.manifest_hash(d / "student")
        assert m["metrics"]["eval_runtime"] == "llama.cpp"
        assert m["metrics"]["accuracy"] >= 0.85
        assert m["metrics"]["teacher_accuracy"] == student["metrics"]["teacher_accuracy"]
        assert m["metrics"]["retention"] is not None
        assert m["valid"] is True and m["metrics"]["parity"]["passed"] is True
        assert m["metrics"]["parity"]["token_id_match"] == 1.0
        sizes[quant] = f["bytes"]
    assert sizes["Q4_K_M"] < sizes["Q8_0"]


def test_eval_json_with_teacher(built, teacher, task_files):
    d, _, exports = built
    r = ok("eval", d / "Q4_K_M", "--data", task_files["eval"], "--teacher", teacher, "--json")
    res = json.loads(r.stdout)
    art, tea = res["results"]
    assert art["runtime"] == "llama.cpp" and tea["runtime"] == "torch"
    assert art["examples"] == tea["examples"] == 100
    assert art["accuracy"] == exports["Q4_K_M"]["metrics"]["accuracy"]  # same runtime, same data
    assert res["retention"] == pytest.approx(art["accuracy"] / tea["accuracy"], abs=1e-3)
    assert art["size_bytes"] < tea["size_bytes"]


def test_eval_exact_match_on_gguf_and_torch(built, task_files):
    d, _, _ = built
    for target in (d / "Q8_0", d / "student"):
        res = json.loads(ok("eval", target, "--data", task_files["eval_gen"], "--json").stdout)
        assert res["results"][0]["accuracy"] >= 0.8, (target, res)


def test_run_generates_the_label(built):
    d, _, _ = built
    prompt = "Review: the coffee was wonderful\nSentiment:"
    for target in (d / "Q8_0", d / "Q4_K_M", d / "student"):
        r = ok("run", target, prompt, "--max-tokens", "3")
        assert r.stdout.strip().startswith("positive"), (target, r.stdout)
