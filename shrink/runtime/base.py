"""What every runtime offers, and how an artifact path is matched to its format.

Token ids are the runtime's own: each runtime tokenizes with the tokenizer it will be
served with (llama.cpp's for GGUF), which is what the accuracy figures must reflect.

End of generation is one notion for every runtime (`stop_ids`): the generation config's
EOS ids (a list for chat models: Gemma's <eos> and <end_of_turn>) plus the tokenizer's
EOS. torch and onnxruntime read them from the model folder; a GGUF carries them as its
eos/eot/eom ids (shrink.export.gguf_convert.write_stop_ids), which llama.cpp's own
end-of-generation test reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from shrink.errors import ModelError, ShrinkError


class Runtime(Protocol):
    name: str  # "torch" | "torch+gptqmodel" | "llama.cpp" | "onnxruntime" | "executorch"
    stop_ids: frozenset[int]  # the token ids that end a generation (not part of its text)
    context_length: int | None  # most tokens a sequence may hold, prompt and output (None: no limit)

    def encode(self, text: str, special: bool = False) -> list[int]:
        """Token ids of `text`, with BOS when the model's tokenizer adds one.
        Special-token strings inside `text` are plain text, unless `special` (text a chat
        template wrote, where "<end_of_turn>" is the token)."""
        ...

    def decode(self, ids: list[int]) -> str: ...

    def logits(self, ids: list[int]) -> np.ndarray:
        """Next-token logits after each prefix of `ids`: (len(ids), vocab) float32."""
        ...

    def score_continuations(self, prompt_ids: list[int], conts: list[list[int]]) -> list[float]:
        """Total log-probability of each continuation after the prompt."""
        ...

    def generate(self, prompt: str | list[int], max_tokens: int, stop: tuple[str, ...] = (),
                 stop_ids: frozenset[int] = frozenset(), sampler: Sampler | None = None) -> str:
        """Greedy (or, with a `sampler`, sampled) completion of `prompt` (text, or its token ids from `encode`): stops at
        one of the runtime's `stop_ids` or the call's (a chat template's end of turn),
        after `max_tokens`, at the context length, or before the first stop string (which
        is not included)."""
        ...

    def share_prefix(self, ids: list[int]) -> None:
        """Told once before an evaluation: every following prompt starts with `ids` (few-shot
        examples, instructions), so a runtime may compute them once and reuse their keys
        and values. Only a speed-up: the results equal those without it (to float rounding).
        This default does nothing, for the runtimes that cannot share (onnxruntime) or
        that reuse their cache for a shared prefix by themselves (llama.cpp)."""
        return None

    def close(self) -> None: ...


def sum_logprobs(rows: np.ndarray, targets: list[int]) -> float:
    """Sum over t of log_softmax(rows[t])[targets[t]], in float64. rows: (T, vocab)."""
    rows = rows.astype(np.float64)
    top = rows.max(axis=1, keepdims=True)  # (T, 1)
    lse = top[:, 0] + np.log(np.exp(rows - top).sum(axis=1))  # (T,)
    return float((rows[np.arange(len(targets)), targets] - lse).sum())


def continuation_scores(conts: list[list[int]], rows_for) -> list[float]:
    """Each continuation's summed log-probability (sum_logprobs), where rows_for(cont) gives
    the (len(cont), vocab) logit rows that predict its tokens; an empty one scores 0."""
    scores = []
    for cont in conts:
        cont = [int(i) for i in cont]
        scores.append(sum_logprobs(rows_for(cont), cont) if cont else 0.0)
    return scores


def end_of_generation(eos_token_id, tokenizer) -> frozenset[int]:
    """The token ids that end a generation: a generation config's `eos_token_id` (one id,
    a list, or None) and the tokenizer's EOS."""
    ids = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    ids.append(getattr(tokenizer, "eos_token_id", None))
    return frozenset(int(i) for i in ids if isinstance(i, int) and i >= 0)


