"""Every bad input: one `Error: ...` line on stderr, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from shrink.cli import cli
from shrink.quantize.gguf_types import QUANT_TYPES


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_user_error(result, message: str):
    """Exit code 2, and stderr is one line: exactly `Error: {message}`."""
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [f"Error: {message}"], result.stderr
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
    assert_user_error(r, f"teacher folder {workdir / 'teacher'} has no config.json")
    assert entries(workdir) == ["teacher"]


def test_teacher_without_safetensors(workdir, task_files):
    (workdir / "teacher" / "model.safetensors").rename(workdir / "teacher" / "pytorch_model.bin")
    r = invoke(*distill_args(workdir, task_files))
    assert_user_error(r, f"teacher folder {workdir / 'teacher'} has no .safetensors weights (only pickle weights "
                         "found; shrink loads safetensors only)")
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
    assert_user_error(r, f"output folder {workdir / 'student'} already exists (use --force to replace it)")
    assert entries(workdir / "student") == []


def test_steps_and_epochs_together(workdir, task_files):
    r = invoke(*distill_args(workdir, task_files, **{"--epochs": 1}))
    assert_user_error(r, "--steps and --epochs cannot be used together")


def test_resume_without_checkpoint(workdir, task_files):
    r = invoke(*distill_args(workdir, task_files) + ["--resume"])
    assert_user_error(r, f"--resume: no checkpoint at {workdir / 'student.checkpoint'}")
    assert entries(workdir) == ["teacher"]


def test_vocab_data_without_prune_vocab(workdir, task_files):
    words = workdir / "words.txt"
    words.write_text("more text\n")
    r = invoke(*distill_args(workdir, task_files, **{"--vocab-data": words}))
    assert_user_error(r, "--vocab-data: only with --prune-vocab (it chooses the tokens a pruned vocabulary keeps)")
    assert entries(workdir) == ["teacher", "words.txt"]


def test_missing_vocab_data_file(workdir, task_files):
    r = invoke(*distill_args(workdir, task_files, **{"--vocab-data": workdir / "nope.txt"}), "--prune-vocab")
    assert_user_error(r, f"--vocab-data: no such file {workdir / 'nope.txt'}")
    assert entries(workdir) == ["teacher"]


def test_bad_vocab_data_names_file_and_line(workdir, task_files):
    bad = workdir / "more.jsonl"
    bad.write_text('{"prompt": "a"}\n{"completion": "b"}\n')
    r = invoke(*distill_args(workdir, task_files, **{"--vocab-data": bad}), "--prune-vocab")
    assert_user_error(r, f"{bad}:2: expected a JSON object with a string 'prompt'")
    assert entries(workdir) == ["more.jsonl", "teacher"]


def test_unknown_quant_type_lists_valid_ones(workdir):
    r = invoke("export", workdir / "teacher", "--target", "gguf", "--quant", "Q9_X", "--out", workdir / "q")
    assert_user_error(r, f"unknown quant type 'Q9_X'; valid: {', '.join(QUANT_TYPES)}")
    assert "Q4_K_M" in r.stderr and "Q8_0" in r.stderr
    assert entries(workdir) == ["teacher"]


def test_export_output_exists(workdir):
    (workdir / "q").mkdir()
    r = invoke("export", workdir / "teacher", "--target", "gguf", "--quant", "Q8_0", "--out", workdir / "q")
    assert_user_error(r, f"output folder {workdir / 'q'} already exists (use --force to replace it)")


def test_export_of_a_non_model(workdir):
    r = invoke("export", workdir / "nothing", "--target", "gguf", "--out", workdir / "q")
    assert_user_error(r, f"student folder {workdir / 'nothing'} does not exist")
    assert entries(workdir) == ["teacher"]


def test_eval_bad_data(workdir):
    bad = workdir / "bad.jsonl"
    bad.write_bytes(b"\xff\xfe\n")
    r = invoke("eval", workdir / "teacher", "--data", bad)
    assert_user_error(r, f"{bad}:1: not UTF-8 (invalid start byte at byte 0)")


def test_run_on_missing_artifact(workdir):
    r = invoke("run", workdir / "missing", "hello")
    assert_user_error(r, f"{workdir / 'missing'}: no such file or folder")


def test_usage_error_is_one_line(workdir):
    r = invoke("distill", "--teacher", workdir / "teacher")
    assert_user_error(r, "Missing option '--data'.")


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


# -- bad teachers and task files -----------------------------------------------------------


def test_truncated_safetensors_names_the_file(workdir, task_files):
    weights = workdir / "teacher" / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size - 1000)
    r = invoke(*distill_args(workdir, task_files))
    message = (f"{weights}: not a valid safetensors file (truncated: {size - 1000:,} bytes, where its "
               f"header describes {size:,}); copy or download it again")
    assert_user_error(r, message)
    assert entries(workdir) == ["teacher"]
    r = invoke("run", workdir / "teacher", "Review:")  # the same check before any runtime loads it
    assert_user_error(r, message)


def test_corrupt_safetensors_header(workdir, task_files):
    weights = workdir / "teacher" / "model.safetensors"
    weights.write_bytes((40).to_bytes(8, "little") + b"{not json" + b"\0" * 100)
    r = invoke(*distill_args(workdir, task_files))
    assert_user_error(r, f"{weights}: not a valid safetensors file (its header is not JSON); copy or download it again")
    assert entries(workdir) == ["teacher"]


def test_custom_code_config_is_refused(workdir, task_files):
    config_file = workdir / "teacher" / "config.json"
    config = json.loads(config_file.read_text())
    config.update(model_type="my_llama", auto_map={"AutoConfig": "configuration_my.MyConfig",
                                                   "AutoModelForCausalLM": "modeling_my.MyForCausalLM"})
    config_file.write_text(json.dumps(config))
    r = invoke(*distill_args(workdir, task_files))
    assert_user_error(r, f"{config_file}: model_type 'my_llama' is not built into transformers; it needs the custom "
                         "code its auto_map names (AutoConfig, AutoModelForCausalLM), and shrink does not run code "
                         "from model folders")
    assert entries(workdir) == ["teacher"]


def test_empty_prompt_names_file_and_line(workdir, task_files):
    bad = workdir / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": " b"}\n{"prompt": "", "completion": " b"}\n')
    r = invoke(*distill_args(workdir, task_files, **{"--data": bad}))
    assert_user_error(r, f"{bad}:2: 'prompt' is empty")
    r = invoke("eval", workdir / "teacher", "--data", bad)
    assert_user_error(r, f"{bad}:2: 'prompt' is empty")
    assert entries(workdir) == ["bad.jsonl", "teacher"]


# -- shrink run: the context ------------------------------------------------------------------

LONG_PROMPT = "Review: the phone was great and the hotel room was lovely " * 40 + "\nSentiment:"


def test_run_refuses_a_prompt_longer_than_the_context(workdir):
    """torch: the context is the model's max_position_embeddings (256 in the tiny teacher)."""
    from shrink.runtime.torch_runtime import TorchRuntime

    n = len(TorchRuntime(workdir / "teacher", device="cpu").encode(LONG_PROMPT))
    assert n > 256
    r = invoke("run", workdir / "teacher", LONG_PROMPT, "--max-tokens", "4", "--device", "cpu")
    assert_user_error(r, f"the prompt is {n} tokens, too long for the context of 256 tokens (torch); shorten it, "
                         "or pass --truncate to keep its last 251 tokens")
    assert r.stdout == ""


