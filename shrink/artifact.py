"""The artifact: one folder of model files plus `manifest.json`, passed between stages.

The manifest (shrink.manifest) records what the folder is, the sha256 of every file,
the manifest hash of the artifact it was made from, the exact settings, shrink's version
and measured metrics; this module hashes the files and writes the folder around it.

Folders are written atomically: everything goes into a temporary sibling folder, the
manifest is written last, and the folder is renamed into place. A full disk (or quota)
while writing becomes DiskFullError naming what was being written, once the temporary
files are removed (shrink.atomic).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shrink.atomic import default_mode, make_temp, removed_on_failure
from shrink.errors import ArtifactError, ShrinkError
from shrink.manifest import MANIFEST, FileEntry, Manifest, Source, is_shrink_manifest


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


def teacher_weight_files(teacher: Path) -> list[Path]:
    """The GGUF file itself, or every *.safetensors file of the teacher's folder."""
    teacher = Path(teacher)
    return [teacher] if teacher.is_file() else sorted(teacher.glob("*.safetensors"))


def weights_sha256(teacher: Path) -> dict[str, str]:
    """File name -> sha256 of the teacher's weight files (what a teacher cache and a
    labeled file record)."""
    return {p.name: sha256_file(p) for p in teacher_weight_files(teacher)}


def manifest_hash(folder: Path) -> str | None:
    """sha256 of a folder's manifest.json, the artifact's identity; None if it has none."""
    path = Path(folder) / MANIFEST
    return sha256_file(path) if path.is_file() else None


def file_table(folder: Path) -> dict[str, FileEntry]:
    """sha256 and size of every file under `folder` except the manifest, by relative path."""
    folder = Path(folder)
    return {rel: FileEntry(sha256_file(folder / rel), (folder / rel).stat().st_size) for rel in file_names(folder)}


def _usual_permissions(folder: Path) -> None:
    """Give a staged folder and everything in it the usual permissions (mkdtemp made it
    0700; some writers make 0600 files), keeping execute bits."""
    os.chmod(folder, default_mode(directory=True))
    for path in folder.rglob("*"):
        if path.is_dir():
            os.chmod(path, default_mode(directory=True))
        elif path.is_file():
            os.chmod(path, default_mode() | (path.stat().st_mode & 0o111))


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
    tmp = Path(make_temp(tempfile.mkdtemp, what, prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
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


def finish(
    folder: Path,
    *,
    kind: str,
    format: str,
    source: Path | None,
    settings: dict[str, Any],
    metrics: dict[str, Any],
    valid: bool = True,
    target: dict[str, Any] | None = None,
    provenance: list[dict[str, Any]] | None = None,
) -> Manifest:
    """Hash the folder's files and write its manifest, the last file written. `source`:
    the artifact or model it was made from (its manifest's hash is recorded); `metrics`
    gain `size_bytes`, the files' total; `target` and `provenance`: a bundle's."""
    files = file_table(folder)
    manifest = Manifest(
        kind=kind, format=format, settings=settings,
        metrics={"size_bytes": sum(f.bytes for f in files.values()), **metrics}, valid=valid,
        source=None if source is None else Source(str(source), manifest_hash(source)),
        files=files, target=target, provenance=provenance,
    )
    return manifest.write(folder)


class VerifyError(ArtifactError):
    """Files differ from the manifest: a failed check, exit code 1."""

    exit_code = 1


def verify(folder: Path) -> list[str]:
    """Re-hash every file the manifest lists; the problems found (empty: intact).
    A changed, missing or unlisted file is each named."""
    folder = Path(folder)
    listed = Manifest.read(folder).files
    problems = []
    for rel, entry in listed.items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != entry.bytes:
            problems.append(f"{rel}: changed (size {path.stat().st_size:,} bytes, manifest says {entry.bytes:,})")
        elif sha256_file(path, "verifying") != entry.sha256:
            problems.append(f"{rel}: changed (sha256 differs from the manifest)")
    for rel in file_names(folder):
        if rel not in listed:
            problems.append(f"{rel}: not in the manifest")
    return problems


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


def collect_artifacts(build_dir: str | Path) -> dict[str, Manifest]:
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
        found[rel.as_posix()] = Manifest.read(path.parent)
    if not found:
        raise ShrinkError(f"build folder {build_dir} holds no shrink artifacts (no {MANIFEST} found)")
    return found


def quant_label(manifest: Manifest) -> str | None:
    """The quantization in a few characters: Q4_K_M, int8, 4-bit; None for a student."""
    settings = manifest.settings
    if settings.get("quant"):
        return str(settings["quant"])
    if settings.get("bits"):
        return f"{settings['bits']}-bit"
    return None