def file_or_folder(path: Path, suffix: str) -> bool:
    """Whether `path` is a model file (it must end in `suffix`) rather than a folder; any
    other path is refused."""
    if path.is_file():
        if path.suffix != suffix:
            raise ModelError(f"{path}: not a {suffix} file")
        return True
    if not path.is_dir():
        raise ModelError(f"{path}: no such file or folder")
    return False


def find_model_file(path: str | Path, name: str) -> Path:
    """The model file `name` (model.onnx, model.pte) at `path`, or in folder `path`; a
    file given directly must have its suffix."""
    path = Path(path)
    if file_or_folder(path, Path(name).suffix):
        return path
    if not (path / name).is_file():
        raise ModelError(f"{path}: no {name} in this folder")
    return path / name


def read_config(path: Path) -> dict:
    """A model's JSON config file (config.json, generation_config.json) as a dict."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path}: not a JSON object")
    return config


def generation_eos(folder: Path):
    """A model folder's generation `eos_token_id` as transformers reads it: from
    generation_config.json, else from config.json (or its text_config); None if neither says."""
    for name in ("generation_config.json", "config.json"):
        path = Path(folder) / name
        if not path.is_file():
            continue
        config = read_config(path)
        value = config.get("eos_token_id", (config.get("text_config") or {}).get("eos_token_id"))
        if value is not None:
            return value
    return None


def stop_ids(folder: Path, tokenizer) -> frozenset[int]:
    """The token ids that end a generation of the model in `folder` (a Hugging Face or
    ONNX folder), served with `tokenizer`: what every runtime stops at."""
    return end_of_generation(generation_eos(folder), tokenizer)


def context_of(config: dict) -> int | None:
    """The longest sequence a model's config.json says it takes (max_position_embeddings)."""
    value = config.get("max_position_embeddings", (config.get("text_config") or {}).get("max_position_embeddings"))
    return value if isinstance(value, int) and value > 0 else None


EMPTY_PROMPT = "the prompt is empty and the tokenizer adds no BOS token: there is no token to predict from"


def prompt_ids(rt: Runtime, prompt: str | list[int]) -> list[int]:
    """The token ids a generation starts from: `prompt` encoded, or as given when it is
    ids already; refused when there are none."""
    ids = rt.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
    if not ids:
        raise ShrinkError(EMPTY_PROMPT)
    return ids


def fit_context(rt: Runtime, prompt: str, max_tokens: int, truncate: bool) -> tuple[list[int], str | None]:
    """The prompt's token ids for `shrink run`, and a note when they were cut.

    A prompt that leaves no room in the runtime's context for one new token is refused,
    naming its length and the context. With `truncate`, a prompt that leaves less room
    than `max_tokens` is cut from the left to leave that room (keeping BOS, and at least
    one token of the prompt), and the note says so.
    """
    ids = prompt_ids(rt, prompt)
    context = rt.context_length
    if not context or len(ids) + (max_tokens if truncate else 1) <= context:
        return ids, None
    head = rt.encode("")  # what every encoding starts with: BOS, or nothing
    head = head if ids[: len(head)] == head else []
    keep = max(len(head) + 1, context - max_tokens)
    if not truncate:
        raise ShrinkError(f"the prompt is {len(ids)} tokens, too long for the context of {context} tokens "
                          f"({rt.name}); shorten it, or pass --truncate to keep its last {keep - len(head)} tokens")
    kept = head + ids[len(ids) - (keep - len(head)):]
    return kept, (f"the prompt ({len(ids)} tokens) was cut to its last {keep - len(head)} tokens, to leave "
                  f"{max_tokens} tokens of the context ({context}) for the output")


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """`text` up to the first of the stop strings (excluded), as generate() returns it."""
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    return text if cut < 0 else text[:cut]


