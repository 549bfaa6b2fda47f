"""ONNX export and onnxruntime: tiny Llama, Qwen2 and Gemma 3 students, briefly trained,
exported once each and compared with torch (logits, incremental decoding with past
key/values, greedy text, continuation scores), then quantized to int8 and int4.

The export (torch.export tracing) dominates the run time, so each family is exported
once per module and shared by the tests (`exports`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny
from shrink.errors import ModelError, ShrinkError
from shrink.export.onnx_export import COMPANION_FILES, export_onnx
from shrink.quantize.onnx_quant import quantize_onnx
from shrink.runtime.onnx_runtime import OnnxRuntime
from shrink.runtime.torch_runtime import TorchRuntime

FAMILIES = ["llama", "qwen2", "gemma3"]
BUILDERS = {"llama": tiny.build_llama, "qwen2": tiny.build_qwen2, "gemma3": tiny.build_gemma3}
WINDOW = 16  # the tiny Gemma 3's sliding window (tiny.build_gemma3); prompts below pass it
# Reviews, accents and code in a row: about 50 tokens, three times the sliding window.
LONG = " ".join([r["prompt"] + r["completion"] for r in tiny.toy_examples(3, seed=11)] + tiny.PARITY_SUITE[1:7])
PROMPTS = [r["prompt"] for r in tiny.toy_examples(8, seed=12, choices=False)] + tiny.PARITY_SUITE[:6]


@dataclass
class Exported:
    student: Path  # the Hugging Face folder
    onnx: Path  # the folder export_onnx wrote
    settings: dict


def _train_student(folder: Path, family: str) -> Path:
    """A 2-layer, 128-wide student, trained for a few seconds so that its next-token
    distributions are peaked (top-1 agreement then measures the export, not noise)."""
    folder.mkdir(parents=True)
    rows = tiny.toy_examples(300, seed=3)
    tok = tiny.build_tokenizer(folder, [r["prompt"] + r["completion"] for r in rows] + tiny.PARITY_SUITE)
    model = BUILDERS[family](folder, tok, layers=2, hidden=128)
    tiny.train_lm(model, tok, rows, steps=60, lr=3e-3)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """family -> Exported (fp32), built on first use."""
    cache: dict[str, Exported] = {}

    def get(family: str) -> Exported:
        if family not in cache:
            root = tmp_path_factory.mktemp(family)
            student = _train_student(root / "student", family)
            (root / "onnx").mkdir()
            settings = export_onnx(student, root / "onnx", "fp32")
            cache[family] = Exported(student, root / "onnx", settings)
        return cache[family]

    return get


@pytest.fixture(scope="module", params=FAMILIES)
def case(request, exports) -> Exported:
    return exports(request.param)


def _runtimes(exp: Exported) -> tuple[TorchRuntime, OnnxRuntime]:
    return TorchRuntime(exp.student, device="cpu"), OnnxRuntime(exp.onnx, threads=1)


def _rel_diff(got: np.ndarray, expected: np.ndarray) -> float:
    """max |got - expected| relative to the logit scale."""
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def test_export_writes_a_self_contained_folder(case):
    names = sorted(p.name for p in case.onnx.iterdir())
    assert "model.onnx" in names and "model.onnx.data" not in names  # tiny: no external data
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= set(names)
    assert set(names) <= {"model.onnx", *COMPANION_FILES}
    assert case.settings["files"] == names
    assert case.settings["quant"] == "fp32" and case.settings["opset"] == 18
    # the export's own check: past 0 and past > 0 against torch, measured 4e-7 .. 7e-7
    check = case.settings["self_check"]
    assert check["max_abs_diff"] < 1e-5 * check["logit_scale"]


def test_fp32_logits_match_torch(case):
    ref, rt = _runtimes(case)
    ids = ref.encode(LONG)
    assert rt.encode(LONG) == ids and len(ids) > 3 * WINDOW
    expected, got = ref.logits(ids), rt.logits(ids)  # (seq, vocab)
    assert got.shape == expected.shape and got.dtype == np.float32
    assert _rel_diff(got, expected) < 1e-4  # measured below 1e-6 for all three families
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_gemma3_sliding_window_holds_past_its_length(exports):
    """The ONNX graph keeps every past key and masks by position: Gemma 3's sliding layers
    stay exact long after the window, and the window does change the result here."""
    from transformers import AutoModelForCausalLM

    exp = exports("gemma3")
    ref, rt = _runtimes(exp)
    ids = ref.encode(LONG)
    windowed = ref.logits(ids)
    wide = AutoModelForCausalLM.from_pretrained(exp.student, sliding_window=1024).eval()
    with torch.inference_mode():
        unwindowed = wide(torch.tensor([ids])).logits[0].numpy()
    assert _rel_diff(unwindowed, windowed) > 1e-2  # the window matters on this prompt
    past, rows = None, []
    for a, b in [(0, 3), (3, WINDOW), (WINDOW, WINDOW + 1), (WINDOW + 1, 2 * WINDOW + 5), (2 * WINDOW + 5, len(ids))]:
        logits, past = rt._run(ids[a:b], past)
        rows.append(logits)
    assert _rel_diff(np.concatenate(rows), windowed) < 1e-4


def test_incremental_decoding_matches_full_pass(case):
    """Past key/values fed back in chunks and one token at a time give the logits of one
    pass over the whole sequence."""
    ref, rt = _runtimes(case)
    ids = ref.encode(LONG)
    full = rt.logits(ids)
    past, rows = None, []
    cuts = [0, 7, 8, 9, 25, len(ids) - 1, len(ids)]
    for a, b in zip(cuts, cuts[1:]):
        logits, past = rt._run(ids[a:b], past)  # (b - a, vocab)
        assert past[0].shape[2] == b
        rows.append(logits)
    got = np.concatenate(rows)
    assert _rel_diff(got, full) < 1e-5
    assert _rel_diff(got, ref.logits(ids)) < 1e-4


def test_generate_matches_torch(case):
    ref, rt = _runtimes(case)
    outputs = []
    for prompt in PROMPTS[:5]:
        expected = ref.generate(prompt, max_tokens=12)
        assert rt.generate(prompt, max_tokens=12) == expected
        assert rt.generate(prompt, max_tokens=12, stop=("e",)) == ref.generate(prompt, max_tokens=12, stop=("e",))
        outputs.append(expected)
    assert any(outputs)  # not all empty: the comparison saw text


def test_context_length_bounds_the_sequence(exports):
    """As llama.cpp's n_ctx: generation stops at the context length, and a longer input
    is refused."""
    exp = exports("llama")
    unbounded = OnnxRuntime(exp.onnx, threads=1)
    ids = unbounded.encode(PROMPTS[0])
    context = len(ids) + 3
    bounded = OnnxRuntime(exp.onnx, threads=1, context_length=context)
    assert bounded.generate(PROMPTS[0], max_tokens=20) == unbounded.generate(PROMPTS[0], max_tokens=3)
    longer = rf"sequence of {context + 1} tokens is longer than the context \({context}\)"
    with pytest.raises(ShrinkError, match=longer):
        bounded.logits(ids + [5] * 4)


def test_score_continuations_sum_logits(case):
    ref, rt = _runtimes(case)
    prompt = rt.encode("Review: the coffee was lovely\nSentiment:")
    conts = [rt.encode(c)[1:] for c in (" positive", " negative", " it was fine really")]
    conts.append(conts[0][:1])
    scores = rt.score_continuations(prompt, conts)
    for cont, score in zip(conts, scores):
        logp = torch.log_softmax(torch.from_numpy(rt.logits(prompt + cont)).double(), -1).numpy()  # (seq, vocab)
        rows = np.arange(len(prompt) - 1, len(prompt) - 1 + len(cont))
        assert score == pytest.approx(float(logp[rows, cont].sum()), abs=1e-4)
    assert scores == pytest.approx(ref.score_continuations(prompt, conts), abs=1e-3)


def _top1_agreement(ref, rt) -> float:
    agree = total = 0
    for prompt in PROMPTS + [LONG]:
        ids = ref.encode(prompt)
        agree += int((ref.logits(ids).argmax(-1) == rt.logits(ids).argmax(-1)).sum())
        total += len(ids)
    return agree / total


# Top-1 agreement with torch over every position of PROMPTS + LONG (135), measured:
# llama int8 0.993, int4 0.985; gemma3 int8 0.985, int4 0.919 (qwen2, not tested here:
# int8 0.994, int4 0.953). In a fresh environment of 2026-12-01 (transformers 5.24,
# onnxruntime 1.32) the tiny gemma3's int8 agrees on 0.956: the 6 positions it
# flips have torch top-2 margins of 0.001 to 0.34 on logits of scale 2.5 to 5.6. The
# thresholds leave room for that and for other CPUs' kernels, above the export's own
# parity floors (shrink.export.onnx_artifact.THRESHOLDS: int8 0.90, int4 0.85).
MIN_TOP1 = {"int8": 0.95, "int4": 0.85}


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_quantized_are_smaller_and_agree(exports, tmp_path, family):
    exp = exports(family)
    ref = TorchRuntime(exp.student, device="cpu")
    sizes = {"fp32": (exp.onnx / "model.onnx").stat().st_size}
    for quant in ("int8", "int4"):
        folder = tmp_path / quant
        shutil.copytree(exp.onnx, folder, ignore=shutil.ignore_patterns("model.onnx*"))
        settings = quantize_onnx(exp.onnx / "model.onnx", folder / "model.onnx", quant)
        # the tied embedding (gemma3) gets a transposed copy for the lm_head MatMul
        assert bool(settings["untied_weights"]) == (family == "gemma3")
        sizes[quant] = (folder / "model.onnx").stat().st_size
        rt = OnnxRuntime(folder, threads=1)
        top1 = _top1_agreement(ref, rt)
        assert top1 >= MIN_TOP1[quant], f"{family} {quant}: top-1 agreement {top1:.3f}"
    assert sizes["int4"] < sizes["int8"] < sizes["fp32"], sizes


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantize_to_external_data(exports, tmp_path, quant):
    """The layout of students over 1.5 GiB (model.onnx + model.onnx.data), on a tiny one."""
    exp = exports("llama")
    for folder, external in ((tmp_path / "inline", False), (tmp_path / "external", True)):
        shutil.copytree(exp.onnx, folder, ignore=shutil.ignore_patterns("model.onnx*"))
        quantize_onnx(exp.onnx / "model.onnx", folder / "model.onnx", quant, external_data=external)
        assert sorted(p.name for p in folder.glob("model*")) == ["model.onnx", "model.onnx.data"][: 1 + external]
    ids = OnnxRuntime(tmp_path / "inline").encode(LONG)
    inline = OnnxRuntime(tmp_path / "inline", threads=1).logits(ids)
    assert np.array_equal(OnnxRuntime(tmp_path / "external", threads=1).logits(ids), inline)


def test_export_with_quantization_leaves_one_model_file(tmp_path, exports):
    """export_onnx(quant=...) quantizes its fp32 export and removes it."""
    exp = exports("llama")
    settings = export_onnx(exp.student, tmp_path, "int8")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert settings["files"] == names and "model-fp32.onnx" not in names
    assert settings["quantization"]["method"] == "quantize_dynamic"
    with OnnxRuntime(tmp_path, threads=1) as rt:
        assert rt.encode("the phone was great") == TorchRuntime(exp.student, device="cpu").encode("the phone was great")


def test_planted_corruption_changes_the_logits(exports, tmp_path):
    """One MatMul weight scaled by 50 in the fp32 graph: the kind of silent export bug the
    parity check must catch. Measured: logits off by 0.8 of the logit scale, top-1
    agreement 0.39."""
    import onnx
    from onnx import numpy_helper

    exp = exports("llama")
    folder = tmp_path / "corrupt"
    shutil.copytree(exp.onnx, folder)
    model = onnx.load(str(folder / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    name = next(n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits)
    inits[name].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[name]) * 50, name))
    onnx.save(model, str(folder / "model.onnx"))

    ref, good = _runtimes(exp)
    bad = OnnxRuntime(folder, threads=1)
    ids = ref.encode(LONG)
    expected = ref.logits(ids)
    assert _rel_diff(good.logits(ids), expected) < 1e-4
    corrupted = bad.logits(ids)
    assert _rel_diff(corrupted, expected) > 0.1
    assert (corrupted.argmax(-1) == expected.argmax(-1)).mean() < 0.8


@pytest.mark.parametrize("config, message", [
    ({"model_type": "gpt2"}, r"config\.json: model_type 'gpt2' is not supported by the ONNX export"),
    ({"model_type": "llama", "quantization_config": {"quant_method": "gptq"}}, r"already quantized \(gptq\)"),
])
def test_unsupported_student_is_a_model_error(tmp_path, config, message):
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({"w": torch.zeros(1)}, tmp_path / "model.safetensors")
    (tmp_path / "out").mkdir()
    with pytest.raises(ModelError, match=message):
        export_onnx(tmp_path, tmp_path / "out")


def test_unknown_quantization_is_refused(tmp_path):
    with pytest.raises(ShrinkError, match="unknown ONNX quantization 'int3'"):
        export_onnx(tmp_path, tmp_path, "int3")


@pytest.mark.parametrize("content", ["garbage", "truncated"])
def test_corrupt_model_file_is_a_model_error(exports, tmp_path, content):
    exp = exports("llama")
    folder = tmp_path / "bad"
    shutil.copytree(exp.onnx, folder)
    data = (exp.onnx / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(b"not an onnx file" if content == "garbage" else data[: len(data) // 2])
    with pytest.raises(ModelError, match=f"{folder / 'model.onnx'}: onnxruntime cannot load this file"):
        OnnxRuntime(folder)


def test_folder_without_model_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="no model.onnx in this folder"):
        OnnxRuntime(tmp_path)
