"""GPTQ quantization with GPTQModel, calibrated on the task's own text.

GPTQ rounds each weight matrix to `bits` bits one column at a time, correcting the
columns not yet rounded with the inverse Hessian of the layer's inputs, which it collects
by running calibration text through the model layer by layer. Calibrating on the task's
prompts and completions (not on generic web text) spends the error budget where the
student will be used.

GPTQModel writes a standard GPTQ checkpoint (config.json with `quantization_config`,
safetensors), which transformers loads when GPTQModel and optimum are installed.

GPTQModel logs to stdout on import and while it works; that output goes to a log file
(shrink.quiet.gptqmodel_output: shown with SHRINK_DEBUG, and its tail on failure) so that
`--json` stays clean and shrink's own progress bar is the only thing on the terminal.
Loading a GPTQ checkpoint is shrink.hf's (`load_gptq`), as for every model folder.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

from shrink.errors import ModelError, ShrinkError

MAX_CALIBRATION = 256  # sequences: GPTQ's Hessians settle well before this on one task


@dataclass(frozen=True)
class GptqSettings:
    bits: int = 4
    group_size: int = 128  # -1: one scale per output channel
    desc_act: bool = False  # quantize columns in order of decreasing activation (slower kernels)

    def check(self) -> None:
        if self.bits not in (4, 8):
            raise ShrinkError(f"--bits {self.bits}: GPTQ exports take 4 or 8")
        if self.group_size != -1 and (self.group_size < 16 or self.group_size & (self.group_size - 1)):
            raise ShrinkError(f"--group-size {self.group_size}: use -1 or a power of two >= 16 (32, 64, 128)")


def calibration_rows(tokenizer, texts: list[str], max_rows: int = MAX_CALIBRATION) -> list[dict]:
    """Token ids of up to `max_rows` texts (prompt + completion each), in GPTQModel's
    input form. Texts are spread over the whole file, not only taken from its start."""
    from shrink.tasks import spread

    if not texts:
        raise ShrinkError("GPTQ calibration needs at least one example")
    rows = []
    for text in spread(texts, max_rows):
        ids = tokenizer(text).input_ids
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    return rows


def quantize_gptq(student: Path, dst: Path, settings: GptqSettings, texts: list[str], device: str) -> dict:
    """Write the GPTQ checkpoint of `student` into the existing folder `dst`, calibrated on
    `texts`; returns the settings to record. Progress: one step per decoder layer."""
    from shrink.console import progress
    from shrink.hf import import_gptqmodel, load_tokenizer
    from shrink.quiet import gptqmodel_output, quiet_transformers

    settings.check()
    gptqmodel = import_gptqmodel()
    quiet_transformers()
    tokenizer = load_tokenizer(student)
    rows = calibration_rows(tokenizer, texts)
    cfg = gptqmodel.QuantizeConfig(bits=settings.bits, group_size=settings.group_size, desc_act=settings.desc_act,
                                   offload_to_disk=False)
    with progress("layers") as bar, _logs_outside_cwd():
        task = bar.add_task(f"GPTQ {settings.bits}-bit, {len(rows)} examples, {device}", total=None)
        with gptqmodel_output():
            try:
                model = gptqmodel.GPTQModel.load(str(student), cfg, device=device)
            except (ValueError, OSError, KeyError, TypeError) as e:
                raise ModelError(f"GPTQModel cannot load {student}: {e}") from None
            layers = _decoder_layers(model.model)
            bar.update(task, total=len(layers))
            hooks = [layer.register_forward_pre_hook(_advance(bar, task, i)) for i, layer in enumerate(layers)]
            try:
                model.quantize(rows, batch_size=1, calibration_data_min_length=1)
            finally:
                for h in hooks:
                    h.remove()
            bar.update(task, completed=len(layers))
            model.save(str(dst))
    (dst / "quant_log.csv").unlink(missing_ok=True)  # GPTQModel's per-module losses; not part of the model
    return {"bits": settings.bits, "group_size": settings.group_size, "desc_act": settings.desc_act,
            "calibration_examples": len(rows), "device": device, "quantizer": f"gptqmodel {_version('gptqmodel')}"}


@contextlib.contextmanager
def _logs_outside_cwd():
    """GPTQModel writes per-run log files into ./logs (a path fixed in
    gptqmodel.looper.loop_processor); point it at a temporary folder instead of
    littering the user's working directory.

    A patch of a private name, kept because GPTQModel has no setting for it: the folder
    became the module constant `_PROJECT_LOG_DIR = Path("logs")` in ModelCloud/GPTQModel#2865
    ("store logs file in ./logs, not in root dir"), relative to the working directory. A
    GPTQModel without the name is left as it is."""
    import importlib

    mod = importlib.import_module("gptqmodel.looper.loop_processor")
    if not hasattr(mod, "_PROJECT_LOG_DIR"):
        yield
        return
    saved = mod._PROJECT_LOG_DIR
    with tempfile.TemporaryDirectory(prefix="shrink-gptq-logs-") as tmp:
        mod._PROJECT_LOG_DIR = Path(tmp)
        try:
            yield
        finally:
            mod._PROJECT_LOG_DIR = saved


def _decoder_layers(model) -> list:
    for path in ("model.layers", "model.language_model.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None:
            return list(obj)
    raise ModelError(f"GPTQ: no decoder layers found in {type(model).__name__}")


def _advance(bar, task, index: int):
    """A pre-forward hook: layer `index` is being run, so the layers before it are done
    (GPTQ runs the calibration data through one layer at a time, in order)."""

    def hook(module, args):
        bar.update(task, completed=index)

    return hook


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)
