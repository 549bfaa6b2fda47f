"""llama.cpp's k-quant rounding (Q4_K, Q5_K, Q6_K), value for value, for training through it.

ggml's reference quantizers (quantize_row_q4_K_ref, _q5_K_ref, _q6_K_ref in ggml-quants.c),
which llama.cpp's quantizer runs for these types when it has no importance matrix:

- Q4_K and Q5_K: each block of 32 values searches an offset and a scale
  (make_qkx2_quants: the range's step, then 21 or 16 trial steps, each refitted by least
  squares, weighted by the block's rms + |x|; a later trial starts from the best so far);
  then each block's scale and offset are coded as 6-bit multiples of two float16s per 256
  values, and the values rounded again with the coded ones.
- Q6_K: each block of 16 searches a signed scale (make_qx_quants: 19 trial steps around the
  extreme's, weighted by x^2); the 16 scales of 256 values are coded as 8-bit multiples of
  one float16, and the values rounded again with them.

Every sum runs one term at a time in float32, as ggml's loops add them (shrink.quantize.
ggml_float.in_order): in another order a near tie between two trials goes the other way.

`kquant_scales` is the search (a few dozen passes over the weight); `kquant_round` rounds
with the scales it found, so training can keep them for a few steps (fake_quant.
RoundedWeights). A row that is not a whole number of 256 values (a width on the way during
--prune-gradually) is searched as if zeros filled its last 256: an all-zero block has no
scale and no offset, so it changes nothing in the blocks beside it.
"""

from __future__ import annotations

from shrink.quantize.ggml_float import GROUP_MAX_EPS, half, in_order, over

QK_K = 256
KQUANTS = {  # type: (values per block, largest level, make_qkx2_quants' rmin, rdelta, nstep)
    "Q4_K": (32, 15, -1.0, 0.1, 20),
    "Q5_K": (32, 31, -0.5, 0.1, 15),
    "Q6_K": (16, 32, None, None, None),  # make_qx_quants: levels -32..31
}


def kquant_scales(w, ggml_type: str):
    """The float32 scale (and, for Q4_K/Q5_K, offset) of each block of `w` as llama.cpp's
    file holds them after coding: (d, dm) per block of 32, or (d, None) per block of 16."""
    import torch

    size, nmax, rmin, rdelta, nstep = KQUANTS[ggml_type]
    x = _padded(w).reshape(-1, size)
    if ggml_type == "Q6_K":
        scales = _qx_scale(x, nmax).reshape(-1, QK_K // size)
        first = scales.abs().argmax(1, keepdim=True)  # the first of largest magnitude, as ggml's strict `>`
        big = scales.gather(1, first)
        empty = big.abs() < GROUP_MAX_EPS  # the whole 256 are zeros
        iscale = over(-128.0, torch.where(empty, torch.ones_like(big), big))
        sc = torch.clamp(torch.round(iscale * scales), max=127)
        d = half(over(1.0, iscale)) * sc
        return torch.where(empty, torch.zeros_like(d), d).reshape(-1), None
    scale, the_min = _qkx2_scale(x, nmax, rmin, rdelta, nstep)
    scale, the_min = scale.reshape(-1, QK_K // size), the_min.reshape(-1, QK_K // size)
    coded = []
    for v in (scale, the_min):
        top = v.amax(1, keepdim=True).clamp(min=0)  # max_scale / max_min start at 0
        inv = torch.where(top > 0, over(63.0, torch.where(top > 0, top, torch.ones_like(top))), torch.zeros_like(top))
        level = torch.remainder(torch.round(inv * v), 256).clamp(max=63)  # uint8_t, then MIN(63, .)
        coded.append(half(top / 63.0) * level)
    return coded[0].reshape(-1), coded[1].reshape(-1)


def kquant_round(w, ggml_type: str, scales):
    """`w` rounded with the blocks' coded scales (and offsets) from kquant_scales."""
    import torch

    size, nmax = KQUANTS[ggml_type][:2]
    d, dm = scales
    x = _padded(w).reshape(-1, size)
    d = d[:, None]
    safe = torch.where(d != 0, d, torch.ones_like(d))
    if dm is None:  # Q6_K
        q = torch.clamp(torch.round(x / safe), -nmax, nmax - 1)
        out = d * q
    else:
        dm = dm[:, None]
        q = torch.clamp(torch.round((x + dm) / safe), 0, nmax)
        out = d * torch.where(d != 0, q, torch.zeros_like(q)) - dm
    n = w.shape[-1]
    return out.reshape(-1, _padded_length(n))[:, :n].reshape(w.shape).to(w.dtype)


def _qkx2_scale(x, nmax, rmin, rdelta, nstep):
    """make_qkx2_quants for each row of x (blocks of 32), weights rms + |x|: (scale, -offset)."""
    import numpy as np
    import torch

    xt = x.t().contiguous()  # (32, blocks): each term of a sum is one contiguous slice
    n = xt.shape[0]
    av = torch.sqrt((in_order(xt * xt) / float(n)).double()).float()  # sqrtf's correctly rounded root: torch's float32 sqrt can miss by a unit
    w = av + xt.abs()
    lo = xt.amin(0).clamp(max=0)
    hi = xt.amax(0)
    flat = hi == lo
    sum_w, sum_x = in_order(w), in_order(w * xt)
    span = torch.where(flat, torch.ones_like(hi), hi - lo)
    iscale = over(nmax, span)
    scale = over(1.0, iscale)
    L = torch.clamp(torch.round(iscale * (xt - lo)), 0, nmax)
    diff = scale * L + lo - xt
    best = in_order(w * (diff * diff))
    for step in range(nstep + 1):
        top = np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax)  # float arithmetic, as C's
        span = torch.where(flat, torch.ones_like(hi), hi - lo)
        l = torch.clamp(torch.round(over(top, span) * (xt - lo)), 0, nmax)
        wl = w * l
        sum_l, sum_l2, sum_xl = in_order(wl), in_order(wl * l), in_order(wl * xt)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        positive = this_min > 0
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        diff = this_scale * l + this_min - xt
        err = in_order(w * (diff * diff))
        better = (D > 0) & (err < best) & ~flat
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        lo = torch.where(better, this_min, lo)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, -lo


def _qx_scale(x, nmax):
    """make_qx_quants(rmse_type 1, no importance) for each row of x (blocks of 16): the scale."""
    import numpy as np
    import torch

    xt = x.t().contiguous()  # (16, blocks)
    first = xt.abs().argmax(0, keepdim=True)
    big = xt.gather(0, first)[0]  # the first value of largest magnitude, signed
    empty = big.abs() < GROUP_MAX_EPS
    big = torch.where(empty, torch.ones_like(big), big)
    w = xt * xt
    wx = w * xt

    def sums(iscale):
        l = torch.clamp(torch.round(iscale * xt), -nmax, nmax - 1)
        return in_order(wx * l), in_order(w * l * l)

    sumlx, suml2 = sums(over(-nmax, big))
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, torch.ones_like(suml2)), torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        top = np.float32(nmax) + np.float32(0.1) * np.float32(step)
        sumlx, suml2 = sums(over(-top, big))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
    return torch.where(empty, torch.zeros_like(scale), scale)


def _padded_length(n: int) -> int:
    return -(-n // QK_K) * QK_K


def _padded(w):
    """The rows of `w` as float32, zeros appended to a whole number of 256 values."""
    import torch

    x = w.detach().float().reshape(-1, w.shape[-1])
    extra = _padded_length(x.shape[1]) - x.shape[1]
    return torch.nn.functional.pad(x, (0, extra)) if extra else x
