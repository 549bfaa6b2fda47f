"""`shrink export STUDENT --target NAME`: the smallest artifact that meets a device target.

Every rung of the target's ladder (format x quantization) is built with the format's own
module, then measured (shrink.measure): accuracy and examples/s through the
runtime that will serve it, in a process of its own with the target's thread count and
context length; peak resident memory of a process running the candidate's run.py, as
the bundle will ship it; and parity against the student. Each constraint is checked
against those figures; the smallest candidate that meets all of them becomes the bundle
(shrink.export.bundle). When none does, nothing is written and the error names the
constraint that failed and the closest candidate.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shrink import artifact
from shrink.console import console
from shrink.errors import ShrinkError
from shrink.export.bundle import RUN_SCRIPT, Serving, serving, write_bundle, write_run_script
from shrink.export.flow import TARGET_FORMATS, ExportOptions, format_module, read_source_manifest
from shrink.export.parity import measure, verdict
from shrink.hf import check_model_dir
from shrink.manifest import Manifest
from shrink.targets import GPTQ_QUANTS, Target, quantized_gguf
from shrink.tasks import load_task_for

EPS = 1e-9


class TargetNotMet(ShrinkError):
    """No candidate meets the target: a failed check, exit code 1."""

    exit_code = 1


@dataclass
class Candidate:
    format: str
    quant: str
    folder: Path
    settings: dict[str, Any] = field(default_factory=dict)
    size_bytes: int = 0
    figures: dict[str, Any] = field(default_factory=dict)  # accuracy, examples_per_s, peak_ram_mb, ...
    parity: dict[str, Any] | None = None
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {limit, value, met}

    @property
    def name(self) -> str:
        return f"{self.format} {self.quant}"

    @property
    def met(self) -> bool:
        return all(c["met"] for c in self.checks.values())

    def failures(self) -> list[str]:
        return [describe(k, c) for k, c in self.checks.items() if not c["met"]]


def describe(name: str, check: dict[str, Any]) -> str:
    value, limit = check["value"], check["limit"]
    if value is None:
        return f"{name} (not measured: {check.get('note', 'unknown')})"
    if name == "parity":
        return f"parity ({check.get('note')})"
    op = "<" if name.startswith("min_") else ">"
    return f"{name} ({_fmt(value)} {op} {_fmt(limit)})"


def _fmt(x) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def export_for_target(student: Path, out: Path, target: Target, eval_data: Path | None,
                      targets_file: Path, force: bool = False) -> Manifest:
    student, out = Path(student), Path(out)
    if eval_data is None:
        raise ShrinkError(f"--target {target.name}: needs --eval (the constraints are checked on measured figures)")
    check_model_dir(student, "student")
    examples = load_task_for(eval_data, student)
    artifact.check_output_free(out, force)
    source_manifest = read_source_manifest(student)
    threads, thread_note = _threads(target)
    serve = serving(target)  # run.py's settings, which its peak RAM is measured with
    baseline = _baseline(student, examples, Path(eval_data), source_manifest)
    _check_embedding(student, target, targets_file)
    options = [_options(target, fmt, quant, threads, serve) for fmt, quant in target.ladder()]
    options = [format_module(o.target).check(o, source_manifest, eval_data) for o in options]

    with artifact.staged_folder(out, force) as tmp:
        scratch = tmp / ".candidates"
        scratch.mkdir()
        imatrix = _imatrix(student, scratch, options)
        reference = _CachedRuntime(student)
        candidates = []
        try:
            for opts in options:
                cand = Candidate(TARGET_FORMATS[opts.target], opts.quant or f"{opts.bits}bit",
                                 scratch / f"{opts.target}-{opts.quant or opts.bits}")
                cand.folder.mkdir()
                console.print(f"[bold]{target.name}[/bold]: building {cand.name}")
                if opts.imatrix:  # computed once for every GGUF rung
                    opts = dataclasses.replace(opts, imatrix=imatrix)
                cand.settings = format_module(opts.target).build(student, cand.folder, opts, source_manifest)
                _measure(cand, opts, target, threads, serve, Path(eval_data), examples, reference, baseline)
                candidates.append(cand)
        finally:
            reference.close()
        print_candidates(target, candidates, thread_note)
        passing = [c for c in candidates if c.met]
        if not passing:
            closest = min(candidates, key=lambda c: (len(c.failures()), _shortfall(c)))
            raise TargetNotMet(f"no candidate meets target {target.name}: closest is {closest.name} "
                               f"({closest.size_bytes / 1e6:.1f} MB), which fails {'; '.join(closest.failures())}")
        chosen = min(passing, key=lambda c: c.size_bytes)
        console.print(f"[bold green]{target.name}[/bold green]: chose {chosen.name} "
                      f"({chosen.size_bytes / 1e6:.1f} MB), the smallest of {len(passing)} passing")
        for f in chosen.folder.iterdir():  # the model files and the run.py that was measured
            shutil.move(str(f), tmp / f.name)
        shutil.rmtree(scratch)
        return write_bundle(tmp, out.name, student, target, chosen, candidates, baseline, source_manifest,
                            serve=serve, targets_file=targets_file, eval_data=Path(eval_data),
                            thread_note=thread_note)


def _threads(target: Target) -> tuple[int | None, str | None]:
    """The target's thread count for scoring, capped at this machine's cores (more threads
    than cores measure contention, not the device). run.py keeps the target's own."""
    cores = os.cpu_count() or 1
    if target.threads is None:
        return None, None
    if target.threads > cores:
        return cores, (f"accuracy and speed measured with {cores} threads: the target says {target.threads}, "
                       f"this machine has {cores} cores")
    return target.threads, None


