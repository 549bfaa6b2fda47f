"""Quantization: llama.cpp's quantizer and its types for GGUF (with a task importance
matrix), GPTQModel for GPTQ, and onnxruntime's quantizers for ONNX."""
