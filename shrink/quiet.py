"""Every log silencer in one place, and the one switch that turns them all off.

shrink shows its own progress bars and one-line errors; the libraries it drives print
loader dumps, per-step INFO logs, progress bars and warnings about their own internals.
Each silencer below keeps one library's output off the terminal (collecting what a
ShrinkError should quote), and steps aside when SHRINK_DEBUG is set (`debug_enabled`):
- llama.cpp and ggml: their C log callback (`install_llama_log`, `llama_listen`, `llama_errors`);
- transformers and the plug-ins it imports: `quiet_transformers`;
- llama.cpp's Python converter: `quiet_converter`;
- torch.onnx, onnxscript and onnxruntime: `quiet_exporters`;
- GPTQModel, which prints to stdout from Python and native code: `gptqmodel_output`;
- ExecuTorch's runtime, whose C++ logs go to file descriptor 2: `native_stderr`.

llama.cpp and ggml write model-loader dumps, per-tensor quantization lines and context
warnings through a single log callback, to stderr by default. llama-cpp-python installs a
callback of its own on import, but its level table predates the current ggml enum (it
maps ERROR=4 to DEBUG), so it neither silences nor reports reliably. We replace it: every
message goes to the listeners registered with `llama_listen()` (quantize parses progress
and errors from them) and is printed to stderr only with SHRINK_DEBUG.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import re
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator

from shrink.errors import ShrinkError

DEBUG_ENV = "SHRINK_DEBUG"


def debug_enabled() -> bool:
    """SHRINK_DEBUG set to anything but empty or 0: every library's own output is shown,
    and the CLI lets errors out with their traceback."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


# llama.cpp's log: enum ggml_log_level in ggml.h (this llama.cpp): NONE=0, DEBUG=1, INFO=2, WARN=3, ERROR=4, CONT=5.
DEBUG, INFO, WARN, ERROR, CONT = 1, 2, 3, 4, 5

Listener = Callable[[int, str], None]

_lock = threading.Lock()
_listeners: list[Listener] = []
_callback = None  # the ctypes callback object; must stay referenced while installed
_last_level = INFO  # CONT messages continue the previous message's level


def install_llama_log() -> None:
    """Route llama.cpp's log through `_on_log`. Idempotent; imports llama_cpp."""
    global _callback
    with _lock:
        if _callback is not None:
            return
        import llama_cpp  # its import installs llama-cpp-python's callback; ours replaces it

        _callback = llama_cpp.llama_log_callback(_on_log)
        llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))


def _on_log(level: int, text: bytes | None, user_data) -> None:
    # Called from C, possibly on llama.cpp's worker threads: never let an exception escape.
    global _last_level
    try:
        msg = text.decode("utf-8", "replace") if text else ""
        if level == CONT:
            level = _last_level
        else:
            _last_level = level
        if debug_enabled():
            sys.stderr.write(msg)
            sys.stderr.flush()
        for fn in list(_listeners):
            fn(level, msg)
    except Exception:  # noqa: BLE001
        pass


@contextlib.contextmanager
def llama_listen(fn: Listener) -> Iterator[None]:
    """Call fn(level, text) for every llama.cpp log message inside the block."""
    install_llama_log()
    with _lock:
        _listeners.append(fn)
    try:
        yield
    finally:
        with _lock:
            _listeners.remove(fn)


@contextlib.contextmanager
def llama_errors() -> Iterator[list[str]]:
    """Collect the WARN/ERROR lines logged inside the block (for error messages)."""
    lines: list[str] = []

    def keep(level: int, text: str) -> None:
        if level >= WARN:
            lines.extend(s.strip() for s in text.splitlines() if s.strip().strip("="))

    with llama_listen(keep):
        yield lines


# Loggers of libraries imported along the way whose warnings are about their own
# internals (torchao registering enums with torch, tokenicer fixing a pad token).
NOISY_LOGGERS = ("torch.utils._pytree", "torch.utils.cpp_extension", "tokenicer", "tokenicer.tokenicer")


