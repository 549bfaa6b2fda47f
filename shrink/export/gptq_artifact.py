"""The GPTQ format for `shrink export`: GPTQModel, calibrated on the task's own data.

The calibration text is, in order of preference: `--calibration FILE`; the training data
the student's manifest names (when the file is still there with the same sha256); the
`--eval` data. The artifact is a standard GPTQ checkpoint (transformers + GPTQModel
load it, and so do vLLM and other GPTQ servers) plus shrink's manifest.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from shrink import artifact
from shrink.console import console
from shrink.errors import ShrinkError
from shrink.export.parity import Thresholds
from shrink.manifest import Manifest
from shrink.chat import template_spec
from shrink.tasks import load_task, load_task_for

# 8-bit GPTQ is close to exact; 4-bit with groups of 128 loses about as much as Q4_K_M.
THRESHOLDS = {8: Thresholds(0.97, 0.02), 4: Thresholds(0.85, 0.15)}


def check(opts, source_manifest: Manifest | None, eval_data: Path | None):
    """Defaults filled in and the calibration file chosen and read, before any work."""
    from shrink.quantize.gptq import GptqSettings

    if opts.quant is not None:
        raise ShrinkError("--quant is for gguf and onnx; GPTQ takes --bits and --group-size")
    opts = dataclasses.replace(opts, bits=4 if opts.bits is None else opts.bits,
                               group_size=128 if opts.group_size is None else opts.group_size,
                               desc_act=bool(opts.desc_act))
    GptqSettings(opts.bits, opts.group_size, opts.desc_act).check()
    calibration = calibration_source(opts, source_manifest, eval_data)
    if template_spec(None, calibration) is None:  # chat rows are read with the student's template, in build
        load_task(calibration)  # a bad file fails now, not after loading the model
    return dataclasses.replace(opts, calibration=calibration)


def thresholds(opts) -> Thresholds:
    return THRESHOLDS[opts.bits]


def calibration_source(opts, source_manifest: Manifest | None, eval_data: Path | None) -> Path:
    """The task file GPTQ calibrates on (see the module docstring for the order)."""
    if opts.calibration is not None:
        return Path(opts.calibration)
    settings = source_manifest.settings if source_manifest else {}
    train = settings.get("data")
    if train and Path(train).is_file() and artifact.sha256_file(Path(train)) == settings.get("data_sha256"):
        return Path(train)
    if eval_data is not None:
        if train:
            console.print(f"[yellow]note:[/yellow] the student's training data {train} is gone or changed; "
                          f"calibrating GPTQ on the evaluation data {eval_data}")
        return Path(eval_data)
    raise ShrinkError("GPTQ needs calibration data: pass --calibration FILE (task JSONL) or --eval FILE")


def build(student: Path, tmp: Path, opts, source_manifest: Manifest | None) -> dict[str, Any]:
    from shrink.hf import resolve_device
    from shrink.quantize.gptq import GptqSettings, quantize_gptq

    source = Path(opts.calibration)
    texts = [ex.prompt + (ex.completion or "") for ex in load_task_for(source, student)]
    device = resolve_device(opts.device)
    settings = quantize_gptq(student, tmp, GptqSettings(opts.bits, opts.group_size, opts.desc_act), texts, device)
    return {**settings, "calibration": str(source), "calibration_sha256": artifact.sha256_file(source)}
