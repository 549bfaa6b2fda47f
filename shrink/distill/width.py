"""Width pruning: fewer MLP channels and attention heads (`--ffn-ratio`, `--heads-ratio`),
and narrower heads (`--head-dim`).

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

`--head-dim N` narrows every head from head_dim to N dimensions (N divides head_dim), in
every kept query, key and value head (one head_dim in the config, as the attention code
and llama.cpp want: keys and values alike):
- queries and keys keep the dimensions that rotate at every (head_dim / N)-th of the
  rotary frequencies (in the rotate-half layout, the pairs i and i + head_dim/2 for i a
  multiple of head_dim / N). A head of N dimensions computes its frequencies as
  base^(-2i'/N), and for i = i' * head_dim / N that is the teacher's base^(-2i/head_dim):
  the kept dimensions rotate exactly as they did (checked against the models' own
  inv_freq buffers, so a rotary scheme where that fails is refused). The per-head norms
  keep the same dimensions. The attention scores, summed over N dimensions instead of
  head_dim and scaled by N^-1/2 (query_pre_attn_scalar follows head_dim where it equalled
  it; llama.cpp's Gemma 3 scales by head_dim^-1/2 whatever the config says), would shrink
  by (N / head_dim)^1/2, so the queries are scaled up by the inverse: through the
  q_norm's gain where there is one, else q_proj's rows.
- values keep, per key/value group, the N dimensions whose attention output (summed over
  the group's query heads) has the highest mean |activation|; o_proj keeps the matching
  columns of each of the group's query heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shrink.errors import ModelError

# What width pruning slices, per decoder layer, in the llama.cpp-style layout that
# llama, mistral, qwen2/3 and gemma 1-3 share: state-dict key -> (which index, dim).
# "q"/"k"/"v": the kept rows of the kept heads (the kept dimensions of each), "o": the
# columns of the kept query heads' kept value dimensions, "ffn": the kept channels,
# "qk_dims": the kept query/key dimensions of one head.
SLICES = {
    "self_attn.q_proj.weight": ("q", 0),
    "self_attn.q_proj.bias": ("q", 0),
    "self_attn.k_proj.weight": ("k", 0),
    "self_attn.k_proj.bias": ("k", 0),
    "self_attn.v_proj.weight": ("v", 0),
    "self_attn.v_proj.bias": ("v", 0),
    "self_attn.o_proj.weight": ("o", 1),  # o_proj's bias is per hidden unit: unchanged
    "mlp.gate_proj.weight": ("ffn", 0),
    "mlp.gate_proj.bias": ("ffn", 0),
    "mlp.up_proj.weight": ("ffn", 0),
    "mlp.up_proj.bias": ("ffn", 0),
    "mlp.down_proj.weight": ("ffn", 1),  # down_proj's bias is per hidden unit: unchanged
    "self_attn.q_norm.weight": ("qk_dims", 0),  # per-head norms: only when --head-dim narrows the heads
    "self_attn.k_norm.weight": ("qk_dims", 0),
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


def target_widths(now: Widths, ffn_ratio: float, heads_ratio: float, head_dim: int | None = None) -> Widths:
    """The widths `ffn_ratio` and `heads_ratio` keep: round(ratio * kv_heads) key/value
    groups (at least one), each with round(ratio * heads / groups) of its query heads (at
    least one): a model with one group (Gemma 3 270M) keeps it and drops query heads.
    `head_dim`: each head's dimensions (--head-dim; None keeps them), checked by
    check_head_dim."""
    ffn = ffn_width(now.intermediate, ffn_ratio)
    dims = now.head_dim if head_dim is None else check_head_dim(now.head_dim, head_dim)
    if heads_ratio >= 1.0:
        return Widths(ffn, now.heads, now.kv_heads, dims)
    kv = max(1, round(heads_ratio * now.kv_heads))
    per_group = min(now.heads // now.kv_heads, max(1, round(heads_ratio * now.heads / kv)))
    return Widths(ffn, kv * per_group, kv, dims)


def check_head_dim(now: int, wanted: int) -> int:
    """`wanted` (--head-dim) when it narrows heads of `now` dimensions, else ModelError."""
    if wanted == now:
        return now
    if not 0 < wanted < now or now % wanted or (now // wanted) > now // 2:
        fine = [str(now // k) for k in range(2, now // 2 + 1) if now % k == 0 and (now // k) % 2 == 0][:6]
        raise ModelError(f"--head-dim {wanted}: the heads have {now} dimensions; it must divide them and be smaller"
                         f" (e.g. {', '.join(fine)})")
    if wanted % 2:
        raise ModelError(f"--head-dim {wanted}: must be even (rotary embeddings turn dimensions in pairs)")
    return wanted


def rotary_dims(head_dim: int, kept: int):
    """The query/key dimensions of a head that --head-dim `kept` keeps, in their new order:
    in the rotate-half layout dimension i pairs with i + head_dim/2 at frequency index i,
    so every (head_dim / kept)-th pair stays, first halves then second halves."""
    import torch

    step = head_dim // kept
    first = torch.arange(0, head_dim // 2, step)
    return torch.cat([first, first + head_dim // 2])


def activation_scores(model, batches, gram: bool = False) -> list[dict]:
    """Per decoder layer: {"ffn": (intermediate,) mean |input of down_proj|, "heads":
    (heads,) mean L2 norm of each query head's attention output, "v_dims": (heads,
    head_dim) mean |attention output| of each head's dimension}, over the non-pad tokens
    of `batches` ((ids, attention mask) pairs). With `gram`, also "gram":
    the (intermediate, intermediate) mean of a a^T over the tokens, a being down_proj's
    input, which refit_down needs."""
    import torch

    from shrink.distill.layers import decoder_layers

    w = widths_of(model)
    layers = decoder_layers(model)
    check_layout(model)
    sums = [{"ffn": torch.zeros(w.intermediate, dtype=torch.float64),
             "heads": torch.zeros(w.heads, dtype=torch.float64),
             "v_dims": torch.zeros(w.heads, w.head_dim, dtype=torch.float64)} for _ in layers]
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
            a = args[0][current["valid"]].view(-1, w.heads, w.head_dim).double()  # (tokens, heads, head_dim)
            sums[index]["heads"] += a.norm(dim=-1).sum(0).cpu()
            sums[index]["v_dims"] += a.abs().sum(0).cpu()
        return record

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.get_submodule("mlp.down_proj").register_forward_pre_hook(on_ffn(i)))
        handles.append(layer.get_submodule("self_attn.o_proj").register_forward_pre_hook(on_heads(i)))
    count = run_hooked(model, batches, handles, current)
    return [{k: v / max(count, 1) for k, v in s.items()} for s in sums]


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
    with the highest scores (in their original order), weights copied. A narrower
    target.head_dim keeps the rotary dimensions of queries and keys (rotary_dims) and the
    value dimensions with the highest "v_dims" scores, and scales the queries up to keep
    the attention scores' size (the module docstring)."""
    import torch

    from shrink.distill.layers import LAYER_KEY, model_from_state

    now = widths_of(model)
    per_group = now.heads // now.kv_heads
    narrower = target.head_dim < now.head_dim
    qk_dims = rotary_dims(now.head_dim, target.head_dim) if narrower else torch.arange(now.head_dim)
    index = []
    for s in scores:
        ffn = torch.topk(s["ffn"], target.intermediate).indices.sort().values
        heads = s["heads"].view(now.kv_heads, per_group)
        groups = torch.topk(heads.sum(-1), target.kv_heads).indices.sort().values  # a group scores its heads' sum
        keep_per_group = target.heads // target.kv_heads  # within a kept group, its highest-scoring query heads
        q_heads = [g * per_group + torch.topk(heads[g], keep_per_group).indices.sort().values for g in groups]
        if narrower:  # per group, the value dimensions its query heads' outputs use most
            v_dims = [torch.topk(s["v_dims"].view(now.kv_heads, per_group, now.head_dim)[g].sum(0),
                                 target.head_dim).indices.sort().values for g in groups]
        else:
            v_dims = [torch.arange(now.head_dim) for _ in groups]
        index.append({"ffn": ffn, "qk_dims": qk_dims,
                      "q": torch.cat([_rows(h, now.head_dim, qk_dims) for h in q_heads]),
                      "k": _rows(groups, now.head_dim, qk_dims),
                      "v": torch.cat([_rows(g[None], now.head_dim, d) for g, d in zip(groups, v_dims)]),
                      "o": torch.cat([_rows(h, now.head_dim, d) for h, d in zip(q_heads, v_dims)])})

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

    pruned = model_from_state(pruned_config(model, target), state, "width-pruned student")
    if narrower:  # check_widths checked the rotary frequencies
        scale_queries(pruned, (now.head_dim / target.head_dim) ** 0.5)
    return pruned


