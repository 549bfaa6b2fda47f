"""The typed manifest: written and read back, every field checked with the file and the
field named, version-1 manifests upgraded, newer ones refused."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from shrink import artifact
from shrink.cli import cli
from shrink.manifest import (FORMATS, KINDS, MANIFEST, SCHEMA_VERSION, FileEntry, Manifest, ManifestError, Source,
                             migrate)

ABC_SHA = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256 of b"abc"


def student(folder, **fields):
    folder.mkdir()
    (folder / "w.bin").write_bytes(b"abc")
    return artifact.finish(folder, **{"kind": "student", "format": "hf", "source": None, "settings": {"x": 1},
                                      "metrics": {"accuracy": 0.5}, **fields})


def rewritten(folder, **changes):
    """A student whose manifest on disk has `changes` in its top-level fields (None
    removes one); returns the manifest's path."""
    student(folder)
    path = folder / MANIFEST
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    path.write_text(json.dumps(data))
    return path


def verify_error(folder) -> str:
    """`shrink verify` on a folder whose manifest it refuses: exit 2, one line."""
    r = CliRunner().invoke(cli, ["verify", str(folder)])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.output, r.stderr
    return lines[0]


def test_round_trip(tmp_path):
    m = student(tmp_path / "s")
    assert m == Manifest.read(tmp_path / "s")
    assert (m.kind, m.format, m.settings, m.valid, m.source) == ("student", "hf", {"x": 1}, True, None)
    assert m.metrics == {"size_bytes": 3, "accuracy": 0.5}
    assert m.files == {"w.bin": FileEntry(ABC_SHA, 3)}
    assert m.schema_version == SCHEMA_VERSION and m.target is None and m.provenance is None
    on_disk = json.loads((tmp_path / "s" / MANIFEST).read_text())
    assert on_disk == m.to_dict()
    assert list(on_disk) == ["magic", "schema_version", "shrink_version", "kind", "format", "created", "source",
                             "settings", "metrics", "valid", "files"]  # the keys readers of --json know


def test_source_and_bundle_sections(tmp_path):
    student(tmp_path / "s")
    b = tmp_path / "b"
    b.mkdir()
    (b / "model.gguf").write_bytes(b"GGUF")
    target = {"name": "phone", "constraints": {}, "met": True}
    provenance = [{"stage": "student", "path": str(tmp_path / "s")}]
    m = artifact.finish(b, kind="bundle", format="gguf", source=tmp_path / "s", settings={}, metrics={},
                        target=target, provenance=provenance)
    assert m.source == Source(str(tmp_path / "s"), artifact.manifest_hash(tmp_path / "s"))
    read = Manifest.read(b)
    assert read == m and read.target == target and read.provenance == provenance
    assert list(read.to_dict())[-3:] == ["target", "provenance", "files"]


def test_kinds_and_formats_are_those_written():
    assert KINDS == ("student", "export", "bundle", "teacher-cache", "labels")
    assert FORMATS == ("hf", "gguf", "onnx", "gptq", "pte", "safetensors", "jsonl")  # teacher-cache shards, labels


@pytest.mark.parametrize("changes, problem", [
    ({"kind": "studnet"}, "field 'kind' is \"studnet\", expected one of student, export, bundle, teacher-cache, labels"),
    ({"format": "gguf"}, "field 'format' is \"gguf\", a student is hf"),
    ({"format": "tflite"}, "field 'format' is \"tflite\", expected one of hf, gguf, onnx, gptq, pte, safetensors, "
                           "jsonl"),
    ({"valid": "yes"}, "field 'valid' is \"yes\", expected true or false"),
    ({"settings": None}, "field 'settings' is missing"),
    ({"metrics": {"accuracy": 0.5}}, "field 'metrics' is {\"accuracy\": 0.5}, expected an object with an integer "
                                     "size_bytes"),
    ({"source": {"path": 3}}, "field 'source' is {\"path\": 3}, expected null or {\"path\": string, "
                              "\"manifest_sha256\": string or null}"),
    ({"files": {"w.bin": {"sha256": "ba78"}}}, "field 'files' entry 'w.bin' is {\"sha256\": \"ba78\"}, "
                                               "expected {\"sha256\": string, \"bytes\": integer}"),
    ({"colour": "blue"}, "unknown field 'colour'"),
    ({"schema_version": None}, "field 'schema_version' is missing"),
    ({"schema_version": "2"}, "field 'schema_version' is \"2\", expected a positive integer"),
])
def test_a_bad_field_is_named_with_its_file(tmp_path, changes, problem):
    path = rewritten(tmp_path / "s", **changes)
    with pytest.raises(ManifestError) as e:
        Manifest.read(tmp_path / "s")
    assert str(e.value) == f"{path}: {problem}"
    assert verify_error(tmp_path / "s") == f"Error: {path}: {problem}"


