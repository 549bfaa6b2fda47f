"""Student folder -> ExecuTorch program (model.pte) with a static KV cache, for phones.

The path is PyTorch's own, with no converter in between: the student is loaded in
transformers (fp32), quantized in place with torchao (shrink.quantize.torchao_quant),
given a static KV cache of `max_context` tokens held as buffers on its attention layers
and an attention written for it (`with_static_cache`), traced by `torch.export`, lowered
to the XNNPACK backend (`to_edge_transform_and_lower(..., XnnpackPartitioner())`) and
serialized (`to_executorch`). optimum-executorch exports to ExecuTorch too but pins
transformers 5.0.0rc1, so it is not used; transformers' own recipe (a StaticCache under
its sdpa) copies the whole cache at every call (see with_static_cache).

The program's one method `forward` takes

    tokens     int64 (1, n)    n from 1 to max_seq_len (PREFILL_TOKENS, or max_context if smaller)
    positions  int64 (n,)      where they go in the cache: the prompt at 0.., then one token a call
 -> logits     float32 (1, n, vocab)

and writes their keys and values into the cache. Methods beside it hold the metadata
ExecuTorch's LLM runner reads (shrink.runtime.executorch_runtime.METADATA), so an Android
or iOS app can load the file with ExecuTorch's own runner (LlmModule, TextLLMRunner).
Logits come for every position: parity and scoring need them; a phone app's runner takes
the last. Their buffer is planned for max_seq_len positions (max_seq_len x vocab floats).
Attention reads the whole cache at every call (the positions not yet written are masked),
so a call costs in proportion to max_context, not to the tokens held: choose
`--max-context` for the task, not the model's limit.

Gemma 3 sliding-window layers: every layer has a cache of max_context tokens and the
window is applied by the attention mask, from absolute positions, so the program is exact
up to max_context (tests/test_executorch.py goes past the window); a sliding layer's cache
costs max_context tokens instead of the window.

Every export checks itself: the program, run by ExecuTorch's runtime over a whole
sequence and then a token at a time, must give the logits of the model it was lowered
from, run by transformers with its own attention (the quantized model for 8da4w/8da8w:
this checks the cache, the attention and the lowering; the parity with the student checks
the quantization). The figures are returned.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from shrink.console import progress_step
from shrink.errors import ModelError, ShrinkError, requires
from shrink.export.onnx_export import COMPANION_FILES
from shrink.export.parity import ParityError
from shrink.hf import check_model_dir
from shrink.quiet import debug_enabled, quiet_exporters, quiet_transformers
from shrink.runtime.executorch_runtime import MODEL_FILE

# model_type in config.json -> class transformers builds; each is checked against torch in
# tests/test_executorch.py. Others may well export, but nothing vouches for them.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",  # text-only Gemma 3 (270M, 1B); not the multimodal "gemma3"
}
DEFAULT_CONTEXT = 2048  # tokens of KV cache without --max-context (capped at max_position_embeddings)
MIN_CONTEXT = 4
PREFILL_TOKENS = 128  # most tokens one call takes: ExecuTorch's LLM export default (max_seq_length)
# max |program - torch| / max |torch| over the check logits. fp32: XNNPACK's kernels
# against torch's, measured 5e-7 (llama, qwen2) to 1e-4 (gemma3). 8da4w/8da8w: XNNPACK's
# integer kernels against torchao's simulation of them; XNNPACK keeps group-wise weight
# scales in bf16, torchao in fp32 (measured: 8da8w per channel 5e-7, 8da4w 1e-2 to 3e-2).
SELF_CHECK_TOL = {"fp32": 1e-3, "quantized": 5e-2}


def linear_widths(config: dict) -> dict[str, int]:
    """Input width of each kind of linear layer, from config.json (the group size must divide them)."""
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    return {"q/k/v_proj, gate/up_proj, lm_head": hidden, "o_proj": config["num_attention_heads"] * head_dim,
            "down_proj": config["intermediate_size"]}


def check_student(student: Path) -> dict:
    """The student's config.json, refused unless its architecture is one the export
    is tested on and it is not quantized already."""
    check_model_dir(student, "student")
    config_file = student / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ModelError(f"{config_file}: model_type {model_type!r} is not supported by the ExecuTorch export "
                         f"(supported: {', '.join(ARCHITECTURES)})")
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method:
        raise ModelError(f"{config_file}: the model is already quantized ({method}); export the unquantized "
                         "student and choose the ExecuTorch quantization instead")
    return config


def context_for(config: dict, max_context: int | None) -> int:
    """The KV cache's length: `max_context`, or DEFAULT_CONTEXT; never past the positions
    the model was built for."""
    limit = config.get("max_position_embeddings")
    if max_context is None:
        return min(DEFAULT_CONTEXT, limit or DEFAULT_CONTEXT)
    if max_context < MIN_CONTEXT:
        raise ShrinkError(f"--max-context {max_context}: at least {MIN_CONTEXT} tokens")
    if limit and max_context > limit:
        raise ShrinkError(f"--max-context {max_context} (or a device target's context_length): more than the "
                          f"{limit} positions the model takes (max_position_embeddings in its config.json)")
    return max_context


def export_pte(student: Path, dst: Path, quant: str = "8da4w", group_size: int | None = None,
               max_context: int | None = None, console=None) -> dict[str, Any]:
    """Write `dst/model.pte` plus the student's tokenizer and config files into the
    existing folder `dst`. `quant`: fp32, 8da4w or 8da8w (shrink.quantize.torchao_quant);
    `group_size`: its weights per scale (None: the recipe's); `max_context`: tokens of KV
    cache (None: DEFAULT_CONTEXT, capped at the model's positions). Returns the settings
    to record. Raises ParityError (exit 1) when the program does not compute what the
    model it was lowered from computes."""
    from shrink.quantize.torchao_quant import QUANTS, check_widths, group_size_for, quantize_model

    student, dst = Path(student), Path(dst)
    if quant not in QUANTS:
        raise ShrinkError(f"unknown ExecuTorch quantization {quant!r}; valid: {', '.join(QUANTS)}")
    config = check_student(student)
    group_size = group_size_for(quant, group_size)
    check_widths(linear_widths(config), group_size)
    context = context_for(config, max_context)
    quiet_transformers()  # and the loggers of what torchao registers with torch as it is imported
    requires("executorch", "executorch")
    requires("torchao", "executorch")
    if not dst.is_dir():
        raise ShrinkError(f"{dst}: no such folder")

    from shrink.hf import load_causal_lm, load_tokenizer
    from shrink.runtime.base import stop_ids

    model = load_causal_lm(student, "cpu")
    tokenizer = load_tokenizer(student)
    max_seq = min(PREFILL_TOKENS, context)
    metadata = {"get_max_context_len": context, "get_max_seq_len": max_seq, "get_vocab_size": model.config.vocab_size,
                "get_bos_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else -1,
                "get_eos_ids": sorted(stop_ids(student, tokenizer)), "use_kv_cache": True,
                "enable_dynamic_shape": True, "use_sdpa_with_kv_cache": False}
    path = dst / MODEL_FILE
    attention = model.config._attn_implementation  # transformers' own: what the self-check compares with
    try:
        with progress_step(console, f"Exporting {student.name} to ExecuTorch ({quant}, XNNPACK)"), quiet_exporters():
            quantization = quantize_model(model, quant, group_size)
            _lower(model, context, max_seq, metadata, path)
        model.set_attn_implementation(attention)
        check = _self_check(model, path, quant, max_seq)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if check["max_abs_diff"] > check["tolerance"] * check["logit_scale"]:
        raise ParityError(
            f"the ExecuTorch program of {student} does not compute what torch computes: logits differ by up to "
            f"{check['max_abs_diff']:.3g} (scale {check['logit_scale']:.3g}, {check['worst_step']})")
    for name in COMPANION_FILES:
        if (student / name).is_file():
            shutil.copy2(student / name, dst / name)
    import executorch.version
    import torch

    return {
        "quant": quant,
        "group_size": group_size,
        "max_context": context,
        "max_seq_len": max_seq,
        "quantization": quantization,
        "backend": "XNNPACK",
        "exporter": f"torch.export {torch.__version__}, executorch {executorch.version.__version__}",
        "metadata": metadata,
        "self_check": check,
        "files": sorted(p.name for p in dst.iterdir() if p.name == MODEL_FILE or p.name in COMPANION_FILES),
    }


def _lower(model, context: int, max_seq: int, metadata: dict, path: Path) -> None:
    """torch.export -> XNNPACK -> `path`. The quantized linears and the embedding lookup
    are lowered as ExecuTorch's LLM builder lowers them (extension/llm/export/builder.py);
    the reinplace pass makes the cache writes in place (index_put_), not a new cache a call."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    # padding_idx only stops a gradient; left in, the lookup does not match the pattern
    # that turns a quantized embedding into ExecuTorch's embedding_byte kernel.
    model.get_input_embeddings().padding_idx = None
    try:
        module = with_static_cache(model, context)
        n = min(4, max_seq)  # an example size other than 0 and 1, which torch.export would specialize on
        seq = torch.export.Dim("seq", min=1, max=max_seq)
        with torch.no_grad():
            program = torch.export.export(
                module, args=(), kwargs={"input_ids": torch.zeros((1, n), dtype=torch.long),
                                         "cache_position": torch.arange(n)},
                dynamic_shapes={"input_ids": {1: seq}, "cache_position": {0: seq}}, strict=True)
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()],
                                           compile_config=EdgeCompileConfig(_check_ir_validity=False),
                                           constant_methods=metadata)
        et = edge.to_executorch(ExecutorchBackendConfig(
            extract_delegate_segments=True, do_quant_fusion_and_const_prop=True, run_reinplace_pass=True,
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass()))
    except Exception as e:  # noqa: BLE001 - torch.export and ExecuTorch raise many types
        if debug_enabled():
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ShrinkError(f"ExecuTorch could not export {model.config.model_type}: {first}") from None
    path.write_bytes(et.buffer)


