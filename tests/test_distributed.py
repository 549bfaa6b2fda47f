"""Distillation under torchrun, on the CPU: two processes on the gloo backend over loopback.

The same global batches split over two processes must give the loss curve and the weights
of one process: each rank weighs its mean loss by its share of the batch's completion
positions, and DDP (or FSDP) averages the gradients. Rank 0 alone writes checkpoints and
the student. Kept small (the tiny teacher, 2 layers, 10 steps); every child process runs
with OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shrink.distill.train import DistillConfig, checkpoint_dir, distill

STEPS, BATCH = 10, 8
# Measured on 2 CPU processes (gloo): the logged losses (5 decimals) equal the single
# process's at every step, with DDP and with FSDP; the final weights are within 2.4e-6
# (max abs difference) with DDP and 4.7e-5 with FSDP, stopped at step 8 and resumed.
LOSS_RTOL = 1e-3
DDP_ATOL = 1e-4
FSDP_ATOL = 2e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", CUDA_VISIBLE_DEVICES="")
    return env


def config(teacher, data, out, **kw) -> DistillConfig:
    return DistillConfig(teacher=teacher, data=data, out=out, layers=2, steps=STEPS, batch_size=BATCH, lr=1e-3,
                         save_every=5, device="cpu", **kw)


@pytest.fixture(scope="module")
def single(teacher, task_files, tmp_path_factory) -> Path:
    """The reference: one process, the same settings."""
    out = tmp_path_factory.mktemp("single") / "student"
    distill(config(teacher, task_files["train"], out))
    return out


def losses(folder: Path) -> list[float]:
    return [h["loss"] for h in json.loads((folder / "training_log.json").read_text())]


def max_weight_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert sorted(wa) == sorted(wb)
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def test_torchrun_two_processes_match_one(single, teacher, task_files, tmp_path):
    """`python -m torch.distributed.run --nproc_per_node 2 -m shrink distill ...` unchanged."""
    out, logs = tmp_path / "student", tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "--tee", "3", "--log-dir", str(logs), "-m", "shrink", "distill",
           "--teacher", str(teacher), "--data", str(task_files["train"]), "--out", str(out), "--layers", "2",
           "--steps", str(STEPS), "--batch-size", str(BATCH), "--lr", "1e-3", "--save-every", "5",
           "--device", "cpu", "--json"]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    a, b = losses(single), losses(out)
    assert len(a) == len(b) == STEPS
    for x, y in zip(a, b):
        assert y == pytest.approx(x, rel=LOSS_RTOL)
    assert max_weight_diff(single, out) < DDP_ATOL

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["train_processes"] == 2
    # Rank 0 alone wrote: the student and no leftovers (checkpoint removed, no partial folders).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "student"]
    assert not checkpoint_dir(out).exists()
    rank_out = {r: (next(logs.rglob(f"attempt_0/{r}/stdout.log")).read_text(),
                    next(logs.rglob(f"attempt_0/{r}/stderr.log")).read_text()) for r in (0, 1)}
    assert json.loads(rank_out[0][0])["kind"] == "student"  # --json: the manifest, once, from rank 0
    assert rank_out[1][0] == ""  # rank 1 printed nothing on stdout ...
    assert "distilling" in rank_out[0][1] and "distilling" not in rank_out[1][1]  # ... nor a progress bar


def _worker(rank: int, world: int, port: int, cfg: DistillConfig, log_dir: str, crash_at: int | None) -> None:
    """One torchrun-like process: torchrun's variables, then the library. Records which
    rank wrote checkpoints and output folders; with `crash_at`, every rank stops at that
    step as a killed job would."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import shrink.artifact as artifact
    import shrink.distill.checkpoint as checkpoint
    import shrink.distill.train as train

    def recorded(name, fn):
        def wrapper(*args, **kwargs):
            with open(Path(log_dir) / f"{name}-rank{rank}", "a") as f:
                f.write("x")
            return fn(*args, **kwargs)
        return wrapper

    checkpoint.save_checkpoint = recorded("checkpoint", checkpoint.save_checkpoint)
    artifact.staged_folder = recorded("output", artifact.staged_folder)
    if crash_at is not None:
        real, calls = train.distill_loss, {"n": 0}

        def crash(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == crash_at:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        train.distill_loss = crash
    try:
        train.distill(cfg)
    except KeyboardInterrupt:
        pass


def spawn(cfg: DistillConfig, log_dir: Path, crash_at: int | None = None) -> None:
    import torch.multiprocessing as mp

    old = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")}
    os.environ.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    try:
        mp.spawn(_worker, args=(2, free_port(), cfg, str(log_dir), crash_at), nprocs=2, join=True)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_fsdp_resume_under_two_processes(single, teacher, task_files, tmp_path):
    """FSDP: a run stopped after its step-5 checkpoint, resumed by two processes, ends with
    the single process's weights; only rank 0 wrote the checkpoint and the student."""
    out, log_dir = tmp_path / "student", tmp_path / "writes"
    log_dir.mkdir()
    spawn(config(teacher, task_files["train"], out, fsdp=True), log_dir, crash_at=8)
    assert not out.exists() and checkpoint_dir(out).exists()
    assert json.loads((checkpoint_dir(out) / "state.json").read_text())["step"] == 5

    spawn(config(teacher, task_files["train"], out, fsdp=True, resume=True), log_dir)
    assert sorted(p.name for p in log_dir.iterdir()) == ["checkpoint-rank0", "output-rank0"]
    assert (log_dir / "checkpoint-rank0").read_text() == "xx"  # at step 5, and at step 10 after resuming
    for x, y in zip(losses(single), losses(out)):
        assert y == pytest.approx(x, rel=LOSS_RTOL)
    assert max_weight_diff(single, out) < FSDP_ATOL
    assert not checkpoint_dir(out).exists()


def test_teacher_cache_shards_under_torchrun(teacher, task_files, tmp_path):
    """Each process runs the teacher on its part of the data and writes its own shard;
    rank 0 writes the manifest. Read back, the shards give what one process computes."""
    from shrink.distill.teacher_cache import CacheConfig, CachedTeacher, build_cache

    one = tmp_path / "one"
    build_cache(CacheConfig(teacher=teacher, data=task_files["train"], out=one, top_k=16, device="cpu"))
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "shrink", "teacher-cache", "--teacher", str(teacher),
           "--data", str(task_files["train"]), "--out", str(two), "--top-k", "16", "--device", "cpu", "--json"]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads(proc.stdout)  # printed once, by rank 0
    assert manifest["settings"]["shards"] == ["part-00000-of-00002.safetensors", "part-00001-of-00002.safetensors"]
    assert sorted(manifest["files"]) == manifest["settings"]["shards"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no partial folder left

    counts = [2] * 600  # each example: its label token and EOS
    a, b = CachedTeacher(one, counts, "cpu"), CachedTeacher(two, counts, "cpu")
    for i in (0, 299, 300, 599):  # both sides of the shard boundary
        torch.testing.assert_close(a[i], b[i], atol=2e-3, rtol=0)


def test_ddp_trains_only_the_norms_as_one_process_does(teacher, task_files, tmp_path):
    """--trainable norms under DDP: the frozen weights stay the teacher's on every rank (DDP
    is built after they stop requiring gradients) and the norms end where one process
    puts them."""
    one, two = tmp_path / "one", tmp_path / "two"
    distill(config(teacher, task_files["train"], one, trainable="norms"))
    (tmp_path / "writes").mkdir()
    spawn(config(teacher, task_files["train"], two, trainable="norms"), tmp_path / "writes")
    for x, y in zip(losses(one), losses(two)):
        assert y == pytest.approx(x, rel=LOSS_RTOL)
    assert max_weight_diff(one, two) < DDP_ATOL


def test_gradual_pruning_under_two_processes_stopped_and_resumed(teacher, task_files, tmp_path):
    """--prune-gradually under DDP: each cut shrinks the weights DDP wrapped, so it wraps
    them again; a run stopped after its step-5 checkpoint (cut at steps 1-4, the scores
    gathered since the last cut in the checkpoint) and resumed by two processes cuts the
    same channels and ends with one process's weights."""
    one, two, writes = tmp_path / "one", tmp_path / "two", tmp_path / "writes"
    pruned = {"ffn_ratio": 0.5, "prune_gradually": True}
    distill(config(teacher, task_files["train"], one, **pruned))
    writes.mkdir()
    spawn(config(teacher, task_files["train"], two, **pruned), writes, crash_at=8)
    state = json.loads((checkpoint_dir(two) / "state.json").read_text())
    assert state["step"] == 5 and [e["step"] for e in state["gradual"]["log"]] == [1, 2, 3, 4]
    spawn(config(teacher, task_files["train"], two, resume=True, **pruned), writes)
    for x, y in zip(losses(one), losses(two)):
        assert y == pytest.approx(x, rel=LOSS_RTOL)
    assert max_weight_diff(one, two) < DDP_ATOL
    settings = [json.loads((d / "manifest.json").read_text())["settings"]["prune_gradually"] for d in (one, two)]
    assert settings[0] == settings[1] and settings[0][-1] == {"step": 6, "kept": 256}
