"""Weights as llama.cpp's quantizer will round them, for training that expects it.

`fake(w, ggml_type)` rounds each row of `w` in the type's blocks and gives the values
back as floats. Q8_0, Q5_0, Q4_0, Q5_1 and Q4_1 follow ggml's reference quantizers
exactly (quantize_row_*_ref: the scale from the block's extreme or range, stored as
float16; tests/test_fake_quant.py checks them against llama.cpp's files); the
k-quants are approximated by their block shape and bits (Q4_K/Q5_K: an offset and a scale
per 32 values; Q6_K: a signed scale per 16), without llama.cpp's search for the best
scale or the 6-/8-bit coding of the scales themselves.

`RoundedWeights` trains through that rounding the straight-through way (BinaryConnect,
Courbariaux et al. 2015): before a forward pass each quantized weight is swapped for its
rounded values, and after the backward pass the full-precision weights come back for the
optimizer to update with the gradient taken at the rounded ones. Which type each weight
gets is what shrink.quantize.gguf_size predicts for the export
(shrink.distill.size_budget.export_types).
"""

from __future__ import annotations

EXACT = ("Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1")
APPROXIMATE = ("Q4_K", "Q5_K", "Q6_K")
MODELED = ("F32", "F16", "BF16") + EXACT + APPROXIMATE  # every type fake() takes


def fake(w, ggml_type: str):
    """`w` (..., row length) rounded as `ggml_type` rounds each row; F32/F16/BF16 as they are."""
    import torch

    if ggml_type == "F32":
        return w
    if ggml_type == "F16":
        return w.half().to(w.dtype)
    if ggml_type == "BF16":
        return w.bfloat16().to(w.dtype)
    size = {"Q6_K": 16}.get(ggml_type, 32)
    if ggml_type not in MODELED:
        raise ValueError(f"no rounding model for ggml type {ggml_type}")
    if w.shape[-1] % size:
        raise ValueError(f"rows of {w.shape[-1]} do not fit {ggml_type}'s blocks of {size}")
    x = w.detach().float().reshape(-1, size)
    if ggml_type == "Q8_0":
        d = x.abs().amax(1, keepdim=True) / 127
        q = _roundf(x * _inverse(d))
        out = q * _half(d)
    elif ggml_type in ("Q5_0", "Q4_0"):
        levels = 16 if ggml_type == "Q5_0" else 8
        extreme = x.gather(1, x.abs().argmax(1, keepdim=True))  # the value of largest magnitude, signed
        d = extreme / -levels
        q = torch.clamp(torch.floor(x * _inverse(d) + levels + 0.5), max=2 * levels - 1)
        out = (q - levels) * _half(d)
    elif ggml_type in ("Q5_1", "Q4_1"):
        top = 31 if ggml_type == "Q5_1" else 15
        lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        d = (hi - lo) / top
        q = torch.clamp(torch.floor((x - lo) * _inverse(d) + 0.5), max=top)
        out = q * _half(d) + _half(lo)
    elif ggml_type in ("Q4_K", "Q5_K"):
        top = 15 if ggml_type == "Q4_K" else 31
        lo, hi = x.amin(1, keepdim=True).clamp(max=0), x.amax(1, keepdim=True)
        d = (hi - lo) / top
        q = torch.clamp(_roundf((x - lo) * _inverse(d)), 0, top)
        out = q * d + lo
    else:  # Q6_K
        extreme = x.gather(1, x.abs().argmax(1, keepdim=True))
        d = extreme / -32
        q = torch.clamp(_roundf(x * _inverse(d)), -32, 31)
        out = q * d
    return out.reshape(w.shape).to(w.dtype)


def _roundf(x):
    """C's roundf: halves away from zero (torch.round takes them to the even neighbour)."""
    import torch

    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _inverse(d):
    import torch

    return torch.where(d != 0, 1 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))


def _half(d):
    return d.half().float()


# GGUF file types whose every tensor type (with llama.cpp's fallbacks) has a rounding model above.
FILE_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_0")


class RoundedWeights:
    """Swaps a model's weights for their rounded values around each training step:
    `round()` before the forward pass, `restore()` after the backward pass."""

    def __init__(self, model, types: dict[str, str]):
        self.model, self.types = model, types
        self.weights: list = []
        self.saved = None

    def round(self) -> None:
        import torch

        if self.saved is not None:
            return
        # Looked up by name each time: --prune-gradually replaces the MLP weights it cuts.
        params = dict(self.model.named_parameters(remove_duplicate=False))
        self.weights = [(params[k], t) for k, t in self.types.items() if k in params]
        with torch.no_grad():
            self.saved = [p.detach().clone() for p, _ in self.weights]
            for p, t in self.weights:
                p.copy_(fake(p, t))

    def restore(self) -> None:
        import torch

        if self.saved is None:
            return
        with torch.no_grad():
            for (p, _), w in zip(self.weights, self.saved):
                p.copy_(w)
        self.saved = None
