"""Student folder -> ONNX graph with past key/values, for onnxruntime.

The export is `torch.onnx.export(dynamo=True)` (torch.export + onnxscript) of a thin
module (`_wrapper`) that takes the past keys and values as flat tensors, builds a transformers
`DynamicCache` from them and returns the logits and the flattened present tensors. The
inputs and outputs follow the convention of optimum and onnxruntime-genai:

    input_ids                   int64   (batch, seq)
    attention_mask              int64   (batch, past + seq)
    position_ids                int64   (batch, seq)
    past_key_values.{i}.key     float32 (batch, kv_heads, past, head_dim)   and .value
 -> logits                      float32 (batch, seq, vocab)
    present.{i}.key             float32 (batch, kv_heads, past + seq, head_dim)  and .value

Why this path: optimum-onnx pins transformers < 5, and the TorchScript exporter
(`dynamo=False`) records one trace, turning Python branches on tensor sizes into
constants: transformers' cache and sdpa code branch on `keys.numel() == 0` and
`q_length == 1`, and the trace warns about each. It gave the right logits on the tiny test
models, but only because those branches happened to agree. torch.export keeps the batch,
sequence and past lengths symbolic, so the one graph serves the first step (past 0) and
every later step.
Attention is exported as transformers' "eager" implementation: plain MatMul/Softmax with
an explicit mask, no backend-specific branch.

Gemma 3 sliding-window layers: the cache built in the wrapper has no config, so every
layer keeps all its past keys and values (transformers' own sliding layers would keep only
the last `sliding_window - 1`, which would make the past length differ between layers).
The window is applied by the attention mask, computed from absolute positions, so the
export is exact at any length up to `max_position_embeddings` (tests/test_onnx.py goes
three windows past); the price is memory: a sliding layer's cache grows with the context
instead of stopping at the window.

Every export checks itself: the fp32 graph, run by onnxruntime with past 0 and with a
past from torch, must give torch's logits (`_self_check`); the figures are returned.
Quantization (int8, int4) is `shrink.quantize.onnx_quant`, applied to that fp32 graph.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from shrink.console import progress_step
from shrink.errors import ModelError, ShrinkError, requires
from shrink.export.parity import ParityError
from shrink.hf import check_model_dir
from shrink.kv_cache import cache_kwargs, returned_cache
from shrink.quiet import debug_enabled, quiet_exporters
from shrink.runtime.onnx_runtime import MODEL_FILE, io_names

# model_type in config.json -> class transformers builds; each is checked against torch in
# tests/test_onnx.py. Others may well export, but nothing vouches for them.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",  # text-only Gemma 3 (270M, 1B); not the multimodal "gemma3"
}
OPSET = 18  # torch.onnx's default; onnxruntime >= 1.14, onnxruntime-genai and ORT mobile run it
ATTENTION = "eager"
# Copied next to model.onnx so the folder runs on its own. config.json matters for the
# ids too: transformers 5 picks the tokenizer class from its model_type (Qwen2Tokenizer
# for qwen2, which pre-tokenizes differently from the bare tokenizer.json).
COMPANION_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "config.json", "generation_config.json")
SELF_CHECK_TOL = 1e-3  # max |onnx - torch| / max |torch| over the check logits, for fp32


def export_onnx(student: Path, dst: Path, quant: str = "fp32", console=None) -> dict[str, Any]:
    """Write `dst/model.onnx` (and `model.onnx.data` beside it for over 1.5 GiB of weights)
    plus the student's tokenizer and config files into the existing folder `dst`.

    `quant`: fp32, int8 or int4 (see shrink.quantize.onnx_quant). `console`: an optional
    rich Console for the progress lines (default: stderr). Returns the settings to record.
    Raises ParityError (exit 1) when the fp32 graph does not give torch's logits.
    """
    from shrink.quantize.onnx_quant import QUANTS, quantize_onnx

    student, dst = Path(student), Path(dst)
    if quant not in QUANTS:
        raise ShrinkError(f"unknown ONNX quantization {quant!r}; valid: {', '.join(QUANTS)}")
    check_model_dir(student, "student")
    _check_architecture(student)
    for module in ("onnx", "onnxscript", "onnxruntime"):
        requires(module, "onnx")
    if not dst.is_dir():
        raise ShrinkError(f"{dst}: no such folder")

    model = _load(student)
    fp32 = dst / (MODEL_FILE if quant == "fp32" else "model-fp32.onnx")
    try:
        with progress_step(console, f"Exporting {student.name} to ONNX (torch.onnx)"), quiet_exporters():
            example = _example_inputs(model)
            _export(model, example, fp32)
        external = fp32.with_name(fp32.name + ".data").exists()
        check = _self_check(model, fp32, example)
        if check["max_abs_diff"] > SELF_CHECK_TOL * check["logit_scale"]:
            raise ParityError(
                f"the ONNX export of {student} does not compute what torch computes: logits differ by up to "
                f"{check['max_abs_diff']:.3g} (scale {check['logit_scale']:.3g}, "
                f"step with past {check['worst_step']})"
            )
        quantization = None
        if quant != "fp32":
            quantization = quantize_onnx(fp32, dst / MODEL_FILE, quant, external_data=external, console=console)
    finally:
        if fp32.name != MODEL_FILE:
            fp32.unlink(missing_ok=True)
            fp32.with_name(fp32.name + ".data").unlink(missing_ok=True)
    for name in COMPANION_FILES:
        if (student / name).is_file():
            shutil.copy2(student / name, dst / name)
    import torch

    return {
        "target": "onnx",
        "quant": quant,
        "opset": OPSET,
        "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
        "attn_implementation": ATTENTION,
        "external_data": external,
        "quantization": quantization,
        "self_check": check,
        "files": sorted(p.name for p in dst.iterdir() if p.name.startswith(MODEL_FILE) or p.name in COMPANION_FILES),
    }


def _check_architecture(student: Path) -> None:
    config_file = student / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ModelError(
            f"{config_file}: model_type {model_type!r} is not supported by the ONNX export "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method:
        # Its layers are quantized kernels, which torch.export cannot turn into ONNX ops.
        raise ModelError(f"{config_file}: the model is already quantized ({method}); export the "
                         "unquantized student and choose the ONNX quantization instead")


def _load(student: Path):
    from shrink.hf import load_causal_lm

    model = load_causal_lm(student, "cpu")  # fp32
    model.set_attn_implementation(ATTENTION)
    return model


def _wrapper(model):
    """`model` as forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present),
    with past/present as key0, value0, key1, value1, ..."""
    import torch
    from transformers import DynamicCache

    class WithPast(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache()  # no config: full-length layers, see the module docstring
            for i in range(len(past) // 2):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          **cache_kwargs(self.lm, cache), use_cache=True)
            present = []
            for layer in returned_cache(out).layers:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return WithPast(model).eval()


def _example_inputs(model) -> dict[str, Any]:
    """Batch 2, a past of 5 real keys/values and 3 new tokens: sizes other than 0 and 1,
    which torch.export would specialize on. The past comes from running the model."""
    import torch
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=g)  # (batch, past + seq)
    with torch.inference_mode():  # a config-less cache, as in the graph: no layer drops keys
        out = model(input_ids=ids[:, :5], **cache_kwargs(model, DynamicCache()), use_cache=True)
    past = [t.clone() for layer in returned_cache(out).layers for t in (layer.keys, layer.values)]
    return {"ids": ids, "past": past, "past_len": 5}


def _export(model, example: dict[str, Any], path: Path) -> None:
    """Write `path` (with `path.data` beside it when the weights pass 1.5 GiB: torch.onnx
    decides that, the protobuf limit being 2 GiB)."""
    import onnx_ir as ir
    import torch

    ids, past, p = example["ids"], example["past"], example["past_len"]
    args = (ids[:, p:], torch.ones_like(ids), torch.arange(p, ids.shape[1]).repeat(2, 1), *past)
    inputs, outputs = io_names(len(past) // 2)
    kv = {0: "batch", 2: "past"}
    dynamic = {
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "past+seq"},
        "position_ids": {0: "batch", 1: "seq"},
        "past": tuple(kv for _ in past),
    }
    try:
        program = torch.onnx.export(
            _wrapper(model), args, dynamo=True, input_names=inputs, output_names=outputs,
            dynamic_shapes=dynamic, opset_version=OPSET, verbose=False,
        )
        # Each node carries its Python stack trace and module path (a third of a tiny
        # model's file, and paths of the machine that exported it): not for deployment.
        for node in ir.traversal.RecursiveGraphIterator(program.model.graph):
            node.metadata_props.clear()
        program.save(str(path))
    except Exception as e:  # noqa: BLE001 - torch.export and onnxscript raise many types
        path.unlink(missing_ok=True)
        if debug_enabled():
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ShrinkError(f"torch.onnx could not export {model.config.model_type}: {first}") from None


def _self_check(model, path: Path, example: dict[str, Any]) -> dict[str, Any]:
    """onnxruntime against torch on the example: the whole sequence with past 0, then the
    last tokens with torch's past. Returns the worst difference and the logit scale."""
    import numpy as np
    import onnxruntime as ort
    import torch

    ids, past, p = example["ids"], example["past"], example["past_len"]
    with torch.inference_mode():
        expected = model(input_ids=ids).logits.numpy()  # (batch, past + seq, vocab)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    inputs, _ = io_names(len(past) // 2)
    batch, n = ids.shape
    empty = np.zeros((batch, *past[0].shape[1:2], 0, past[0].shape[-1]), dtype=np.float32)
    steps = {0: (ids.numpy(), [empty] * len(past)), p: (ids[:, p:].numpy(), [t.numpy() for t in past])}
    diffs = {}
    for start, (x, kv) in steps.items():
        feed = dict(zip(inputs, [x, np.ones((batch, n), np.int64), np.tile(np.arange(start, n), (batch, 1)), *kv]))
        got = session.run(["logits"], feed)[0]  # (batch, n - start, vocab)
        diffs[start] = float(np.abs(got - expected[:, start:]).max())
    worst = max(diffs, key=diffs.get)
    return {"max_abs_diff": diffs[worst], "worst_step": worst, "logit_scale": float(np.abs(expected).max()),
            "tolerance": SELF_CHECK_TOL}
