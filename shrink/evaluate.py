"""Task accuracy measured through the runtime that serves the artifact.

- Examples with `choices`: the choice with the highest total log-probability wins.
- Examples without: greedy generation, stopped at EOS or at the first newline (unless the
  reference has one), compared by normalized exact match (case, surrounding whitespace,
  runs of whitespace and a final period do not count).
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass

from shrink.console import progress
from shrink.prefix import common_prefix
from shrink.runtime.base import Runtime
from shrink.tasks import Example

EXTRA_GENERATED_TOKENS = 8  # beyond the reference's length, before generation is cut off


@dataclass(frozen=True)
class EvalResult:
    runtime: str
    examples: int
    correct: int
    accuracy: float  # correct / examples
    seconds: float
    examples_per_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def normalize(text: str) -> str:
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text[:-1].rstrip() if text.endswith(".") else text


def split_ids(rt: Runtime, prompt: str, continuations: list[str]) -> tuple[list[int], list[list[int]]]:
    """Tokenize prompt+continuation as one text (as the model sees it), then split off the
    continuation. The shared prefix of all encodings and the prompt's is the context, so a
    merge across the boundary moves the split point left instead of breaking it."""
    prompt_ids = rt.encode(prompt)
    fulls = [rt.encode(prompt + c) for c in continuations]
    n = len(common_prefix([prompt_ids, *fulls]))
    n = max(n, 1) if prompt_ids else 0
    return prompt_ids[:n], [full[n:] for full in fulls]


def is_correct(rt: Runtime, ex: Example) -> bool:
    if ex.choices:
        context, conts = split_ids(rt, ex.prompt, list(ex.choices))
        scores = rt.score_continuations(context, conts)
        return ex.choices[scores.index(max(scores))] == ex.completion
    budget = len(rt.encode(ex.completion)) + EXTRA_GENERATED_TOKENS
    stop = () if "\n" in ex.completion else ("\n",)
    return normalize(rt.generate(ex.prompt, budget, stop)) == normalize(ex.completion)


def evaluate(rt: Runtime, examples: list[Example], label: str = "evaluating") -> EvalResult:
    """Accuracy and examples/s (the clock includes tokenization and any prefix set-up)."""
    correct = 0
    start = time.perf_counter()
    prompts = [rt.encode(ex.prompt) for ex in examples]
    # Keep one token before each prompt's end out of the prefix: it must be computed.
    rt.share_prefix(common_prefix(prompts)[: min(map(len, prompts)) - 1])
    with progress("ex") as bar:
        task = bar.add_task(f"{label} ({rt.name})", total=len(examples))
        for ex in examples:
            correct += is_correct(rt, ex)
            bar.advance(task)
    seconds = time.perf_counter() - start
    return EvalResult(
        runtime=rt.name,
        examples=len(examples),
        correct=correct,
        accuracy=correct / len(examples),
        seconds=round(seconds, 3),
        examples_per_s=round(len(examples) / seconds, 3) if seconds > 0 else float("inf"),
    )


def retention(student_accuracy: float, teacher_accuracy: float) -> float | None:
    """Student accuracy as a fraction of the teacher's (None when the teacher scores 0)."""
    return None if teacher_accuracy == 0 else round(student_accuracy / teacher_accuracy, 4)


def artifact_size(path) -> int:
    """Bytes of model weights: the file itself, or the weight files of an artifact folder."""
    from pathlib import Path

    from shrink.runtime.base import WEIGHT_FILES, artifact_format

    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for pattern in WEIGHT_FILES[artifact_format(path)] for f in path.glob(pattern))


TEACHER_RUNTIMES = ("auto", "torch")  # auto: the teacher's own (llama.cpp for a GGUF file)


def evaluate_path(artifact, data, *, teacher=None, teacher_prefix=None, teacher_runtime="auto", threads=None,
                  device="auto", skip_verify=False) -> dict:
    """`shrink eval`: the artifact (and optionally the teacher) on a task file.

    The teacher runs as its user serves it: a GGUF file in llama.cpp (quantized, as it
    is), a folder in torch. teacher_runtime="torch" runs a GGUF teacher's dequantized
    Hugging Face copy in torch instead. Each that is a shrink artifact is first checked
    against its manifest, unless `skip_verify`."""
    from pathlib import Path

    from shrink.artifact import verify_before_use
    from shrink.errors import ShrinkError
    from shrink.hf import check_model_dir
    from shrink.runtime import open_runtime
    from shrink.tasks import load_task, with_prefix

    if teacher_runtime not in TEACHER_RUNTIMES:
        raise ShrinkError(f"--teacher-runtime must be one of {', '.join(TEACHER_RUNTIMES)}, got {teacher_runtime!r}")
    examples = load_task(data)
    for path in (artifact, teacher):
        if path is not None:
            verify_before_use(path, skip=skip_verify)
    if teacher is not None:
        teacher = Path(teacher)
        if teacher.is_file():
            if teacher.suffix != ".gguf":
                raise ShrinkError(f"--teacher: {teacher} is a file but not .gguf (expected a model folder or a GGUF file)")
            if teacher_runtime == "torch":
                from shrink.teacher_gguf import resolve_teacher

                teacher = resolve_teacher(teacher)
        else:
            check_model_dir(teacher, "teacher")
    teacher_examples = examples
    if teacher_prefix is not None:
        if not Path(teacher_prefix).is_file():
            raise ShrinkError(f"--teacher-prefix: no such file {teacher_prefix}")
        teacher_examples = with_prefix(examples, Path(teacher_prefix).read_text(encoding="utf-8"))
    rows = []
    for role, path in [("artifact", artifact)] + ([("teacher", teacher)] if teacher else []):
        rt = open_runtime(path, device=device, threads=threads)
        try:
            res = evaluate(rt, teacher_examples if role == "teacher" else examples, f"evaluating {role}")
        finally:
            rt.close()
        rows.append({"role": role, "path": str(path), "size_bytes": artifact_size(Path(path)), **res.to_dict()})
    out = {"data": str(data), "results": rows}
    if teacher is not None:
        out["retention"] = retention(rows[0]["accuracy"], rows[1]["accuracy"])
    return out
