"""Device targets end to end on a tiny model: the ladder picks the smallest rung that meets
every constraint, an impossible target exits 1 naming the constraint and the closest
candidate, the bundle's contents and manifest, `shrink verify`, and the task-aware
importance matrix (an IQ type that needs one)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from shrink import artifact
from shrink.cli import cli


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def student(tmp_path_factory, teacher, task_files):
    """The tiny teacher as a shrink student of itself: its manifest holds the teacher's and
    its own accuracy on the evaluation file, measured here, as distill --eval records them."""
    from shrink.evaluate import evaluate
    from shrink.runtime.torch_runtime import TorchRuntime
    from shrink.tasks import load_task

    folder = tmp_path_factory.mktemp("target") / "student"
    rt = TorchRuntime(teacher, device="cpu")
    acc = evaluate(rt, load_task(task_files["eval"])).accuracy
    rt.close()
    with artifact.staged_folder(folder, force=False) as tmp:
        for f in teacher.iterdir():
            shutil.copy2(f, tmp / f.name)
        artifact.finish(tmp, kind="student", format="hf", source=teacher,
                        settings={"data": str(task_files["train"]), "data_sha256": artifact.sha256_file(task_files["train"]),
                                  "layers_kept": [0, 1, 2, 3], "steps": 0},
                        metrics={"accuracy": acc, "teacher_accuracy": acc,
                                 "eval_data_sha256": artifact.sha256_file(task_files["eval"])})
    return folder


def targets_file(tmp_path, quants=("Q8_0", "Q6_K", "Q4_K_M"), **keys) -> str:
    lines = ["[targets.tiny]", 'description = "a test device"', 'runtime = "llama.cpp"', 'formats = ["gguf"]',
             f"quants = {list(quants)}".replace("'", '"'), "threads = 1"]
    lines += [f"{k} = {v}" for k, v in keys.items()]
    path = tmp_path / "targets.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, student, task_files):
    d = tmp_path_factory.mktemp("bundle")
    tf = targets_file(d, max_size_mb=10, max_ram_mb=4000, min_retention=0.9, max_accuracy_drop=0.03,
                      context_length=256)
    r = invoke("export", student, "--target", "tiny", "--targets", tf, "--eval", task_files["eval"],
               "--out", d / "tiny-bundle", "--json")
    assert r.exit_code == 0, r.output
    return d / "tiny-bundle", json.loads(r.stdout), r


def test_ladder_picks_the_smallest_rung_that_meets_every_constraint(bundle):
    folder, m, r = bundle
    cands = {c["quant"]: c for c in m["metrics"]["candidates"]}
    assert list(cands) == ["Q8_0", "Q6_K", "Q4_K_M"] and all(c["met"] for c in cands.values())
    assert cands["Q4_K_M"]["size_bytes"] < cands["Q6_K"]["size_bytes"] < cands["Q8_0"]["size_bytes"]
    assert m["settings"]["quant"] == "Q4_K_M" and m["kind"] == "bundle" and m["format"] == "gguf"
    for c in cands.values():  # measured through llama.cpp in a process of its own
        assert 5 < c["peak_ram_mb"] < 4000 and c["eval_runtime"] == "llama.cpp" and c["threads"] == 1
    t = m["target"]
    assert t["name"] == "tiny" and t["met"] is True
    assert set(t["constraints"]) == {"max_size_mb", "max_ram_mb", "min_retention", "max_accuracy_drop", "parity"}
    assert t["constraints"]["max_size_mb"]["value"] == round(cands["Q4_K_M"]["size_bytes"] / 1e6, 2)
    assert t["constraints"]["min_retention"]["value"] == m["metrics"]["retention"] >= 0.9
    assert "Q4_K_M" in r.stderr and "meets all" in r.stderr  # the candidates table


def test_bundle_contents_and_provenance(bundle, student, teacher):
    folder, m, _ = bundle
    assert sorted(p.name for p in folder.iterdir()) == ["Modelfile", "README.md", "manifest.json", "model-Q4_K_M.gguf",
                                                        "run.py"]
    assert [p["stage"] for p in m["provenance"]] == ["teacher", "student", "artifact"]
    assert m["provenance"][0]["path"] == str(teacher)
    assert m["provenance"][1]["manifest_sha256"] == artifact.manifest_hash(student)
    assert (folder / "Modelfile").read_text().startswith("FROM ./model-Q4_K_M.gguf\n")
    assert "PARAMETER num_ctx 256\n" in (folder / "Modelfile").read_text()
    card = (folder / "README.md").read_text()
    assert card.startswith("# tiny-bundle\n") and "`min_retention` | 0.9 |" in card and "shrink verify tiny-bundle" in card
    out = subprocess.run([sys.executable, str(folder / "run.py"), "Review: the coffee was wonderful\nSentiment:"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "positive"


def test_peak_ram_is_run_py_serving_the_targets_context(bundle, student, task_files, tmp_path):
    """The RAM figure is a process running the bundle's run.py, with the target's context:
    llama.cpp allocates its KV cache for all of n_ctx when the model loads. The tiny
    model's f16 cache takes 2 KiB a token (4 layers x 2 KV heads x 64 x K and V), so
    32768 tokens hold 64 MiB more than 256 do."""
    small = {c["quant"]: c for c in bundle[1]["metrics"]["candidates"]}["Q8_0"]
    tf = targets_file(tmp_path, quants=["Q8_0"], max_ram_mb=4000, context_length=32768)
    r = invoke("export", student, "--target", "tiny", "--targets", tf, "--eval", task_files["eval"],
               "--out", tmp_path / "long", "--json")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    large = m["metrics"]["candidates"][0]
    served = {"script": "run.py", "runtime": "llama.cpp", "threads": 1, "device": "cpu", "logits_all": False,
              "max_tokens": 16}
    assert small["ram_measured_with"] == {**served, "context_length": 256}
    assert large["ram_measured_with"] == m["metrics"]["ram_measured_with"] == {**served, "context_length": 32768}
    assert small["context_length"] == 256 and large["context_length"] == 32768  # the scoring process's too
    assert large["peak_ram_mb"] - small["peak_ram_mb"] > 50, (small["peak_ram_mb"], large["peak_ram_mb"])
    assert m["target"]["constraints"]["max_ram_mb"]["value"] == large["peak_ram_mb"]
    run = (tmp_path / "long" / "run.py").read_text()  # what was measured is what ships
    assert "n_ctx=32768, n_threads=1, n_threads_batch=1, logits_all=False," in run
    assert "n_ctx=256, " in (bundle[0] / "run.py").read_text()
    assert "running run.py: context 32768 tokens, threads 1" in (tmp_path / "long" / "README.md").read_text()


def test_onnx_bundle_is_measured_as_its_run_py_serves(student, task_files, tmp_path):
    """An onnxruntime target: run.py (shrink's onnxruntime loop) gets the target's context
    length and threads, and is what the RAM figure ran."""
    tf = tmp_path / "targets.toml"
    tf.write_text('[targets.server]\ndescription = "a test server"\nruntime = "onnxruntime"\nformats = ["onnx"]\n'
                  'quants = ["int8"]\nthreads = 1\ncontext_length = 64\nmax_ram_mb = 4000\n')
    r = invoke("export", student, "--target", "server", "--targets", tf, "--eval", task_files["eval"],
               "--out", tmp_path / "b", "--json")
    assert r.exit_code == 0, r.output
    metrics = json.loads(r.stdout)["metrics"]
    assert metrics["ram_measured_with"] == {"script": "run.py", "runtime": "onnxruntime", "context_length": 64,
                                            "threads": 1, "device": "cpu", "max_tokens": 16, "logits_all": None}
    assert metrics["eval_runtime"] == "onnxruntime" and 5 < metrics["peak_ram_mb"] < 4000
    run = tmp_path / "b" / "run.py"
    assert "OnnxRuntime(here, threads=1, context_length=64)" in run.read_text()
    out = subprocess.run([sys.executable, str(run), "Review: the service was dreadful\nSentiment:"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "negative"


def test_serving_measurement_runs_the_script_as_python_would(tmp_path):
    """The serving child runs the script as __main__ with no arguments and this very
    shrink on its path, and reports its own peak resident memory."""
    import shrink
    from shrink.errors import ShrinkError
    from shrink.measure import serving_peak_ram_mb

    seen = tmp_path / "seen.json"
    script = tmp_path / "run.py"
    script.write_text("import json, sys, shrink\n"
                      "block = b'x' * 300_000_000  # resident: every page written\n"
                      f"json.dump([__name__, sys.argv, shrink.__file__, sys.path[0]], open({str(seen)!r}, 'w'))\n")
    assert 300 < serving_peak_ram_mb(script) < 600
    assert json.loads(seen.read_text()) == ["__main__", [str(script)], shrink.__file__, str(tmp_path)]
    script.write_text("raise SystemExit(3)\n")
    with pytest.raises(ShrinkError, match=r"running .*run.py failed \(exit code 3"):
        serving_peak_ram_mb(script)


def test_run_eval_and_verify_on_the_bundle(bundle, task_files, tmp_path):
    folder, m, _ = bundle
    r = invoke("run", folder, "Review: the service was dreadful\nSentiment:", "--max-tokens", "2")
    assert r.exit_code == 0 and r.stdout.strip() == "negative"
    r = invoke("eval", folder, "--data", task_files["eval"], "--json")
    assert json.loads(r.stdout)["results"][0]["accuracy"] == m["metrics"]["accuracy"]
    assert invoke("verify", folder).exit_code == 0

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    model = copy / "model-Q4_K_M.gguf"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one changed byte, same size
    model.write_bytes(bytes(data))
    (copy / "extra.txt").write_text("x")
    r = invoke("verify", copy)
    assert r.exit_code == 1
    assert r.stderr.strip() == (f"Error: {copy}: 2 problem(s): model-Q4_K_M.gguf: changed (sha256 differs from the "
                                f"manifest); extra.txt: not in the manifest")


def test_impossible_target_exits_1_naming_constraint_and_closest(student, task_files, tmp_path):
    tf = targets_file(tmp_path, max_size_mb=0.1)
    out = tmp_path / "never"
    r = invoke("export", student, "--target", "tiny", "--targets", tf, "--eval", task_files["eval"], "--out", out)
    assert r.exit_code == 1, r.output
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: no candidate meets target tiny: closest is gguf Q4_K_M (")
    assert "which fails max_size_mb (" in line and "> 0.1)" in line
    assert not out.exists() and not list(tmp_path.glob(".never*"))  # nothing half-written


def test_retention_needs_the_teachers_accuracy(teacher, task_files, tmp_path):
    """A folder with no shrink manifest has no teacher figure: min_retention cannot be met."""
    tf = targets_file(tmp_path, min_retention=0.5)
    r = invoke("export", teacher, "--target", "tiny", "--targets", tf, "--eval", task_files["eval"],
               "--out", tmp_path / "b")
    assert r.exit_code == 1 and "min_retention (not measured: the teacher's accuracy" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--target", "tiny", "--quant", "Q4_K_M"], "--quant: a device target's ladder and settings decide these"),
    (["--target", "nowhere"], "--target nowhere: no such target in"),
    (["--target", "tiny"], "--target tiny: needs --eval"),
])
def test_device_target_option_errors(student, tmp_path, args, message):
    r = invoke("export", student, "--targets", targets_file(tmp_path), "--out", tmp_path / "o", *args)
    assert r.exit_code == 2 and message in r.stderr, r.output
    assert not (tmp_path / "o").exists()


def test_imatrix_enables_the_types_that_need_one(student, task_files, tmp_path):
    r = invoke("export", student, "--target", "gguf", "--quant", "IQ2_XS", "--out", tmp_path / "no")
    assert r.exit_code == 2 and "--quant IQ2_XS needs an importance matrix: add --imatrix" in r.stderr
    assert not (tmp_path / "no").exists()

    r = invoke("export", student, "--target", "gguf", "--quant", "IQ2_XS", "--imatrix", "--eval", task_files["eval"],
               "--out", tmp_path / "iq2", "--json")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["settings"]["imatrix"]["calibration"] == str(task_files["train"])  # the student's training data
    assert m["valid"] and m["metrics"]["accuracy"] >= 0.85
    iq2 = m["files"]["model-IQ2_XS.gguf"]["bytes"]
    f16 = (student / "model.safetensors").stat().st_size / 2
    assert iq2 < 0.3 * f16


def test_imatrix_follows_the_activations(student, task_files):
    """The matrix is E[x^2] per input column, by GGUF tensor name, over texts spread over
    the whole file: checked against a direct computation for one layer on 8 of 12 texts
    (the first 8 would leave the file's end out)."""
    import torch

    from shrink.hf import load_causal_lm, load_tokenizer
    from shrink.quantize.imatrix import compute_imatrix
    from shrink.tasks import load_task, spread

    every = [ex.prompt + ex.completion for ex in load_task(task_files["eval"])][:12]
    data = compute_imatrix(student, every, max_rows=8)
    texts = spread(every, 8)
    assert texts == [every[i] for i in (0, 1, 3, 4, 6, 7, 9, 10)] != every[:8]  # not the first 8
    layers = load_causal_lm(student).config.num_hidden_layers
    assert set(data) == {f"blk.{i}.{t}.weight" for i in range(layers)
                         for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}

    model, tok = load_causal_lm(student), load_tokenizer(student)
    seen = []
    h = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0][0]))
    with torch.no_grad():
        for t in texts:
            model(input_ids=torch.tensor([tok(t).input_ids]))
    h.remove()
    x = torch.cat(seen)
    assert torch.allclose(torch.from_numpy(data["blk.1.ffn_down.weight"]), (x * x).mean(0), rtol=1e-4)
