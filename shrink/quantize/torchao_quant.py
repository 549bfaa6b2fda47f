"""Quantize a torch model in place with torchao before torch.export, as ExecuTorch's own
LLM recipe does (executorch/extension/llm/export/quantize.py, 1.5): the XNNPACK backend
then runs the quantized linears with its dynamically quantized kernels, and ExecuTorch's
quantized kernels run the embedding lookup.

- 8da4w: every nn.Linear (the lm_head included) takes int8 activations, quantized per
  token at run time (asymmetric), and int4 weights, symmetric, one scale per group of
  `group_size` input channels (default 32), the scales chosen by HQQ (scale only).
- 8da8w: the same with int8 weights, one scale per output channel unless a group size
  is given.
- The embedding table of both: int8, one scale per row, weight-only. A lookup reads
  one row per token, so there is no compute to save, only bytes: the table shrinks 4x.
  A tied lm_head gets its own quantized copy (the one XNNPACK multiplies with).

fp32 quantizes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shrink.errors import ShrinkError

PER_CHANNEL = -1  # --group-size -1: one scale per output channel


@dataclass(frozen=True)
class Recipe:
    weight_bits: int | None  # bits of the linear weights (None: fp32, nothing quantized)
    default_group: int  # input channels per scale (PER_CHANNEL: one per output channel)
    description: str


QUANTS = {
    "fp32": Recipe(None, PER_CHANNEL, "no quantization"),
    "8da4w": Recipe(4, 32, "linears: int8 dynamic activations, int4 weights in groups; embedding int8 per row"),
    "8da8w": Recipe(8, PER_CHANNEL, "linears: int8 dynamic activations, int8 weights per channel; embedding int8 per row"),
}
CHOOSE_QPARAMS = "hqq_scale_only"  # torchao's algorithm for the weight scales, as ExecuTorch's recipe


def group_size_for(quant: str, group_size: int | None) -> int | None:
    """The group size `quant` quantizes with (None for fp32, PER_CHANNEL for one scale per
    output channel); a group size fp32 cannot use, or one below 1, is refused."""
    recipe = QUANTS[quant]
    if recipe.weight_bits is None:
        if group_size is not None:
            raise ShrinkError(f"--group-size: --quant {quant} quantizes nothing")
        return None
    if group_size is None:
        return recipe.default_group
    if group_size != PER_CHANNEL and group_size < 1:
        raise ShrinkError(f"--group-size {group_size}: a positive number of input channels, or -1 (one scale per "
                          "output channel)")
    return group_size


def check_widths(widths: dict[str, int], group_size: int | None) -> None:
    """Every linear's input width (name -> width) must hold whole groups."""
    if group_size in (None, PER_CHANNEL):
        return
    odd = {name: w for name, w in widths.items() if w % group_size}
    if odd:
        named = ", ".join(f"{name} ({w})" for name, w in odd.items())
        raise ShrinkError(f"--group-size {group_size}: does not divide the input width of {named}; choose a "
                          f"divisor of {', '.join(str(w) for w in sorted(set(widths.values())))}, or -1")


def quantize_model(model, quant: str, group_size: int | None) -> dict[str, Any]:
    """Quantize `model` in place for `quant` (see the module docstring); returns what was
    done, for the manifest."""
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    recipe = QUANTS[quant]
    if recipe.weight_bits is None:
        return {"linear": None, "embedding": None}
    granularity = PerAxis(0) if group_size == PER_CHANNEL else PerGroup(group_size)
    # The embedding first: quantizing it unties a tied lm_head, which the linears' pass then
    # quantizes as a linear of its own.
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0),
                                          intx_choose_qparams_algorithm=CHOOSE_QPARAMS),
              filter_fn=lambda m, fqn: isinstance(m, torch.nn.Embedding))
    weight_dtype = getattr(torch, f"int{recipe.weight_bits}")
    quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=weight_dtype, weight_granularity=granularity,
                                                           intx_choose_qparams_algorithm=CHOOSE_QPARAMS),
              filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear))
    return {
        "linear": {"activations": "int8 per token, asymmetric, dynamic", "weights": f"int{recipe.weight_bits} symmetric",
                   "group_size": group_size, "scales": CHOOSE_QPARAMS},
        "embedding": {"weights": "int8 per row", "scales": CHOOSE_QPARAMS},
    }
