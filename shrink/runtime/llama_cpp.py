"""Serve a GGUF file with llama.cpp (through llama-cpp-python): the Runtime protocol.

Token ids are llama.cpp's own (its tokenizer reads the vocabulary stored in the GGUF),
since that is what a deployed model sees.

All evaluation goes through `_eval`, which keeps llama.cpp's KV cache for the longest
prefix shared with the previous call and decodes only the new tokens, and asks llama.cpp
for the logits of the positions the caller reads only (`llama_batch.logits`). So scoring N
continuations evaluates the prompt once, scoring one-token choices decodes nothing past
the prompt, and greedy generation decodes one token a step. What a model costs to serve
is then what a server that reads only the logits it needs pays: with every position's
logits, a 262,144-token output layer (Gemma's) over a 100-token prompt costs more than
the layers under it.

On a CPU with Intel AMX (Xeon Sapphire Rapids and later) the model is loaded with
llama.cpp's plain CPU weight buffers (`plain_weight_buffers`): its AMX weight buffers crash
the process in ggml_backend_amx_mul_mat on some models (ggml-org/llama.cpp#20824; this
repository's toy models hit it, Q8_0 and Q4_K_M alike), and a segfault takes the whole
evaluation, or CI, with it. Other CPUs load as llama.cpp's defaults do.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from shrink.errors import ModelError, ShrinkError
from shrink.runtime.base import EMPTY_PROMPT, Runtime, continuation_scores, cut_at_stop, file_or_folder, prompt_ids


def find_gguf(path: str | Path) -> Path:
    """The .gguf file at `path`, or the one in folder `path` (the manifest picks among several)."""
    path = Path(path)
    if file_or_folder(path, ".gguf"):
        return path
    files = sorted(path.glob("*.gguf"))
    if len(files) == 1:
        return files[0]
    if not files:
        raise ModelError(f"{path}: no .gguf file in this folder")
    from shrink.errors import ArtifactError
    from shrink.manifest import Manifest

    try:
        named = Manifest.read(path).settings.get("file")
    except ArtifactError:
        named = None
    if named and (path / named) in files:
        return path / named
    raise ModelError(
        f"{path} holds several .gguf files ({', '.join(f.name for f in files)}); pass one of them"
    )


DEFAULT_CONTEXT = 2048  # tokens: n_ctx when neither the caller nor a device target sets one


def amx_cpu() -> bool:
    """Whether llama.cpp was built for, and runs on, a CPU with Intel AMX (its system
    info reports AMX_INT8 = 1 only then)."""
    import llama_cpp

    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


@contextlib.contextmanager
def plain_weight_buffers() -> Iterator[None]:
    """Models loaded by `llama_cpp.Llama(...)` inside keep their weights in llama.cpp's
    plain CPU buffers (model parameter use_extra_bufts = false, llama.cpp's --no-repack)
    when the CPU has AMX; elsewhere nothing changes. Llama() takes no such argument: it
    builds its parameters from llama_model_default_params(), which is wrapped meanwhile."""
    import llama_cpp.llama_cpp as lib

    if not amx_cpu():
        yield
        return
    default = lib.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = default


class LlamaCppRuntime(Runtime):
    """A GGUF model in llama.cpp.

    n_ctx: the tokens of context llama.cpp is set up for; its KV cache is allocated (and
    cleared, so resident) for all of them when the model is loaded, so it is part of the
    memory a serving process holds from the start.
    logits_all: keep every position's logits, which scoring continuations and `logits`
    need. Without it only the last position's logits are computed, which is all greedy
    generation needs and what a plain `Llama(...)` (a bundle's run.py) does.
    """

    name = "llama.cpp"

    def __init__(self, path: str | Path, threads: int | None = None, n_ctx: int = DEFAULT_CONTEXT,
                 logits_all: bool = True):
        self.path = find_gguf(path)
        import llama_cpp

        from shrink import quiet

        self._lib = llama_cpp
        self.logits_all = logits_all
        threads = threads or os.cpu_count() or 1
        with quiet.llama_errors() as errors, plain_weight_buffers():
            try:
                # logits_all: llm.scores is an (n_ctx, vocab) float32 buffer, into which _decode
                # copies the logits of the positions read; rows are touched (paid for) only when used.
                self._llm = llama_cpp.Llama(
                    model_path=str(self.path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                    logits_all=logits_all, verbose=quiet.debug_enabled(),
                )
            except Exception as e:  # noqa: BLE001 - llama_cpp raises ValueError/RuntimeError
                detail = "; ".join(errors[-3:]) or str(e)
                raise ModelError(f"{self.path}: llama.cpp cannot load this file ({detail})") from None
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        self._add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self._bos = llama_cpp.llama_vocab_bos(self._vocab)
        self.n_vocab = self._llm.n_vocab()
        self.n_ctx = self.context_length = self._llm.n_ctx()
        self._stop_ids: frozenset[int] | None = None
        # The sequence in llama.cpp's KV cache, and which of its positions have their
        # logits in llm.scores (logits_all) or, without logits_all, in llama.cpp's buffer.
        self._ids = np.zeros(self.n_ctx, dtype=np.int64)
        self._n = 0
        self._has = np.zeros(self.n_ctx, dtype=bool)
        self._batch = llama_cpp.llama_batch_init(self._llm.n_batch, 0, 1)

    @property
    def stop_ids(self) -> frozenset[int]:
        """llama.cpp's end-of-generation tokens (its eos, eot and eom ids from the GGUF,
        plus tokens it recognises by their text), which `generate` stops at."""
        if self._stop_ids is None:
            is_eog = self._lib.llama_vocab_is_eog
            self._stop_ids = frozenset(i for i in range(self.n_vocab) if is_eog(self._vocab, i))
        return self._stop_ids

    # -- tokens ------------------------------------------------------------------------

    def encode(self, text: str, special: bool = False) -> list[int]:
        # special=False: "<s>" typed in the text is three characters, not the BOS token.
        return self._llm.tokenize(text.encode("utf-8"), add_bos=self._add_bos, special=special)

    def decode(self, ids: list[int]) -> str:
        """Text of `ids` as the HF tokenizer's decode(skip_special_tokens=True) gives it.

        A leading BOS is dropped first: llama.cpp strips the SentencePiece leading space
        only when the ids do not start with BOS, as HF does after skipping specials.
        Control tokens render as nothing (unparse_special=False).
        """
        ids = [int(i) for i in ids]
        if ids and ids[0] == self._bos:
            ids = ids[1:]
        if not ids:
            return ""
        arr = (self._lib.llama_token * len(ids))(*ids)
        size = 16 * len(ids) + 16
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = self._lib.llama_detokenize(self._vocab, arr, len(ids), buf, size, True, False)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = -n  # too small: llama.cpp says how much it needs
        raise ShrinkError("llama.cpp could not detokenize")

    # -- evaluation --------------------------------------------------------------------

    def _eval(self, ids: list[int], rows: int | None = None) -> np.ndarray:
        """The logits after each of the last `rows` prefixes of `ids` (all of them when
        None): a (rows, vocab) view, valid until the next call. Without logits_all only the
        last position's (rows must be 1). Reuses the KV cache for the prefix shared with
        the sequence evaluated last, and the logits it already has for it."""
        if len(ids) > self.n_ctx:
            raise ShrinkError(f"sequence of {len(ids)} tokens is longer than the context ({self.n_ctx})")
        if not ids:
            raise ShrinkError(EMPTY_PROMPT)
        rows = len(ids) if rows is None else rows
        if not 1 <= rows <= len(ids):
            raise ValueError(f"rows={rows} for a sequence of {len(ids)} tokens")
        if not self.logits_all and rows != 1:
            raise ValueError("without logits_all only the last position's logits are kept")
        arr = np.asarray(ids, dtype=np.int64)
        bad = arr[(arr < 0) | (arr >= self.n_vocab)]
        if bad.size:
            raise ValueError(f"token ids out of range [0, {self.n_vocab}): {bad[:5].tolist()}")
        first = len(ids) - rows  # the first position whose logits are read
        limit = min(self._n, len(ids))
        diff = np.flatnonzero(self._ids[:limit] != arr[:limit])
        same = int(diff[0]) if diff.size else limit
        if not self.logits_all:
            same = min(same, len(ids) - 1)  # llama.cpp holds the logits of the last batch only
        missing = np.flatnonzero(~self._has[first:same])
        if missing.size:
            same = first + int(missing[0])  # decode again from the first position lacking its logits
        if same < len(ids):
            self._decode(arr, same, first)
        if not self.logits_all:
            last = self._lib.llama_get_logits_ith(self._llm.ctx, -1)
            return np.ctypeslib.as_array(last, shape=(1, self.n_vocab))
        return self._llm.scores[first : len(ids)]

    def _decode(self, ids: np.ndarray, start: int, first: int) -> None:
        """Decode ids[start:] after the cache's first `start` tokens (the rest of the cache
        is dropped), with logits for the positions from `first` on."""
        lib, llm, batch = self._lib, self._llm, self._batch
        lib.llama_memory_seq_rm(lib.llama_get_memory(llm.ctx), -1, start, -1)
        self._n = start
        self._has[start:] = False
        for lo in range(start, len(ids), llm.n_batch):
            hi = min(len(ids), lo + llm.n_batch)
            batch.n_tokens = hi - lo
            for j, pos in enumerate(range(lo, hi)):
                batch.token[j] = int(ids[pos])
                batch.pos[j] = pos
                batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = 0
                batch.logits[j] = pos >= first
            rc = lib.llama_decode(llm.ctx, batch)
            if rc != 0:
                raise ShrinkError(f"{self.path}: llama.cpp could not decode ({rc})")
            self._ids[lo:hi] = ids[lo:hi]
            self._n = hi
            if self.logits_all:
                for pos in range(max(lo, first), hi):
                    row = lib.llama_get_logits_ith(llm.ctx, pos - lo)
                    llm.scores[pos] = np.ctypeslib.as_array(row, shape=(self.n_vocab,))
            self._has[max(lo, first):hi] = True

    def reset(self) -> None:
        """Forget the cached sequence: the next call decodes from its first token."""
        self._n = 0
        self._has[:] = False

    def _need_all_logits(self, what: str) -> None:
        if not self.logits_all:
            raise ValueError(f"{what} needs every position's logits: open the runtime with logits_all=True")

    def logits(self, ids: list[int]) -> np.ndarray:
        self._need_all_logits("logits")
        ids = [int(i) for i in ids]
        if not ids:
            return np.zeros((0, self.n_vocab), dtype=np.float32)
        return np.array(self._eval(ids), dtype=np.float32)  # (len(ids), vocab), a copy

    def score_continuations(self, prompt_ids: list[int], conts: list[list[int]]) -> list[float]:
        self._need_all_logits("scoring continuations")
        prompt = [int(i) for i in prompt_ids]
        if not prompt:
            raise ShrinkError(EMPTY_PROMPT)
        # The logits after the prompt and after each continuation token but the last predict
        # the continuation: its last token is never decoded.
        return continuation_scores(conts, lambda cont: self._eval(prompt + cont[:-1], rows=len(cont)))

    def generate(self, prompt: str | list[int], max_tokens: int, stop: tuple[str, ...] = (),
                 stop_ids: frozenset[int] = frozenset(), sampler=None) -> str:
        """Greedy completion; the text is what follows the prompt's own decoding
        (so a leading space of the first new token is kept)."""
        seq = prompt_ids(self, prompt)
        stops = [s for s in stop if s]
        head = len(self.decode(seq))
        text = ""
        for _ in range(max_tokens):
            if len(seq) >= self.n_ctx:
                break
            last = self._eval(seq, rows=1)[-1]
            nxt = int(np.argmax(last)) if sampler is None else sampler(last)
            if self._lib.llama_vocab_is_eog(self._vocab, nxt) or nxt in stop_ids:
                break
            seq.append(nxt)
            text = self.decode(seq)[head:]
            if any(s in text for s in stops):
                return cut_at_stop(text, tuple(stops))
        return text

    def close(self) -> None:
        batch, self._batch = getattr(self, "_batch", None), None
        if batch is not None:
            self._lib.llama_batch_free(batch)
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is not None:
            llm.close()

    def __enter__(self) -> LlamaCppRuntime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
