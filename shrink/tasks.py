"""Task data: JSONL, one example per line.

    {"prompt": "Review: great phone\\nSentiment:", "completion": " positive",
     "choices": [" positive", " negative"]}
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

A row holds a `prompt` (raw text the model continues) or `messages` (a chat, rendered by
a chat template: shrink.chat). `prompt` and `completion` must not be empty (a model
needs a prompt to continue). `completion` (for chats, the last assistant turn) may be
left out where answers are not needed (`shrink label`'s inputs, `--reference teacher`).
`choices` is optional; when present, `completion` must be one of them. Other keys are
ignored. Every problem is reported with the file and line it is on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from shrink.errors import TaskDataError

T = TypeVar("T")


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str | None  # None: an input without an answer
    choices: tuple[str, ...] | None = None  # candidate completions; None = free generation
    reference: str | None = None  # what an answer is scored against, when not `completion` (a chat's turn content)
    chat: bool = False  # prompt and completion were written by a chat template: special tokens are parsed
    end_of_turn: str | None = None  # the text a chat template closes an answer with: generation stops there
    where: str = field(default="", compare=False)  # "file:line", for messages

    @property
    def target(self) -> str | None:
        """The reference answer a generated one is scored against."""
        return self.reference if self.reference is not None else self.completion


def load_task(path: str | Path, chat_template=None, need_completion: bool = True) -> list[Example]:
    """Read and validate a task file; raise TaskDataError naming file:line on the first
    problem. `chat_template` (a shrink.chat.ChatTemplate) renders `messages` rows, and
    `prompt` rows as one user turn; without one, `messages` rows are an error."""
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"{path}: no such file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise TaskDataError(f"{path}:{line}: not UTF-8 ({e.reason} at byte {e.start})") from None

    examples = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        examples.append(_parse_line(line, f"{path}:{lineno}", chat_template, need_completion))
    if not examples:
        raise TaskDataError(f"{path}: empty file (expected one JSON object per line)")
    return examples


def parse_row(line: str, where: str) -> dict:
    """A task file's line as its JSON object."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise TaskDataError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise TaskDataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _parse_line(line: str, where: str, chat_template=None, need_completion: bool = True) -> Example:
    obj = parse_row(line, where)
    if "messages" in obj or chat_template is not None:
        return _chat_example(obj, where, chat_template, need_completion)
    keys = ("prompt", "completion") if need_completion or "completion" in obj else ("prompt",)
    if "prompt" not in obj:
        raise TaskDataError(f"{where}: missing key 'prompt' (or 'messages')")
    for key in keys:
        if key not in obj:
            raise TaskDataError(f"{where}: missing key '{key}'")
        if not isinstance(obj[key], str):
            raise TaskDataError(f"{where}: '{key}' must be a string, got {type(obj[key]).__name__}")
    for key in keys:
        if obj[key] == "":
            raise TaskDataError(f"{where}: '{key}' is empty")
    choices = obj.get("choices")
    if choices is not None:
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise TaskDataError(f"{where}: 'choices' must be a non-empty list of non-empty strings")
        if obj.get("completion") is not None and obj["completion"] not in choices:
            raise TaskDataError(f"{where}: completion {obj['completion']!r} is not among the choices {choices!r}")
        choices = tuple(choices)
    return Example(prompt=obj["prompt"], completion=obj.get("completion"), choices=choices, where=where)


def _chat_example(obj: dict, where: str, template, need_completion: bool) -> Example:
    from shrink.chat import check_messages, render, turn_end

    if template is None:
        raise TaskDataError(f"{where}: a row with 'messages' needs a chat template (--chat-template auto or FILE)")
    if "messages" in obj:
        messages = check_messages(obj["messages"], where)
    elif isinstance(obj.get("prompt"), str) and obj["prompt"]:
        messages = ({"role": "user", "content": obj["prompt"]},)
        if isinstance(obj.get("completion"), str) and obj["completion"]:
            messages += ({"role": "assistant", "content": obj["completion"]},)
    else:
        raise TaskDataError(f"{where}: missing key 'prompt' (or 'messages')")
    if obj.get("choices") is not None:
        raise TaskDataError(f"{where}: 'choices' are not supported with a chat template")
    r = render(template, messages)
    end = r.end_of_turn or turn_end(template)
    if r.completion is None and need_completion:
        raise TaskDataError(f"{where}: the chat has no answer (its last turn is not the assistant's)")
    return Example(prompt=r.prompt, completion=r.completion, reference=r.reference, chat=True, end_of_turn=end,
                   where=where)


def load_task_for(path: str | Path, model, chat_template: str | None = None,
                  need_completion: bool = True) -> list[Example]:
    """A task file as `model` reads it: chat rows rendered by `model`'s chat template
    (shrink.chat.template_spec: auto when the file holds messages, unless told)."""
    from shrink.chat import resolve_template, template_spec

    return load_task(path, resolve_template(template_spec(chat_template, path), model), need_completion)


def spread(items: Sequence[T], n: int) -> list[T]:
    """`n` of `items` evenly spaced over the whole list, in order; all of them when there
    are at most `n`. Item k is the first of the k-th of n equal shares, so every region
    of a file is sampled (its first item and its last share too, whatever its length),
    not just its first lines. Deterministic, so calibration is reproducible."""
    if n < 1:
        raise ValueError(f"spread: n must be at least 1, got {n}")
    if len(items) <= n:
        return list(items)
    return [items[k * len(items) // n] for k in range(n)]


def with_prefix(examples, prefix: str):
    """The examples as the teacher reads them: `prefix` (few-shot examples, instructions)
    before every prompt."""
    import dataclasses

    return [dataclasses.replace(ex, prompt=prefix + ex.prompt) for ex in examples]
