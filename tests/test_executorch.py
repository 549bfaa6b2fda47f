"""`shrink export --target executorch`: tiny Llama, Qwen2 and Gemma 3 students exported to
.pte (fp32 and 8da4w; Qwen3 in fp32) through the CLI, each checked against torch through ExecuTorch's own
runtime: logits, incremental decoding on the program's KV cache, greedy text, parity
figures in the manifest; eval and run on a .pte; ExecuTorch's LLM runner (what an
Android or iOS app links) loading the program; a planted corrupted weight caught by parity;
an unsupported family, bad options and a broken .pte refused; a device-target bundle
served by ExecuTorch.

Lowering to XNNPACK dominates the run time (30-60 s of one core an export), so each
(family, quant) is exported once per module, two at a time, and shared by the tests
(`exports`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("executorch", reason="the executorch extra is not installed (pip install 'shrink[executorch]')")

import tiny  # noqa: E402
import tiny_families  # noqa: E402
from shrink.cli import cli  # noqa: E402
from shrink.manifest import Manifest  # noqa: E402
from shrink.runtime.executorch_runtime import ExecuTorchRuntime  # noqa: E402
from shrink.runtime.torch_runtime import TorchRuntime  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ["llama", "qwen2", "gemma3"]
QUANTS = ["fp32", "8da4w"]
FP32_FAMILIES = FAMILIES + ["qwen3"]  # Qwen3 differs from Qwen2 by its per-head q/k norms: fp32 checks them
CONTEXT = 128  # --max-context: the static KV cache, tokens
WINDOW = 16  # the tiny Gemma 3's sliding window (tiny_families.build_model); LONG goes three times past it
LONG = " ".join([r["prompt"] + r["completion"] for r in tiny.toy_examples(3, seed=11)] + tiny.PARITY_SUITE[1:4])
PROMPTS = [r["prompt"] for r in tiny.toy_examples(5, seed=12, choices=False)] + tiny.PARITY_SUITE[:3]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@dataclass
class Exported:
    student: Path  # the Hugging Face folder
    out: Path  # the export folder
    manifest: dict


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory) -> Path:
    return tiny.write_jsonl(tmp_path_factory.mktemp("task") / "eval.jsonl", tiny.toy_examples(24, seed=99))


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    """family -> a 2-layer, 64-wide student with its family's tokenizer files, chat template
    and generation config, trained briefly so that its next tokens are peaked."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            rows = tiny.toy_examples(300, seed=3)
            cache[family] = tiny_families.make_teacher(tmp_path_factory.mktemp(family) / "student", family, rows,
                                                       steps=40, layers=2, hidden=64)
        return cache[family]

    return get


@pytest.fixture(scope="module")
def exports(tmp_path_factory, students, eval_file):
    """(family, quant) -> Exported: every family in fp32 and 8da4w through `shrink export
    --target executorch --eval`, in processes of their own, as many at a time as there are
    cores (two in CI): lowering is single-threaded Python, so this halves the wait."""
    root = tmp_path_factory.mktemp("exports")
    keys = [(family, quant) for family in FAMILIES for quant in QUANTS] + [("qwen3", "fp32")]
    jobs = {key: root / "-".join(key) for key in keys}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

    def export(job):
        (family, quant), out = job
        cmd = [sys.executable, "-m", "shrink", "export", str(students(family)), "--target", "executorch",
               "--quant", quant, "--max-context", str(CONTEXT), "--eval", str(eval_file), "--out", str(out),
               "--threads", "1", "--json"]
        return subprocess.run(cmd, capture_output=True, text=True, env=env)

    for family in FP32_FAMILIES:  # trained here, one after the other, before the exports start
        students(family)
    with ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
        done = dict(zip(jobs, pool.map(export, jobs.items())))
    cache = {}
    for key, r in done.items():
        assert r.returncode == 0, f"{key}: {r.stderr[-3000:]}"
        cache[key] = Exported(students(key[0]), jobs[key], json.loads(r.stdout))
    return lambda family, quant: cache[family, quant]


@pytest.fixture(scope="module", params=FP32_FAMILIES)
def fp32(request, exports) -> Exported:
    return exports(request.param, "fp32")


