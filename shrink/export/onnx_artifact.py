"""The ONNX format for `shrink export`: torch's ONNX exporter, onnxruntime's quantizers.

The graph carries past key/values for generation (shrink.export.onnx_export); int8 is
onnxruntime's dynamic quantization and int4 its weight-only MatMulNBits
(shrink.quantize.onnx_quant). The shared flow (evaluation, parity, manifest) is
shrink.export.flow's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from shrink.errors import ShrinkError
from shrink.export.parity import Thresholds
from shrink.manifest import Manifest
from shrink.quantize.onnx_quant import QUANTS

DEFAULT_QUANT = "int8"

# fp32 computes what torch computes (the export checks itself to 1e-3 of the logit
# scale); int8 dynamic quantization agreed on 98.5-99.4% of top-1 tokens on the tiny
# llama/qwen2/gemma3 models, int4 (blocks of 32) on 92-98.5% (tests/test_onnx.py).
THRESHOLDS = {"fp32": Thresholds(0.99, 0.01), "int8": Thresholds(0.90, 0.10), "int4": Thresholds(0.85, 0.15)}


def check(opts, source_manifest: Manifest | None, eval_data: Path | None):
    quant = (opts.quant or DEFAULT_QUANT).lower()
    if quant not in QUANTS:
        raise ShrinkError(f"--quant {opts.quant}: not an ONNX quantization (valid: {', '.join(QUANTS)})")
    return dataclasses.replace(opts, quant=quant)


def thresholds(opts) -> Thresholds:
    return THRESHOLDS[opts.quant]


def build(student: Path, tmp: Path, opts, source_manifest: Manifest | None) -> dict[str, Any]:
    from shrink.console import console
    from shrink.export.onnx_export import export_onnx

    settings = export_onnx(student, tmp, opts.quant, console=console)
    settings.pop("target", None)  # the flow records it
    return {**settings, "threads": opts.threads}