def check_rotary(model, config, head_dim: int, kept: int) -> None:
    """rotary_dims's assumptions hold: `model`'s rotary frequencies (its `*inv_freq`
    buffers) turn all `head_dim` dimensions of a head, and a model of the narrowed `config`
    computes every (head_dim / kept)-th of them (its rotary modules are rebuilt from it,
    which costs no weights, so this runs before the scores' pass); ModelError when the
    family's rotary scheme (partial rotary, per-frequency factors) breaks that."""
    import torch

    theirs, ours = {}, {}
    for where, module in model.named_modules():
        own = {n: b for n, b in module.named_buffers(recurse=False) if n.endswith("inv_freq")}
        if not own:
            continue
        try:
            with torch.device("cpu"):
                rebuilt = dict(type(module)(config=config.get_text_config()).named_buffers(recurse=False))
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise ModelError(f"--head-dim: {type(model).__name__}'s rotary embedding ({type(module).__name__}) cannot "
                             f"be rebuilt for narrower heads ({e}); leave --head-dim out for this family") from None
        for n, b in own.items():
            name = f"{where}.{n}" if where else n
            theirs[name], ours[name] = b, rebuilt.get(n)
    if not theirs:
        raise ModelError(f"--head-dim: {type(model).__name__} has no rotary frequencies (inv_freq) to keep")
    step = head_dim // kept
    for name, freqs in theirs.items():
        mine = ours[name]
        if (freqs.shape[-1] * 2 != head_dim or mine is None or mine.shape[-1] * step != freqs.shape[-1]
                or not torch.allclose(mine.double().cpu(), freqs[..., ::step].double().cpu(), rtol=1e-5, atol=0)):
            raise ModelError(f"--head-dim: narrowing {type(model).__name__}'s heads would change how they rotate "
                             f"({name}: not every dimension turns, or not at the teacher's frequencies); leave "
                             "--head-dim out for this family")


