"""What a distill run is told: one frozen dataclass, the single source of

- the `shrink distill` options (shrink.cli generates one per field, from its type, default
  and metadata: `--field-name`, its help text, its choices);
- `shrink distill --config FILE.toml` (read_file: the same fields, by field name);
- the student manifest's `settings` (DistillConfig.settings: the fields that decide the result).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shrink.distill.batches import LOSS_ON
from shrink.distill.trainable import TRAINABLE
from shrink.errors import ShrinkError
from shrink.metrics import METRIC_NAMES
from shrink.quantize.gguf_size import SIZED
from shrink.toml_files import read_toml


class ConfigError(ShrinkError):
    """A --config file does not follow DistillConfig; the message lists every problem."""


def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,
           choices: tuple[str, ...] = (), setting: bool = True, cli: bool = True) -> Any:
    """A DistillConfig field. `flag`: the option's name when not `--field-name`; `choices`:
    the only values allowed; `setting`: it decides the result, so it goes into the manifest's
    settings and --resume compares it (run-control fields do not); `cli`: a `shrink distill`
    option (else library and --config only)."""
    meta = {"help": help, "flag": flag, "choices": choices, "setting": setting, "cli": cli}
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    # In the order `shrink distill --help` lists them; the help text says what each is for.
    teacher: Path = option(help="Teacher: a Hugging Face model folder or a GGUF file (converted once, then cached).")
    data: Path = option(help="Training task data (JSONL).")
    eval_data: Path | None = option(
        None, "Held-out task data; student and teacher accuracy go into the manifest.", flag="--eval")
    out: Path = option(help="Student folder to write.", setting=False)
    layers: int | None = option(
        None, "Decoder layers the student keeps (required unless --student, --max-size-mb or --for-target).")
    max_size_mb: float | None = option(  # shrink.distill.size_budget
        None, "Choose the layers and hidden size so that the student's GGUF at --quant fits this many MB (10^6 bytes), "
        "from each tensor's byte cost; instead of --layers.")
    quant: str | None = option(  # the GGUF types the size budget models
        None, "With --max-size-mb or --qat: the GGUF type the student is sized for, or trained to be rounded to.  "
        "[default: Q4_K_M]", choices=tuple(SIZED))
    embedding_type: str | None = option(  # shrink.quantize.gguf_types.EMBEDDING_TYPES
        None, "With --max-size-mb or --qat: the token embedding's type in that GGUF (as `shrink export "
        "--embedding-type` will write it), instead of llama.cpp's choice.")
    for_target: str | None = option(
        None, "Size the student for a device target (targets.toml): its max_size_mb at its ladder's first GGUF type; "
        "instead of --layers.")
    targets_file: Path | None = option(
        None, "With --for-target: the device targets file.  [default: the one shipped with shrink]", flag="--targets")
    layer_selection: str = option(
        "even", "Which teacher layers to keep: evenly spaced, those that change the hidden state most on the task "
        "data (both always keep the first and the last), or the first N in a row (the teacher's own computation "
        "up to layer N, unbroken).", choices=("even", "importance", "first"))
    ffn_ratio: float = option(  # Minitron's width pruning
        1.0, "Fraction of MLP channels kept, by activation on the task (width pruning; 1 = all).")
    prune_gradually: bool = option(  # shrink.distill.gradual
        False, "With --ffn-ratio: reach the kept MLP width during training instead of before it: from 10% to 60% of "
        "the steps the channels shrink on a cubic schedule, the least used masked at each of 10 updates (gradual "
        "pruning), and the student is cut to that width when it is saved.")
    ffn_refit: bool = option(  # shrink.distill.width.refit_down
        False, "With --ffn-ratio: re-fit each layer's down projection by least squares on the task's tokens, so the "
        "kept MLP channels stand in for the dropped ones (OBS-style compensation) instead of losing their part.")
    width_scores: str = option(  # shrink.distill.width (activation), shrink.distill.fisher
        "activation", "How --ffn-ratio/--heads-ratio rank channels and heads: by mean activation on the task "
        "(Minitron), or by how much the teacher's answer depends on them (Fisher information of a mask on each, "
        "from the teacher's gradients on the training completions).", choices=("activation", "fisher"))
    heads_ratio: float = option(
        1.0, "Fraction of attention heads kept, by activation on the task: whole key/value groups, and query heads "
        "within each kept group (1 = all).")
    head_dim: int | None = option(  # shrink.distill.width (rotary_dims)
        None, "Dimensions each attention head keeps (queries, keys and values; it must divide the teacher's): keys "
        "and queries keep every k-th rotary frequency, so they turn as the teacher's did, values their most active "
        "dimensions.")
    hidden_size: int | None = option(  # shrink.distill.hidden_width
        None, "Hidden (embedding) channels the student keeps, by activation on the task: a multiple of 256 below the "
        "teacher's.")
    hidden_ratio: float | None = option(
        None, "Fraction of hidden channels kept, rounded to a multiple of 256 (at least 256); not with --hidden-size.")
    student: Path | None = option(
        None, "Start from this smaller model folder (it must share the teacher's tokenizer) instead of cutting the teacher.")
    steps: int | None = option(None, "Optimizer steps (instead of --epochs).")  # None: derived from epochs
    epochs: float = option(2.0, "Passes over the training data.")  # used when steps is None
    batch_size: int = option(8, "Sequences per step.")  # over every process together under torchrun
    lr: float = option(2e-4, "Peak learning rate (AdamW, warm-up then cosine).")
    temperature: float = option(2.0, "Softens teacher and student distributions in the KL term.")
    alpha: float = option(0.9, "Weight of the KL term; 1 - alpha weights cross-entropy on the reference.")
    loss: str = option(  # shrink.distill.loss
        "fkl", "Divergence to the teacher: forward KL, reverse KL, generalized Jensen-Shannon, skew KL.",
        choices=("fkl", "rkl", "jsd", "skl"))
    beta: float = option(0.5, "jsd: the mixture's teacher weight; skl: the skew. Strictly between 0 and 1.")
    loss_on: str = option(  # shrink.distill.batches: which positions; CE stays on the completion
        "completion", "Where the divergence to the teacher is taken: the completion's tokens, or the prompt's too "
        "(more positions per step; cross-entropy stays on the completion).", choices=LOSS_ON)
    trainable: str = option(  # shrink.distill.trainable
        "all", "Which weights train: all, or only those the GGUF export keeps at high precision (the norms, float32 "
        "in llama.cpp; and the token embedding, 6-8 bits), so a gentle run's changes survive Q4_K_M rounding.",
        choices=TRAINABLE)
    qat: bool = option(  # shrink.quantize.fake_quant
        False, "Train through the rounding of the GGUF the student will ship as (--quant, default Q4_K_M, and "
        "--embedding-type; with --max-size-mb/--for-target, the budget's): every step sees the weights as "
        "llama.cpp's quantizer will round them, and the full-precision ones take the gradient (straight-through).")
    hidden_weight: float = option(
        0.0, "Weight of aligning each student layer's hidden state with its teacher layer's (cosine; 0 = off).")
    hidden_targets: str | None = option(  # shrink.distill.hidden.parse_targets
        None, "With --hidden-weight: the teacher layer each student layer is aligned with, a comma list with one "
        "entry per student layer ('-': none), say 0,1,3,4,6,8.  [default: the layer each was copied from]")
    on_policy: float = option(  # shrink.distill.on_policy
        0.0, "Fraction of batches (0 to 1) whose completions the student samples itself and the teacher scores "
        "(GKD's lambda); the divergence alone trains on those, no cross-entropy.")
    split_words: float = option(  # shrink.distill.split_words
        0.0, "Chance (0 to 1), each step, that a word the completion copies from the prompt is spelled in smaller "
        "pieces in both, so the student learns to copy words its vocabulary lacks (those pieces train on the "
        "reference; the rest on the teacher).")
    max_length: int = option(512, "Tokens per sequence; longer prompts are trimmed on the left.")
    save_every: int = option(200, "Steps between checkpoints.")
    device: str = option(
        "auto", "Where to train (auto: cuda when there is one).", choices=("auto", "cpu", "cuda"), setting=False)
    seed: int = option(0, "Random seed (torch, and the order of the batches).")
    teacher_prefix: Path | None = option(
        None, "Text file put before every prompt for the teacher only (few-shot examples the student should not need).")
    metric: str | None = option(
        None, "How --eval answers are scored.  [default: choice for rows with choices, else exact]",
        choices=METRIC_NAMES)
    chat_template: str | None = option(
        None, "Render rows as chats (auto: the teacher's template; none: raw prompts; or a Jinja file); the student "
        "inherits the teacher's template.  [default: auto when rows hold messages]")
    prune_vocab: bool = option(
        False, "Keep only the tokens the training data needs (plus special and byte tokens; never --eval's).")
    vocab_top: int = option(
        0, "With --prune-vocab: also keep the teacher's first N token ids (a BPE vocabulary's most frequent pieces), "
        "so words the training text lacks keep tokens of their own instead of bytes.")
    vocab_data: tuple[Path, ...] = option(  # a list of paths in a --config file
        (), "With --prune-vocab: more in-domain text whose tokens are kept too (.jsonl task-like rows, else one text "
        "per line). Repeatable.")
    teacher_cache: Path | None = option(
        None, "Train from a `shrink teacher-cache` folder instead of running the teacher (made from the same data, "
        "teacher, --teacher-prefix and --max-length).")
    fsdp: bool = option(
        False, "Under torchrun: shard the student over the processes (FSDP2) instead of replicating it on each (DDP).",
        setting=False)
    resume: bool = option(False, "Continue from the checkpoint an interrupted run left (OUT.checkpoint).", setting=False)
    force: bool = option(False, "Replace an existing output folder or stale checkpoint.", setting=False)
    teacher_memory_mb: int = option(  # MiB of float16 logits; not a command-line option
        2048, "Teacher outputs up to this size are computed once and kept in memory.", setting=False, cli=False)

    def to_dict(self) -> dict[str, Any]:
        """Every field, as it reads back from JSON (paths as given, as strings)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DistillConfig:
        """The config to_dict (or JSON) gave: strings back to paths, lists to tuples."""
        def typed(name, value):
            if value is None or kind(name) not in (Path, tuple):
                return value
            return tuple(map(Path, value)) if kind(name) is tuple else Path(value)

        return cls(**{k: typed(k, v) for k, v in values.items()})

    def settings(self) -> dict[str, Any]:
        """What decides the result: the manifest's `settings` (with what the run measured
        added) and what --resume compares."""
        return {k: v for k, v in self.to_dict().items() if FIELDS[k].metadata["setting"]}


