"""Quantize a GGUF file with llama.cpp's own quantizer (`llama_model_quantize`).

Using llama.cpp's code, not a re-implementation, means the file holds exactly the tensor
mix that `llama-quantize` would write and that every llama.cpp build can load.

The C call blocks for minutes on a big model and cannot report progress itself, so it
runs on a worker thread (ctypes releases the GIL) while the main thread shows a rich
progress line; the tensor count comes from llama.cpp's per-tensor log lines
("[  12/ 291] blk.1.ffn_up.weight ...").
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import threading
from pathlib import Path

from shrink.errors import ShrinkError
from shrink.quantize.gguf_types import QuantType

_TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")


def quantize_gguf(
    src: Path, dst: Path, qtype: QuantType, threads: int | None = None, *, imatrix: dict | None = None,
    embedding: str | None = None, console=None,
) -> None:
    """Write `dst`, the F16/F32/BF16 GGUF `src` quantized to `qtype`.

    `imatrix`: per-tensor importance (shrink.quantize.imatrix), required by the IQ1/IQ2/
    IQ3_XXS types and used by every type that can. `console`: an optional rich Console
    for the progress line (default: stderr). `embedding`: a ggml type for the token
    embedding instead of the one llama.cpp chooses (gguf_types.EMBEDDING_TYPES; the caller
    checks that the rows fit its blocks). Raises ShrinkError, with llama.cpp's own
    reason when it gives one.
    """
    src, dst = Path(src), Path(dst)
    if qtype.needs_imatrix and imatrix is None:
        raise ShrinkError(
            f"{qtype.name} needs an importance matrix: add --imatrix (computed from the task's data), "
            "or choose a type that does not, e.g. IQ4_XS, Q4_K_M or Q3_K_M"
        )
    if not src.is_file():
        raise ShrinkError(f"{src}: no such GGUF file")
    if dst.exists() and dst.resolve() == src.resolve():
        raise ShrinkError(f"{dst}: the output would overwrite the input")

    import llama_cpp
    from rich.progress import (
        BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
    )

    from shrink import quiet

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = qtype.ftype
    params.nthread = threads or os.cpu_count() or 0  # <= 0: llama.cpp uses hardware_concurrency()
    if embedding is not None:
        from shrink.quantize.gguf_types import ggml_type

        params.token_embedding_type = ggml_type(embedding)
    if imatrix is not None:
        from shrink.quantize.imatrix import imatrix_entries

        entries, _buffers = imatrix_entries(imatrix)  # both alive until the call returns
        params.imatrix = ctypes.cast(entries, type(params.imatrix))

    tensors = [0, 0]  # [done, total], written by the log callback

    def on_log(level: int, text: str) -> None:
        if m := _TENSOR_LINE.match(text):
            tensors[0], tensors[1] = int(m[1]), int(m[2])

    outcome: dict = {}

    def work() -> None:
        try:
            outcome["rc"] = llama_cpp.llama_model_quantize(
                os.fsencode(src), os.fsencode(dst), ctypes.byref(params)
            )
        except BaseException as e:  # noqa: BLE001 - reported on the main thread
            outcome["error"] = e

    from shrink.console import console as stderr_console

    console = console or stderr_console
    progress = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=console, transient=True,
        disable=not console.is_interactive,  # logs and pipes get no bar (rich would print blank lines)
    )
    with quiet.llama_errors() as errors, quiet.llama_listen(on_log), progress:
        task = progress.add_task(f"Quantizing to {qtype.name} (llama.cpp)", total=None)
        # daemon: on Ctrl-C the C call cannot be stopped, but it must not keep the process alive.
        worker = threading.Thread(target=work, name="llama-quantize", daemon=True)
        worker.start()
        try:
            while worker.is_alive():
                worker.join(0.1)
                if tensors[1]:
                    progress.update(task, total=tensors[1], completed=tensors[0])
        except BaseException:
            dst.unlink(missing_ok=True)
            raise

    if "error" in outcome or outcome.get("rc") != 0:
        from shrink.atomic import out_of_space

        full = out_of_space(dst.parent)  # measured with the partial output still there
        dst.unlink(missing_ok=True)
        if full:  # llama.cpp says "basic_ios::clear: iostream error"; the writers above explain ENOSPC
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst)) from None
        reason = _reason(errors) or str(outcome.get("error") or f"return code {outcome.get('rc')}")
        raise ShrinkError(f"llama.cpp could not quantize {src.name} to {qtype.name}: {reason}")


def _reason(lines: list[str]) -> str:
    """The most telling error line llama.cpp logged ("...failed to quantize: <why>")."""
    for line in reversed(lines):
        if "failed to quantize:" in line:
            return line.split("failed to quantize:", 1)[1].strip()
    return "; ".join(lines[-3:])
