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
    name: str  # "torch" | "llama.cpp"
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


def artifact_format(path: Path) -> str:
    """'hf' for a Hugging Face folder, 'gguf' for a GGUF file or a folder holding one."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf"
        raise ModelError(f"{path}: not a model (expected a Hugging Face folder or a .gguf file)")
    if (path / "config.json").is_file():
        return "hf"
    if list(path.glob("*.gguf")):
        return "gguf"
    raise ModelError(f"{path}: no config.json or .gguf file in this folder")


def open_runtime(path: str | Path, *, device: str = "auto", threads: int | None = None) -> Runtime:
    """Open an artifact in the runtime that serves its format."""
    path = Path(path)
    fmt = artifact_format(path)
    if fmt == "hf":
        from shrink.runtime.torch_runtime import TorchRuntime

        return TorchRuntime(path, device=device)
    from shrink.runtime.llama_cpp import LlamaCppRuntime

    return LlamaCppRuntime(path, threads=threads)
