"""A task's score measured through the runtime that serves the artifact.

- `choice` (rows with `choices`): the choice with the highest total log-probability wins.
- Every other metric (shrink.metrics: exact, f1, chrf, rouge-l, json): the model writes
  its answer greedily, up to `max_new_tokens`, stopping at an end-of-generation token
  or a stop string; the answers are scored against the references. The budget and the
  stops are settings (`Generation`), never derived from the reference answers.

`accuracy` in results is that score, a fraction in [0, 1], whatever the metric (the
fraction correct for choice and exact); `metric` names it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from shrink.console import progress
from shrink.errors import ShrinkError
from shrink.metrics import METRICS, get_metric
from shrink.metrics import default_metric as metrics_default
from shrink.prefix import common_prefix
from shrink.runtime.base import Runtime
from shrink.tasks import Example

DEFAULT_MAX_NEW_TOKENS = 64
RAW_PROMPT_STOP = ("\n",)  # a raw prompt's answer is its first line; a chat's ends at its end-of-turn token


@dataclass(frozen=True)
class Generation:
    """How free answers are written."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # most tokens an answer may have
    stop: tuple[str, ...] | None = None  # stop strings; None: a newline for raw prompts, none for chats

    def stops_for(self, ex: Example) -> tuple[str, ...]:
        if self.stop is not None:
            return tuple(s for s in self.stop if s)
        return () if ex.chat else RAW_PROMPT_STOP


@dataclass(frozen=True)
class EvalResult:
    runtime: str
    examples: int
    correct: int | None  # answers counted right (choice, exact); None for graded metrics
    accuracy: float  # the metric's score over the set, in [0, 1]
    seconds: float
    examples_per_s: float
    metric: str = "choice"

    def to_dict(self) -> dict:
        return asdict(self)


def split_ids(rt: Runtime, prompt: str, continuations: list[str], special: bool = False) -> tuple[list[int], list[list[int]]]:
    """Tokenize prompt+continuation as one text (as the model sees it), then split off the
    continuation. The shared prefix of all encodings and the prompt's is the context, so a
    merge across the boundary moves the split point left instead of breaking it."""
    prompt_ids = rt.encode(prompt, special)
    fulls = [rt.encode(prompt + c, special) for c in continuations]
    n = len(common_prefix([prompt_ids, *fulls]))
    n = max(n, 1) if prompt_ids else 0
    return prompt_ids[:n], [full[n:] for full in fulls]


def choose(rt: Runtime, ex: Example) -> tuple[str, list[float]]:
    """The choice the model gives the highest log-probability, and every choice's."""
    context, conts = split_ids(rt, ex.prompt, list(ex.choices), ex.chat)
    scores = rt.score_continuations(context, conts)
    return ex.choices[scores.index(max(scores))], scores


def answer(rt: Runtime, ex: Example, generation: Generation, sampler=None) -> str:
    """The model's greedy answer to `ex` (sampled with a runtime.base.Sampler); a chat's
    ends at its template's end of turn."""
    return rt.generate(rt.encode(ex.prompt, ex.chat), generation.max_new_tokens, generation.stops_for(ex),
                       turn_end_ids(rt, ex.end_of_turn), sampler)


def turn_end_ids(rt: Runtime, end_of_turn: str | None) -> frozenset[int]:
    """The end-of-turn text's token, when it is one token (<end_of_turn>, <|im_end|>)."""
    if not end_of_turn:
        return frozenset()
    base, ids = rt.encode("", True), rt.encode(end_of_turn, True)
    ids = ids[len(base):] if ids[: len(base)] == base else ids
    return frozenset(ids) if len(ids) == 1 else frozenset()


def default_metric(examples: list[Example]) -> str:
    """choice when every row has choices, exact when none has."""
    with_choices = sum(ex.choices is not None for ex in examples)
    if with_choices not in (0, len(examples)):
        first = next(ex for ex in examples if ex.choices is None)
        raise ShrinkError(f"{first.where or 'task data'}: some rows have 'choices' and this one has not: "
                          "give every row choices, or none, or choose a --metric")
    return metrics_default(bool(with_choices))


def check_references(examples: list[Example], metric: str, references: list[str] | None = None) -> None:
    """Every row can be scored by `metric`: choices for choice, a reference the metric
    can read (a JSON object for json) for the others."""
    m = get_metric(metric)
    for i, ex in enumerate(examples):
        where = ex.where or f"row {i + 1}"
        if metric == "choice":
            if ex.choices is None:
                raise ShrinkError(f"{where}: --metric choice needs 'choices' in every row")
            continue
        ref = references[i] if references is not None else ex.target
        if ref is None:
            raise ShrinkError(f"{where}: no reference answer to score against "
                              "(give a 'completion', or use --reference teacher)")
        if m.check_reference is not None and references is None:
            m.check_reference(ref, where)


def share_prompt_prefix(rt: Runtime, examples: list[Example]) -> None:
    """Tell the runtime the prefix every prompt starts with (few-shot examples), once."""
    prompts = [rt.encode(ex.prompt, ex.chat) for ex in examples]
    # Keep one token before each prompt's end out of the prefix: it must be computed.
    rt.share_prefix(common_prefix(prompts)[: min(map(len, prompts)) - 1])