def test_every_problem_is_listed_at_once(tmp_path):
    path = rewritten(tmp_path / "s", kind="x", valid=1)
    assert verify_error(tmp_path / "s") == (f"Error: {path}: field 'kind' is \"x\", expected one of student, export, "
                                            "bundle, teacher-cache, labels; field 'valid' is 1, expected true or false")


def test_not_a_manifest(tmp_path):
    (tmp_path / "empty").mkdir()
    assert verify_error(tmp_path / "empty") == f"Error: {tmp_path / 'empty'}: not a shrink artifact (no {MANIFEST})"
    other = tmp_path / "other"
    other.mkdir()
    (other / MANIFEST).write_text('{"name": "another tool"}')
    assert verify_error(other) == f"Error: {other / MANIFEST}: not a shrink manifest (magic 'shrink-artifact' missing)"


def test_a_newer_schema_version_is_refused_with_a_hint(tmp_path):
    path = rewritten(tmp_path / "s", schema_version=SCHEMA_VERSION + 1)
    assert verify_error(tmp_path / "s") == (
        f"Error: {path}: manifest schema version {SCHEMA_VERSION + 1} is newer than this shrink (0.1.0) reads "
        f"(up to {SCHEMA_VERSION}); upgrade shrink to use this artifact (pip install -U shrink)")


def version_1(folder, **over):
    """A manifest as shrink wrote it before the typed manifest (schema version 1), by hand."""
    folder.mkdir()
    (folder / "model-Q4_K_M.gguf").write_bytes(b"abc")
    data = {
        "magic": "shrink-artifact", "schema_version": 1, "shrink_version": "0.1.0", "kind": "export",
        "format": "gguf", "created": "2025-01-02T03:04:05Z",
        "source": {"path": "student", "manifest_sha256": "0" * 64},
        "settings": {"target": "gguf", "quant": "Q4_K_M", "file": "model-Q4_K_M.gguf"},
        "metrics": {"size_bytes": 3, "accuracy": 0.875, "parity": {"passed": True}},
        "valid": True,
        "files": {"model-Q4_K_M.gguf": {"sha256": ABC_SHA, "bytes": 3}},
        **over,
    }
    (folder / MANIFEST).write_text(json.dumps(data, indent=2))
    return data


def test_version_1_manifests_still_read(tmp_path):
    version_1(tmp_path / "v1")
    m = Manifest.read(tmp_path / "v1")
    assert m.schema_version == SCHEMA_VERSION
    assert (m.kind, m.format, m.created, m.shrink_version) == ("export", "gguf", "2025-01-02T03:04:05Z", "0.1.0")
    assert m.source == Source("student", "0" * 64)
    assert m.settings["quant"] == "Q4_K_M" and m.metrics["accuracy"] == 0.875 and m.valid is True
    assert m.files == {"model-Q4_K_M.gguf": FileEntry(ABC_SHA, 3)}
    assert artifact.verify(tmp_path / "v1") == []
    r = CliRunner().invoke(cli, ["verify", str(tmp_path / "v1")])
    assert r.exit_code == 0 and r.stderr.strip() == f"{tmp_path / 'v1'}: all 1 files match the manifest"


def test_migration_fills_what_version_1_could_lack(tmp_path):
    """The first version-1 manifests, written before export parity, had no `valid`."""
    data = version_1(tmp_path / "early")
    del data["valid"]
    (tmp_path / "early" / MANIFEST).write_text(json.dumps(data))
    assert Manifest.read(tmp_path / "early").valid is True
    assert migrate(data, "m.json") == {**data, "valid": True, "schema_version": 2}
    assert migrate({**data, "valid": False}, "m.json")["valid"] is False
    bundle = version_1(tmp_path / "bundle", kind="bundle", target={"name": "phone", "met": True},
                       provenance=[{"stage": "artifact", "format": "gguf", "quant": "Q4_K_M"}])
    m = Manifest.read(tmp_path / "bundle")
    assert m.target == bundle["target"] and m.provenance == bundle["provenance"]


def test_write_refuses_what_read_would_refuse(tmp_path):
    (tmp_path / "s").mkdir()
    with pytest.raises(ManifestError, match="field 'format' is \"gguf\", a teacher-cache is safetensors"):
        Manifest(kind="teacher-cache", format="gguf", metrics={"size_bytes": 0}).write(tmp_path / "s")
    assert list((tmp_path / "s").iterdir()) == []
