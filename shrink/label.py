"""`shrink label`: the teacher writes the training data.

Input rows need only a `prompt` (or `messages`); every other key is kept. A row with
`choices` is labeled with the teacher's most probable choice (its probability is the
confidence); any other row with the teacher's greedy answer (the confidence is the
geometric mean of its tokens' probabilities: exp of their mean log-probability).
Distilling on the output is sequence-level distillation: the student learns the
teacher's next-token distributions over the teacher's own answers.

For extraction tasks, `copied_only` (`--copied-only`) leaves out answers the teacher did
not copy from its input: a JSON answer with a string value (at any depth) that the input
does not contain as whole words, any other answer that it does not contain whole. A
student learns to copy from what it is trained on; a teacher's invented or misspelt field
teaches it not to.

The teacher runs in its fastest runtime: a GGUF file in llama.cpp as it is (quantized,
so a teacher far larger than the student fits in memory), a Hugging Face folder in
torch (on CUDA when there is one).

Labeled rows are appended to `OUT.partial` as they come, so a run that stops continues
where it stopped when started again with the same inputs and settings (`OUT.partial.json`
records them). The output is written atomically at the end, then its manifest
(`OUT.manifest.json`: the teacher's and the data's sha256, the decoding settings and
the counts), last.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shrink.console import console, progress
from shrink.errors import ShrinkError

BATCH = 16  # answers a torch teacher writes per forward pass (greedy labeling)


@dataclass(frozen=True)
class LabelConfig:
    teacher: Path  # a Hugging Face folder or a GGUF file
    data: Path  # task rows: prompt or messages; answers not needed
    out: Path  # the labeled task file (JSONL)
    teacher_prefix: Path | None = None  # text put before every prompt for the teacher (few-shot examples)
    chat_template: str | None = None  # auto | none | FILE; None: auto when rows hold messages
    max_new_tokens: int = 64  # most tokens of a generated answer
    stop: tuple[str, ...] | None = None  # stop strings; None: a newline for raw prompts, none for chats
    min_confidence: float = 0.0  # rows the teacher is less sure of are left out (and counted)
    copied_only: bool = False  # answers not copied from the input are left out (and counted)
    samples: int = 1  # answers per input row (distinct ones kept); more than 1 needs a temperature
    temperature: float = 0.0  # 0: greedy; else sampling from softmax(logits / temperature)
    top_p: float = 1.0  # below 1: sampling from the nucleus of that much probability (needs a temperature)
    seed: int = 0  # of the sampling
    threads: int | None = None  # llama.cpp threads
    device: str = "auto"  # torch teachers

    def settings(self) -> dict[str, Any]:
        """What decides the labels (and must match to resume a run)."""
        return {"teacher_prefix": None if self.teacher_prefix is None else str(self.teacher_prefix),
                "chat_template": self.chat_template, "max_new_tokens": self.max_new_tokens,
                "stop": None if self.stop is None else list(self.stop),
                "decoding": "greedy" if self.temperature == 0 else "sampling",
                "samples": self.samples, "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}


def label(cfg: LabelConfig) -> dict[str, Any]:
    from shrink.artifact import sha256_file
    from shrink.chat import resolve_template
    from shrink.chat import template_spec
    from shrink.evaluate import Generation
    from shrink.runtime import open_runtime
    from shrink.tasks import load_task, parse_row, with_prefix

    if not 0.0 <= cfg.min_confidence <= 1.0:
        raise ShrinkError(f"--min-confidence must be between 0 and 1, got {cfg.min_confidence}")
    if cfg.samples < 1:
        raise ShrinkError(f"--samples must be at least 1, got {cfg.samples}")
    if cfg.samples > 1 and cfg.temperature <= 0:
        raise ShrinkError("--samples: more than one answer per input needs --temperature above 0 (greedy answers are all the same)")
    if cfg.temperature < 0:
        raise ShrinkError(f"--temperature must be 0 or more, got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        raise ShrinkError(f"--top-p must be above 0 and at most 1, got {cfg.top_p}")
    if cfg.top_p < 1 and cfg.temperature == 0:
        raise ShrinkError("--top-p: sampling from the nucleus needs --temperature above 0 (greedy answers ignore it)")
    teacher = Path(cfg.teacher)
    if not teacher.exists():
        raise ShrinkError(f"--teacher: no such file or folder {teacher}")
    if teacher.is_file() and teacher.suffix != ".gguf":
        raise ShrinkError(f"--teacher: {teacher} is a file but not .gguf (expected a model folder or a GGUF file)")
    if cfg.teacher_prefix is not None and not Path(cfg.teacher_prefix).is_file():
        raise ShrinkError(f"--teacher-prefix: no such file {cfg.teacher_prefix}")
    out = Path(cfg.out)
    if out.exists() and out.is_dir():
        raise ShrinkError(f"--out: {out} is a folder (expected a .jsonl file to write)")
    template = resolve_template(template_spec(cfg.chat_template, cfg.data), teacher)
    examples = load_task(cfg.data, template, need_completion=False)
    lines = [line for line in Path(cfg.data).read_text(encoding="utf-8").splitlines() if line.strip()]
    raw = [parse_row(line, ex.where) for line, ex in zip(lines, examples)]
    if cfg.copied_only and any(ex.choices for ex in examples):
        where = next(ex.where for ex in examples if ex.choices)
        raise ShrinkError(f"--copied-only: {where} has choices; only generated answers can be copied from the input")
    if cfg.teacher_prefix is not None:
        examples = with_prefix(examples, Path(cfg.teacher_prefix).read_text(encoding="utf-8"))

    key = {"data_sha256": sha256_file(cfg.data, "hashing the data"),
           "teacher_sha256": _teacher_sha256(teacher),
           "teacher_prefix_sha256": None if cfg.teacher_prefix is None else sha256_file(cfg.teacher_prefix),
           "chat_template_sha256": None if template is None else template.sha256, **cfg.settings()}
    done = _resume(out, key)
    generation = Generation(cfg.max_new_tokens, cfg.stop)
    start = time.perf_counter()
    if _inputs_done(done) < len(examples):
        _label_rows(teacher, examples, raw, done, out, key, generation, cfg, open_runtime)
    answered = [r for r in done if r.get("_empty") is not True]
    sure = [r for r in answered if r["confidence"] >= cfg.min_confidence]
    kept = [r for r in sure if copied(*_answer_and_input(r))] if cfg.copied_only else sure
    kept = [{k: v for k, v in r.items() if not k.startswith("_")} for r in kept]
    return _write(out, kept, key, cfg, teacher, template, counts={
        "rows": len(examples), "labeled": len(kept), "dropped_low_confidence": len(answered) - len(sure),
        "dropped_empty": len(done) - len(answered), "dropped_not_copied": len(sure) - len(kept),
        "seconds": round(time.perf_counter() - start, 3)})


def copied(answer: str, source: str) -> bool:
    """Whether an answer is copied from its input: every string of a JSON object or list
    (at any depth) is in `source` as whole words (not "Ada Quil" from "Ada Quill"); any
    other answer is in it whole (stripped)."""
    text = answer.strip()
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, (dict, list)):
        return bool(text) and _in(text, source)
    return all(_in(s, source) for s in _strings(value))


def _in(text: str, source: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(text)}(?!\w)", source) is not None


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _answer_and_input(row: dict) -> tuple[str, str]:
    """A labeled row's answer, and the text it was asked about: the prompt, or the chat's
    messages before the answer."""
    if "messages" in row:
        *before, last = row["messages"]
        return last["content"], "\n".join(str(m.get("content", "")) for m in before)
    return row["completion"], row["prompt"]


def _teacher_sha256(teacher: Path) -> str:
    """A GGUF file's sha256, or one over a folder's weight files (name and sha256 each)."""
    from shrink.artifact import weights_sha256

    files = weights_sha256(teacher)
    if teacher.is_file():
        return files[teacher.name]
    import hashlib

    return hashlib.sha256("".join(f"{name}:{sha}\n" for name, sha in files.items()).encode()).hexdigest()


def _resume(out: Path, key: dict) -> list[dict]:
    """The rows a stopped run with the same inputs and settings labeled already."""
    partial, meta = _partial_paths(out)
    if not partial.is_file() or not meta.is_file():
        return []
    try:
        same = json.loads(meta.read_text(encoding="utf-8")) == key
    except ValueError:
        same = False
    if not same:
        console.print(f"[yellow]{partial} is from another run (other data, teacher or settings): starting over[/yellow]")
        return []
    rows = []
    for line in partial.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            break  # the last line of a run that was killed mid-write
    console.print(f"resuming: {_inputs_done(rows)} rows already labeled in {partial}")
    return rows


def _inputs_done(rows: list[dict]) -> int:
    """How many input rows are labeled (each input's answers are written together)."""
    return rows[-1]["_input"] + 1 if rows else 0


def _partial_paths(out: Path) -> tuple[Path, Path]:
    return out.with_name(out.name + ".partial"), out.with_name(out.name + ".partial.json")


def _label_rows(teacher, examples, raw, done, out, key, generation, cfg, open_runtime) -> None:
    from shrink.evaluate import answer, choose, share_prompt_prefix, split_ids, turn_end_ids

    partial, meta = _partial_paths(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps(key), encoding="utf-8")
    with partial.open("w", encoding="utf-8") as f:  # rewritten whole: drops a half-written last line
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in done)
    with console.status(f"loading the teacher {teacher}"):
        rt = open_runtime(teacher, device=cfg.device, threads=cfg.threads)
    try:
        start = _inputs_done(done)
        rest = examples[start:]
        from shrink.runtime.base import Sampler

        share_prompt_prefix(rt, rest)
        with partial.open("a", encoding="utf-8") as f, progress("rows") as bar:
            task = bar.add_task(f"labeling with the teacher ({rt.name})", total=len(examples), completed=start)
            batch = BATCH if hasattr(rt, "generate_batch") and cfg.temperature == 0 else 1
            answered: dict[int, str] = {}  # greedy answers of the batch being written
            for i, ex in enumerate(rest, start=start):
                if batch > 1 and not ex.choices and i not in answered:
                    group = [(j, e) for j, e in enumerate(examples[i:i + batch], start=i) if not e.choices]
                    texts = rt.generate_batch([rt.encode(e.prompt, e.chat) for _, e in group], generation.max_new_tokens,
                                              [generation.stops_for(e) for _, e in group],
                                              [turn_end_ids(rt, e.end_of_turn) for _, e in group])
                    answered = dict(zip([j for j, _ in group], texts))
                if ex.choices:
                    choice, scores = choose(rt, ex)
                    top = max(scores)
                    confidence = math.exp(top) / sum(math.exp(s) for s in scores) if math.isfinite(top) else 0.0
                    rows = [{**raw[i], "completion": choice, "confidence": round(confidence, 6)}]
                else:
                    texts = [answered[i]] if i in answered else [
                        answer(rt, ex, generation) if cfg.temperature == 0 else
                        answer(rt, ex, generation, Sampler(cfg.temperature, cfg.seed * 1_000_003 + i * 101 + k, cfg.top_p))
                        for k in range(cfg.samples)]
                    rows = [_answered(rt, ex, raw[i], text, split_ids) for text in dict.fromkeys(texts)]
                for row in rows:
                    row["_input"] = i
                done.extend(rows)
                f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
                f.flush()
                bar.advance(task)
    finally:
        rt.close()


