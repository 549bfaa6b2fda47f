"""What every runtime offers, and how an artifact path is matched to its runtime.

Token ids are the runtime's own: each runtime tokenizes with the tokenizer it will be
served with (llama.cpp's for GGUF), which is what the accuracy figures must reflect.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from shrink.errors import ModelError


class Runtime(Protocol):
    name: str  # "torch" | "torch+gptqmodel" | "llama.cpp" | "onnxruntime"
    eos_id: int | None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with BOS when the model's tokenizer adds one.
        Special-token strings inside `text` are plain text."""
        ...

    def decode(self, ids: list[int]) -> str: ...

    def logits(self, ids: list[int]) -> np.ndarray:
        """Next-token logits after each prefix of `ids`: (len(ids), vocab) float32."""
        ...

    def score_continuations(self, prompt_ids: list[int], conts: list[list[int]]) -> list[float]:
        """Total log-probability of each continuation after the prompt."""
        ...

    def generate(self, prompt: str, max_tokens: int, stop: tuple[str, ...] = ()) -> str:
        """Greedy completion of `prompt`: stops at EOS, after `max_tokens`, or before
        the first stop string (which is not included)."""
        ...

    def close(self) -> None: ...


def sum_logprobs(rows: np.ndarray, targets: list[int]) -> float:
    """Sum over t of log_softmax(rows[t])[targets[t]], in float64. rows: (T, vocab)."""
    rows = rows.astype(np.float64)
    top = rows.max(axis=1, keepdims=True)  # (T, 1)
    lse = top[:, 0] + np.log(np.exp(rows - top).sum(axis=1))  # (T,)
    return float((rows[np.arange(len(targets)), targets] - lse).sum())


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """`text` up to the first of the stop strings (excluded), as generate() returns it."""
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    return text if cut < 0 else text[:cut]


# The files that hold an artifact's weights, per format (its size is theirs).
WEIGHT_FILES = {"hf": ("*.safetensors",), "gptq": ("*.safetensors",), "gguf": ("*.gguf",),
                "onnx": ("*.onnx", "*.onnx.data")}


def artifact_format(path: Path) -> str:
    """'hf' for a Hugging Face folder, 'gptq' for a GPTQ checkpoint folder, 'gguf' for a
    GGUF file or a folder holding one, 'onnx' for an ONNX file or a folder holding model.onnx."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix in (".gguf", ".onnx"):
            return path.suffix[1:]
        raise ModelError(f"{path}: not a model (expected a Hugging Face folder, a .gguf or an .onnx file)")
    if (path / "model.onnx").is_file():
        return "onnx"
    if (path / "config.json").is_file():
        from shrink.hf import quantization_method

        try:
            return "gptq" if quantization_method(path) == "gptq" else "hf"
        except ValueError as e:
            raise ModelError(f"{path / 'config.json'}: not valid JSON ({e})") from None
    if list(path.glob("*.gguf")):
        return "gguf"
    raise ModelError(f"{path}: no config.json, .gguf or model.onnx file in this folder")


def open_runtime(path: str | Path, *, device: str = "auto", threads: int | None = None,
                 context_length: int | None = None) -> Runtime:
    """Open an artifact in the runtime that serves its format. context_length: llama.cpp's
    n_ctx (default DEFAULT_CONTEXT) and onnxruntime's longest sequence; torch has none."""
    path = Path(path)
    fmt = artifact_format(path)
    if fmt in ("hf", "gptq"):
        from shrink.runtime.torch_runtime import TorchRuntime

        return TorchRuntime(path, device=device)
    if fmt == "onnx":
        from shrink.runtime.onnx_runtime import OnnxRuntime

        return OnnxRuntime(path, threads=threads, context_length=context_length)
    from shrink.runtime.llama_cpp import DEFAULT_CONTEXT, LlamaCppRuntime

    return LlamaCppRuntime(path, threads=threads, n_ctx=context_length or DEFAULT_CONTEXT)