def _runtimes(exp: Exported) -> tuple[TorchRuntime, ExecuTorchRuntime]:
    return TorchRuntime(exp.student, device="cpu"), ExecuTorchRuntime(exp.out, threads=1)


def _copy_of(exp: Exported):
    """A stand-in for the .pte build step that writes `exp`'s files (the export is the
    module's, already lowered), so a test exercises the rest of the flow without lowering
    again."""
    def build(student, tmp, opts, source_manifest):
        for f in exp.out.iterdir():
            if f.name != "manifest.json":
                shutil.copy2(f, tmp / f.name)
        return {k: v for k, v in exp.manifest["settings"].items() if k != "target"}  # the flow adds it

    return build


def _rel_diff(got: np.ndarray, expected: np.ndarray) -> float:
    """max |got - expected| relative to the logit scale."""
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def test_export_writes_an_app_ready_folder(fp32):
    m, student = fp32.manifest, fp32.student
    assert m["kind"] == "export" and m["format"] == "pte" and m["valid"] is True
    names = set(m["files"])
    assert {"model.pte", "tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json",
            "special_tokens_map.json"} <= names
    assert ("tokenizer.model" in names) == (student / "tokenizer.model").is_file()  # SentencePiece families
    assert ("chat_template.jinja" in names) == (student / "chat_template.jinja").is_file()  # else in tokenizer_config
    s = m["settings"]
    assert s["target"] == "executorch" and s["quant"] == "fp32" and s["group_size"] is None
    assert s["max_context"] == CONTEXT and s["backend"] == "XNNPACK" and s["files"] == sorted(names)
    tok = TorchRuntime(student, device="cpu").tokenizer
    assert s["metadata"]["get_max_context_len"] == CONTEXT and s["metadata"]["get_vocab_size"] == len(tok)
    assert s["metadata"]["get_bos_id"] == (tok.bos_token_id if tok.bos_token_id is not None else -1)
    # the export's own check: a whole sequence, then a token a call, against torch (measured: 5e-7 of the
    # logit scale for llama and qwen2, 1e-4 for gemma3)
    check = s["self_check"]
    assert check["max_abs_diff"] < 5e-4 * check["logit_scale"] and check["tokens"] == CONTEXT
    p = m["metrics"]["parity"]  # against the Hugging Face student, as every export
    assert p["passed"] and p["token_id_match"] == 1.0 and p["top1_agreement"] >= 0.99 and p["mean_kl"] < 1e-4
    assert m["metrics"]["eval_runtime"] == "executorch" and m["metrics"]["eval_examples"] == 24


