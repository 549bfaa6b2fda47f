"""`shrink export`: one flow for every format.

A format module (gguf_artifact, onnx_artifact, gptq_artifact, executorch_artifact) knows
how to build its files into a staging folder and which parity thresholds suit each of its
quantizations.
Everything else is shared: input checks before any work, evaluation through the runtime
that serves the format, parity against the Hugging Face student, the manifest, and the
atomic rename. An export that fails parity is still written, marked `valid: false`, and
ParityError (exit 1) names the worst example. Token ids that differ only on the drift
suite (shrink.export.parity.DRIFT_SUITE) are a warning naming the texts, or with
`strict_tokenizer` a parity failure.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shrink import artifact
from shrink.errors import ShrinkError
from shrink.export.parity import ParityError, Thresholds, drifted, measure, suite_texts, verdict
from shrink.hf import check_model_dir
from shrink.manifest import Manifest
from shrink.tasks import load_task_for

# --target -> the format its artifact is stored in (the manifest's `format`).
TARGET_FORMATS = {"gguf": "gguf", "onnx": "onnx", "gptq": "gptq", "executorch": "pte"}
TARGETS = tuple(TARGET_FORMATS)


@dataclass(frozen=True)
class ExportOptions:
    target: str  # gguf | onnx | gptq | executorch
    quant: str | None = None  # GGUF type, ONNX fp32/int8/int4 or ExecuTorch fp32/8da4w/8da8w; None: the format's default
    bits: int | None = None  # GPTQ (None: 4)
    group_size: int | None = None  # GPTQ (None: 128), ExecuTorch (None: 32 for 8da4w, per channel for 8da8w)
    desc_act: bool | None = None  # GPTQ (None: off)
    calibration: Path | None = None  # GPTQ: task data to calibrate on
    imatrix: bool | Path | None = None  # GGUF: True computes one from the calibration data; a Path reads one
    embedding_type: str | None = None  # GGUF: the token embedding's own ggml type (None: llama.cpp's choice)
    threads: int | None = None
    device: str = "auto"  # where GPTQ quantizes and torch-served artifacts are evaluated
    metric: str | None = None  # how --eval answers are scored (None: choice for rows with choices, else exact)
    max_context: int | None = None  # ExecuTorch: tokens of the static KV cache (None: 2048, or the model's positions)


FLAGS = {"bits": "--bits", "group_size": "--group-size", "desc_act": "--desc-act", "calibration": "--calibration",
         "imatrix": "--imatrix", "max_context": "--max-context", "embedding_type": "--embedding-type"}
OWNERS = {"bits": ("gptq",), "group_size": ("gptq", "executorch"), "desc_act": ("gptq",),
          "calibration": ("gptq", "gguf"), "imatrix": ("gguf",), "max_context": ("executorch",),
          "embedding_type": ("gguf",)}


def refuse_foreign_options(opts: ExportOptions) -> None:
    """Options of another target are a mistake worth saying, not ignoring."""
    for field, flag in FLAGS.items():
        if getattr(opts, field) is not None and opts.target not in OWNERS[field]:
            raise ShrinkError(f"{flag}: only for --target {' or '.join(OWNERS[field])}, not {opts.target}")
    if opts.target == "gguf" and opts.calibration is not None and not opts.imatrix:
        raise ShrinkError("--calibration: for gguf only with --imatrix (the importance matrix's data)")


def format_module(target: str):
    if target == "gguf":
        from shrink.export import gguf_artifact as mod
    elif target == "onnx":
        from shrink.export import onnx_artifact as mod
    elif target == "gptq":
        from shrink.export import gptq_artifact as mod
    elif target == "executorch":
        from shrink.export import executorch_artifact as mod
    else:
        raise ShrinkError(f"--target {target}: not a format (choose from {', '.join(TARGETS)})")
    return mod


def export(
    student: Path,
    out: Path,
    opts: ExportOptions,
    eval_data: Path | None = None,
    force: bool = False,
    min_top1: float | None = None,
    max_kl: float | None = None,
    strict_tokenizer: bool = False,
) -> Manifest:
    """Build the `opts.target` artifact of `student` in `out`; returns its manifest.
    `strict_tokenizer`: token ids that differ on the drift suite fail parity."""
    student, out = Path(student), Path(out)
    fmt = format_module(opts.target)
    check_model_dir(student, "student")
    examples = load_task_for(eval_data, student) if eval_data else None
    if (min_top1 is not None or max_kl is not None or strict_tokenizer) and examples is None:
        raise ShrinkError("--min-top1/--max-kl/--strict-tokenizer need --eval (parity is measured on the "
                          "evaluation prompts)")
    source_manifest = read_source_manifest(student)
    # Defaults filled in, bad options refused, before any work.
    refuse_foreign_options(opts)
    opts = fmt.check(opts, source_manifest, eval_data)
    artifact.check_output_free(out, force)

    with artifact.staged_folder(out, force) as tmp:
        settings = {"target": opts.target, **fmt.build(student, tmp, opts, source_manifest)}
        metrics: dict[str, Any] = {}
        failed: list[str] = []
        if examples is not None:
            metrics = evaluate_artifact(tmp, examples, Path(eval_data), source_manifest, opts)
            thresholds = _override(fmt.thresholds(opts), min_top1, max_kl, strict_tokenizer)
            metrics["parity"] = check_parity(student, tmp, examples, Path(eval_data), opts)
            metrics["parity"]["thresholds"] = dataclasses.asdict(thresholds)
            failed = verdict(metrics["parity"], thresholds)
            metrics["parity"]["passed"] = not failed
            if not failed:
                _warn_drift(metrics["parity"], opts.target)
        manifest = artifact.finish(tmp, kind="export", format=TARGET_FORMATS[opts.target], source=student,
                                   settings=settings, metrics=metrics, valid=not failed)
    if failed:
        worst = metrics["parity"]["worst_example"]
        raise ParityError(f"{out}: parity with {student} failed ({'; '.join(failed)}); "
                          f"worst example {worst['where']} (mean KL {worst['mean_kl']}); marked not valid")
    return manifest


def _override(base: Thresholds, min_top1: float | None, max_kl: float | None, strict_tokenizer: bool) -> Thresholds:
    return dataclasses.replace(base, min_top1=base.min_top1 if min_top1 is None else min_top1,
                               max_kl=base.max_kl if max_kl is None else max_kl,
                               min_suite_match=1.0 if strict_tokenizer else base.min_suite_match)


def _warn_drift(parity: dict, target: str) -> None:
    """Tokenizer drift outside the evaluation prompts: said, with the texts, not failed."""
    from rich.markup import escape

    from shrink.console import console

    texts = drifted(parity)
    if texts:
        suite = parity["suite"]
        console.print(f"[yellow]warning:[/yellow] the {target} export's tokenizer gives other token ids than the "
                      f"student's on {len(texts)} of {suite['total']} drift-suite texts (metrics.parity.suite; "
                      "--strict-tokenizer makes this a failure):", highlight=False, soft_wrap=True)
        for text in texts:
            console.print(f"  {escape(repr(text))}", highlight=False, soft_wrap=True)


def check_parity(student: Path, built: Path, examples, eval_path: Path, opts: ExportOptions) -> dict[str, Any]:
    """The export against the Hugging Face student, on the evaluation rows and the
    drift suite (with the student's own special tokens as text)."""
    from shrink.runtime import open_runtime
    from shrink.runtime.torch_runtime import TorchRuntime

    reference = TorchRuntime(student, device="cpu")
    candidate = open_runtime(built, device=opts.device, threads=opts.threads)
    try:
        where = [f"{eval_path}:{i}" for i in range(1, len(examples) + 1)]
        return measure(reference, candidate, examples, where, suite_texts(reference.tokenizer))
    finally:
        candidate.close()
        reference.close()


def evaluate_artifact(path: Path, examples, eval_path: Path, source_manifest: Manifest | None,
                      opts: ExportOptions) -> dict[str, Any]:
    """Accuracy through the artifact's runtime, with the teacher's figure carried over
    from the student's manifest when it was measured on the same evaluation file."""
    from shrink.evaluate import evaluate, retention
    from shrink.runtime import open_runtime

    rt = open_runtime(path, device=opts.device, threads=opts.threads)
    try:
        res = evaluate(rt, examples, f"evaluating {opts.target}", metric=opts.metric)
    finally:
        rt.close()
    metrics = {
        "metric": res.metric,
        "accuracy": res.accuracy,
        "examples_per_s": res.examples_per_s,
        "eval_examples": res.examples,
        "eval_data_sha256": artifact.sha256_file(eval_path),
        "eval_runtime": res.runtime,
    }
    src = source_manifest.metrics if source_manifest else {}
    same_metric = src.get("metric", res.metric) == res.metric  # student manifests before metrics had none
    if src.get("eval_data_sha256") == metrics["eval_data_sha256"] and src.get("teacher_accuracy") is not None \
            and same_metric:
        metrics["teacher_accuracy"] = src["teacher_accuracy"]
        metrics["retention"] = retention(res.accuracy, src["teacher_accuracy"])
        metrics["student_accuracy"] = src.get("accuracy")
    return metrics


def read_source_manifest(student: Path) -> Manifest | None:
    """The student's manifest when it was made by shrink (a plain Hugging Face folder has none)."""
    try:
        return Manifest.read(student)
    except ShrinkError:
        return None
