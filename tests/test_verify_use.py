"""Inputs cannot change underneath a run: `shrink eval` and `shrink run` re-hash a shrink
artifact's files against its manifest before using it (exit 1 naming the changed file),
`--no-verify` skips that, and a model with no manifest (a teacher) is used as it is.
`shrink check`'s side is in test_check.py.

The model is an untrained one-layer Llama: what is measured here is which files are
read, not what the model says.
"""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

import tiny
from shrink import artifact
from shrink.cli import cli

HINT = "rebuild it, or pass --no-verify to skip this check"
PROMPT = "Review: the service was dreadful\nSentiment:"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def only_error(r) -> str:
    """The one line on stderr of a failed check (exit 1)."""
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.output, r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory, task_files):
    """A plain Hugging Face folder (no manifest), as a teacher is."""
    rows = [json.loads(line) for line in task_files["train"].read_text().splitlines()]
    return tiny.make_teacher(tmp_path_factory.mktemp("plain") / "model", rows, steps=0, layers=1)


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory, task_files):
    lines = task_files["eval"].read_text().splitlines()[:8]
    path = tmp_path_factory.mktemp("data") / "eval.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def student(tmp_path, model):
    """The model as a shrink artifact: the same files with a manifest."""
    folder = tmp_path / "student"
    shutil.copytree(model, folder)
    artifact.finish(folder, kind="student", format="hf", source=None, settings={}, metrics={})
    return folder


def nudge_a_weight(safetensors):
    """Flip the lowest bit of one float32 weight: the model still loads and runs, and
    only the sha256 can tell."""
    data = bytearray(safetensors.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # after the header's length and the header
    data[start + (len(data) - start) // 8 * 4] ^= 1
    safetensors.write_bytes(bytes(data))


def fake_gguf_artifact(folder):
    """An export folder whose model file is never opened: verification refuses it first."""
    folder.mkdir()
    (folder / "model.gguf").write_bytes(b"GGUF" + bytes(4096))
    artifact.finish(folder, kind="export", format="gguf", source=None, settings={}, metrics={})
    return folder


def test_eval_refuses_a_changed_artifact(student, eval_file):
    r = invoke("eval", student, "--data", eval_file, "--json")
    assert r.exit_code == 0, r.output
    nudge_a_weight(student / "model.safetensors")
    r = invoke("eval", student, "--data", eval_file, "--json")
    assert only_error(r) == f"Error: {student}: model.safetensors: changed (sha256 differs from the manifest); {HINT}"
    assert r.stdout == ""
    r = invoke("eval", student, "--data", eval_file, "--json", "--no-verify")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["results"][0]["path"] == str(student)


def test_eval_verifies_a_teacher_that_is_an_artifact(student, model, eval_file):
    # a plain teacher folder has no manifest: used as it is
    r = invoke("eval", student, "--data", eval_file, "--teacher", model, "--json")
    assert r.exit_code == 0, r.output
    assert [row["role"] for row in json.loads(r.stdout)["results"]] == ["artifact", "teacher"]
    (student / "notes.txt").write_text("not from shrink")
    r = invoke("eval", model, "--data", eval_file, "--teacher", student)
    assert only_error(r) == f"Error: {student}: notes.txt: not in the manifest; {HINT}"
    r = invoke("eval", model, "--data", eval_file, "--teacher", student, "--no-verify", "--json")
    assert r.exit_code == 0, r.output


def test_run_refuses_a_changed_artifact(student):
    r = invoke("run", student, PROMPT, "--max-tokens", "2")
    assert r.exit_code == 0, r.output
    nudge_a_weight(student / "model.safetensors")
    r = invoke("run", student, PROMPT, "--max-tokens", "2")
    assert only_error(r) == f"Error: {student}: model.safetensors: changed (sha256 differs from the manifest); {HINT}"
    assert r.stdout == ""
    assert invoke("run", student, PROMPT, "--max-tokens", "2", "--no-verify").exit_code == 0


def test_run_on_a_plain_folder_needs_no_manifest(model):
    assert invoke("run", model, PROMPT, "--max-tokens", "2").exit_code == 0


@pytest.mark.parametrize("command", ["run", "eval"])
def test_a_file_inside_an_artifact_verifies_its_folder(tmp_path, eval_file, command):
    q4 = fake_gguf_artifact(tmp_path / "student-q4")
    (q4 / "model.gguf").write_bytes(b"GGUF" + bytes(4095) + b"\1")  # same size, one byte changed
    args = [PROMPT] if command == "run" else ["--data", eval_file]
    r = invoke(command, q4 / "model.gguf", *args)
    assert only_error(r) == f"Error: {q4}: model.gguf: changed (sha256 differs from the manifest); {HINT}"
    (q4 / "model.gguf").unlink()
    r = invoke(command, q4, *args)
    assert only_error(r) == f"Error: {q4}: model.gguf: missing; {HINT}"


def test_owning_artifact(tmp_path, model):
    q4 = fake_gguf_artifact(tmp_path / "q4")
    assert artifact.owning_artifact(q4) == q4
    assert artifact.owning_artifact(q4 / "model.gguf") == q4
    assert artifact.owning_artifact(q4 / "absent.gguf") is None  # the runtime says it does not exist
    assert artifact.owning_artifact(model) is None
    bare = tmp_path / "bare.gguf"
    shutil.copy(q4 / "model.gguf", bare)
    assert artifact.owning_artifact(bare) is None
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text('{"name": "another tool"}')
    (other / "model.gguf").write_bytes(b"GGUF")
    assert artifact.owning_artifact(other / "model.gguf") is None
    (q4 / "model.gguf").write_bytes(b"changed")
    artifact.verify_before_use(q4, skip=True)  # --no-verify
    with pytest.raises(artifact.VerifyError, match="model.gguf: changed \\(size 7 bytes, manifest says 4,100\\)"):
        artifact.verify_before_use(q4)