def quiet_transformers() -> None:
    """Keep transformers' (and its plug-ins') progress bars and warnings off the terminal
    (shrink shows its own)."""
    if debug_enabled():
        return
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# Loggers of llama.cpp's converter: conversion/* ("hf-to-gguf"), gguf/* ("gguf.*") and
# gguf/metadata.py ("metadata").
CONVERTER_LOGGERS = ("hf-to-gguf", "gguf", "metadata")
# Warnings the converter prints for every Llama-style model; they do not affect the file.
_BENIGN = (
    re.compile(r"^Unknown RoPE type: default$"),
    re.compile(r"^Unknown separator token .* TemplateProcessing<pair>$"),
    # Gemma 3: the converter writes some hyperparameters twice, with the same values.
    re.compile(r"^Duplicated key name '[\w.]+', overwriting it with new value"),
)


@contextlib.contextmanager
def quiet_converter() -> Iterator[list[str]]:
    """Raise the converter's loggers to WARNING and collect their warnings (not with SHRINK_DEBUG)."""
    kept: list[str] = []
    if debug_enabled():
        handler: logging.Handler = logging.StreamHandler()
        level = logging.DEBUG
    else:
        handler = _ListHandler(kept)
        level = logging.WARNING
    saved = []
    for name in CONVERTER_LOGGERS:
        log = logging.getLogger(name)
        saved.append((log, log.level, log.propagate))
        log.setLevel(level)
        log.propagate = False
        log.addHandler(handler)
    try:
        yield kept
    finally:
        for log, old_level, old_propagate in saved:
            log.removeHandler(handler)
            log.setLevel(old_level)
            log.propagate = old_propagate


class _ListHandler(logging.Handler):
    def __init__(self, sink: list[str]):
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if not any(p.search(msg) for p in _BENIGN) and msg not in self.sink:
            self.sink.append(msg)


# Loggers that report every step of an ONNX export or quantization at INFO/WARNING.
EXPORTER_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir", "onnxruntime", "root")


@contextlib.contextmanager
def quiet_exporters() -> Iterator[None]:
    """Keep torch.onnx's, onnxscript's and onnxruntime's progress prints, warnings and
    INFO logs off the terminal (shrink shows its own progress), unless SHRINK_DEBUG."""
    if debug_enabled():
        yield
        return
    loggers = [logging.getLogger(name if name != "root" else None) for name in EXPORTER_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def gptqmodel_output():
    """Send everything GPTQModel prints to a log file, unless SHRINK_DEBUG: Python's
    sys.stdout (which may be replaced, as by a test runner) and file descriptor 1 (native
    code). On an exception, the log's tail joins the error."""
    if debug_enabled():
        yield
        return
    sys.stdout.flush()
    log = tempfile.TemporaryFile(mode="w+b")
    text = io.TextIOWrapper(log, encoding="utf-8", errors="replace", write_through=True)
    saved = os.dup(1)
    os.dup2(log.fileno(), 1)
    try:
        with contextlib.redirect_stdout(text):
            yield
    except Exception as e:
        tail = _tail(log, saved)
        if isinstance(e, ShrinkError) or not tail:
            raise
        raise ShrinkError(f"GPTQModel failed: {e} (last log lines: {' | '.join(tail)})") from e
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        text.close()


@contextlib.contextmanager
def native_stderr() -> Iterator[list[str]]:
    """Keep what native code writes to stderr inside the block (ExecuTorch's cpuinfo,
    threadpool and loader lines when its runtime loads) off the terminal, unless
    SHRINK_DEBUG: file descriptor 2, and Python's sys.stderr, which ExecuTorch's bindings
    also write to. The list it yields holds those lines afterwards, for an error to quote."""
    lines: list[str] = []
    if debug_enabled():
        yield lines
        return
    sys.stderr.flush()
    log = tempfile.TemporaryFile(mode="w+b")
    python = io.StringIO()
    saved = os.dup(2)
    os.dup2(log.fileno(), 2)
    try:
        with contextlib.redirect_stderr(python):
            yield lines
    finally:
        lines.extend(_tail(log, saved, fd=2, lines=20))
        lines.extend(line for line in python.getvalue().splitlines() if line.strip())
        os.close(saved)
        log.close()


def _tail(log, saved_fd: int, lines: int = 5, fd: int = 1) -> list[str]:
    os.dup2(saved_fd, fd)
    log.seek(0)
    return log.read().decode("utf-8", "replace").strip().splitlines()[-lines:]
