import json

import pytest

from shrink import artifact, atomic
from shrink.errors import ArtifactError, ShrinkError
from shrink.manifest import Manifest


def test_staged_folder_writes_manifest_last_and_renames(tmp_path):
    out = tmp_path / "out"
    with artifact.staged_folder(out, force=False) as tmp:
        assert not out.exists()
        (tmp / "w.bin").write_bytes(b"abc")
        m = artifact.finish(tmp, kind="student", format="hf", source=None, settings={"x": 1}, metrics={"accuracy": 0.5})
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "w.bin"]
    assert m.files["w.bin"].sha256 == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert m.metrics == {"size_bytes": 3, "accuracy": 0.5}
    assert Manifest.read(out).settings == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


def test_failure_inside_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with artifact.staged_folder(out, force=False) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_refused_unless_forced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("keep")
    with pytest.raises(ShrinkError, match="already exists"):
        with artifact.staged_folder(out, force=False):
            pass
    assert (out / "old").exists()
    with artifact.staged_folder(out, force=True) as tmp:
        (tmp / "new").write_text("n")
    assert [p.name for p in out.iterdir()] == ["new"]


def test_source_hash_and_bad_manifests(tmp_path):
    src = tmp_path / "src"
    with artifact.staged_folder(src, False) as tmp:
        artifact.finish(tmp, kind="student", format="hf", source=None, settings={}, metrics={})
    dst = tmp_path / "dst"
    with artifact.staged_folder(dst, False) as tmp:
        m = artifact.finish(tmp, kind="export", format="gguf", source=src, settings={}, metrics={})
    assert m.source.manifest_sha256 == artifact.manifest_hash(src)

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ArtifactError, match="not a shrink manifest"):
        Manifest.read(tmp_path / "other")
    data = json.loads((dst / "manifest.json").read_text())
    data["schema_version"] = 99
    (dst / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="schema version 99"):
        Manifest.read(dst)
    (dst / "manifest.json").write_text("{broken")
    with pytest.raises(ArtifactError, match="corrupt manifest"):
        Manifest.read(dst)


def test_written_artifacts_get_the_usual_permissions(tmp_path):
    """tempfile's private 0700/0600 must not leak into folders users hand to a server."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = tmp_path / "art"
        with artifact.staged_folder(out, force=False) as tmp:
            (tmp / "model.bin").write_bytes(b"x")
            os.chmod(tmp / "model.bin", 0o600)
            artifact.finish(tmp, kind="export", format="gguf", source=None, settings={}, metrics={})
        atomic.write_json_atomic(tmp_path / "baseline.json", {"a": 1})
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(out) == 0o755
    assert mode(out / "model.bin") == mode(out / "manifest.json") == mode(tmp_path / "baseline.json") == 0o644


def test_full_disk_in_atomic_file_names_the_path_and_leaves_nothing(tmp_path):
    import errno

    target = tmp_path / "baseline.json"
    with pytest.raises(atomic.DiskFullError) as e:
        with atomic.atomic_file(target) as tmp:
            tmp.write_text("{half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(e.value) == (f"no space left on device while writing {target}; "
                            "the partial files were removed (free some space, or write elsewhere)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error, full", [
    (OSError(28, "No space left on device"), True),
    (OSError(122, "Disk quota exceeded"), True),
    (Exception("Error while serializing: I/O error: No space left on device (os error 28)"), True),  # safetensors
    (OSError("131072 requested and 124432 written"), True),  # numpy tofile, as the GGUF writer calls it
    (OSError(13, "Permission denied"), False),
    (RuntimeError("131072 requested and 124432 written"), False),
])
def test_is_disk_full(error, full):
    assert atomic.is_disk_full(error) is full
    try:
        raise RuntimeError("wrapped") from error
    except RuntimeError as wrapped:
        assert atomic.is_disk_full(wrapped) is full  # found through the chain too
