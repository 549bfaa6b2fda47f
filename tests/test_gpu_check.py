"""bench/gpu_check.sh on a machine without a GPU: its syntax, and the dry run, which checks
the arguments and imports, finds the teacher and prints every command it would run,
training nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"


def run(*args, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env_extra or {})}
    return subprocess.run(["bash", str(SCRIPT), "--python", sys.executable, *map(str, args)],
                          capture_output=True, text=True, timeout=120, env=env)


def fake_gguf(tmp_path: Path) -> Path:
    """The dry run reads a GGUF teacher's magic only."""
    path = tmp_path / "teacher.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    return path


def test_script_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_dry_run_prints_every_step_and_trains_nothing(tmp_path):
    teacher, work, results = fake_gguf(tmp_path), tmp_path / "work", tmp_path / "results"
    started = time.perf_counter()
    proc = run(teacher, "--dry-run", "--work", work, "--results", results)
    assert proc.returncode == 0, proc.stderr
    assert time.perf_counter() - started < 60  # measured 3 s idle, 17 s on a loaded 2-core machine
    err = proc.stderr
    assert "GPU: none (dry run" in err and f"teacher: {teacher}" in err
    lines = {line.split()[1].rstrip(":"): line for line in err.splitlines() if line.startswith("== ")}
    assert list(lines) == ["teacher", "demo_distill", "teacher_cache", "nccl", "torchrun_distill", "gptq"]
    data = work / "data"
    assert f"-m shrink distill --teacher {teacher} --data {data}/train.jsonl --eval {data}/test.jsonl" in lines["demo_distill"]
    assert "--epochs 12 " in lines["demo_distill"] and "--device cuda" in lines["demo_distill"]
    assert "-m shrink teacher-cache" in lines["teacher_cache"]
    assert "-m torch.distributed.run --standalone --nproc_per_node 1 bench/gpu_check.py nccl" in lines["nccl"]
    run_line = lines["torchrun_distill"]
    assert "--nproc_per_node 1 -m shrink distill" in run_line and "--on-policy 0.5" in run_line
    assert f"--teacher-cache {work}/teacher-cache" in run_line
    assert (f"-m shrink export {work}/student --target gptq" in lines["gptq"]
            or "skipped: GPTQ needs gptqmodel" in lines["gptq"])
    # Nothing trained or written but the task files.
    assert sorted(p.name for p in work.iterdir()) == ["data", "logs", "steps.tsv"]
    assert sorted(p.name for p in data.iterdir()) == ["dev.jsonl", "teacher_prefix.txt", "test.jsonl", "train.jsonl"]
    assert not results.exists()


def test_a_missing_package_skips_its_step(tmp_path):
    """GPTQModel hidden from the interpreter (a meta-path finder that refuses it): the gptq
    step is skipped with one line, the others are still run."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'gptqmodel':\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Hide())\n")
    proc = run(fake_gguf(tmp_path), "--dry-run", "--work", tmp_path / "work",
               env_extra={"PYTHONPATH": str(hide)})
    assert proc.returncode == 0, proc.stderr
    assert "gptq: missing gptqmodel" in proc.stderr
    assert ("== gptq: skipped: GPTQ needs gptqmodel and optimum (pip install 'shrink[gptq]')"
            in proc.stderr.splitlines())
    assert "== demo_distill (at most" in proc.stderr


def test_bad_arguments_are_one_error_line(tmp_path):
    for args, line in [
        (["--epochs", "0"], "Error: --epochs must be a positive number, got 0"),
        (["--nproc", "two"], "Error: --nproc must be a positive integer, got two"),
        (["--bogus"], "Error: unknown option --bogus (see --help)"),
        (["--work"], "Error: --work needs a value"),
        ([tmp_path / "a.gguf", tmp_path / "b.gguf"], f"Error: one teacher only (got {tmp_path}/a.gguf and {tmp_path}/b.gguf)"),
    ]:
        proc = run(*args, "--dry-run")
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.splitlines() == [line]

    not_gguf = tmp_path / "model.bin"
    not_gguf.write_bytes(b"PK\x03\x04")
    proc = run(not_gguf, "--dry-run", "--work", tmp_path / "work")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == f"Error: --teacher {not_gguf}: not a GGUF file (no GGUF magic)"


def test_without_a_gpu_a_real_run_stops_at_once(tmp_path):
    proc = run(fake_gguf(tmp_path), "--work", tmp_path / "work", "--results", tmp_path / "results")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].startswith("Error: no CUDA device")
    assert not (tmp_path / "results").exists()