class Sampler:
    """Picks the next token by sampling softmax(logits / temperature) with its own seeded
    generator (`shrink label --samples`); generation is greedy without one.

    With `top_p` below 1 it samples from the nucleus (Holtzman et al. 2020): the most
    probable tokens whose probabilities, after the temperature, first sum to `top_p` or
    more, renormalized (transformers' order: temperature, then top-p)."""

    def __init__(self, temperature: float, seed: int, top_p: float = 1.0):
        if not temperature > 0:
            raise ValueError(f"temperature must be above 0 to sample, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.temperature = temperature
        self.top_p = top_p
        self.rng = np.random.default_rng(seed)

    def probabilities(self, logits) -> np.ndarray:
        """The distribution a token is drawn from (zero outside the nucleus)."""
        if hasattr(logits, "detach"):  # a torch tensor
            logits = logits.detach().float().cpu().numpy()
        z = np.asarray(logits, dtype=np.float64) / self.temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        if self.top_p < 1:
            order = np.argsort(-p, kind="stable")
            # Keep tokens while the mass before them is under top_p: the first always stays.
            before = np.cumsum(p[order]) - p[order]
            p[order[before >= self.top_p]] = 0.0
            p /= p.sum()
        return p

    def __call__(self, logits) -> int:
        p = self.probabilities(logits)
        return int(self.rng.choice(len(p), p=p))


def greedy_generate(rt: Runtime, prompt: str | list[int], max_tokens: int, stop: tuple[str, ...],
                    next_logits: Callable[[list[int], Any], tuple[Any, Any]],
                    stop_ids: frozenset[int] = frozenset(), sampler: Sampler | None = None) -> str:
    """`Runtime.generate` over a runtime's decoding step: `next_logits(new_ids, cache)`
    returns the logits after the last of `new_ids` (vocab,) and the cache extended by
    them (it starts as None: the prompt, then one token a step).

    The text is what decoding prompt + output adds to the prompt's own decoding, so a
    leading space is kept (as llama.cpp returns it); stop strings are checked as it grows.
    """
    ids = prompt_ids(rt, prompt)
    base = rt.decode(ids)
    out: list[int] = []
    new, cache = ids, None
    for _ in range(max_tokens):
        if rt.context_length and len(ids) + len(out) >= rt.context_length:
            break
        logits, cache = next_logits(new, cache)
        nxt = int(logits.argmax()) if sampler is None else sampler(logits)
        if nxt in rt.stop_ids or nxt in stop_ids:
            break
        out.append(nxt)
        if stop and any(st in rt.decode(ids + out)[len(base):] for st in stop):
            break
        new = [nxt]
    return cut_at_stop(rt.decode(ids + out)[len(base):], stop)


# The files that hold an artifact's weights, per format (its size is theirs).
WEIGHT_FILES = {"hf": ("*.safetensors",), "gptq": ("*.safetensors",), "gguf": ("*.gguf",),
                "onnx": ("*.onnx", "*.onnx.data"), "pte": ("*.pte",)}


def artifact_format(path: Path) -> str:
    """'hf' for a Hugging Face folder, 'gptq' for a GPTQ checkpoint folder, 'gguf' for a
    GGUF file or a folder holding one, 'onnx' for an ONNX file or a folder holding model.onnx,
    'pte' for an ExecuTorch program or a folder holding model.pte."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix in (".gguf", ".onnx", ".pte"):
            return path.suffix[1:]
        raise ModelError(f"{path}: not a model (expected a Hugging Face folder, a .gguf, .onnx or .pte file)")
    if (path / "model.onnx").is_file():
        return "onnx"
    if (path / "model.pte").is_file():
        return "pte"
    if (path / "config.json").is_file():
        from shrink.hf import quantization_method

        try:
            return "gptq" if quantization_method(path) == "gptq" else "hf"
        except ValueError as e:
            raise ModelError(f"{path / 'config.json'}: not valid JSON ({e})") from None
    if list(path.glob("*.gguf")):
        return "gguf"
    raise ModelError(f"{path}: no config.json, .gguf, model.onnx or model.pte file in this folder")
