"""Quantization: llama.cpp's quantizer for GGUF."""