def test_fp32_logits_match_torch(fp32):
    ref, rt = _runtimes(fp32)
    ids = ref.encode(LONG)
    assert rt.encode(LONG) == ids and 3 * WINDOW < len(ids) < CONTEXT
    expected, got = ref.logits(ids), rt.logits(ids)  # (seq, vocab)
    assert got.shape == expected.shape and got.dtype == np.float32
    assert _rel_diff(got, expected) < 5e-4  # measured below 1e-6 (llama, qwen2), 1e-4 (gemma3)
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_gemma3_sliding_window_holds_past_its_length(exports):
    """The window matters on LONG, and the program applies it: its logits are the windowed
    model's, not those of the same weights with a window wider than the prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    exp = exports("gemma3", "fp32")
    ref, rt = _runtimes(exp)
    ids = ref.encode(LONG)
    wide = AutoModelForCausalLM.from_pretrained(exp.student, sliding_window=1024).eval()
    with torch.inference_mode():
        unwindowed = wide(torch.tensor([ids])).logits[0].numpy()
    windowed = ref.logits(ids)
    assert _rel_diff(unwindowed, windowed) > 1e-2
    assert _rel_diff(rt.logits(ids), windowed) < 5e-4


def test_incremental_decoding_matches_full_pass(fp32):
    """The KV cache the program keeps: a sequence fed in pieces and a token at a time gives
    the logits of one pass; so does a prefill cut into calls shorter than the prompt."""
    ref, rt = _runtimes(fp32)
    ids = ref.encode(LONG)
    full = rt.logits(ids)
    cuts = [0, 7, 8, 9, 25, len(ids) - 1, len(ids)]
    rows = [rt._run(ids[a:b], a) for a, b in zip(cuts, cuts[1:])]  # each (b - a, vocab)
    assert _rel_diff(np.concatenate(rows), full) < 1e-5
    rt.program.max_seq = 16  # the runtime cuts longer inputs into calls of at most this many tokens
    assert _rel_diff(rt.logits(ids), full) < 1e-5
    assert _rel_diff(full, ref.logits(ids)) < 5e-4


def test_generate_and_scores_match_torch(fp32):
    ref, rt = _runtimes(fp32)
    outputs = []
    for prompt in PROMPTS:
        expected = ref.generate(prompt, max_tokens=10)
        assert rt.generate(prompt, max_tokens=10) == expected
        assert rt.generate(prompt, max_tokens=10, stop=("e",)) == ref.generate(prompt, max_tokens=10, stop=("e",))
        outputs.append(expected)
    assert any(outputs)  # not all empty: the comparison saw text
    prompt = rt.encode("Review: the coffee was lovely\nSentiment:")
    conts = [rt.encode(c, special=False)[len(rt.encode("")):] for c in (" positive", " negative", " fine really")]
    assert rt.score_continuations(prompt, conts) == pytest.approx(ref.score_continuations(prompt, conts), abs=1e-3)


def test_context_length_bounds_the_sequence(exports):
    """As llama.cpp's n_ctx: generation stops at the KV cache's length; a longer input is
    refused, and so is a context the cache cannot hold."""
    exp = exports("llama", "fp32")
    rt = ExecuTorchRuntime(exp.out, threads=1)
    ids = rt.encode(PROMPTS[0])
    bounded = ExecuTorchRuntime(exp.out, threads=1, context_length=len(ids) + 3)
    assert bounded.generate(PROMPTS[0], max_tokens=20) == rt.generate(PROMPTS[0], max_tokens=3)
    with pytest.raises(Exception, match=rf"sequence of {CONTEXT + 1} tokens is longer than the context \({CONTEXT}\)"):
        rt.logits(ids + [5] * (CONTEXT + 1 - len(ids)))
    with pytest.raises(Exception, match=rf"a context of {CONTEXT + 1} tokens does not fit its KV cache of {CONTEXT}"):
        ExecuTorchRuntime(exp.out, context_length=CONTEXT + 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_8da4w_is_smaller_and_agrees(exports, family):
    q, f = exports(family, "8da4w"), exports(family, "fp32")
    s = q.manifest["settings"]
    assert s["quant"] == "8da4w" and s["group_size"] == 32
    assert s["quantization"]["linear"]["weights"] == "int4 symmetric"
    assert s["quantization"]["embedding"]["weights"] == "int8 per row"
    assert q.manifest["metrics"]["size_bytes"] < 0.5 * f.manifest["metrics"]["size_bytes"]
    check = s["self_check"]  # XNNPACK's int4 kernels against torchao's simulation of them
    assert check["max_abs_diff"] < check["tolerance"] * check["logit_scale"]
    p = q.manifest["metrics"]["parity"]
    assert q.manifest["valid"] and p["passed"] and p["thresholds"]["min_top1"] == 0.85
    assert p["top1_agreement"] >= 0.85 and 0 < p["mean_kl"] <= 0.15  # quantized: close, not exact
    assert abs(q.manifest["metrics"]["accuracy"] - f.manifest["metrics"]["accuracy"]) <= 0.1


def test_eval_and_run_through_executorch(exports, eval_file):
    exp = exports("llama", "8da4w")
    r = invoke("eval", exp.out, "--data", eval_file, "--threads", 1, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)["results"][0]
    assert res["runtime"] == "executorch" and res["accuracy"] == exp.manifest["metrics"]["accuracy"]
    assert res["size_bytes"] == exp.manifest["files"]["model.pte"]["bytes"]
    prompt = "Review: the coffee was wonderful\nSentiment:"
    r = invoke("run", exp.out, prompt, "--max-tokens", 3, "--threads", 1)
    assert r.exit_code == 0, r.output
    assert r.stdout == ExecuTorchRuntime(exp.out).generate(prompt, 3) + "\n" and r.stdout.strip()
    assert "cpuinfo" not in r.stderr  # ExecuTorch's load-time log stays off the terminal


def test_chat_template_travels_with_the_program(exports):
    exp = exports("gemma3", "8da4w")
    assert (exp.out / "chat_template.jinja").read_text() == (exp.student / "chat_template.jinja").read_text()
    r = invoke("run", exp.out, "the phone was great", "--chat-template", "auto", "--max-tokens", 4)
    assert r.exit_code == 0, r.output


def test_executorch_llm_runner_loads_the_program(exports):
    """ExecuTorch's own LLM runner (TextLLMRunner: what Android's LlmModule and iOS's
    TextLLMRunner wrap) reads the metadata and tokenizer.json and writes the same greedy
    text as shrink's runtime."""
    try:
        from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
    except (ImportError, RuntimeError) as e:
        pytest.skip(f"this ExecuTorch build has no LLM runner bindings ({e})")
    exp = exports("llama", "fp32")
    prompt = "Review: the coffee was wonderful\nSentiment:"
    expected = ExecuTorchRuntime(exp.out).generate(prompt, 6)
    bos = int(exp.manifest["settings"]["metadata"]["get_bos_id"] >= 0)
    pieces: list[str] = []
    runner = TextLLMRunner(str(exp.out / "model.pte"), str(exp.out / "tokenizer.json"))
    runner.generate(prompt, GenerationConfig(echo=False, max_new_tokens=6, temperature=0.0, num_bos=bos),
                    token_callback=pieces.append)
    eos = TorchRuntime(exp.student, device="cpu").tokenizer.eos_token
    text = "".join(pieces).removesuffix(eos)  # the runner hands on the end token's text, then stops
    assert expected.strip() and text.strip() == expected.strip()