def scale_queries(model, factor: float) -> None:
    """Queries times `factor`, in place: the q_norm's gain where the layer has one (its
    output is the gain times the normalized input, the gain affine in the weight, as in
    Gemma's 1 + w and Qwen 3's w), else q_proj's rows and bias."""
    import torch

    from shrink.distill.layers import decoder_layers

    with torch.no_grad():
        for layer in decoder_layers(model):
            attn = layer.self_attn
            norm = getattr(attn, "q_norm", None)
            if norm is None:
                attn.q_proj.weight.mul_(factor)
                if attn.q_proj.bias is not None:
                    attn.q_proj.bias.mul_(factor)
                continue
            ones = torch.ones(1, norm.weight.shape[0], dtype=torch.float32, device=norm.weight.device)
            w = norm.weight.detach().clone()

            def gain(weight):
                norm.weight.copy_(weight)
                return norm(ones.to(norm.weight.dtype)).float()[0]

            at_w, at_0, at_1 = gain(w), gain(torch.zeros_like(w)), gain(torch.ones_like(w))
            norm.weight.copy_(((factor * at_w - at_0) / (at_1 - at_0)).to(w.dtype))


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
    text.head_dim = target.head_dim  # explicit: hidden_size / heads would now be wrong
    if target.head_dim != now.head_dim and getattr(text, "query_pre_attn_scalar", None) == now.head_dim:
        text.query_pre_attn_scalar = target.head_dim  # Gemma: the scores' scale follows head_dim, as llama.cpp's does
    validate = getattr(config, "validate", None)  # transformers 5's strict configs
    if validate is not None:
        validate()
    return config


def check_widths(model, ffn_ratio: float, heads_ratio: float, head_dim: int | None = None) -> Widths:
    """The widths `ffn_ratio`, `heads_ratio` and `head_dim` keep of `model`, or ModelError
    naming --head-dim when it does not divide the heads, or --heads-ratio and the ratios
    the family's config accepts when it refuses them."""
    now = widths_of(model)
    target = target_widths(now, ffn_ratio, heads_ratio, head_dim)
    try:
        config = pruned_config(model, target)
    except _config_errors() as e:
        fine = [f"{k / now.heads:g}" for k in range(1, now.heads + 1) if _accepted(model, now, k / now.heads)]
        why = str(e).strip().splitlines()[-1].strip()
        raise ModelError(f"--heads-ratio {heads_ratio:g}: {target.heads} of {now.heads} query heads, which "
                         f"{type(model.config).__name__} refuses ({why}); ratios it accepts: {', '.join(fine)}") from e
    if target.head_dim != now.head_dim:
        check_rotary(model, config, now.head_dim, target.head_dim)
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


def _rows(units, size: int, dims=None):
    """Row indices of units (heads) of `size` rows each: all their rows, or their `dims`."""
    import torch

    dims = torch.arange(size) if dims is None else dims
    return (units[:, None] * size + dims).flatten()


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
