"""Serve an ExecuTorch export (shrink.export.executorch_export) with ExecuTorch's own
runtime (`executorch.runtime`, the C++ runtime a phone app links, with its XNNPACK
backend): the Runtime protocol.

The program keeps its KV cache inside (a static cache of `get_max_context_len` tokens),
so a call gives it only new tokens and where they go: `forward(tokens (1, n), positions
(n,)) -> logits (1, n, vocab)`, n up to `get_max_seq_len`, longer inputs in several calls.
The runtime remembers which tokens the cache holds: a sequence that starts with them (the
same prompt with another continuation, a shared few-shot prefix, the next generated
token) runs only its new tokens; another one overwrites the cache from where they part.
So scoring N continuations runs the prompt once, and generation one token a step.

The folder holds model.pte and the student's tokenizer files: token ids are the student's
(encode/decode are TorchRuntime's, call for call). torch is imported for its tensors,
which ExecuTorch's Python bindings take and return; it computes nothing here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shrink.errors import ModelError, ShrinkError, requires
from shrink.runtime.base import EMPTY_PROMPT, Runtime, continuation_scores, find_model_file, greedy_generate, stop_ids

MODEL_FILE = "model.pte"
# The methods the export writes beside `forward`, named as ExecuTorch's LLM runner reads
# them (extension/llm/runner), with what they hold.
METADATA = {
    "get_max_context_len": "tokens the static KV cache holds",
    "get_max_seq_len": "most tokens one forward call takes (prefill is cut into calls of this size)",
    "get_vocab_size": "logits per position",
    "get_bos_id": "the token the tokenizer starts a text with (-1: none)",
    "get_eos_ids": "the tokens that end a generation",
    "use_kv_cache": "true: the program keeps its KV cache between calls",
    "enable_dynamic_shape": "true: a call takes 1 to get_max_seq_len tokens",
    "use_sdpa_with_kv_cache": "false: standard attention ops, no ExecuTorch custom op",
}


def find_pte(path: str | Path) -> Path:
    """The model.pte at `path`, or in folder `path`."""
    return find_model_file(path, MODEL_FILE)


def load_program(path: Path):
    """The ExecuTorch program in `path`, loaded by ExecuTorch's runtime with its quantized
    kernels registered (the 8-bit embedding lookup of 8da4w/8da8w): (program, its metadata
    (METADATA), its forward method). The runtime's own log lines (cpuinfo, threadpool),
    written as it loads, are kept off the terminal."""
    from shrink.quiet import native_stderr, quiet_transformers

    requires("executorch", "executorch")
    quiet_transformers()  # the loggers torch warns on as ExecuTorch's kernels register
    with native_stderr() as log:
        try:
            import importlib

            from executorch.runtime import Runtime as ETRuntime

            importlib.import_module("executorch.kernels.quantized")  # registers its kernels with the runtime

            program = ETRuntime.get().load_program(path)
            metadata = read_metadata(program, path)
            return program, metadata, program.load_method("forward")
        except ModelError:
            raise
        except Exception as e:  # noqa: BLE001 - the bindings raise RuntimeError and their own types
            error = e
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    last = f"; {log[-1]}" if log else ""
    raise ModelError(f"{path}: ExecuTorch cannot load this file ({detail}{last})") from None


def set_threads(threads: int) -> None:
    """Size ExecuTorch's thread pool (XNNPACK's), one per process. Resizing it under a
    loaded XNNPACK program aborts the process, so this is called before a program loads,
    and changes nothing when the size is right already."""
    from shrink.quiet import native_stderr

    requires("executorch", "executorch")
    with native_stderr():
        from executorch.extension.pybindings.portable_lib import (_threadpool_get_thread_count,
                                                                   _unsafe_reset_threadpool)

        if _threadpool_get_thread_count() != threads:
            _unsafe_reset_threadpool(threads)


def read_metadata(program, path: Path) -> dict:
    """The values of the program's metadata methods (METADATA); a program without the
    context length is not a causal LM exported by shrink."""
    found = {}
    for name in METADATA:
        if name in program.method_names:
            value = program.load_method(name).execute([])
            found[name] = [int(v) for v in value] if name == "get_eos_ids" else int(value[0])
    forward = program.metadata("forward") if "forward" in program.method_names else None
    if "get_max_context_len" not in found or forward is None or forward.num_inputs() != 2:
        raise ModelError(f"{path}: not a causal LM exported with a KV cache (forward(tokens, positions) and "
                         "get_max_context_len); export it with shrink export --target executorch")
    return found


class KVProgram:
    """A loaded program and what its KV cache holds: runs tokens at positions, and says
    where a sequence can resume (the tokens before it are in the cache already)."""

    def __init__(self, path: Path):
        self.path = path
        self._program, self.metadata, self._forward = load_program(path)
        self.context_length = self.metadata["get_max_context_len"]
        self.max_seq = self.metadata.get("get_max_seq_len", 1)
        self.cached: list[int] = []  # the tokens whose keys and values the cache holds, from position 0

    def run(self, ids: list[int], start: int, context_length: int | None = None) -> np.ndarray:
        """Logits after each of `ids`, placed at positions start, start + 1, ... (the cache
        must hold the right tokens before `start`): (len(ids), vocab)."""
        import torch

        end, context = start + len(ids), context_length or self.context_length
        if end > context:
            raise ShrinkError(f"sequence of {end} tokens is longer than the context ({context})")
        self.cached = self.cached[:start]
        rows = []
        for a in range(0, len(ids), self.max_seq):
            chunk = ids[a:a + self.max_seq]
            tokens = torch.tensor([chunk], dtype=torch.long)  # (1, n)
            positions = torch.arange(start + a, start + a + len(chunk), dtype=torch.long)  # (n,)
            rows.append(self._forward.execute([tokens, positions])[0][0].numpy())  # (n, vocab)
        self.cached += ids
        return rows[0] if len(rows) == 1 else np.concatenate(rows)

    def resume(self, ids: list[int]) -> int:
        """Where a run of `ids` can start: after the longest prefix the cache holds, but
        at the last token at the latest (its logits are wanted)."""
        held = 0
        for a, b in zip(self.cached, ids):
            if a != b:
                break
            held += 1
        return min(held, len(ids) - 1)

    def close(self) -> None:
        self._forward = self._program = None
        self.cached = []


class ExecuTorchRuntime(Runtime):
    """An exported causal LM in ExecuTorch's runtime (CPU, XNNPACK), batch 1.

    context_length: the longest sequence it takes; at most, and by default, the KV cache
    the program was exported with (`--max-context`). threads: the size of ExecuTorch's
    thread pool, which XNNPACK runs on (one pool per process)."""

    name = "executorch"

    def __init__(self, path: str | Path, threads: int | None = None, context_length: int | None = None):
        self.path = find_pte(path)
        if threads:
            set_threads(threads)
        self.program = KVProgram(self.path)
        cache = self.program.context_length
        if context_length is not None and context_length > cache:
            raise ShrinkError(f"{self.path}: a context of {context_length} tokens does not fit its KV cache of "
                              f"{cache} tokens (export again with --max-context {context_length})")
        self.context_length = context_length or cache

        from shrink.hf import load_tokenizer

        self.tokenizer = load_tokenizer(self.path.parent)
        self.stop_ids = stop_ids(self.path.parent, self.tokenizer)

    # -- tokens ------------------------------------------------------------------------

    def encode(self, text: str, special: bool = False) -> list[int]:
        # As TorchRuntime: special-token strings in user text stay text.
        return list(self.tokenizer(text, split_special_tokens=not special).input_ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _run(self, ids: list[int], start: int) -> np.ndarray:
        return self.program.run(ids, start, self.context_length)

    # -- evaluation --------------------------------------------------------------------

    def logits(self, ids: list[int]) -> np.ndarray:
        ids = [int(i) for i in ids]
        if not ids:
            return np.zeros((0, self.program.metadata.get("get_vocab_size", 0)), dtype=np.float32)
        return self._run(ids, 0)

    def score_continuations(self, prompt_ids: list[int], conts: list[list[int]]) -> list[float]:
        prompt = [int(i) for i in prompt_ids]
        if not prompt:
            raise ShrinkError(EMPTY_PROMPT)
        start = self.program.resume(prompt)
        first = self._run(prompt[start:], start)[-1:]  # (1, vocab): predicts each continuation's first token
        return continuation_scores(
            conts, lambda cont: first if len(cont) == 1 else np.concatenate([first, self._run(cont[:-1], len(prompt))]))

    def generate(self, prompt: str | list[int], max_tokens: int, stop: tuple[str, ...] = (),
                 stop_ids: frozenset[int] = frozenset(), sampler=None) -> str:
        """Greedy decoding: the prompt (past what the cache holds already), then one token
        a call (shrink.runtime.base.greedy_generate)."""

        def next_logits(ids: list[int], position: int | None) -> tuple[np.ndarray, int]:
            if position is None:  # the prompt
                start = self.program.resume(ids)
                ids, position = ids[start:], start
            return self._run(ids, position)[-1], position + len(ids)  # (vocab,)

        return greedy_generate(self, prompt, max_tokens, stop, next_logits, stop_ids, sampler)

    def close(self) -> None:
        self.program.close()

    def __enter__(self) -> ExecuTorchRuntime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