def test_planted_corrupted_weight_is_caught_by_parity(exports, eval_file, tmp_path, monkeypatch):
    """The export of a student checked against a copy of it with one weight scaled by -3:
    parity fails, exit 1, the artifact marked not valid. The build is the good fp32 program
    (exported once for the module), so this costs no export."""
    import shrink.export.executorch_artifact as ea

    exp = exports("llama", "fp32")
    broken = tiny.corrupted_copy(exp.student, tmp_path / "broken")

    monkeypatch.setattr(ea, "build", _copy_of(exp))
    out = tmp_path / "pte"
    r = invoke("export", broken, "--target", "executorch", "--quant", "fp32", "--eval", eval_file, "--out", out)
    assert r.exit_code == 1, r.output
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"Error: {out}: parity with {broken} failed (") and "top-1 agreement" in line
    assert f"worst example {eval_file}:" in line
    m = Manifest.read(out)
    assert m.valid is False and m.format == "pte" and m.metrics["parity"]["passed"] is False
    assert m.metrics["parity"]["top1_agreement"] < 0.99


def test_unsupported_family_is_refused(tmp_path, eval_file):
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "phi"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "phi3"}))
    save_file({"w": torch.zeros(1)}, folder / "model.safetensors")
    r = invoke("export", folder, "--target", "executorch", "--out", tmp_path / "out")
    assert r.exit_code == 2 and r.stderr == (
        f"Error: {folder / 'config.json'}: model_type 'phi3' is not supported by the ExecuTorch export "
        "(supported: llama, qwen2, qwen3, gemma3_text)\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--quant", "int4"], "--quant int4: not an ExecuTorch quantization (valid: fp32, 8da4w, 8da8w)"),
    (["--quant", "fp32", "--group-size", "32"], "--group-size: --quant fp32 quantizes nothing"),
    (["--group-size", "48"], "--group-size 48: does not divide the input width of q/k/v_proj, gate/up_proj, "
                             "lm_head (64), o_proj (64), down_proj (128); choose a divisor of 64, 128, or -1"),
    (["--max-context", "1000"], "--max-context 1000 (or a device target's context_length): more than the 256 "
                                "positions the model takes (max_position_embeddings in its config.json)"),
    (["--max-context", "2"], "--max-context 2: at least 4 tokens"),
])
def test_bad_options_are_refused_before_any_work(students, tmp_path, args, message):
    r = invoke("export", students("llama"), "--target", "executorch", "--out", tmp_path / "out", *args)
    assert r.exit_code == 2 and r.stderr == f"Error: {message}\n", r.output
    assert not (tmp_path / "out").exists()


