"""Width pruning: fewer MLP channels and attention heads (`--ffn-ratio`, `--heads-ratio`).

The Minitron recipe (Muralidharan et al., 2024): after the layer cut, run the student
over a sample of the task's texts, score every MLP intermediate channel and every
attention head by its mean activation, keep the highest-scoring ones in each layer,
and let distillation recover the rest.

- MLP channel j: mean |a_j| over tokens, a being the input of down_proj
  (act(gate(x)) * up(x)).
- Attention head h: mean over tokens of the L2 norm of the head's attention output (its
  slice of o_proj's input). Keys and values are shared by a group of query heads (GQA),
  so groups are kept or dropped whole, scored by the sum of their heads; within each kept
  group its highest-scoring query heads stay, the same number in every group (as the
  attention code requires). A model with a single group (Gemma 3 270M: 4 query heads,
  1 key/value head) keeps it and drops query heads.

Each layer keeps its own channels and heads; the counts are the same in every layer, as
a config holds one width. Widths are rounded for llama.cpp's quantizers:
- the MLP intermediate size becomes a multiple of 256 (k-quant rows are 256 values)
  when the original was, else a multiple of 32 (Q8_0/Q4_0 blocks): the nearest multiple
  to ratio * size, at least one multiple, at most the original size. down_proj reads
  that many values per row.
- the heads: round(ratio * kv_heads) groups, at least one, each keeping round(ratio *
  heads / groups) query heads, at least one. o_proj reads query_heads * head_dim values
  per row, a multiple of 256 whenever head_dim is (Llama 3: 128 per head, 4 per group;
  Gemma 3: 256).
head_dim is written into the config, so it is not recomputed as hidden_size / heads.
Per-head norms (Gemma 3's and Qwen 3's q_norm/k_norm) act on head_dim and are unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shrink.errors import ModelError

# What width pruning slices, per decoder layer, in the llama.cpp-style layout that
# llama, mistral, qwen2/3 and gemma 1-3 share: state-dict key -> (which index, dim).
# "q": kept query heads' rows, "kv": kept key/value heads' rows, "ffn": kept channels.
SLICES = {
    "self_attn.q_proj.weight": ("q", 0),
    "self_attn.q_proj.bias": ("q", 0),
    "self_attn.k_proj.weight": ("kv", 0),
    "self_attn.k_proj.bias": ("kv", 0),
    "self_attn.v_proj.weight": ("kv", 0),
    "self_attn.v_proj.bias": ("kv", 0),
    "self_attn.o_proj.weight": ("q", 1),  # o_proj's bias is per hidden unit: unchanged
    "mlp.gate_proj.weight": ("ffn", 0),
    "mlp.gate_proj.bias": ("ffn", 0),
    "mlp.up_proj.weight": ("ffn", 0),
    "mlp.up_proj.bias": ("ffn", 0),
    "mlp.down_proj.weight": ("ffn", 1),  # down_proj's bias is per hidden unit: unchanged
}
GRAM_BYTES = 8 * 2**30  # --ffn-refit's float64 Gram matrices, all layers together (Gemma 3 270M: 32 MiB a layer)
DAMP = 0.01  # of the Gram matrix's mean diagonal, added to its diagonal (GPTQ's damping)
REQUIRED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class Widths:
    intermediate: int  # MLP intermediate channels
    heads: int  # query heads
    kv_heads: int  # key/value heads (groups)
    head_dim: int


def widths_of(model) -> Widths:
    c = model.config.get_text_config()
    heads = c.num_attention_heads
    if not isinstance(c.intermediate_size, int):
        raise ModelError(f"{type(model).__name__}: width pruning needs one intermediate_size, got {c.intermediate_size}")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return Widths(c.intermediate_size, heads, getattr(c, "num_key_value_heads", None) or heads, head_dim)


def ffn_width(size: int, ratio: float) -> int:
    """The kept MLP intermediate size: a multiple of 256 when `size` is one, else of 32."""
    step = 256 if size % 256 == 0 else 32
    if ratio >= 1.0 or size <= step:
        return size
    return min(size, max(step, math.floor(ratio * size / step + 0.5) * step))  # nearest, halves up


def target_widths(now: Widths, ffn_ratio: float, heads_ratio: float) -> Widths:
    """The widths `ffn_ratio` and `heads_ratio` keep: round(ratio * kv_heads) key/value
    groups (at least one), each with round(ratio * heads / groups) of its query heads (at
    least one): a model with one group (Gemma 3 270M) keeps it and drops query heads."""
    ffn = ffn_width(now.intermediate, ffn_ratio)
    if heads_ratio >= 1.0:
        return Widths(ffn, now.heads, now.kv_heads, now.head_dim)
    kv = max(1, round(heads_ratio * now.kv_heads))
    per_group = min(now.heads // now.kv_heads, max(1, round(heads_ratio * now.heads / kv)))
    return Widths(ffn, kv * per_group, kv, now.head_dim)


def activation_scores(model, batches, gram: bool = False) -> list[dict]:
    """Per decoder layer: {"ffn": (intermediate,) mean |input of down_proj|, "heads":
    (heads,) mean L2 norm of each query head's attention output}, over the non-pad tokens
    of `batches` ((ids, attention mask) pairs). With `gram`, also "gram":
    the (intermediate, intermediate) mean of a a^T over the tokens, a being down_proj's
    input, which refit_down needs."""
    import torch

    from shrink.distill.layers import decoder_layers

    w = widths_of(model)
    layers = decoder_layers(model)
    check_layout(model)
    sums = [{"ffn": torch.zeros(w.intermediate, dtype=torch.float64),
             "heads": torch.zeros(w.heads, dtype=torch.float64)} for _ in layers]
    if gram:
        need = len(layers) * w.intermediate ** 2 * 8
        if need > GRAM_BYTES:
            raise ModelError(f"--ffn-refit: the least-squares fit holds a {w.intermediate:,} x {w.intermediate:,} matrix "
                             f"per layer, {need / 2**30:.1f} GiB for {len(layers)} layers, over the "
                             f"{GRAM_BYTES // 2**30} GiB it may use; leave --ffn-refit out for this model")
        for entry in sums:
            entry["gram"] = torch.zeros(w.intermediate, w.intermediate, dtype=torch.float64)
    current = {}

    def on_ffn(index):
        def record(module, args):
            a = args[0][current["valid"]]  # (tokens, intermediate)
            sums[index]["ffn"] += a.abs().double().sum(0).cpu()
            if gram:
                a = a.double().cpu()
                sums[index]["gram"] += a.T @ a
        return record

    def on_heads(index):
        def record(module, args):
            a = args[0][current["valid"]]  # (tokens, heads * head_dim)
            sums[index]["heads"] += a.view(a.shape[0], w.heads, w.head_dim).double().norm(dim=-1).sum(0).cpu()
        return record

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.get_submodule("mlp.down_proj").register_forward_pre_hook(on_ffn(i)))
        handles.append(layer.get_submodule("self_attn.o_proj").register_forward_pre_hook(on_heads(i)))
    count = run_hooked(model, batches, handles, current)
    return [{"ffn": s["ffn"] / max(count, 1), "heads": s["heads"] / max(count, 1),
             **({"gram": s["gram"] / max(count, 1)} if gram else {})} for s in sums]


def check_layout(model) -> None:
    from shrink.distill.layers import decoder_layers

    layer = decoder_layers(model)[0]
    names = {n for n, _ in layer.named_modules()}
    missing = [n for n in REQUIRED if n not in names]
    if missing:
        raise ModelError(f"--ffn-ratio/--heads-ratio: {type(model).__name__} has no {', '.join(missing)} in its "
                         f"decoder layers (width pruning supports separate q/k/v/o and gate/up/down projections)")


def prune_width(model, target: Widths, scores: list[dict]):
    """A new model with `target` widths, keeping in each layer the channels and KV groups
    with the highest scores (in their original order), weights copied."""
    import torch

    from shrink.distill.layers import LAYER_KEY, model_from_state

    now = widths_of(model)
    per_group = now.heads // now.kv_heads
    index = []
    for s in scores:
        ffn = torch.topk(s["ffn"], target.intermediate).indices.sort().values
        heads = s["heads"].view(now.kv_heads, per_group)
        groups = torch.topk(heads.sum(-1), target.kv_heads).indices.sort().values  # a group scores its heads' sum
        keep_per_group = target.heads // target.kv_heads  # within a kept group, its highest-scoring query heads
        q_heads = torch.cat([g * per_group + torch.topk(heads[g], keep_per_group).indices.sort().values for g in groups])
        index.append({"ffn": ffn, "kv": _rows(groups, now.head_dim), "q": _rows(q_heads, now.head_dim)})

    state = {}
    for key, tensor in model.state_dict().items():
        m = LAYER_KEY.match(key)
        rule = SLICES.get(m.group(3)[1:]) if m else None
        if rule is None:
            state[key] = tensor
        else:
            which, dim = rule
            layer = int(m.group(2))
            kept = index[layer][which].to(tensor.device)
            if m.group(3) == ".mlp.down_proj.weight" and "gram" in scores[layer]:
                state[key] = refit_down(tensor, kept, scores[layer]["gram"])
            else:
                state[key] = tensor.index_select(dim, kept).clone()

    return model_from_state(pruned_config(model, target), state, "width-pruned student")


def pruned_config(model, target: Widths):
    """`model`'s config with the `target` widths, checked by the family's own config
    validation (the one saving and loading the student run), so a width it refuses fails
    before any work: Gemma 3's, for one, wants the hidden size a multiple of the query
    heads even though its head_dim is explicit."""
    now = widths_of(model)
    config = model.config.__class__.from_dict(model.config.to_dict())
    text = config.get_text_config()
    text.intermediate_size = target.intermediate
    text.num_attention_heads = target.heads
    text.num_key_value_heads = target.kv_heads
    text.head_dim = now.head_dim  # explicit: hidden_size / heads would now be wrong
    validate = getattr(config, "validate", None)  # transformers 5's strict configs
    if validate is not None:
        validate()
    return config


def check_widths(model, ffn_ratio: float, heads_ratio: float) -> Widths:
    """The widths `ffn_ratio` and `heads_ratio` keep of `model`, or ModelError naming
    --heads-ratio and the ratios the family's config accepts when it refuses them."""
    now = widths_of(model)
    target = target_widths(now, ffn_ratio, heads_ratio)
    try:
        pruned_config(model, target)
    except _config_errors() as e:
        fine = [f"{k / now.heads:g}" for k in range(1, now.heads + 1) if _accepted(model, now, k / now.heads)]
        why = str(e).strip().splitlines()[-1].strip()
        raise ModelError(f"--heads-ratio {heads_ratio:g}: {target.heads} of {now.heads} query heads, which "
                         f"{type(model.config).__name__} refuses ({why}); ratios it accepts: {', '.join(fine)}") from e
    return target


def _accepted(model, now: Widths, ratio: float) -> bool:
    try:
        pruned_config(model, target_widths(now, 1.0, ratio))
    except _config_errors():
        return False
    return True


def _config_errors() -> tuple[type[Exception], ...]:
    """What a config's validation raises: huggingface_hub's strict-dataclass error (not a
    ValueError) in transformers 5, ValueError where a family checks in its own code."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return (ValueError,)
    return (ValueError, StrictDataclassError)




def refit_down(weight, kept, gram):
    """down_proj's weight (hidden, intermediate) for the `kept` channels alone, re-fitted by
    least squares so that the pruned MLP's output on the calibration tokens stays as close
    as it can to the whole MLP's: W_K = W G[:, K] (G[K, K] + damp I)^-1, G being the mean
    a a^T of down_proj's input a (the compensation step of OBS-style structured pruning,
    as in ZipLM and SlimGPT). Without it the dropped channels' part of the output is
    simply lost, for training to recover."""
    import torch

    g = gram.to(torch.float64)
    k = kept.cpu()
    gkk = g[k][:, k]
    gkk = gkk + DAMP * gkk.diagonal().mean().clamp_min(1e-12) * torch.eye(len(k), dtype=torch.float64)
    cross = g[:, k]  # (intermediate, kept)
    fitted = torch.linalg.solve(gkk, cross.T @ weight.double().cpu().T).T  # W G[:, K] G[K, K]^-1; G is symmetric
    return fitted.to(weight.dtype).to(weight.device)


def _rows(units, size: int):
    """Row indices of whole units (heads) of `size` rows each."""
    import torch

    return (units[:, None] * size + torch.arange(size)).flatten()


def run_hooked(model, batches, handles, current: dict) -> int:
    """Runs the task's (ids, attention mask) batches through the model's body while the
    forward hooks `handles` record activations (they read `current["valid"]`, the mask of
    real tokens), removes the hooks, and returns how many real tokens went through."""
    import torch

    count = 0
    try:
        with torch.no_grad():
            for ids, attn in batches:
                current["valid"] = attn.bool()
                model.base_model(input_ids=ids, attention_mask=attn)
                count += int(attn.sum())
    finally:
        for h in handles:
            h.remove()
    return count
