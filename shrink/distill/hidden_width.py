"""Hidden-size pruning: fewer embedding channels (`--hidden-size N`, `--hidden-ratio R`).

Minitron's embedding-channel pruning (Muralidharan et al., 2024): every tensor that reads
or writes the residual stream has a hidden dimension, and a channel of that stream can
be removed from all of them at once. After the layer cut (and the MLP/head pruning of
shrink.distill.width), the student runs over a sample of the task's texts; channel c
scores the sum over every hidden-width RMSNorm (each layer's, and the final norm) of the
mean |output_c| over the non-pad tokens (Minitron aggregates the norms' outputs over
tokens and layers). The highest-scoring channels are kept, in their original order.

Sliced: the embeddings' and the output head's columns (tied or not), every hidden-width
norm, the input columns of q/k/v and gate/up, the output rows of o_proj and down_proj
(and their biases). Per-head norms (q_norm/k_norm) act on head_dim and are unchanged;
head_dim is written into the config, so it is not recomputed as hidden_size / heads.

What the narrower student computes at the start:
- RMSNorm divides by the root mean square over the channels. On fewer channels that mean
  is over fewer terms: if the dropped channels held nothing, every norm's output would
  grow by sqrt(old / new). Each hidden-width norm's gain is multiplied by sqrt(new / old)
  to undo it, so pruning channels that are zero throughout the residual stream gives
  exactly the teacher's logits (tested); channels that held little give nearly them.
- Gemma multiplies its input embeddings by sqrt(hidden_size), computed from the config:
  narrower, it would scale the stream by sqrt(new) instead of sqrt(old). The embedding
  rows are multiplied by sqrt(old / new) so the stream starts as before. When the output
  head is the embedding matrix (tied), the logits would grow by the same factor: the
  final norm's gain is divided by it. Gemma's RMSNorm multiplies by (1 + weight), so the
  gain g = 1 + weight is scaled, not the weight. llama.cpp computes the same
  sqrt(hidden_size) from the GGUF's embedding length, so the exported student agrees.

Width: a multiple of 256, so llama.cpp's k-quants (rows of 256 values) apply to every
tensor that reads the hidden state (Gemma 3 270M's 640 makes Q4_K_M fall back to Q5_0 and
Q8_0 on those tensors). `--hidden-size N`: N itself, a multiple of 256, at least 256,
below the pruned model's width. `--hidden-ratio R`: the nearest multiple of 256 to R x
width (halves up), at least 256; a width the rounding leaves unchanged is not pruned.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from shrink.errors import ModelError, ShrinkError

STEP = 256  # the kept hidden size is a multiple of this (llama.cpp's k-quant rows)

# Per decoder layer, state-dict key -> the dimension that runs over hidden channels, in
# the llama.cpp-style layout llama, mistral, qwen2/3 and gemma 1-3 share. None: no hidden
# dimension, though its size may equal the hidden size (q/k/v biases: heads x head_dim).
LAYER_SLICES = {
    "input_layernorm.weight": 0,
    "post_attention_layernorm.weight": 0,
    "pre_feedforward_layernorm.weight": 0,  # Gemma 2/3
    "post_feedforward_layernorm.weight": 0,  # Gemma 2/3
    "self_attn.q_proj.weight": 1,
    "self_attn.k_proj.weight": 1,
    "self_attn.v_proj.weight": 1,
    "self_attn.o_proj.weight": 0,
    "self_attn.o_proj.bias": 0,
    "mlp.gate_proj.weight": 1,
    "mlp.up_proj.weight": 1,
    "mlp.down_proj.weight": 0,
    "mlp.down_proj.bias": 0,
    "self_attn.q_proj.bias": None,
    "self_attn.k_proj.bias": None,
    "self_attn.v_proj.bias": None,
    "self_attn.q_norm.weight": None,  # per head (Gemma 3, Qwen 3)
    "self_attn.k_norm.weight": None,
    "mlp.gate_proj.bias": None,
    "mlp.up_proj.bias": None,
}
MODEL_SLICES = {"model.embed_tokens.weight": 1, "model.norm.weight": 0, "lm_head.weight": 1, "lm_head.bias": None}
NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
# Families whose RMSNorm multiplies by (1 + weight) and whose input embeddings are scaled
# by sqrt(hidden_size) (transformers' Gemma*RMSNorm and Gemma embeddings; llama.cpp's
# gemma builds scale by sqrt(n_embd)).
GEMMA_STYLE = ("gemma", "gemma2", "gemma3", "gemma3_text")


def hidden_width(size: int, ratio: float) -> int:
    """The kept hidden size for --hidden-ratio: the nearest multiple of 256 to ratio x
    size (halves up), at least 256, at most `size` (kept as it is when rounding reaches it)."""
    if ratio >= 1.0 or size <= STEP:
        return size
    return min(size, max(STEP, math.floor(ratio * size / STEP + 0.5) * STEP))


def check_hidden_options(cfg, folder: Path, whose: str) -> None:
    """--hidden-size/--hidden-ratio against the hidden size in `folder`'s config.json (the
    model they prune: `whose`, "the teacher's" or "--student's"), before anything is loaded."""
    if cfg.hidden_size is not None and cfg.hidden_ratio is not None:
        raise ShrinkError("--hidden-size and --hidden-ratio cannot be used together")
    if cfg.hidden_ratio is not None and not 0.0 < cfg.hidden_ratio <= 1.0:
        raise ShrinkError(f"--hidden-ratio must be above 0 and at most 1 (1 keeps every channel), got {cfg.hidden_ratio}")
    if cfg.hidden_size is None:
        return
    if cfg.hidden_size < STEP or cfg.hidden_size % STEP:
        raise ShrinkError(f"--hidden-size must be a multiple of {STEP} (llama.cpp's k-quant rows), "
                          f"at least {STEP}, got {cfg.hidden_size}")
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    width = config.get("hidden_size") or config.get("text_config", {}).get("hidden_size")
    if isinstance(width, int) and cfg.hidden_size >= width:
        raise ShrinkError(f"--hidden-size {cfg.hidden_size} must be below {whose} hidden size {width}")


def target_hidden(width: int, hidden_size: int | None, hidden_ratio: float | None) -> int:
    """The hidden size the options ask of a model `width` wide (checked before)."""
    if hidden_size is not None:
        return hidden_size
    return hidden_width(width, hidden_ratio) if hidden_ratio is not None else width


def hidden_size_of(model) -> int:
    return model.config.get_text_config().hidden_size


def unknown_hidden_weights(model) -> list[str]:
    """The hidden-sized weights neither LAYER_SLICES nor MODEL_SLICES knows (a fused
    qkv_proj, a LayerNorm bias, another family's extra): none, or hidden pruning would
    leave them wide."""
    from shrink.distill.layers import LAYER_KEY

    hidden = hidden_size_of(model)
    unknown = []
    for key, tensor in model.state_dict().items():
        m = LAYER_KEY.match(key)
        known = LAYER_SLICES if m else MODEL_SLICES
        if (m.group(3)[1:] if m else key) not in known and hidden in tensor.shape:
            unknown.append(key)
    return unknown


def check_layout(model) -> None:
    unknown = unknown_hidden_weights(model)
    if unknown:
        raise ModelError(f"--hidden-size/--hidden-ratio: {type(model).__name__} has hidden-sized weights shrink does "
                         f"not know how to slice ({', '.join(unknown[:3])}); hidden pruning supports the Llama, "
                         "Mistral, Qwen 2/3 and Gemma layouts")


def channel_scores(model, batches):
    """(hidden,) float64: the sum over every hidden-width RMSNorm of its mean |output| per
    channel, over the non-pad tokens of `batches` ((ids, attention mask) pairs)."""
    import torch

    from shrink.distill.layers import decoder_layers
    from shrink.distill.width import run_hooked

    check_layout(model)
    norms = [layer.get_submodule(name) for layer in decoder_layers(model) for name in NORMS if hasattr(layer, name)]
    norms.append(model.get_submodule("model.norm"))
    sums = [torch.zeros(hidden_size_of(model), dtype=torch.float64) for _ in norms]
    current = {}

    def hook(index):
        def record(module, args, output):
            sums[index] += output[current["valid"]].abs().double().sum(0).cpu()  # (tokens, hidden) -> (hidden,)
        return record

    handles = [norm.register_forward_hook(hook(i)) for i, norm in enumerate(norms)]
    count = run_hooked(model, batches, handles, current)
    return torch.stack(sums).sum(0) / max(count, 1)


def prune_hidden(model, size: int, scores):
    """A new model `size` channels wide keeping the highest-`scores` channels (in their
    order), weights copied and rescaled as the module docstring says. Returns (model,
    the kept channel indices)."""
    import torch

    from shrink.distill.layers import LAYER_KEY, model_from_state

    check_layout(model)
    config = model.config.__class__.from_dict(model.config.to_dict())
    text = config.get_text_config()
    old = text.hidden_size
    kept = torch.topk(scores, size).indices.sort().values
    gemma = text.model_type in GEMMA_STYLE
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    rms = math.sqrt(old / size)  # every norm's gain: undoes the mean over fewer channels
    embed = math.sqrt(old / size) if gemma else 1.0  # Gemma: embeddings times sqrt(old) / sqrt(new)

    state = {}
    for key, tensor in model.state_dict().items():
        m = LAYER_KEY.match(key)
        dim = LAYER_SLICES.get(m.group(3)[1:]) if m else MODEL_SLICES.get(key)
        if dim is None:
            state[key] = tensor
            continue
        t = tensor.index_select(dim, kept.to(tensor.device)).clone()
        norm = key.endswith("norm.weight")
        if norm:
            gain = rms / embed if key == "model.norm.weight" and tied else rms  # tied: the head grew by `embed`
            t = (1.0 + t) * gain - 1.0 if gemma else t * gain
        elif key == "model.embed_tokens.weight":
            t = t * embed
        state[key] = t
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]

    text.hidden_size = size
    head_dim = getattr(text, "head_dim", None) or old // text.num_attention_heads
    text.head_dim = head_dim  # explicit: hidden_size / heads would now be wrong
    return model_from_state(config, state, "hidden-pruned"), kept.tolist()
