"""Chat rows and chat templates.

A task row may hold `messages` instead of a `prompt`:

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}]}

The last assistant turn, when there is one, is the completion. A chat template (Jinja, as
Hugging Face tokenizers and GGUF files carry it) turns the other turns into the prompt
text every model reads, the teacher and the student alike. It is rendered by transformers'
own `render_jinja_template`, so shrink's text is the text `apply_chat_template` gives.

`--chat-template` picks the template: `auto` (the teacher's own; an error when it has
none), `none` (rows must hold a `prompt`), or a Jinja file.

A template writes special tokens as text (`<start_of_turn>`); rendered prompts are
encoded with special-token parsing, unlike raw prompts. A leading BOS is left out of the
rendered text: every runtime adds BOS to every prompt itself, as it does for raw prompts.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from shrink.errors import ShrinkError, TaskDataError

ROLES = ("system", "user", "assistant")
TEMPLATE_CHOICES = "auto|none|FILE"


@dataclass(frozen=True)
class ChatTemplate:
    text: str  # the Jinja source
    source: str  # where it came from: a file path, or "<model>/tokenizer_config.json"
    bos_token: str | None = None  # the model's BOS text (a template may write it)
    eos_token: str | None = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Rendered:
    prompt: str  # what the model reads: every turn before the answer, and the generation prompt
    completion: str | None  # the answer as the model writes it, end-of-turn included (for training)
    reference: str | None  # the answer's content alone (for scoring)
    end_of_turn: str | None  # the text the template closes the answer with, e.g. "<end_of_turn>"


def check_messages(messages, where: str) -> tuple[dict[str, str], ...]:
    """A row's `messages`, validated: a non-empty list of {role, content} with a known
    role and string content, and at least one turn that is not the final answer."""
    if not isinstance(messages, list) or not messages:
        raise TaskDataError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TaskDataError(f"{where}: messages[{i}] must be an object, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise TaskDataError(f"{where}: messages[{i}] has role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise TaskDataError(f"{where}: messages[{i}] content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    if len(out) == 1 and out[0]["role"] == "assistant":
        raise TaskDataError(f"{where}: 'messages' holds only an assistant turn (nothing to prompt with)")
    return tuple(out)


def render(template: ChatTemplate, messages: tuple[dict[str, str], ...]) -> Rendered:
    """The prompt (turns before the final assistant answer, with the generation prompt)
    and, when the last turn is the assistant's, the completion the template writes for it."""
    answer = messages[-1]["content"] if messages[-1]["role"] == "assistant" else None
    turns = messages[:-1] if answer is not None else messages
    prompt = _render(template, turns, add_generation_prompt=True)
    if answer is None:
        return Rendered(prompt, None, None, None)
    full = _render(template, messages, add_generation_prompt=False)
    if not full.startswith(prompt) or answer not in full[len(prompt):]:
        raise ShrinkError(f"chat template {template.source}: the answer's rendering does not continue the prompt's "
                          "(a template that rewrites earlier turns cannot be distilled turn by turn)")
    completion = full[len(prompt):]
    end = completion[completion.index(answer) + len(answer):].strip()
    return Rendered(prompt, completion.rstrip("\n") if end else completion, answer, end or None)


@functools.lru_cache(maxsize=8)  # once per template, not once per row of a task file
def turn_end(template: ChatTemplate) -> str | None:
    """The text the template closes an assistant turn with (probed with a short chat)."""
    probe = ({"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"})
    try:
        return render(template, probe).end_of_turn
    except ShrinkError:
        return None


def _render(template: ChatTemplate, messages, add_generation_prompt: bool) -> str:
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, _ = render_jinja_template(
            conversations=[list(messages)], chat_template=template.text, add_generation_prompt=add_generation_prompt,
            bos_token=template.bos_token or "", eos_token=template.eos_token or "")
    except TemplateError as e:
        raise ShrinkError(f"chat template {template.source}: {e}") from None
    text = rendered[0]
    if template.bos_token and text.startswith(template.bos_token):
        text = text[len(template.bos_token):]
    return text


def resolve_template(spec: str | None, model: str | Path | None, option: str = "--chat-template") -> ChatTemplate | None:
    """`none`/None: no template. `auto`: the model's own (an error when it has none).
    Anything else: a Jinja file, with the model's BOS/EOS text when a model is given."""
    if spec in (None, "none"):
        return None
    bos, eos, own = model_chat_template(Path(model)) if model is not None else (None, None, None)
    if spec == "auto":
        if own is None:
            raise ShrinkError(f"{option} auto: {model} has no chat template "
                              "(give a Jinja file, or --chat-template none for raw prompts)")
        return own
    path = Path(spec)
    if not path.is_file():
        raise ShrinkError(f"{option}: no such file {spec} (expected auto, none or a Jinja file)")
    return ChatTemplate(path.read_text(encoding="utf-8"), str(path), bos, eos)


def model_chat_template(model: Path) -> tuple[str | None, str | None, ChatTemplate | None]:
    """(BOS text, EOS text, chat template or None) of a Hugging Face folder or a GGUF file."""
    if model.is_dir() and not (model / "tokenizer_config.json").is_file():
        model = next(iter(sorted(model.glob("*.gguf"))), model)  # a GGUF export's folder
    if model.is_file():
        return _gguf_chat_template(model)
    config = _read_json(model / "tokenizer_config.json")
    bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
    text, source = None, None
    if (model / "chat_template.jinja").is_file():
        text, source = (model / "chat_template.jinja").read_text(encoding="utf-8"), model / "chat_template.jinja"
    elif (model / "chat_template.json").is_file():
        text, source = _read_json(model / "chat_template.json").get("chat_template"), model / "chat_template.json"
    else:
        text, source = config.get("chat_template"), model / "tokenizer_config.json"
    if isinstance(text, list):  # named templates: [{"name": "default", "template": ...}, ...]
        text = next((t.get("template") for t in text if isinstance(t, dict) and t.get("name") == "default"), None)
    return bos, eos, ChatTemplate(text, str(source), bos, eos) if isinstance(text, str) and text else None


def _gguf_chat_template(path: Path):
    from gguf import GGUFReader

    reader = GGUFReader(path)

    def field(name):
        f = reader.fields.get(name)
        return None if f is None else f.contents()

    tokens = field("tokenizer.ggml.tokens") or []
    bos_id, eos_id = field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")
    bos = tokens[bos_id] if isinstance(bos_id, int) and bos_id < len(tokens) else None
    eos = tokens[eos_id] if isinstance(eos_id, int) and eos_id < len(tokens) else None
    text = field("tokenizer.chat_template")
    return bos, eos, ChatTemplate(text, f"{path} (tokenizer.chat_template)", bos, eos) if text else None


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def template_spec(spec: str | None, data) -> str | None:
    """--chat-template as given; when it is not given, auto for data with chat rows."""
    if spec is not None:
        return spec
    if not Path(data).is_file():
        return None  # load_task names the missing file
    with open(Path(data), encoding="utf-8", errors="replace") as f:
        return "auto" if any('"messages"' in line for line in f) else None
