"""float32 arithmetic as ggml's C code does it, for rounding models that must equal its files
(shrink.quantize.fake_quant, shrink.quantize.kquants)."""

from __future__ import annotations

GROUP_MAX_EPS = 1e-15  # ggml-quants.c: a block whose largest magnitude is under it has no scale


def in_order(a):
    """The sum over the first axis one term at a time, in float32, as ggml's loop adds them:
    a sum in another order moves the last bits, and a near tie between two scales with them."""
    import torch

    total = torch.zeros(a.shape[1:], dtype=a.dtype, device=a.device)
    for term in a:
        total += term
    return total


def over(c, t):
    """c / t in float32, one division: `c / t` with a Python number c is t.reciprocal() * c in
    torch, which rounds twice and can miss C's quotient by one unit in the last place."""
    import torch

    return torch.full_like(t, float(c)) / t


def half(d):
    """d stored as float16 and read back (GGML_FP32_TO_FP16: round to nearest even)."""
    return d.half().float()