def test_run_truncate_keeps_the_end_of_the_prompt(workdir):
    from shrink.runtime.torch_runtime import TorchRuntime

    rt = TorchRuntime(workdir / "teacher", device="cpu")
    ids = rt.encode(LONG_PROMPT)
    expected = rt.generate(ids[:1] + ids[-251:], 4)  # BOS, then the last 251 tokens
    r = invoke("run", workdir / "teacher", LONG_PROMPT, "--max-tokens", "4", "--device", "cpu", "--truncate")
    assert r.exit_code == 0, r.output
    assert r.stderr == (f"note: the prompt ({len(ids)} tokens) was cut to its last 251 tokens, to leave 4 tokens "
                        "of the context (256) for the output\n")
    assert r.stdout == expected + "\n" and expected.strip()


def test_run_refuses_a_prompt_longer_than_llama_cpp_context(workdir):
    """llama.cpp printed nothing and exited 0: its n_ctx (2048 by default) is refused the same way."""
    from shrink.export.gguf_convert import convert_hf_to_gguf
    from shrink.runtime.llama_cpp import LlamaCppRuntime

    gguf_file = workdir / "teacher.gguf"
    convert_hf_to_gguf(workdir / "teacher", gguf_file, "f16")
    prompt = LONG_PROMPT * 8
    with LlamaCppRuntime(gguf_file, threads=2, n_ctx=64) as rt:
        n = len(rt.encode(prompt))
    assert n > 2048
    r = invoke("run", gguf_file, prompt, "--max-tokens", "4", "--threads", "2")
    assert_user_error(r, f"the prompt is {n} tokens, too long for the context of 2048 tokens (llama.cpp); shorten it, "
                         "or pass --truncate to keep its last 2043 tokens")
    r = invoke("run", gguf_file, prompt, "--max-tokens", "4", "--threads", "2", "--truncate")
    assert r.exit_code == 0 and r.stdout.strip(), r.output
    assert r.stderr.startswith(f"note: the prompt ({n} tokens) was cut to its last 2043 tokens")


