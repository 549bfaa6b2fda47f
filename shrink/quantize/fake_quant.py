"""Weights as llama.cpp's quantizer will round them, for training that expects it.

`fake(w, ggml_type)` rounds each row of `w` in the type's blocks and gives the values
back as floats, value for value as llama.cpp's quantizer writes them without an importance
matrix (tests/test_fake_quant.py checks every type against files llama.cpp wrote):
Q8_0, Q5_0, Q4_0, Q5_1 and Q4_1 follow ggml's reference quantizers (quantize_row_*_ref:
the scale from the block's extreme or range, stored as float16); the non-linear IQ4_NL and
IQ4_XS follow quantize_row_iq4_nl_impl (each block of 32 tries 16 scales for its 16 levels
and keeps the one of least x^2-weighted error; IQ4_XS then codes the 8 block scales of 256
values as 6-bit multiples of one float16); the k-quants Q4_K, Q5_K and Q6_K follow their
reference quantizers' scale searches and 6- or 8-bit scale coding (shrink.quantize.kquants).

`RoundedWeights` trains through that rounding the straight-through way (BinaryConnect,
Courbariaux et al. 2015): before a forward pass each quantized weight is swapped for its
rounded values, and after the backward pass the full-precision weights come back for the
optimizer to update with the gradient taken at the rounded ones. A weight whose type
searches its scales (IQ4_*, the k-quants: SEARCHED) is rounded with the scales its last
search chose, searched again every SEARCH_EVERY steps: a search costs 16 to 40 roundings,
and a step at a gentle learning rate moves a block's best scale by little. Which type each
weight gets is what shrink.quantize.gguf_size predicts for the export
(shrink.distill.size_budget.export_types).
"""

from __future__ import annotations

from shrink.quantize.ggml_float import GROUP_MAX_EPS, half, in_order

MODELED = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "IQ4_NL", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K")


def fake(w, ggml_type: str):
    """`w` (..., row length) rounded as `ggml_type` rounds each row; F32/F16/BF16 as they are."""
    import torch

    if ggml_type == "F32":
        return w
    if ggml_type == "F16":
        return w.half().to(w.dtype)
    if ggml_type == "BF16":
        return w.bfloat16().to(w.dtype)
    size = {"Q6_K": 16, "IQ4_XS": 256}.get(ggml_type, 32)
    if ggml_type not in MODELED:
        raise ValueError(f"no rounding model for ggml type {ggml_type}")
    if w.shape[-1] % size:
        raise ValueError(f"rows of {w.shape[-1]} do not fit {ggml_type}'s blocks of {size}")
    if ggml_type in SEARCHED:
        x = w.detach().float()
        return round_searched(x, ggml_type, search_scales(x, ggml_type)).to(w.dtype)
    x = w.detach().float().reshape(-1, size)
    if ggml_type == "Q8_0":
        d = x.abs().amax(1, keepdim=True) / 127
        q = _roundf(x * _inverse(d))
        out = q * half(d)
    elif ggml_type in ("Q5_0", "Q4_0"):
        levels = 16 if ggml_type == "Q5_0" else 8
        extreme = x.gather(1, x.abs().argmax(1, keepdim=True))  # the value of largest magnitude, signed
        d = extreme / -levels
        q = torch.clamp(torch.floor(x * _inverse(d) + levels + 0.5), max=2 * levels - 1)
        out = (q - levels) * half(d)
    else:  # Q5_1, Q4_1
        top = 31 if ggml_type == "Q5_1" else 15
        lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        d = (hi - lo) / top
        q = torch.clamp(torch.floor((x - lo) * _inverse(d) + 0.5), max=top)
        out = q * half(d) + half(lo)
    return out.reshape(w.shape).to(w.dtype)


IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # kvalues_iq4nl
IQ4_TRIES = 7  # ntry: the scales tried are (itry - 127) / max for itry in -7..7, after max / 127
SEARCHED = ("IQ4_NL", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K")  # types whose scales come from a search, not a formula
SEARCH_EVERY = 16  # training steps between two searches of a weight's scales (RoundedWeights)


def search_scales(w, ggml_type: str):
    """The scales llama.cpp's search picks for `w` (a SEARCHED type), for round_searched."""
    if ggml_type in ("IQ4_NL", "IQ4_XS"):
        return iq4_scales(w, ggml_type)
    from shrink.quantize.kquants import kquant_scales

    return kquant_scales(w, ggml_type)


def round_searched(w, ggml_type: str, scales):
    """`w` rounded with scales from search_scales (of `w` itself, or of its values a few steps ago)."""
    if ggml_type in ("IQ4_NL", "IQ4_XS"):
        return iq4_round(w, scales)
    from shrink.quantize.kquants import kquant_round

    return kquant_round(w, ggml_type, scales)


def iq4_scales(w, ggml_type: str):
    """quantize_row_iq4_nl_impl's scales for `w` (rows of 32 or 256 values), one pair per block
    of 32: (the scale whose inverse picks each value's level, the float16-coded one the file
    multiplies the level by). The search is 16 passes over the weights: RoundedWeights keeps
    the scales for a few steps (SEARCH_EVERY) and only rounds with them in between."""
    import torch

    x = w.detach().float().reshape(-1, 32)
    chunk = 1 << 14  # blocks at a time: the 16 tried scales make 16 copies of each
    d = torch.cat([_searched_scale(x[i:i + chunk]) for i in range(0, len(x), chunk)])
    if ggml_type == "IQ4_NL":
        return d, half(d)
    scales = d.reshape(-1, 8)  # IQ4_XS: the 8 block scales of 256 values as 6-bit multiples of one float16
    big = scales.gather(1, scales.abs().argmax(1, keepdim=True))  # the largest in magnitude, signed
    dh = -big / 32
    ls = torch.clamp(torch.round(scales * _inverse(dh)), -32, 31)  # nearest_int: halves to even
    return (dh * ls).reshape(-1), (half(dh) * ls).reshape(-1)


def iq4_round(w, scales):
    """`w` rounded to the IQ4 levels with the blocks' scales from iq4_scales."""
    import torch

    pick, stored = scales
    x = w.detach().float().reshape(-1, 32)
    levels = _iq4_levels()
    out = torch.take(levels, _nearest_level(x * _inverse(pick[:, None]))) * stored[:, None]
    return out.reshape(w.shape).to(w.dtype)


def _searched_scale(b):
    """Each block's scale: the best of ggml's 16 tries (x^2-weighted error), refitted."""
    import torch

    levels = _iq4_levels()
    amax, at = b.abs().max(1, keepdim=True)  # the first value of largest magnitude, as ggml's strict `>`
    top = b.gather(1, at)
    empty = amax < GROUP_MAX_EPS  # no scale
    safe = torch.where(empty, torch.ones_like(top), top)
    first = 1 / (-safe / levels[0])
    tries = (torch.arange(-IQ4_TRIES, IQ4_TRIES + 1, dtype=torch.float32) + levels[0]) / safe
    ids = torch.cat([first, tries], 1)  # (blocks, 16), in the order ggml tries them
    bt = b.t().contiguous()  # (32, blocks): the sums below add one contiguous slice per term
    q = torch.take(levels, _nearest_level(bt[:, :, None] * ids[None]))  # (32, blocks, 16)
    wq = (bt * bt)[:, :, None] * q
    sumqx, sumq2 = in_order(wq * bt[:, :, None]), in_order(wq * q)
    d = sumqx[:, 0] / sumq2[:, 0]
    best = d * sumqx[:, 0]
    for k in range(1, ids.shape[1]):  # a later try replaces the scale only when strictly better
        better = (sumq2[:, k] > 0) & (sumqx[:, k] * sumqx[:, k] > best * sumq2[:, k])
        d = torch.where(better, sumqx[:, k] / sumq2[:, k], d)
        best = torch.where(better, d * sumqx[:, k], best)
    return torch.where(empty[:, 0], torch.zeros_like(d), d)


def _iq4_levels():
    import torch

    return torch.tensor(IQ4_LEVELS, dtype=torch.float32)


def _nearest_level(a):
    """best_index_int8: the nearest level, a tie going to the upper one. Counting the midpoints
    at or below `a` is the same choice: near a midpoint ggml's two differences are exact in
    float32 (each at most 12 from a value at least 4.5 in magnitude)."""
    import torch

    levels = _iq4_levels()
    return torch.bucketize(a, (levels[1:] + levels[:-1]) / 2, right=True)


def _roundf(x):
    """C's roundf: halves away from zero (torch.round takes them to the even neighbour)."""
    import torch

    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _inverse(d):
    import torch

    return torch.where(d != 0, 1 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))


# GGUF file types whose every tensor type (with llama.cpp's fallbacks) has a rounding model above.
FILE_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_0", "IQ4_XS", "IQ4_NL")


class RoundedWeights:
    """Swaps a model's weights for their rounded values around each training step:
    `round()` before the forward pass, `restore()` after the backward pass."""

    def __init__(self, model, types: dict[str, str]):
        self.model, self.types = model, types
        self.weights: list = []
        self.saved = None
        self.rounds = 0
        self.scales: dict = {}  # SEARCHED types: name -> (shape, search_scales), redone every SEARCH_EVERY rounds

    def round(self) -> None:
        import torch

        if self.saved is not None:
            return
        # Looked up by name each time: --prune-gradually replaces the MLP weights it cuts.
        params = dict(self.model.named_parameters(remove_duplicate=False))
        self.weights = [(k, params[k], t) for k, t in self.types.items() if k in params]
        with torch.no_grad():
            self.saved = [p.detach().clone() for _, p, _ in self.weights]
            for name, p, t in self.weights:
                # The export quantizes the converter's F16 file (shrink.export.gguf_artifact), so the
                # rounding starts from the F16 values: from float32 ones an IQ4 search picks other
                # scales for about an eighth of the values.
                w = fake(p, "F16")
                if t in SEARCHED:
                    kept = self.scales.get(name)
                    if kept is None or kept[0] != tuple(p.shape) or self.rounds % SEARCH_EVERY == 0:
                        kept = self.scales[name] = (tuple(p.shape), search_scales(w, t))  # a cut weight: searched again
                    p.copy_(round_searched(w, t, kept[1]))
                else:
                    p.copy_(fake(w, t))
        self.rounds += 1

    def restore(self) -> None:
        import torch

        if self.saved is None:
            return
        with torch.no_grad():
            for (_, p, _), w in zip(self.weights, self.saved):
                p.copy_(w)
        self.saved = None