def _answered(rt, ex, raw: dict, text: str, split_ids) -> dict:
    """The input row with the teacher's answer and its confidence: the geometric mean of
    its tokens' probabilities under the teacher (untempered)."""
    row, confidence = dict(raw), 0.0
    if text.strip():
        context, (cont,) = split_ids(rt, ex.prompt, [text], ex.chat)
        confidence = math.exp(rt.score_continuations(context, [cont])[0] / max(len(cont), 1))
    else:
        row["_empty"] = True
    _put_answer(row, text)
    row["confidence"] = round(confidence, 6)
    return row


def _put_answer(row: dict, text: str) -> None:
    """A chat row gets the answer as a last assistant turn; a prompt row as its completion."""
    if "messages" in row:
        messages = list(row["messages"])
        if messages and messages[-1].get("role") == "assistant":
            messages = messages[:-1]  # an answer given in the input is replaced by the teacher's
        row["messages"] = messages + [{"role": "assistant", "content": text}]
    else:
        row["completion"] = text


def _write(out: Path, kept: list[dict], key: dict, cfg: LabelConfig, teacher: Path, template, counts: dict):
    from shrink.artifact import sha256_file
    from shrink.atomic import write_text_atomic
    from shrink.manifest import FileEntry, Manifest, Source

    write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    manifest = Manifest(
        kind="labels", format="jsonl",
        settings={**key, "data": str(cfg.data), "teacher": str(teacher), "min_confidence": cfg.min_confidence,
                  "copied_only": cfg.copied_only},
        metrics={**counts, "size_bytes": out.stat().st_size,
                 "mean_confidence": round(sum(r["confidence"] for r in kept) / len(kept), 6) if kept else None},
        source=Source(str(teacher), None),
        files={out.name: FileEntry(sha256_file(out), out.stat().st_size)},
    )
    manifest.write_to(manifest_path(out))
    for p in _partial_paths(out):
        p.unlink(missing_ok=True)
    if counts["dropped_low_confidence"]:
        console.print(f"left out {counts['dropped_low_confidence']} of {counts['rows']} rows the teacher was less "
                      f"than {cfg.min_confidence:.0%} sure of")
    if counts["dropped_empty"]:
        console.print(f"left out {counts['dropped_empty']} rows the teacher answered with nothing")
    if counts["dropped_not_copied"]:
        console.print(f"left out {counts['dropped_not_copied']} answers not copied from their input (--copied-only)")
    return manifest


def manifest_path(out: Path) -> Path:
    """labeled.jsonl -> labeled.jsonl.manifest.json, beside it."""
    return Path(out).with_name(Path(out).name + ".manifest.json")


def label_summary(cfg: LabelConfig, manifest) -> str:
    m = manifest.metrics
    return (f"{m['labeled']} answers to {m['rows']} rows written to {cfg.out} "
            f"(mean confidence {m['mean_confidence']}) in {m['seconds']:.1f} s")

