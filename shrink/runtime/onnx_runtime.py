"""Serve an ONNX export (shrink.export.onnx_export) with onnxruntime: the Runtime protocol.

The folder holds model.onnx and the student's tokenizer, so token ids are the student's
(encode/decode are TorchRuntime's, call for call). The graph takes the past keys and
values as inputs and returns the present ones, so the KV cache lives here as a list of
numpy arrays: scoring N continuations runs the prompt once and each continuation on top
of its cache (as LlamaCppRuntime reuses its KV prefix), and greedy generation decodes one
token a step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shrink.errors import ModelError, ShrinkError, requires
from shrink.runtime.base import (EMPTY_PROMPT, Runtime, context_of, continuation_scores, find_model_file,
                                 greedy_generate, read_config, stop_ids)
from shrink.quiet import debug_enabled

KV = list[np.ndarray]  # key0, value0, key1, value1, ...: each (1, kv_heads, past, head_dim)
MODEL_FILE = "model.onnx"


def io_names(layers: int) -> tuple[list[str], list[str]]:
    """Graph input and output names for a model with `layers` decoder layers: the
    convention shrink.export.onnx_export writes (and optimum and onnxruntime-genai read)."""
    kv = [(i, k) for i in range(layers) for k in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{i}.{k}" for i, k in kv]
    return inputs, ["logits"] + [f"present.{i}.{k}" for i, k in kv]


def find_onnx(path: str | Path) -> Path:
    """The model.onnx at `path`, or in folder `path`."""
    return find_model_file(path, MODEL_FILE)


class OnnxRuntime(Runtime):
    """An exported causal LM in onnxruntime (CPU), batch 1.

    context_length: the longest sequence it takes, as llama.cpp's n_ctx (default: the
    model's max_position_embeddings, from the config.json beside model.onnx); generation
    stops there. Unlike llama.cpp's, the past keys and values are not allocated for it
    up front: they grow with the tokens held.
    """

    name = "onnxruntime"

    def __init__(self, path: str | Path, threads: int | None = None, context_length: int | None = None):
        self.path = find_onnx(path)
        self.context_length = context_length
        ort = requires("onnxruntime", "onnx")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 0 if debug_enabled() else 3
        try:
            self._session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own pybind exception types
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"{self.path}: onnxruntime cannot load this file ({detail})") from None
        self._inputs, self._outputs = self._check_io()
        past = next(i.shape for i in self._session.get_inputs() if i.name == self._inputs[3])
        # (batch, kv_heads, past, head_dim)
        if not all(isinstance(d, int) for d in (past[1], past[3])):
            raise ModelError(f"{self.path}: past_key_values inputs have no fixed kv_heads/head_dim ({past})")
        self._empty = np.zeros((1, past[1], 0, past[3]), dtype=np.float32)

        from shrink.hf import load_tokenizer

        self.tokenizer = load_tokenizer(self.path.parent)
        self.stop_ids = stop_ids(self.path.parent, self.tokenizer)
        if self.context_length is None and (self.path.parent / "config.json").is_file():
            self.context_length = context_of(read_config(self.path.parent / "config.json"))

    def _check_io(self) -> tuple[list[str], list[str]]:
        """The graph's input and output names, which must be the export's convention."""
        got_in = [i.name for i in self._session.get_inputs()]
        got_out = [o.name for o in self._session.get_outputs()]
        layers = sum(name.startswith("past_key_values.") for name in got_in) // 2
        inputs, outputs = io_names(layers)
        if not layers or set(got_in) != set(inputs) or set(got_out) != set(outputs):
            raise ModelError(
                f"{self.path}: not a causal LM exported with past key/values "
                f"(inputs: {', '.join(got_in[:4])}{', ...' if len(got_in) > 4 else ''})"
            )
        return inputs, outputs

    # -- tokens ------------------------------------------------------------------------

    def encode(self, text: str, special: bool = False) -> list[int]:
        # As TorchRuntime: special-token strings in user text stay text.
        return list(self.tokenizer(text, split_special_tokens=not special).input_ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- evaluation --------------------------------------------------------------------

    def _run(self, ids: list[int], past: KV | None) -> tuple[np.ndarray, KV]:
        """Logits after each of `ids` following the cached `past`: (len(ids), vocab),
        and the cache extended by `ids`."""
        past = past or [self._empty] * (len(self._inputs) - 3)
        start = past[0].shape[2]
        n = len(ids)
        if self.context_length and start + n > self.context_length:
            raise ShrinkError(f"sequence of {start + n} tokens is longer than the context ({self.context_length})")
        feed = [
            np.asarray([ids], dtype=np.int64),  # (1, n)
            np.ones((1, start + n), dtype=np.int64),
            np.arange(start, start + n, dtype=np.int64)[None],  # (1, n)
            *past,
        ]
        logits, *present = self._session.run(self._outputs, dict(zip(self._inputs, feed)))
        return logits[0], present

    def logits(self, ids: list[int]) -> np.ndarray:
        ids = [int(i) for i in ids]
        if not ids:
            return np.zeros((0, self._session.get_outputs()[0].shape[-1]), dtype=np.float32)
        return self._run(ids, None)[0]

    def score_continuations(self, prompt_ids: list[int], conts: list[list[int]]) -> list[float]:
        prompt = [int(i) for i in prompt_ids]
        if not prompt:
            raise ShrinkError(EMPTY_PROMPT)
        logits, past = self._run(prompt, None)
        first = logits[-1:]  # (1, vocab): predicts each continuation's first token
        return continuation_scores(
            conts, lambda cont: first if len(cont) == 1 else np.concatenate([first, self._run(cont[:-1], past)[0]]))

    def generate(self, prompt: str | list[int], max_tokens: int, stop: tuple[str, ...] = (),
                 stop_ids: frozenset[int] = frozenset(), sampler=None) -> str:
        """Greedy decoding with the KV cache (shrink.runtime.base.greedy_generate)."""

        def next_logits(ids: list[int], past: KV | None) -> tuple[np.ndarray, KV]:
            logits, past = self._run(ids, past)
            return logits[-1], past  # (vocab,)

        return greedy_generate(self, prompt, max_tokens, stop, next_logits, stop_ids, sampler)

    def close(self) -> None:
        self._session = None

    def __enter__(self) -> OnnxRuntime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