def test_max_context_is_for_executorch_only(students, tmp_path):
    r = invoke("export", students("llama"), "--target", "gguf", "--max-context", "64", "--out", tmp_path / "out")
    assert r.exit_code == 2 and r.stderr == "Error: --max-context: only for --target executorch, not gguf\n"


def test_phone_pte_target_ships(exports, eval_file, tmp_path, monkeypatch):
    """A device target served by ExecuTorch: its ladder, a bundle whose run.py runs the .pte
    in ExecuTorch's runtime (and was what the peak RAM measured), a model card that says how
    an app loads it. The build is the module's llama 8da4w program (no export)."""
    import shrink.export.executorch_artifact as ea
    from shrink.targets import load_targets

    assert load_targets()["phone-pte"].ladder() == [("pte", "fp32"), ("pte", "8da8w"), ("pte", "8da4w")]
    exp = exports("llama", "8da4w")

    def build(student, tmp, opts, source_manifest):
        assert opts.target == "executorch" and opts.quant == "8da4w" and opts.max_context == CONTEXT
        return _copy_of(exp)(student, tmp, opts, source_manifest)

    monkeypatch.setattr(ea, "build", build)
    tf = tmp_path / "targets.toml"
    tf.write_text('[targets.tiny-phone]\ndescription = "a test phone"\nruntime = "executorch"\nformats = ["pte"]\n'
                  f'quants = ["8da4w"]\nthreads = 1\ncontext_length = {CONTEXT}\nmax_ram_mb = 4000\n')
    out = tmp_path / "bundle"
    r = invoke("export", exp.student, "--target", "tiny-phone", "--targets", tf, "--eval", eval_file, "--out", out,
               "--json")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["kind"] == "bundle" and m["format"] == "pte" and m["settings"]["quant"] == "8da4w"
    assert m["metrics"]["eval_runtime"] == "executorch" and 5 < m["metrics"]["peak_ram_mb"] < 4000
    assert m["metrics"]["ram_measured_with"]["runtime"] == "executorch"
    assert m["metrics"]["accuracy"] == exp.manifest["metrics"]["accuracy"]
    assert {"model.pte", "tokenizer.json", "run.py", "README.md"} <= set(p.name for p in out.iterdir())
    card = (out / "README.md").read_text()
    assert "new LlmModule(modelPath, tokenizerPath, 0.0f)" in card and "TextLLMRunner(modelPath:" in card
    assert f"`get_max_context_len` {CONTEXT}" in card and ".numBos(1)" in card
    run = out / "run.py"
    assert "from executorch.runtime import Runtime" in run.read_text() and "shrink" not in run.read_text()
    got = subprocess.run([sys.executable, str(run), "Review: the coffee was wonderful\nSentiment:"],
                         capture_output=True, text=True, check=True)
    assert got.stdout.strip() == ExecuTorchRuntime(out).generate("Review: the coffee was wonderful\nSentiment:",
                                                                 16, stop=("\n",)).strip()


def test_a_broken_program_is_one_error_line(exports, tmp_path):
    """Garbage, a truncated .pte and an ExecuTorch program that is not a causal LM with a
    KV cache: each refused with one line naming the file, exit 2."""
    import torch
    from executorch.exir import to_edge

    class AddOne(torch.nn.Module):
        def forward(self, x):
            return x + 1

    exp = exports("llama", "fp32")
    data = (exp.out / "model.pte").read_bytes()
    plain = to_edge(torch.export.export(AddOne(), (torch.ones(2),))).to_executorch().buffer
    for content, message in [(b"not a pte", "ExecuTorch cannot load this file ("),
                             (data[: len(data) // 2], "ExecuTorch cannot load this file ("),
                             (plain, "not a causal LM exported with a KV cache (forward(tokens, positions) and "
                                     "get_max_context_len); export it with shrink export --target executorch")]:
        folder = tmp_path / str(len(content))
        shutil.copytree(exp.out, folder)
        (folder / "model.pte").write_bytes(content)
        r = invoke("run", folder, "hello", "--no-verify")
        assert r.exit_code == 2 and r.stderr.startswith(f"Error: {folder / 'model.pte'}: {message}"), r.output
        assert len(r.stderr.strip().splitlines()) == 1
