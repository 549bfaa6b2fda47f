"""Runtimes that serve an artifact behind one protocol (shrink.runtime.base.Runtime):
torch (Hugging Face and GPTQ folders), llama.cpp (GGUF), onnxruntime (ONNX) and ExecuTorch
(.pte), and `open_runtime`, which opens an artifact in the runtime that serves its format."""

from __future__ import annotations

from pathlib import Path

from shrink.runtime.base import Runtime, artifact_format

__all__ = ["Runtime", "open_runtime"]


def open_runtime(path: str | Path, *, device: str = "auto", threads: int | None = None,
                 context_length: int | None = None) -> Runtime:
    """Open an artifact in the runtime that serves its format. context_length: llama.cpp's
    n_ctx (default DEFAULT_CONTEXT), onnxruntime's and ExecuTorch's longest sequence (at
    most the .pte's KV cache); torch has none."""
    path = Path(path)
    fmt = artifact_format(path)
    if fmt in ("hf", "gptq"):
        from shrink.runtime.torch_runtime import TorchRuntime

        return TorchRuntime(path, device=device)
    if fmt == "onnx":
        from shrink.runtime.onnx_runtime import OnnxRuntime

        return OnnxRuntime(path, threads=threads, context_length=context_length)
    if fmt == "pte":
        from shrink.runtime.executorch_runtime import ExecuTorchRuntime

        return ExecuTorchRuntime(path, threads=threads, context_length=context_length)
    from shrink.runtime.llama_cpp import DEFAULT_CONTEXT, LlamaCppRuntime

    return LlamaCppRuntime(path, threads=threads, n_ctx=context_length or DEFAULT_CONTEXT)
