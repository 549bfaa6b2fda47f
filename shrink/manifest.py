"""The manifest: one typed record of what an artifact folder is.

Every stage writes one, last, into the folder it makes (`manifest.json`): a student
(`shrink distill`), an export (`shrink export`), a device target's bundle and a teacher
cache; every stage that takes an artifact reads its input's. It records what the folder
is (`kind`, `format`), the sha256 and size of every file, the manifest hash of the
artifact it was made from, the exact settings, shrink's version and measured metrics.
`settings`, `metrics` and a bundle's `target` and `provenance` vary by stage and stay
plain JSON objects; everything else is typed and checked.

`Manifest.read` checks every field and names the file and the field that is wrong;
`Manifest.write` is the only way a manifest reaches disk, atomically. The file carries
a magic string and a schema version (as llm.c stamps its files): a folder from another
tool is recognised, an older version is upgraded on reading (`migrate`), and a newer
one is refused with a hint, not misread.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shrink import __version__
from shrink.atomic import write_json_atomic
from shrink.errors import ArtifactError

MANIFEST = "manifest.json"
MAGIC = "shrink-artifact"
SCHEMA_VERSION = 2  # 1: before the typed manifest (see migrate)

# kind (the stage that made the folder) -> the formats it writes (how the model is
# stored, which decides the runtime that serves it).
KIND_FORMATS = {
    "student": ("hf",),                  # shrink distill: a Hugging Face folder
    "export": ("gguf", "onnx", "gptq", "pte"),  # shrink export --target FORMAT (pte: --target executorch)
    "bundle": ("gguf", "onnx", "gptq", "pte"),  # shrink export --target DEVICE: the rung chosen
    "teacher-cache": ("safetensors",),   # shrink teacher-cache: top-k log-prob shards
    "labels": ("jsonl",),                # shrink label: a task file the teacher answered (beside it, not a folder)
}
KINDS = tuple(KIND_FORMATS)
FORMATS = tuple(dict.fromkeys(f for formats in KIND_FORMATS.values() for f in formats))


class ManifestError(ArtifactError):
    """A manifest.json that is corrupt, another tool's, of a newer schema version, or with
    a field missing or of the wrong type; the message names the file and the field."""


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Source:
    """What an artifact was made from: a shrink artifact or a plain model (a teacher)."""

    path: str
    manifest_sha256: str | None  # sha256 of its manifest.json; None when it has none


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class Manifest:
    kind: str  # the stage that made the folder: one of KINDS
    format: str  # how the model is stored: one of KIND_FORMATS[kind]
    settings: dict[str, Any] = field(default_factory=dict)  # exactly what produced it (each stage its own keys)
    metrics: dict[str, Any] = field(default_factory=dict)  # size_bytes (always), and what was measured
    valid: bool = True  # false when a check of the artifact failed (export parity)
    source: Source | None = None
    files: dict[str, FileEntry] = field(default_factory=dict)  # every file but the manifest, by relative path
    target: dict[str, Any] | None = None  # a bundle's device target: constraints, measured values, verdict
    provenance: list[dict[str, Any]] | None = None  # a bundle's chain: teacher -> student -> artifact
    created: str = field(default_factory=_now)  # UTC, ISO 8601
    shrink_version: str = __version__
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        """The manifest of artifact `folder`, checked (and upgraded when older);
        ManifestError says what is wrong."""
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise ManifestError(f"{folder}: not a shrink artifact (no {MANIFEST})")
        return cls.read_from(path)

    @classmethod
    def read_from(cls, path: str | Path) -> Manifest:
        """The manifest in file `path`, checked (a labeled task file's sits beside it)."""
        path = Path(path)
        if not path.is_file():
            raise ManifestError(f"{path}: no such manifest")
        data = _load(path)
        if not _is_shrink(data):
            raise ManifestError(f"{path}: not a shrink manifest (magic {MAGIC!r} missing)")
        return cls.from_dict(migrate(data, path), path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str | Path) -> Manifest:
        """A current-version manifest object (as to_dict gives it), checked; `path` names
        the file in errors."""
        problems = _problems(data)
        if problems:
            raise ManifestError(f"{path}: {'; '.join(problems)}")
        source = data["source"]
        return cls(
            kind=data["kind"], format=data["format"], settings=data["settings"], metrics=data["metrics"],
            valid=data["valid"], source=None if source is None else Source(source["path"], source["manifest_sha256"]),
            files={rel: FileEntry(e["sha256"], e["bytes"]) for rel, e in data["files"].items()},
            target=data.get("target"), provenance=data.get("provenance"), created=data["created"],
            shrink_version=data["shrink_version"], schema_version=data["schema_version"],
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of manifest.json, which `--json` prints. `target` and
        `provenance` appear only when set (a bundle)."""
        data = {
            "magic": MAGIC,
            "schema_version": self.schema_version,
            "shrink_version": self.shrink_version,
            "kind": self.kind,
            "format": self.format,
            "created": self.created,
            "source": None if self.source is None else dataclasses.asdict(self.source),
            "settings": self.settings,
            "metrics": self.metrics,
            "valid": self.valid,
        }
        if self.target is not None:
            data["target"] = self.target
        if self.provenance is not None:
            data["provenance"] = self.provenance
        data["files"] = {rel: dataclasses.asdict(entry) for rel, entry in self.files.items()}
        return data

    def write(self, folder: str | Path) -> Manifest:
        """Write `folder`/manifest.json atomically; a manifest that Manifest.read would
        refuse is not written."""
        return self.write_to(Path(folder) / MANIFEST)

    def write_to(self, path: str | Path) -> Manifest:
        """Write the manifest to `path` (a labeled task file's sits beside it)."""
        path = Path(path)
        data = self.to_dict()
        problems = _problems(data)
        if problems:
            raise ManifestError(f"{path}: not written: {'; '.join(problems)}")
        write_json_atomic(path, data)
        return self


def migrate(data: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """`data` upgraded to the current schema version, one version at a time; a newer
    version than this shrink knows is refused, since its fields may mean other things.

    1 -> 2: the same fields, each now required and typed; the first version-1 manifests
    (before export parity) had no `valid`, which was true for them.
    """
    if "schema_version" not in data:
        raise ManifestError(f"{path}: field 'schema_version' is missing")
    version = data["schema_version"]
    if not _is_int(version) or version < 1:
        raise ManifestError(f"{path}: field 'schema_version' is {_show(version)}, expected a positive integer")
    if version > SCHEMA_VERSION:
        raise ManifestError(
            f"{path}: manifest schema version {version} is newer than this shrink ({__version__}) reads "
            f"(up to {SCHEMA_VERSION}); upgrade shrink to use this artifact (pip install -U shrink)")
    if version == 1:
        data = {**data, "valid": data.get("valid", True), "schema_version": 2}
    return data


def is_shrink_manifest(path: Path) -> bool:
    """Whether the `manifest.json` at `path` is shrink's rather than another tool's file of
    that name; a corrupt one is a ManifestError, not a guess."""
    return _is_shrink(_load(Path(path)))


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: corrupt manifest ({e})") from None


def _is_shrink(data: Any) -> bool:
    return isinstance(data, dict) and data.get("magic") == MAGIC


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_str_or_none(v: Any) -> bool:
    return v is None or isinstance(v, str)


# field -> (the check of its value, what is expected); every field but target and
# provenance is required.
FIELDS = {
    "schema_version": (_is_int, "an integer"),
    "shrink_version": (lambda v: isinstance(v, str), "a string"),
    "kind": (lambda v: v in KINDS, f"one of {', '.join(KINDS)}"),
    "format": (lambda v: v in FORMATS, f"one of {', '.join(FORMATS)}"),
    "created": (lambda v: isinstance(v, str), "a string"),
    "source": (lambda v: v is None or (isinstance(v, dict) and set(v) == {"path", "manifest_sha256"}
                                       and isinstance(v["path"], str) and _is_str_or_none(v["manifest_sha256"])),
               'null or {"path": string, "manifest_sha256": string or null}'),
    "settings": (lambda v: isinstance(v, dict), "an object"),
    "metrics": (lambda v: isinstance(v, dict) and _is_int(v.get("size_bytes")), "an object with an integer size_bytes"),
    "valid": (lambda v: isinstance(v, bool), "true or false"),
    "target": (lambda v: v is None or isinstance(v, dict), "an object"),
    "provenance": (lambda v: v is None or (isinstance(v, list) and all(isinstance(s, dict) for s in v)),
                   "a list of objects"),
    "files": (lambda v: isinstance(v, dict), "an object"),
}
OPTIONAL = ("target", "provenance")


def _problems(data: dict[str, Any]) -> list[str]:
    """What is wrong with a manifest object of the current version, field by field."""
    problems = [f"field {name!r} is missing" for name in FIELDS if name not in data and name not in OPTIONAL]
    problems += [f"unknown field {name!r}" for name in data if name not in FIELDS and name != "magic"]
    for name, (ok, expected) in FIELDS.items():
        if name in data and not ok(data[name]):
            problems.append(f"field {name!r} is {_show(data[name])}, expected {expected}")
    kind, fmt = data.get("kind"), data.get("format")
    if kind in KINDS and fmt in FORMATS and fmt not in KIND_FORMATS[kind]:
        problems.append(f"field 'format' is {_show(fmt)}, a {kind} is {' or '.join(KIND_FORMATS[kind])}")
    if isinstance(data.get("files"), dict):
        for rel, entry in data["files"].items():
            if not (isinstance(entry, dict) and set(entry) == {"sha256", "bytes"}
                    and isinstance(entry["sha256"], str) and _is_int(entry["bytes"])):
                problems.append(f"field 'files' entry {rel!r} is {_show(entry)}, "
                                'expected {"sha256": string, "bytes": integer}')
    return problems


def _show(value: Any, width: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= width else text[:width - 3] + "..."
