"""Runtimes that serve an artifact behind one protocol (base.Runtime): torch for Hugging Face
folders and GPTQ checkpoints, llama.cpp for GGUF, onnxruntime for ONNX; measure.py runs
one in a child process for accuracy, speed and peak RAM."""

from shrink.runtime.base import Runtime, open_runtime

__all__ = ["Runtime", "open_runtime"]
