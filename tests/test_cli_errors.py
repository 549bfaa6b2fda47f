"""Every bad input: one `Error: ...` line on stderr, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from shrink.cli import cli


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_user_error(result, message: str, exact: bool = False):
    """`exact`: the line is `Error: {message}`, else it contains `message`."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and message in lines[0], lines[0]
    assert not exact or lines[0] == f"Error: {message}", lines[0]
    assert "Traceback" not in result.output


@pytest.fixture
def workdir(tmp_path, teacher, task_files):
    """A scratch folder holding a copy of the teacher; tests check it gains no output."""
    shutil.copytree(teacher, tmp_path / "teacher")
    return tmp_path


def entries(folder):
    return sorted(p.name for p in folder.iterdir())


def distill_args(workdir, task_files, **over):
    opts = {"--teacher": workdir / "teacher", "--data": task_files["train"], "--out": workdir / "student",
            "--layers": 2, "--steps": 1}
    opts.update(over)
    args = ["distill"]
    for k, v in opts.items():
        if v is not None:
            args += [k, v]
    return args


def test_missing_teacher_folder(workdir, task_files):
    r = invoke(*distill_args(workdir, task_files, **{"--teacher": workdir / "nope"}))
    assert_user_error(r, f"teacher folder {workdir / 'nope'} does not exist")
    assert entries(workdir) == ["teacher"]


def test_teacher_without_config(workdir, task_files):
    (workdir / "teacher" / "config.json").unlink()
    r = invoke(*distill_args(workdir, task_files))
    assert_user_error(r, "has no config.json")
    assert entries(workdir) == ["teacher"]


def test_teacher_without_safetensors(workdir, task_files):
    (workdir / "teacher" / "model.safetensors").rename(workdir / "teacher" / "pytorch_model.bin")
    r = invoke(*distill_args(workdir, task_files))
    assert_user_error(r, "has no .safetensors weights (only pickle weights found")
    assert entries(workdir) == ["teacher"]


@pytest.mark.parametrize("layers", [0, 5])
def test_layers_out_of_range(workdir, task_files, layers):
    r = invoke(*distill_args(workdir, task_files, **{"--layers": layers}))
    assert_user_error(r, f"--layers must be between 1 and the teacher's 4 layers, got {layers}")
    assert entries(workdir) == ["teacher"]


def test_bad_task_data_names_file_and_line(workdir, task_files):
    bad = workdir / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": " b"}\n{"prompt": "a"}\n')
    r = invoke(*distill_args(workdir, task_files, **{"--data": bad}))
    assert_user_error(r, f"{bad}:2: missing key 'completion'")
    assert entries(workdir) == ["bad.jsonl", "teacher"]


def test_output_exists_is_refused(workdir, task_files):
    (workdir / "student").mkdir()
    r = invoke(*distill_args(workdir, task_files))
    assert_user_error(r, "already exists (use --force to replace it)")
    assert entries(workdir / "student") == []


def test_steps_and_epochs_together(workdir, task_files):
    r = invoke(*distill_args(workdir, task_files, **{"--epochs": 1}))
    assert_user_error(r, "--steps and --epochs cannot be used together")


def test_resume_without_checkpoint(workdir, task_files):
    r = invoke(*distill_args(workdir, task_files) + ["--resume"])
    assert_user_error(r, "--resume: no checkpoint at")
    assert entries(workdir) == ["teacher"]


def test_vocab_data_without_prune_vocab(workdir, task_files):
    words = workdir / "words.txt"
    words.write_text("more text\n")
    r = invoke(*distill_args(workdir, task_files, **{"--vocab-data": words}))
    assert_user_error(r, "--vocab-data: only with --prune-vocab (it chooses the tokens a pruned vocabulary keeps)", exact=True)
    assert entries(workdir) == ["teacher", "words.txt"]


def test_missing_vocab_data_file(workdir, task_files):
    r = invoke(*distill_args(workdir, task_files, **{"--vocab-data": workdir / "nope.txt"}), "--prune-vocab")
    assert_user_error(r, f"--vocab-data: no such file {workdir / 'nope.txt'}", exact=True)
    assert entries(workdir) == ["teacher"]


def test_bad_vocab_data_names_file_and_line(workdir, task_files):
    bad = workdir / "more.jsonl"
    bad.write_text('{"prompt": "a"}\n{"completion": "b"}\n')
    r = invoke(*distill_args(workdir, task_files, **{"--vocab-data": bad}), "--prune-vocab")
    assert_user_error(r, f"{bad}:2: expected a JSON object with a string 'prompt'", exact=True)
    assert entries(workdir) == ["more.jsonl", "teacher"]


def test_unknown_quant_type_lists_valid_ones(workdir):
    r = invoke("export", workdir / "teacher", "--target", "gguf", "--quant", "Q9_X", "--out", workdir / "q")
    assert_user_error(r, "unknown quant type 'Q9_X'")
    assert "Q4_K_M" in r.stderr and "Q8_0" in r.stderr
    assert entries(workdir) == ["teacher"]


def test_export_output_exists(workdir):
    (workdir / "q").mkdir()
    r = invoke("export", workdir / "teacher", "--target", "gguf", "--quant", "Q8_0", "--out", workdir / "q")
    assert_user_error(r, "already exists")


def test_export_of_a_non_model(workdir):
    r = invoke("export", workdir / "nothing", "--target", "gguf", "--out", workdir / "q")
    assert_user_error(r, "student folder")
    assert entries(workdir) == ["teacher"]


def test_eval_bad_data(workdir):
    bad = workdir / "bad.jsonl"
    bad.write_bytes(b"\xff\xfe\n")
    r = invoke("eval", workdir / "teacher", "--data", bad)
    assert_user_error(r, f"{bad}:1: not UTF-8")


def test_run_on_missing_artifact(workdir):
    r = invoke("run", workdir / "missing", "hello")
    assert_user_error(r, "no such file or folder")


def test_usage_error_is_one_line(workdir):
    r = invoke("distill", "--teacher", workdir / "teacher")
    assert_user_error(r, "Missing option")


def test_debug_env_shows_the_traceback(workdir, task_files, monkeypatch):
    from shrink.errors import ModelError

    monkeypatch.setenv("SHRINK_DEBUG", "1")
    with pytest.raises(ModelError):
        invoke(*distill_args(workdir, task_files, **{"--teacher": workdir / "nope"}))


def test_every_command_has_help_with_an_example():
    for name, command in cli.commands.items():
        r = invoke(name, "--help")
        assert r.exit_code == 0
        assert command.help and "Example" in command.help, name