def test_run_refuses_an_empty_prompt_without_bos(workdir):
    tok_config = workdir / "teacher" / "tokenizer_config.json"
    tok_config.write_text(json.dumps({**json.loads(tok_config.read_text()), "add_bos_token": False}))
    tokenizer_json = workdir / "teacher" / "tokenizer.json"
    spec = json.loads(tokenizer_json.read_text())
    spec["post_processor"] = None  # the template that adds BOS
    tokenizer_json.write_text(json.dumps(spec))
    r = invoke("run", workdir / "teacher", "", "--device", "cpu")
    assert_user_error(r, "the prompt is empty and the tokenizer adds no BOS token: there is no token to predict from")


# -- a full disk: one line, exit 2, nothing half-written -------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs to write on; skipped where mounting is not permitted (needs root)."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command to make a small tmpfs")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip() or 'mount failed'}); needs root")
    try:
        yield disk
    finally:
        busy = subprocess.run(["umount", str(disk)], capture_output=True, text=True).returncode != 0
        if busy:
            subprocess.run(["umount", "-l", str(disk)], check=True)
    assert not busy, "a file on the small disk was left open"


NO_SPACE = "the partial files were removed (free some space, or write elsewhere)"


def assert_failed_midway(result, message: str):
    """A failure after the work started: its progress lines, then exactly `Error: {message}`."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == f"Error: {message}", result.stderr
    assert sum(line.startswith("Error:") for line in lines) == 1 and "Traceback" not in result.output


def test_full_disk_while_writing_a_checkpoint(workdir, task_files, small_disk):
    out = small_disk / "student"
    r = invoke(*distill_args(workdir, task_files, **{"--out": out}))
    assert_failed_midway(r, f"no space left on device while writing the checkpoint {out}.checkpoint; {NO_SPACE}")
    assert entries(small_disk) == []


def test_full_disk_while_writing_an_export(workdir, small_disk):
    out = small_disk / "q"
    r = invoke("export", workdir / "teacher", "--target", "gguf", "--quant", "F16", "--out", out)
    assert_failed_midway(r, f"no space left on device while writing the output folder {out}; {NO_SPACE}")
    assert entries(small_disk) == []


def test_full_disk_while_writing_the_student(workdir, task_files, monkeypatch):
    """The student's weights hit a full disk halfway: its staging folder goes; the
    checkpoint written before stays, for --resume once there is space."""
    import errno

    from transformers import PreTrainedModel

    def full(self, folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    out = workdir / "student"
    r = invoke(*distill_args(workdir, task_files))
    assert_failed_midway(r, f"no space left on device while writing the student {out}; {NO_SPACE}")
    assert entries(workdir) == ["student.checkpoint", "teacher"]


def test_full_disk_anywhere_else_is_one_line(workdir, monkeypatch):
    """The CLI's last resort, for a write no shrink writer wraps."""
    import errno

    import shrink.evaluate

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/somewhere/file")

    monkeypatch.setattr(shrink.evaluate, "evaluate_path", full)
    data = workdir / "data.jsonl"
    data.write_text('{"prompt": "a", "completion": " b"}\n')
    r = invoke("eval", workdir / "teacher", "--data", data)
    assert_user_error(r, "no space left on device while writing /somewhere/file (OSError: [Errno 28] No space left "
                         "on device: '/somewhere/file')")
