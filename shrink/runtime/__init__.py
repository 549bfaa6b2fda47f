"""Runtimes that serve an artifact: torch (Hugging Face folders) and llama.cpp (GGUF)."""

from shrink.runtime.base import Runtime, open_runtime

__all__ = ["Runtime", "open_runtime"]
