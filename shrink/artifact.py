"""The artifact: one folder of model files plus `manifest.json`, passed between stages.

The manifest records what the folder is (`kind`, `format`), the sha256 of every file,
the manifest hash of the artifact it was made from, the exact settings, shrink's version
and measured metrics. It carries a magic string and a schema version so that a folder
from another tool or another shrink version is recognised and explained, not misread.

Folders are written atomically: everything goes into a temporary sibling folder, the
manifest is written last, and the folder is renamed into place. A full disk (or quota)
while writing becomes DiskFullError naming what was being written, once the temporary
files are removed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shrink import __version__
from shrink.errors import ArtifactError, ShrinkError

MANIFEST = "manifest.json"
MAGIC = "shrink-artifact"
SCHEMA_VERSION = 1

# kind: what stage made it.  format: how the model is stored (decides the runtime).
KINDS = ("student", "export", "bundle", "teacher-cache")
FORMATS = ("hf", "gguf", "onnx", "gptq")


HASH_BAR_BYTES = 64 << 20  # files smaller than this are hashed without a progress bar


def sha256_file(path: Path, label: str = "hashing", chunk: int = 8 << 20) -> str:
    """Hex sha256 of a file, streamed; big files (model weights) show a progress bar."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size < HASH_BAR_BYTES:
            while block := f.read(chunk):
                h.update(block)
            return h.hexdigest()
        from shrink.console import progress

        with progress("MiB") as bar:
            task = bar.add_task(f"{label} {path.name}", total=size / 2**20)
            while block := f.read(chunk):
                h.update(block)
                bar.advance(task, len(block) / 2**20)
    return h.hexdigest()


def manifest_hash(folder: Path) -> str | None:
    """sha256 of a folder's manifest.json, the artifact's identity; None if it has none."""
    path = Path(folder) / MANIFEST
    return sha256_file(path) if path.is_file() else None


def file_table(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under `folder` except the manifest, by relative path."""
    folder = Path(folder)
    return {rel: {"sha256": sha256_file(folder / rel), "bytes": (folder / rel).stat().st_size}
            for rel in file_names(folder)}


def build_manifest(
    folder: Path,
    *,
    kind: str,
    format: str,
    source: Path | None,
    settings: dict[str, Any],
    metrics: dict[str, Any],
    valid: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`extra`: more top-level sections (a bundle's `target` and `provenance`)."""
    files = file_table(folder)
    metrics = {"size_bytes": sum(f["bytes"] for f in files.values()), **metrics}
    return {
        "magic": MAGIC,
        "schema_version": SCHEMA_VERSION,
        "shrink_version": __version__,
        "kind": kind,
        "format": format,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": None
        if source is None
        else {"path": str(source), "manifest_sha256": manifest_hash(source)},
        "settings": settings,
        "metrics": metrics,
        "valid": valid,  # false when a check of the artifact (export parity) failed
        **(extra or {}),
        "files": files,
    }


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


def _make_temp(make, what: str, **kw) -> str:
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
    fd, tmp = _make_temp(tempfile.mkstemp, str(path), prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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


def _usual_permissions(folder: Path) -> None:
    """Give a staged folder and everything in it the usual permissions (mkdtemp made it
    0700; some writers make 0600 files), keeping execute bits."""
    os.chmod(folder, default_mode(directory=True))
    for path in folder.rglob("*"):
        if path.is_dir():
            os.chmod(path, default_mode(directory=True))
        elif path.is_file():
            os.chmod(path, default_mode() | (path.stat().st_mode & 0o111))


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Read and check a folder's manifest; ArtifactError says what is wrong."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder}: not a shrink artifact (no {MANIFEST})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: corrupt manifest ({e})") from None
    if not isinstance(data, dict) or data.get("magic") != MAGIC:
        raise ArtifactError(f"{path}: not a shrink manifest (magic {MAGIC!r} missing)")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path}: manifest schema version {data.get('schema_version')!r}, this shrink "
            f"({__version__}) reads version {SCHEMA_VERSION}; rebuild the artifact with this version"
        )
    return data


def check_output_free(out: Path, force: bool) -> None:
    """Refuse to overwrite an existing output unless forced. Call before any work starts."""
    out = Path(out)
    if out.exists() and not force:
        raise ShrinkError(f"output folder {out} already exists (use --force to replace it)")
    if not out.parent.exists():
        raise ShrinkError(f"--out: parent folder {out.parent} does not exist")


