"""targets.toml: the shipped targets, the schema (every error at once, with file and key),
and `shrink targets`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from shrink.cli import cli
from shrink.targets import DEFAULT_FILE, TargetsError, load_targets

ROOT = Path(__file__).parent.parent


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "targets.toml"
    path.write_text(text)
    return path


def test_shipped_targets_are_valid_and_the_root_file_is_the_same():
    targets = load_targets()
    assert {"laptop", "phone", "cpu-server", "gpu-server"} <= set(targets)
    assert (ROOT / "targets.toml").read_bytes() == DEFAULT_FILE.read_bytes()
    assert targets["phone"].ladder()[0] == ("gguf", "Q6_K") and targets["phone"].imatrix
    assert targets["cpu-server"].formats == ("onnx",) and targets["gpu-server"].formats == ("gptq",)
    assert targets["gpu-server"].ladder() == [("gptq", "8bit"), ("gptq", "4bit")]
    text = DEFAULT_FILE.read_text()
    for name in targets:  # each shipped target says what device class it stands for
        block = text.split(f"[targets.{name}]")[1].split("[targets.")[0]
        assert block.lstrip().startswith("#"), name


def test_every_schema_error_is_reported_at_once(tmp_path):
    path = write(tmp_path, """
[targets.bad]
description = "x"
runtime = "llama.cpp"
formats = ["gguf", "onnx"]
quants = ["Q4_K_M", "Q9_Z"]
max_size_mb = "big"
min_retention = 1.5
threads = 0
colour = "red"

[targets.missing]
runtime = "tflite"
""")
    with pytest.raises(TargetsError) as e:
        load_targets(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: 10 problem(s): ")
    for part in ["targets.bad.colour: unknown key", "targets.bad.formats: 'onnx' is not served by runtime 'llama.cpp'",
                 "targets.bad.quants: 'Q9_Z' is not a quantization of gguf, onnx",
                 "targets.bad.max_size_mb: expected a non-negative number, got 'big'",
                 "targets.bad.min_retention: a fraction between 0 and 1, got 1.5",
                 "targets.bad.threads: expected a positive integer, got 0",
                 "targets.missing.description: missing", "targets.missing.formats: missing",
                 "targets.missing.quants: missing", "targets.missing.runtime: 'tflite' is not one of"]:
        assert part in msg, part


@pytest.mark.parametrize("text, message", [
    ("not toml [", "not valid TOML"),
    ("[other]\nx = 1\n", "unknown top-level key(s) other"),
    ("", "no [targets.NAME] tables"),
])
def test_file_level_errors(tmp_path, text, message):
    with pytest.raises(TargetsError) as e:
        load_targets(write(tmp_path, text))
    assert message in str(e.value)


def test_targets_command_lists_and_reports_errors(tmp_path):
    r = CliRunner().invoke(cli, ["targets", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["phone"]["constraints"]["max_size_mb"] == 600 and data["phone"]["runtime"] == "llama.cpp"
    r = CliRunner().invoke(cli, ["targets"])
    assert r.exit_code == 0 and "cpu-server" in r.stderr
    bad = write(tmp_path, "[targets.x]\ndescription = 'x'\n")
    r = CliRunner().invoke(cli, ["targets", "--targets", str(bad)])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.stderr.strip().splitlines() == [f"Error: {bad}: 3 problem(s): targets.x.formats: missing; "
                                             "targets.x.quants: missing; targets.x.runtime: missing"]
    r = CliRunner().invoke(cli, ["targets", "--targets", str(tmp_path / "none.toml")])
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == [f"Error: --targets: no such file {tmp_path / 'none.toml'}"]


def test_embedding_type_key(tmp_path):
    """`embedding_type` names a type llama-quantize can give the token embedding, for a
    GGUF target with a quantized rung; read case-insensitively, every misuse reported."""
    base = 'description = "x"\nruntime = "{runtime}"\nformats = ["{fmt}"]\nquants = {quants}\n'
    path = write(tmp_path, "[targets.ok]\n" + base.format(runtime="llama.cpp", fmt="gguf", quants='["Q4_K_M"]')
                 + 'embedding_type = "q4_0"\n')
    assert load_targets(path)["ok"].embedding_type == "Q4_0"
    assert load_targets(path)["ok"].to_dict()["embedding_type"] == "Q4_0"
    assert load_targets()["phone"].embedding_type is None  # the shipped targets leave llama.cpp's choice
    path = write(tmp_path, "[targets.unknown]\n" + base.format(runtime="llama.cpp", fmt="gguf", quants='["Q4_K_M"]')
                 + 'embedding_type = "Q9"\n'
                 + "[targets.onnx]\n" + base.format(runtime="onnxruntime", fmt="onnx", quants='["int8"]')
                 + 'embedding_type = "Q4_0"\n'
                 + "[targets.f16]\n" + base.format(runtime="llama.cpp", fmt="gguf", quants='["F16"]')
                 + 'embedding_type = "Q4_0"\n')
    with pytest.raises(TargetsError) as e:
        load_targets(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: 3 problem(s): ")
    for part in ["targets.unknown.embedding_type: expected one of F32, F16, BF16, Q8_0", "got 'Q9'",
                 "targets.onnx.embedding_type: only for a gguf target (this one is onnx)",
                 "targets.f16.embedding_type: no rung of quants is a quantized GGUF type (F16)"]:
        assert part in msg, part