def _options(target: Target, fmt: str, quant: str, threads: int | None, serve: Serving) -> ExportOptions:
    if fmt == "gptq":
        return ExportOptions(target="gptq", bits=GPTQ_QUANTS[quant], threads=threads, device=target.device)
    if fmt == "pte":  # its KV cache is the context run.py serves (and its peak RAM is measured) with
        return ExportOptions(target="executorch", quant=quant, max_context=serve.context_length, threads=threads,
                             device=target.device)
    imatrix = True if fmt == "gguf" and target.imatrix else None
    embedding = target.embedding_type if fmt == "gguf" and quantized_gguf(quant) else None
    return ExportOptions(target=fmt, quant=quant, imatrix=imatrix, threads=threads, device=target.device,
                         embedding_type=embedding)


def _check_embedding(student: Path, target: Target, targets_file: Path) -> None:
    """The target's embedding_type against the student's token embedding rows (its hidden
    size), before any rung is built: llama.cpp fails a file whose rows the type's blocks
    do not fit."""
    if target.embedding_type is None:
        return
    from transformers import AutoConfig

    from shrink.quantize.gguf_types import embedding_type, quant_type

    hidden = AutoConfig.from_pretrained(student, local_files_only=True).get_text_config().hidden_size
    rung = next(q for fmt, q in target.ladder() if fmt == "gguf" and quantized_gguf(q))
    embedding_type(target.embedding_type, quant_type(rung).name, hidden,
                   what=f"{targets_file}: targets.{target.name}.embedding_type")


def _imatrix(student: Path, scratch: Path, options: list[ExportOptions]) -> Path | None:
    """One importance matrix for every GGUF rung that wants one, on their (shared)
    calibration data; None when no rung does."""
    wanting = [o for o in options if o.imatrix]
    if not wanting:
        return None
    from shrink.quantize.imatrix import compute_imatrix, save_imatrix

    texts = [ex.prompt + (ex.completion or "") for ex in load_task_for(wanting[0].calibration, student)]
    path = scratch / "imatrix.safetensors"
    save_imatrix(compute_imatrix(student, texts), path)
    return path


def _baseline(student: Path, examples, eval_path: Path, source_manifest: Manifest | None) -> dict[str, Any]:
    """The teacher's and the unquantized student's accuracy on the evaluation file: from
    the student's manifest when measured on the same file, else the student's measured now."""
    metrics = source_manifest.metrics if source_manifest else {}
    same = metrics.get("eval_data_sha256") == artifact.sha256_file(eval_path)
    teacher = metrics.get("teacher_accuracy") if same else None
    student_acc = metrics.get("accuracy") if same else None
    if student_acc is None:
        from shrink.evaluate import evaluate
        from shrink.runtime.torch_runtime import TorchRuntime

        rt = TorchRuntime(student, device="cpu")
        try:
            student_acc = evaluate(rt, examples, "evaluating the student").accuracy
        finally:
            rt.close()
    return {"teacher_accuracy": teacher, "student_accuracy": student_acc}