def answers(rt: Runtime, examples: list[Example], generation: Generation = Generation(),
            label: str = "answering", by_choice: bool | None = None) -> list[str]:
    """The model's answers: its choice (rows with choices, or every row when `by_choice`),
    its greedy text otherwise (every row when `by_choice` is False)."""
    share_prompt_prefix(rt, examples)
    out = []
    with progress("ex") as bar:
        task = bar.add_task(f"{label} ({rt.name})", total=len(examples))
        for ex in examples:
            pick = bool(ex.choices) if by_choice is None else by_choice
            out.append(choose(rt, ex)[0] if pick else answer(rt, ex, generation))
            bar.advance(task)
    return out


def evaluate(rt: Runtime, examples: list[Example], label: str = "evaluating", *, metric: str | None = None,
             generation: Generation = Generation(), references: list[str] | None = None) -> EvalResult:
    """The task's score by `metric` (default: choice for rows with choices, else exact) and
    examples/s (the clock includes tokenization and any prefix set-up). `references`
    replace the rows' own answers (the teacher's, for --reference teacher)."""
    metric = metric or default_metric(examples)
    check_references(examples, metric, references)
    refs = references if references is not None else [ex.target for ex in examples]
    start = time.perf_counter()
    predictions = answers(rt, examples, generation, label, by_choice=metric == "choice")
    if metric == "choice":
        correct = sum(p == r for p, r in zip(predictions, refs))
        score = correct / len(examples)
    else:
        score = METRICS[metric].score(predictions, refs)
        correct = round(score * len(examples)) if metric == "exact" else None
    seconds = time.perf_counter() - start
    return EvalResult(
        runtime=rt.name,
        examples=len(examples),
        correct=correct,
        accuracy=score,
        seconds=round(seconds, 3),
        examples_per_s=round(len(examples) / seconds, 3) if seconds > 0 else float("inf"),
        metric=metric,
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


REFERENCES = ("labels", "teacher")  # what answers are scored against: the data's, or the teacher's


def evaluate_path(artifact, data, *, teacher=None, teacher_prefix=None, teacher_runtime="auto", threads=None,
                  device="auto", skip_verify=False, metric=None, generation: Generation = Generation(),
                  chat_template=None, reference="labels") -> dict:
    """`shrink eval`: the artifact (and optionally the teacher) on a task file.

    The teacher runs as its user serves it: a GGUF file in llama.cpp (quantized, as it
    is), a folder in torch. teacher_runtime="torch" runs a GGUF teacher's dequantized
    Hugging Face copy in torch instead. Each that is a shrink artifact is first checked
    against its manifest, unless `skip_verify`.

    `chat_template` (auto|none|FILE, None: auto when rows hold messages) renders chat rows,
    from the teacher's template when there is a teacher, else the artifact's. With
    reference="teacher" the data needs no answers: the teacher answers first, and the
    artifact is scored against its answers (agreement with the teacher)."""
    from pathlib import Path

    from shrink.artifact import verify_before_use
    from shrink.chat import resolve_template, template_spec
    from shrink.hf import check_model_dir
    from shrink.runtime import open_runtime
    from shrink.tasks import load_task, with_prefix

    if teacher_runtime not in TEACHER_RUNTIMES:
        raise ShrinkError(f"--teacher-runtime must be one of {', '.join(TEACHER_RUNTIMES)}, got {teacher_runtime!r}")
    if reference not in REFERENCES:
        raise ShrinkError(f"--reference must be one of {', '.join(REFERENCES)}, got {reference!r}")
    if reference == "teacher" and teacher is None:
        raise ShrinkError("--reference teacher needs --teacher")
    if metric is not None:
        get_metric(metric)
    template_model = teacher if teacher is not None else artifact
    template = resolve_template(template_spec(chat_template, data), template_model)
    examples = load_task(data, template, need_completion=reference == "labels")
    metric = metric or default_metric(examples)
    if reference == "labels":
        check_references(examples, metric)
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
    rows, references = [], None
    order = [("teacher", teacher), ("artifact", artifact)] if reference == "teacher" else (
        [("artifact", artifact)] + ([("teacher", teacher)] if teacher else []))
    for role, path in order:
        rt = open_runtime(path, device=device, threads=threads)
        try:
            if role == "teacher" and reference == "teacher":
                start = time.perf_counter()
                references = answers(rt, teacher_examples, generation, "the teacher answers", by_choice=metric == "choice")
                seconds = time.perf_counter() - start
                res = EvalResult(rt.name, len(examples), None, 1.0, round(seconds, 3),
                                 round(len(examples) / seconds, 3) if seconds > 0 else float("inf"), metric)
            else:
                res = evaluate(rt, teacher_examples if role == "teacher" else examples, f"evaluating {role}",
                               metric=metric, generation=generation,
                               references=references if role == "artifact" else None)
        finally:
            rt.close()
        rows.append({"role": role, "path": str(path), "size_bytes": artifact_size(Path(path)), **res.to_dict()})
    rows.sort(key=lambda r: r["role"] != "artifact")
    out = {"data": str(data), "metric": metric, "reference": reference, "results": rows}
    if template is not None:
        out["chat_template"] = {"source": template.source, "sha256": template.sha256}
    if teacher is not None:
        out["retention"] = retention(rows[0]["accuracy"], rows[1]["accuracy"])
    return out