@contextlib.contextmanager
def staged_folder(out: Path, force: bool, what: str = "the output folder") -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success move it to `out`, else delete it.

    The caller writes the manifest last, inside the block. An existing `out` is replaced
    only when `force` is set, and only after the new folder is complete. `what` names the
    folder in a full-disk error ("the student").
    """
    out = Path(out)
    check_output_free(out, force)
    what = f"{what} {out}"
    tmp = Path(_make_temp(tempfile.mkdtemp, what, prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    with removed_on_failure(tmp, what):
        yield tmp
        _usual_permissions(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)


def finish(folder: Path, **fields: Any) -> dict[str, Any]:
    """Hash the folder's files and write its manifest, the last file written. `fields`
    are build_manifest's: kind, format, source, settings, metrics, valid and extra."""
    manifest = build_manifest(folder, **fields)
    write_json_atomic(Path(folder) / MANIFEST, manifest)
    return manifest


class VerifyError(ArtifactError):
    """Files differ from the manifest: a failed check, exit code 1."""

    exit_code = 1


def verify(folder: Path) -> list[str]:
    """Re-hash every file the manifest lists; the problems found (empty: intact).
    A changed, missing or unlisted file is each named."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    listed = manifest.get("files") or {}
    problems = []
    for rel, entry in listed.items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{rel}: changed (size {path.stat().st_size:,} bytes, manifest says {entry['bytes']:,})")
        elif sha256_file(path, "verifying") != entry["sha256"]:
            problems.append(f"{rel}: changed (sha256 differs from the manifest)")
    for rel in file_names(folder):
        if rel not in listed:
            problems.append(f"{rel}: not in the manifest")
    return problems


def is_shrink_manifest(path: Path) -> bool:
    """Whether the `manifest.json` at `path` is shrink's rather than another tool's file of
    that name; a corrupt one is an ArtifactError, not a guess."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: corrupt manifest ({e})") from None
    return isinstance(data, dict) and data.get("magic") == MAGIC


def owning_artifact(path: Path) -> Path | None:
    """The artifact folder a model path belongs to: the folder itself, or for a file (a
    GGUF or ONNX inside an artifact) its folder; None when there is no shrink manifest
    there (a bare model file, a plain Hugging Face folder such as a teacher)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    manifest = folder / MANIFEST
    if path.exists() and manifest.is_file() and is_shrink_manifest(manifest):
        return folder
    return None


def verify_before_use(path: Path, *, skip: bool = False) -> None:
    """Refuse a model whose artifact's files differ from its manifest, before eval, run or
    check uses it: VerifyError (exit 1) names each changed, missing or unlisted file.
    Nothing to check when `path` is in no artifact, or when `skip` (--no-verify) is set."""
    folder = None if skip else owning_artifact(path)
    if folder is None:
        return
    problems = verify(folder)
    if problems:
        raise VerifyError(f"{folder}: {'; '.join(problems)}; rebuild it, or pass --no-verify to skip this check")


def file_names(folder: Path) -> list[str]:
    """Relative paths of the files under `folder`, the manifest excepted."""
    return [p.relative_to(folder).as_posix() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and p.name != MANIFEST]


def collect_artifacts(build_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Every shrink artifact under `build_dir` (recursively), its manifest keyed by its
    folder's path relative to `build_dir`. Hidden folders (staging and `.old` folders
    left by an interrupted write) are skipped, and so are `manifest.json` files of other
    tools; a shrink manifest that is corrupt or of another version is an error."""
    build_dir = Path(build_dir)
    if not build_dir.is_dir():
        raise ShrinkError(f"build folder {build_dir} does not exist")
    found = {}
    for path in sorted(build_dir.rglob(MANIFEST)):
        rel = path.parent.relative_to(build_dir)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if not is_shrink_manifest(path):
            continue  # another tool's manifest.json
        found[rel.as_posix()] = read_manifest(path.parent)
    if not found:
        raise ShrinkError(f"build folder {build_dir} holds no shrink artifacts (no {MANIFEST} found)")
    return found


def quant_label(manifest: dict[str, Any]) -> str | None:
    """The quantization in a few characters: Q4_K_M, int8, 4-bit; None for a student."""
    settings = manifest.get("settings") or {}
    if settings.get("quant"):
        return str(settings["quant"])
    if settings.get("bits"):
        return f"{settings['bits']}-bit"
    return None
