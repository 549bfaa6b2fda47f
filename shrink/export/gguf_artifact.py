"""Student folder -> GGUF artifact: llama.cpp's converter, then llama.cpp's quantizer.

The converter writes a 16-bit (or 32-bit) GGUF; every other type is quantized from it.
The intermediate file lives in the staging folder and is removed before the manifest
is written, so the artifact holds exactly one model file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dataclasses

from shrink import artifact
from shrink.export.parity import GGUF_DEFAULT, GGUF_THRESHOLDS, ParityError, Thresholds, measure, verdict
from shrink.errors import ShrinkError
from shrink.hf import check_model_dir
from shrink.tasks import load_task

UNQUANTIZED = {"F32": "f32", "F16": "f16", "BF16": "bf16"}  # written by the converter itself


def export_gguf(
    student: Path,
    out: Path,
    quant: str = "Q4_K_M",
    eval_data: Path | None = None,
    threads: int | None = None,
    force: bool = False,
    min_top1: float | None = None,
    max_kl: float | None = None,
) -> dict[str, Any]:
    """Convert and quantize `student` into the artifact folder `out`; returns its manifest.

    With `eval_data`, the export is evaluated through llama.cpp and checked against the
    student (shrink.export.parity); one that fails the check is still written, marked
    `valid: false`, and ParityError (exit 1) names the worst example."""
    from shrink.quantize.gguf_types import quant_type

    check_model_dir(student, "student")
    qtype = quant_type(quant)
    examples = load_task(eval_data) if eval_data else None
    artifact.check_output_free(out, force)
    source_manifest = _source_manifest(student)

    if min_top1 is not None or max_kl is not None:
        if examples is None:
            raise ShrinkError("--min-top1/--max-kl need --eval (parity is measured on the evaluation prompts)")
    file_name = f"model-{qtype.name}.gguf"
    # A pruned vocabulary hides the teacher's BPE pre-tokenizer from the converter's hash
    # check; distill recorded its name.
    tokenizer_pre = ((source_manifest or {}).get("settings") or {}).get("tokenizer_pre")
    with artifact.staged_folder(out, force) as tmp:
        _build(student, tmp / file_name, qtype, threads, tokenizer_pre)
        metrics: dict[str, Any] = {}
        failed: list[str] = []
        if examples is not None:
            metrics = evaluate_file(tmp / file_name, examples, Path(eval_data), source_manifest, threads)
            thresholds = _thresholds(qtype.name, min_top1, max_kl)
            metrics["parity"] = check_parity(student, tmp / file_name, examples, Path(eval_data), threads)
            metrics["parity"]["thresholds"] = dataclasses.asdict(thresholds)
            failed = verdict(metrics["parity"], thresholds)
            metrics["parity"]["passed"] = not failed
        settings = {"target": "gguf", "quant": qtype.name, "file": file_name, "threads": threads,
                    "tokenizer_pre": tokenizer_pre}
        manifest = artifact.finish(tmp, kind="export", format="gguf", source=Path(student), settings=settings,
                                   metrics=metrics, valid=not failed)
    if failed:
        worst = metrics["parity"]["worst_example"]
        raise ParityError(f"{out}: parity with {student} failed ({'; '.join(failed)}); "
                          f"worst example {worst['where']} (mean KL {worst['mean_kl']}); marked not valid")
    return manifest


def _thresholds(quant: str, min_top1: float | None, max_kl: float | None) -> Thresholds:
    base = GGUF_THRESHOLDS.get(quant, GGUF_DEFAULT)
    return Thresholds(base.min_top1 if min_top1 is None else min_top1, base.max_kl if max_kl is None else max_kl)


def check_parity(student: Path, gguf_file: Path, examples, eval_path: Path, threads) -> dict[str, Any]:
    """The GGUF against the Hugging Face student, on the evaluation prompts."""
    from shrink.runtime.llama_cpp import LlamaCppRuntime
    from shrink.runtime.torch_runtime import TorchRuntime

    reference, candidate = TorchRuntime(student, device="cpu"), LlamaCppRuntime(gguf_file, threads=threads)
    try:
        prompts = [ex.prompt for ex in examples]
        where = [f"{eval_path}:{i}" for i in range(1, len(examples) + 1)]
        return measure(reference, candidate, prompts, where)
    finally:
        candidate.close()
        reference.close()


def _build(student: Path, dst: Path, qtype, threads: int | None, tokenizer_pre: str | None) -> None:
    from shrink.export.gguf_convert import convert_hf_to_gguf
    from shrink.quantize.llama_quantize import quantize_gguf

    if qtype.name in UNQUANTIZED:
        convert_hf_to_gguf(student, dst, UNQUANTIZED[qtype.name], tokenizer_pre=tokenizer_pre)
        return
    intermediate = dst.with_name("intermediate-F16.gguf")
    convert_hf_to_gguf(student, intermediate, "f16", tokenizer_pre=tokenizer_pre)
    try:
        quantize_gguf(intermediate, dst, qtype, threads)
    finally:
        intermediate.unlink(missing_ok=True)


def evaluate_file(path: Path, examples, eval_path: Path, source_manifest: dict | None, threads) -> dict[str, Any]:
    """Accuracy through llama.cpp, with the teacher's figure carried over from the student's
    manifest when it was measured on the same evaluation file."""
    from shrink.evaluate import evaluate, retention
    from shrink.runtime.llama_cpp import LlamaCppRuntime

    rt = LlamaCppRuntime(path, threads=threads)
    try:
        res = evaluate(rt, examples, "evaluating GGUF")
    finally:
        rt.close()
    metrics = {
        "accuracy": res.accuracy,
        "examples_per_s": res.examples_per_s,
        "eval_examples": res.examples,
        "eval_data_sha256": artifact.sha256_file(eval_path),
        "eval_runtime": res.runtime,
    }
    src = (source_manifest or {}).get("metrics", {})
    if src.get("eval_data_sha256") == metrics["eval_data_sha256"] and src.get("teacher_accuracy") is not None:
        metrics["teacher_accuracy"] = src["teacher_accuracy"]
        metrics["retention"] = retention(res.accuracy, src["teacher_accuracy"])
        metrics["student_accuracy"] = src.get("accuracy")
    return metrics


def _source_manifest(student: Path) -> dict | None:
    try:
        return artifact.read_manifest(student)
    except ShrinkError:
        return None
