"""Atomic writes: a file appears whole or not at all, and a full disk is explained.

A file is written to a temporary name beside it and renamed over it; a failure removes
the temporary file. A full disk (or quota) while writing becomes DiskFullError naming
what was being written, once the partial files are removed. shrink.artifact builds its
staged folders on the same pieces.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shrink.errors import ShrinkError


def default_mode(directory: bool = False) -> int:
    """The permissions open()/mkdir() would give under the current umask. tempfile's
    private 0600/0700 must not leak into what users hand to other users and services."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


class DiskFullError(ShrinkError):
    """The disk (or the user's quota) filled up while writing; nothing half-written is left."""


NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# The same errors as text, from writers that do not raise OSError: safetensors (Rust's
# "No space left on device (os error 28)"), llama.cpp's quantizer, the GGUF writer.
NO_SPACE_TEXT = re.compile(r"No space left on device|Disk quota exceeded|os error (28|122)\b")
# numpy's tofile (the GGUF converter's tensors) reports a short write without an errno.
SHORT_WRITE = re.compile(r"^\d+ requested and \d+ written$")


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from, says the disk or quota is full."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFullError):
            return False  # already explained
        if isinstance(exc, OSError) and (exc.errno in NO_SPACE_ERRNOS
                                         or (exc.errno is None and SHORT_WRITE.match(str(exc)))):
            return True
        if NO_SPACE_TEXT.search(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def out_of_space(folder: Path, margin: int = 1 << 20) -> bool:
    """Whether the filesystem of `folder` has less than `margin` bytes free: how a writer
    that reports no errno (llama.cpp's quantizer: "basic_ios::clear") ran out of space."""
    try:
        return shutil.disk_usage(folder).free < margin
    except OSError:
        return False


def disk_full_error(what: str) -> DiskFullError:
    return DiskFullError(f"no space left on device while writing {what}; "
                         "the partial files were removed (free some space, or write elsewhere)")


@contextlib.contextmanager
def removed_on_failure(tmp: Path, what: str) -> Iterator[None]:
    """Remove the temporary file or folder `tmp` when the block fails; a full disk
    becomes DiskFullError naming `what` was being written."""
    try:
        yield
    except BaseException as e:
        if Path(tmp).is_dir() and not Path(tmp).is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if is_disk_full(e):
            raise disk_full_error(what) from None
        raise


def make_temp(make, what: str, **kw) -> str:
    """tempfile.mkstemp/mkdtemp, with a full disk explained."""
    try:
        return make(**kw)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(what) from None
        raise


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary path beside `path`, renamed over it when the block succeeds (with the
    usual permissions) and removed when it fails: readers never see half a file."""
    path = Path(path)
    fd, tmp = make_temp(tempfile.mkstemp, str(path), prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    with removed_on_failure(Path(tmp), str(path)):
        yield Path(tmp)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary name beside `path`, then rename over it."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