ATTENTION = "shrink_static_kv"  # the attention function with_static_cache registers with transformers


def with_static_cache(model, context: int):
    """`model` as forward(input_ids (1, n), cache_position (n,)) -> logits (1, n, vocab),
    keeping the keys and values of every token it is given in buffers of `context`
    positions on each attention layer, where a later call reads them.

    The attention (`static_kv_attention`) is written for that cache, with standard ops that
    XNNPACK runs: keys are held transposed (1, kv_heads, head_dim, context) and values
    (1, kv_heads, context, head_dim), and the query heads that share a key/value head are
    stacked into one matrix, so a step reads each cache once and copies none of it.
    (transformers' own ExecuTorch recipe, a StaticCache under its sdpa, repeats every
    key/value head for its query heads and transposes the keys at every call: on the
    demo's student with 2048 tokens of cache, 35 ms a decoding step against 3 ms here,
    and 64 ms against 34 for a 50-token prompt, on 2 cores.)
    The mask comes from the absolute positions: causal, and the sliding window of Gemma 3's
    sliding layers, so the program is exact up to `context` tokens; a sliding layer's cache
    holds `context` tokens, not the window."""
    import torch
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, static_kv_attention)
    config = model.config
    kv_heads = config.num_key_value_heads
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.register_buffer("k_cache", torch.zeros(1, kv_heads, attn.head_dim, context), persistent=False)
        attn.register_buffer("v_cache", torch.zeros(1, kv_heads, context, attn.head_dim), persistent=False)
    model.set_attn_implementation(ATTENTION)

    class WithStaticCache(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm
            self.window = getattr(lm.config, "sliding_window", None) if "sliding_attention" in (
                getattr(lm.config, "layer_types", None) or ()) else None

        def forward(self, input_ids, cache_position):
            # What each new token sees, as a bias on its attention scores: 0 for the cache
            # positions at or before its own (within the window, for sliding layers), -1e30
            # for the others. Computed once a call, for every layer. (n, context)
            keys = torch.arange(context)
            seen = keys[None, :] <= cache_position[:, None]
            biases = {None: (seen.float() - 1.0) * 1e30}
            if self.window:
                near = (cache_position[:, None] - keys[None, :]) < self.window
                biases[self.window] = ((seen & near).float() - 1.0) * 1e30
            return self.lm(input_ids=input_ids, position_ids=cache_position[None], use_cache=False,
                           static_kv_biases=biases).logits

    return WithStaticCache(model).eval()


def static_kv_attention(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0,
                        sliding_window: int | None = None, position_ids=None, static_kv_biases=None, **kwargs):
    """transformers' attention interface for with_static_cache. query (1, heads, n, d); key,
    value (1, kv_heads, n, d): the new tokens', written into the layer's cache at
    `position_ids` first. Returns (1, n, heads, d) and no weights."""
    import torch

    positions = position_ids[0]  # (n,)
    module.k_cache.index_copy_(3, positions, key.transpose(2, 3))  # (1, kv_heads, d, context)
    module.v_cache.index_copy_(2, positions, value)  # (1, kv_heads, context, d)
    _, heads, n, d = query.shape
    kv_heads = value.shape[1]
    group = heads // kv_heads
    q = query.reshape(1, kv_heads, group * n, d)  # the query heads of one key/value head, stacked
    scores = torch.matmul(q, module.k_cache) * scaling  # (1, kv_heads, group * n, context)
    scores = scores + static_kv_biases[sliding_window].repeat(group, 1)
    weights = torch.softmax(scores, dim=-1)
    out = torch.matmul(weights, module.v_cache)  # (1, kv_heads, group * n, d)
    return out.reshape(1, heads, n, d).transpose(1, 2), None


def _self_check(model, path: Path, quant: str, max_seq: int) -> dict[str, Any]:
    """ExecuTorch's runtime against `model` in torch on one sequence: all of it in calls
    of max_seq_len tokens (the prefill), then its last tokens again one a call (decoding
    on top of the cache). Returns the worst difference and the logit scale."""
    import numpy as np
    import torch

    from shrink.runtime.executorch_runtime import KVProgram

    program = KVProgram(path)
    try:
        length = min(max_seq + 8, program.context_length)  # two calls when the context allows
        ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            expected = model(input_ids=ids).logits[0].float().numpy()  # (length, vocab)
        ids = ids[0].tolist()
        got = {"prefill": program.run(ids, 0)}
        tail = max(1, length - 6)
        got["one token a call"] = np.concatenate([program.run([t], tail + i) for i, t in enumerate(ids[tail:])])
    finally:
        program.close()
    diffs = {"prefill": float(np.abs(got["prefill"] - expected).max()),
             "one token a call": float(np.abs(got["one token a call"] - expected[tail:]).max())}
    worst = max(diffs, key=diffs.get)
    return {"max_abs_diff": diffs[worst], "worst_step": worst, "logit_scale": float(np.abs(expected).max()),
            "tolerance": SELF_CHECK_TOL["fp32" if quant == "fp32" else "quantized"], "tokens": length}