def _measure(cand: Candidate, opts: ExportOptions, target: Target, threads, serve: Serving, eval_path: Path, examples,
             reference, baseline: dict) -> None:
    """The candidate's figures. Peak RAM: of a process running its run.py (the target's
    context length and threads; llama.cpp without logits_all), which is what a user of
    the bundle sees. Accuracy and speed: scored in another process with the same context
    length and `threads` (the target's, capped at this machine's cores), where llama.cpp
    keeps every position's logits, which scoring continuations needs and serving does not."""
    from shrink.evaluate import artifact_size, retention
    from shrink.runtime import open_runtime
    from shrink.measure import measure_artifact, serving_peak_ram_mb

    cand.size_bytes = artifact_size(cand.folder)
    script = write_run_script(cand.folder, cand.format, examples[0].prompt, serve)
    peak_ram_mb = serving_peak_ram_mb(script)
    m = measure_artifact(cand.folder, eval_path, threads, device=opts.device, label=f"evaluating {cand.name}",
                         context_length=serve.context_length)
    cand.figures = {"accuracy": m.accuracy, "examples_per_s": m.examples_per_s, "peak_ram_mb": peak_ram_mb,
                    "ram_measured_with": {"script": RUN_SCRIPT, **serve.to_dict()},
                    "eval_runtime": m.runtime, "eval_examples": m.examples, "threads": threads,
                    "context_length": m.context_length,
                    "retention": retention(m.accuracy, baseline["teacher_accuracy"])
                    if baseline["teacher_accuracy"] is not None else None,
                    "accuracy_drop": round(baseline["student_accuracy"] - m.accuracy, 4)}
    rt = open_runtime(cand.folder, device=opts.device, threads=threads, context_length=serve.context_length)
    try:
        where = [f"{eval_path}:{i}" for i in range(1, len(examples) + 1)]
        cand.parity = measure(reference, rt, examples, where)
    finally:
        rt.close()
    thresholds = format_module(opts.target).thresholds(opts)
    cand.parity["thresholds"] = dataclasses.asdict(thresholds)
    failed = verdict(cand.parity, thresholds)
    cand.parity["passed"] = not failed
    cand.checks = constraint_checks(target, cand)
    cand.checks["parity"] = {"limit": cand.parity["thresholds"], "value": cand.parity["top1_agreement"],
                             "met": not failed, "note": "; ".join(failed) or "passed"}


def constraint_checks(target: Target, cand: Candidate) -> dict[str, dict[str, Any]]:
    """Each of the target's constraints against the candidate's figures."""
    f = cand.figures
    values = {
        "max_size_mb": round(cand.size_bytes / 1e6, 2),
        "max_ram_mb": f.get("peak_ram_mb"),
        "min_retention": f.get("retention"),
        "max_accuracy_drop": f.get("accuracy_drop"),
        "min_examples_per_s": f.get("examples_per_s"),
    }
    checks = {}
    for name, limit in target.constraints.items():
        value = values[name]
        if value is None:
            checks[name] = {"limit": limit, "value": None, "met": False,
                            "note": "the teacher's accuracy on this evaluation file is unknown "
                                    "(distill with --eval on the same file)"}
        elif name.startswith("min_"):
            checks[name] = {"limit": limit, "value": value, "met": value >= limit - EPS}
        else:
            checks[name] = {"limit": limit, "value": value, "met": value <= limit + EPS}
    return checks


def _shortfall(cand: Candidate) -> float:
    """How far the failed constraints miss, relative to their limits (to rank near misses)."""
    total = 0.0
    for name, c in cand.checks.items():
        if c["met"] or name == "parity":
            continue
        if c["value"] is None:
            total += 1.0
        else:
            total += abs(c["value"] - c["limit"]) / max(abs(c["limit"]), EPS)
    return total


def print_candidates(target: Target, candidates: list[Candidate], thread_note: str | None) -> None:
    from rich.table import Table

    from shrink.tables import human_bytes, pct

    table = Table(title=f"target {target.name}: {target.description}")
    for col in ("candidate", "size", "accuracy", "ex/s", "peak RAM", "verdict"):
        table.add_column(col, justify="right" if col in ("size", "accuracy", "ex/s", "peak RAM") else "left")
    for c in candidates:
        f = c.figures
        failed = [k for k, v in c.checks.items() if not v["met"]]
        verdict = "[green]meets all[/green]" if not failed else f"[red]fails {', '.join(failed)}[/red]"
        table.add_row(c.name, human_bytes(c.size_bytes), pct(f.get("accuracy")), f"{f.get('examples_per_s', 0):.1f}",
                      f"{f.get('peak_ram_mb', 0):,.0f} MB", verdict)
    console.print(table)
    limits = ", ".join(f"{k} {v:g}" for k, v in target.constraints.items())
    console.print(f"constraints: {limits}; parity per type")
    if thread_note:
        console.print(f"[yellow]note:[/yellow] {thread_note}")


class _CachedRuntime:
    """The student in torch, with its logits kept per prompt: every candidate's parity is
    measured against the same reference, computed once."""

    def __init__(self, student: Path):
        from shrink.runtime.torch_runtime import TorchRuntime

        self.rt = TorchRuntime(student, device="cpu")
        self.name = self.rt.name
        self._logits: dict[tuple[int, ...], Any] = {}

    def encode(self, text: str, special: bool = False) -> list[int]:
        return self.rt.encode(text, special)

    def logits(self, ids: list[int]):
        key = tuple(ids)
        if key not in self._logits:
            self._logits[key] = self.rt.logits(ids)
        return self._logits[key]

    def close(self) -> None:
        self.rt.close()
        self._logits.clear()