FIELDS = {f.name: f for f in dataclasses.fields(DistillConfig)}
TYPES = typing.get_type_hints(DistillConfig)  # field name -> its annotation, resolved
EXCLUSIVE = ("steps", "epochs")  # two ways of saying how long to train: one at a time


def kind(name: str) -> type:
    """What a field holds, None aside: Path, int, float, str, bool, or tuple (of paths)."""
    hint = TYPES[name]
    if typing.get_origin(hint) is tuple:
        return tuple
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _plain(value):
    """Paths as strings and tuples as lists, as they read back from JSON."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def read_file(path: Path) -> dict[str, Any]:
    """The fields a TOML file sets, by field name, checked against DistillConfig: every
    unknown key and wrong type is reported at once, with the file and the key. Relative
    paths are relative to the file's folder."""
    path = Path(path)
    data = read_toml(path, "--config", ConfigError)
    problems, values = [], {}
    for key, value in data.items():
        if key not in FIELDS:
            near = difflib.get_close_matches(key.replace("-", "_"), FIELDS, n=1)
            problems.append(f"unknown key {key!r}" + (f" (did you mean {near[0]}?)" if near else ""))
            continue
        try:
            values[key] = _checked(key, value, path.parent)
        except ValueError as e:
            problems.append(f"{key}: {e}")
    if all(k in values for k in EXCLUSIVE):
        problems.append(f"{' and '.join(EXCLUSIVE)} cannot be used together")
    if problems:
        raise ConfigError(f"{path}: {len(problems)} problem(s): " + "; ".join(problems))
    return values


def _checked(key: str, value: Any, folder: Path) -> Any:
    """`value` as the field holds it; ValueError saying what was expected."""
    want = kind(key)
    if want is tuple:  # tuple[Path, ...]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"expected a list of paths, got {value!r}")
        return tuple(folder / v for v in value)
    ok = {Path: isinstance(value, str), bool: isinstance(value, bool), str: isinstance(value, str),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool)}[want]
    if not ok:
        what = {Path: "a path (a string)", bool: "true or false", str: "a string", int: "an integer", float: "a number"}[want]
        raise ValueError(f"expected {what}, got {value!r}")
    choices = FIELDS[key].metadata["choices"]
    if choices and value not in choices:
        raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
    if want is Path:
        return folder / value  # an absolute path stays as it is
    return float(value) if want is float else value


def merge(from_file: dict[str, Any], from_command_line: dict[str, Any]) -> dict[str, Any]:
    """The file's values with the command line's over them. --steps or --epochs on the
    command line replaces the file's length of training, whichever of the two it set."""
    if any(k in from_command_line for k in EXCLUSIVE):
        from_file = {k: v for k, v in from_file.items() if k not in EXCLUSIVE}
    return {**from_file, **from_command_line}
