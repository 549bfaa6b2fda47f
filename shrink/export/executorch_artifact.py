"""The ExecuTorch format for `shrink export --target executorch`: a `.pte` program for
ExecuTorch's runtime (XNNPACK on phone CPUs), with a static KV cache
(shrink.export.executorch_export); the weights quantized with torchao
(shrink.quantize.torchao_quant). The manifest's format is "pte". The shared flow
(evaluation, parity, manifest) is shrink.export.flow's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from shrink.errors import ShrinkError
from shrink.export.parity import Thresholds
from shrink.manifest import Manifest
from shrink.quantize.torchao_quant import QUANTS, group_size_for

DEFAULT_QUANT = "8da4w"  # ExecuTorch's documented recipe for LLMs on XNNPACK

# fp32 computes what torch computes (the export checks itself to 1e-3 of the logit scale).
# On the tiny llama/qwen2/gemma3 students of tests/test_executorch.py, measured: 8da8w
# agreed with the student on 1.0 of top-1 tokens, 8da4w on 0.88-0.99.
THRESHOLDS = {"fp32": Thresholds(0.99, 0.01), "8da8w": Thresholds(0.95, 0.05), "8da4w": Thresholds(0.85, 0.15)}


def check(opts, source_manifest: Manifest | None, eval_data: Path | None):
    quant = (opts.quant or DEFAULT_QUANT).lower()
    if quant not in QUANTS:
        raise ShrinkError(f"--quant {opts.quant}: not an ExecuTorch quantization (valid: {', '.join(QUANTS)})")
    return dataclasses.replace(opts, quant=quant, group_size=group_size_for(quant, opts.group_size))


def thresholds(opts) -> Thresholds:
    return THRESHOLDS[opts.quant]


def build(student: Path, tmp: Path, opts, source_manifest: Manifest | None) -> dict[str, Any]:
    from shrink.console import console
    from shrink.export.executorch_export import export_pte

    settings = export_pte(student, tmp, opts.quant, opts.group_size, opts.max_context, console=console)
    return {**settings, "threads": opts.threads}
