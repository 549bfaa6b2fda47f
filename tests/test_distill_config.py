"""One distill config: `shrink distill`'s options come from DistillConfig, `--config FILE`
reads the same fields (command-line options override it), and the student manifest's
settings are the config's."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from shrink.cli import cli
from shrink.distill.config import DistillConfig

EXAMPLE = Path(__file__).parents[1] / "examples" / "distill.toml"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_error_line(result, line: str):
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [f"Error: {line}"]


@pytest.fixture
def runs(monkeypatch):
    """The DistillConfig each `shrink distill` would train with (nothing is trained)."""
    seen = []
    monkeypatch.setattr("shrink.distill.train.distill", lambda cfg: seen.append(cfg))
    return seen


def test_options_are_the_fields():
    """Every option of `shrink distill` as it was before it came from DistillConfig."""
    command = cli.commands["distill"]
    assert [p.opts[0] for p in command.params if p.name not in ("config_file", "as_json")] == [
        "--teacher", "--data", "--eval", "--out", "--layers",
        "--max-size-mb", "--quant", "--embedding-type", "--for-target", "--targets",  # issue 15: size-budgeted students
        "--layer-selection", "--ffn-ratio", "--prune-gradually", "--ffn-refit", "--width-scores", "--heads-ratio",
        "--head-dim",  # issue 15: narrower heads
        "--hidden-size", "--hidden-ratio",  # issue 15: hidden-size pruning
        "--student", "--steps", "--epochs", "--batch-size", "--lr", "--temperature", "--alpha", "--loss", "--beta",
        "--loss-on", "--trainable", "--qat",  # issue 15
        "--hidden-weight", "--hidden-targets", "--on-policy", "--split-words", "--max-length", "--save-every", "--device", "--seed", "--teacher-prefix",
        "--metric", "--chat-template", "--prune-vocab", "--vocab-top",  # issue 14
        "--vocab-data", "--teacher-cache", "--fsdp", "--resume", "--force"]
    defaults = {p.name: p.default for p in command.params}
    assert defaults["epochs"] == 2.0 and defaults["lr"] == 2e-4 and defaults["layer_selection"] == "even"


def test_settings_keep_their_keys(tmp_path):
    cfg = DistillConfig(teacher=tmp_path / "t", data=tmp_path / "d.jsonl", out=tmp_path / "s", layers=2,
                        vocab_data=(tmp_path / "v.txt",))
    assert set(cfg.settings()) == {
        "teacher", "data", "eval_data", "layers", "layer_selection", "ffn_ratio", "heads_ratio", "student", "steps",
        "epochs", "batch_size", "lr", "temperature", "alpha", "loss", "beta", "hidden_weight", "max_length",
        "save_every", "seed", "teacher_prefix", "prune_vocab", "vocab_data", "teacher_cache",
        "metric", "chat_template", "vocab_top",  # issue 14
        "on_policy", "loss_on", "split_words",  # issue 15
        "max_size_mb", "quant", "embedding_type", "for_target", "targets_file", "hidden_size", "hidden_ratio",  # issue 15
        "trainable", "ffn_refit", "width_scores", "hidden_targets", "prune_gradually", "qat",  # issue 15
        "head_dim"}  # issue 15
    assert cfg.settings()["vocab_data"] == [str(tmp_path / "v.txt")]
    assert set(cfg.to_dict()) - set(cfg.settings()) == {"out", "device", "fsdp", "resume", "force", "teacher_memory_mb"}
    assert DistillConfig.from_dict(cfg.to_dict()) == cfg  # back from JSON


def test_config_file_values_and_command_line_overrides(tmp_path, monkeypatch, runs):
    (tmp_path / "conf").mkdir()
    toml = tmp_path / "conf" / "distill.toml"
    toml.write_text(f'teacher = "{tmp_path / "abs-teacher"}"\ndata = "train.jsonl"\nout = "../student"\n'
                    'layers = 3\nepochs = 3\nbatch_size = 4\nlr = 1e-3\nloss = "jsd"\nprune_vocab = true\n'
                    'vocab_data = ["a.txt", "b.txt"]\n')
    monkeypatch.chdir(tmp_path)  # relative paths in the file are the file's folder's, not the working folder's
    r = invoke("distill", "--config", "conf/distill.toml", "--layers", 2, "--steps", 5, "--eval", "eval.jsonl")
    assert r.exit_code == 0, r.output
    cfg, conf = runs[0], Path("conf")  # the file's folder, as --config gave it
    assert cfg.teacher == tmp_path / "abs-teacher" and cfg.data == conf / "train.jsonl" and cfg.out == conf / "../student"
    assert cfg.vocab_data == (conf / "a.txt", conf / "b.txt")
    assert (cfg.batch_size, cfg.lr, cfg.loss, cfg.prune_vocab) == (4, 1e-3, "jsd", True)  # from the file
    assert (cfg.layers, cfg.steps, cfg.eval_data) == (2, 5, Path("eval.jsonl"))  # the command line's
    assert cfg.epochs == 2.0  # --steps replaced the file's length of training
    assert (cfg.temperature, cfg.device) == (2.0, "auto")  # set nowhere: the defaults

    r = invoke("distill", "--config", toml, "--batch-size", 8, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert (runs[1].batch_size, runs[1].device, runs[1].epochs, runs[1].steps) == (8, "cpu", 3.0, None)


def test_config_file_problems_all_at_once(tmp_path, runs):
    toml = tmp_path / "distill.toml"
    toml.write_text('teacher = "t"\nlerning_rate = 0.1\nbatch-size = 4\nlayers = "4"\nloss = "kl"\n'
                    'prune_vocab = 1\nvocab_data = "words.txt"\nsteps = 10\nepochs = 1\n[student]\npath = "s"\n')
    r = invoke("distill", "--config", toml, "--data", "d.jsonl", "--out", "s")
    assert_error_line(r, f"{toml}: 8 problem(s): unknown key 'lerning_rate'; unknown key 'batch-size' "
                         "(did you mean batch_size?); layers: expected an integer, got '4'; "
                         "loss: expected one of fkl, rkl, jsd, skl, got 'kl'; prune_vocab: expected true or false, got 1; "
                         "vocab_data: expected a list of paths, got 'words.txt'; student: expected a path (a string), "
                         "got {'path': 's'}; steps and epochs cannot be used together")
    assert not runs


def test_config_file_errors(tmp_path, runs):
    assert_error_line(invoke("distill", "--config", tmp_path / "nope.toml"), f"--config: no such file {tmp_path / 'nope.toml'}")
    bad = tmp_path / "bad.toml"
    bad.write_text("layers = \n")
    r = invoke("distill", "--config", bad)
    assert r.exit_code == 2 and r.stderr.startswith(f"Error: {bad}: not valid TOML (")
    partial = tmp_path / "partial.toml"
    partial.write_text('teacher = "t"\ndata = "d.jsonl"\n')
    assert_error_line(invoke("distill", "--config", partial), "Missing option '--out'.")
    assert_error_line(invoke("distill", "--config", partial, "--out", "s", "--steps", 1, "--epochs", 1),
                      "--steps and --epochs cannot be used together")
    assert not runs


def test_example_config_trains_and_the_manifest_settings_are_the_config(teacher, task_files, tmp_path, monkeypatch):
    """examples/distill.toml, beside a teacher and task data, with a quick run's overrides;
    the student manifest's settings hold the config's settings as they are."""
    import shrink.distill.train as train
    import tiny

    shutil.copy(EXAMPLE, tmp_path / "distill.toml")
    shutil.copytree(teacher, tmp_path / "teacher")
    shutil.copy(task_files["train"], tmp_path / "train.jsonl")
    tiny.write_jsonl(tmp_path / "eval.jsonl", tiny.toy_examples(8, seed=5))
    used, real = [], train.distill
    monkeypatch.setattr(train, "distill", lambda cfg: used.append(cfg) or real(cfg))
    monkeypatch.chdir(tmp_path.parent)
    r = invoke("distill", "--config", tmp_path / "distill.toml", "--layers", 2, "--steps", 2, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    from shrink.manifest import Manifest

    settings = Manifest.read(tmp_path / "student").settings
    cfg = used[0]
    assert {k: settings[k] for k in cfg.settings()} == cfg.settings()
    assert settings["teacher"] == str(tmp_path / "teacher") and settings["layer_selection"] == "importance"
    assert (settings["layers"], settings["steps"], settings["batch_size"]) == (2, 2, 16)
    assert settings["layers_kept"] == [0, 3]
