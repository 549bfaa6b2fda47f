"""One owner for llama.cpp's log output.

llama.cpp and ggml write model-loader dumps, per-tensor quantization lines and context
warnings through a single log callback, to stderr by default; that would bury shrink's
own output. llama-cpp-python installs a callback of its own on import, but its level
table predates the current ggml enum (it maps ERROR=4 to DEBUG), so it neither silences
nor reports reliably. We replace it: every message goes to the listeners registered with
`listen()` (quantize parses progress and errors from them) and is printed to stderr only
with SHRINK_DEBUG=1.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Callable, Iterator

# enum ggml_log_level in ggml.h (this llama.cpp): NONE=0, DEBUG=1, INFO=2, WARN=3, ERROR=4, CONT=5.
DEBUG, INFO, WARN, ERROR, CONT = 1, 2, 3, 4, 5

Listener = Callable[[int, str], None]

_lock = threading.Lock()
_listeners: list[Listener] = []
_callback = None  # the ctypes callback object; must stay referenced while installed
_last_level = INFO  # CONT messages continue the previous message's level


def debug_enabled() -> bool:
    """SHRINK_DEBUG=1 (any value but empty or 0) shows the raw llama.cpp/converter logs."""
    return os.environ.get("SHRINK_DEBUG", "") not in ("", "0")


def install() -> None:
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
def listen(fn: Listener) -> Iterator[None]:
    """Call fn(level, text) for every llama.cpp log message inside the block."""
    install()
    with _lock:
        _listeners.append(fn)
    try:
        yield
    finally:
        with _lock:
            _listeners.remove(fn)


@contextlib.contextmanager
def capture_errors() -> Iterator[list[str]]:
    """Collect the WARN/ERROR lines logged inside the block (for error messages)."""
    lines: list[str] = []

    def keep(level: int, text: str) -> None:
        if level >= WARN:
            lines.extend(s.strip() for s in text.splitlines() if s.strip().strip("="))

    with listen(keep):
        yield lines
