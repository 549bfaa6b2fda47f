"""Scale-out under torchrun: one process per device, each reading its share of every batch.

    torchrun --nproc_per_node 4 -m shrink distill --teacher ./teacher --data train.jsonl ...

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR/PORT) for every process it
starts. When they say there is more than one process, `process_group` joins them (NCCL on
CUDA, gloo on the CPU), pins each process to the GPU of its LOCAL_RANK and silences the
console of every rank but 0. Without them everything here is a no-op, and a single
process runs exactly as before.

Each global batch (`--batch-size` rows, in the same order as a single process reads
them) is split across the ranks: rank r takes rows r, r + W, r + 2W, ... The loss is a
mean over the batch's loss positions, so each rank scales its own mean by its share of
those positions (`Shard.weight`); DDP averages gradients over the W ranks, so the
gradient is that of the global mean, as in one process. The same weights give the
global loss for the log. The divergence and the hidden-state term are means over the
loss positions; the cross-entropy is a mean over the completion positions, which with
`--loss-on all` are fewer, so it is scaled once more by the rank's share of those
(`Shard.ce_scale`, 1 when the two sets are one).

The student is wrapped in DDP by default, or sharded with FSDP2 (`fully_shard`, per
decoder layer and over the whole) with `--fsdp`: every rank then holds a slice of the
weights, gradients and AdamW state. Checkpoints are written by rank 0 alone, in the
single-process format (full weights, optimizer state by parameter index), so a run can be
resumed with another number of processes or without torchrun; under FSDP the full state
is gathered for it, and every rank loads it back on `--resume`.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shrink.errors import ShrinkError

# How long a rank waits at a collective (a barrier while rank 0 evaluates and writes the
# student) before the job is declared hung.
TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0  # this process, 0 .. world_size - 1
    world_size: int = 1  # processes in the job, over every node
    local_rank: int = 0  # this process on its node: the GPU it uses

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that shows progress and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()


def launched_by_torchrun() -> bool:
    """torchrun (or any launcher using its variables) started this process with others."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def current() -> Ranks:
    """This process's place in the job: from the process group when there is one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(rank=dist.get_rank(), world_size=dist.get_world_size(),
                 local_rank=int(os.environ.get("LOCAL_RANK", "0")))


@contextlib.contextmanager
def process_group(device: str) -> Iterator[Ranks]:
    """Join the torchrun job for the duration of the block and leave it cleanly, also on
    errors (destroy_process_group). A group the caller already set up is used as it is
    and left to the caller. `device` is distill's --device: auto | cpu | cuda."""
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        yield current()
        return
    if not launched_by_torchrun():
        yield Ranks()
        return
    from shrink.console import console
    from shrink.hf import resolve_device

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_cuda = resolve_device(device) == "cuda"
    if on_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ShrinkError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) here; "
                              f"start at most that many processes per node")
        torch.cuda.set_device(local_rank)  # "cuda" now means this process's GPU
    dist.init_process_group("nccl" if on_cuda else "gloo", timeout=TIMEOUT)
    ranks = current()
    quiet = console.quiet
    console.quiet = not ranks.is_main  # one progress display for the job
    previous = _exit_on_sigterm()
    try:
        yield ranks
    finally:
        console.quiet = quiet
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        dist.destroy_process_group()


def _exit_on_sigterm():
    """torchrun stops the other workers with SIGTERM when one fails. Turn it into SystemExit
    so that `finally` blocks run: partial output folders are removed and the process
    group is destroyed. Returns the previous handler (None when not in the main thread)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, stop)


def main_first(ranks: Ranks, fn, *args):
    """Run `fn` on rank 0 first, then on the others (checks, and a cache filled once and
    then read). When it fails on rank 0, which reports why, the others exit with the
    same code instead of waiting for it."""
    if not ranks.enabled:
        return fn(*args)
    import torch.distributed as dist

    if ranks.is_main:
        try:
            out = fn(*args)
        except BaseException as e:
            dist.broadcast_object_list([getattr(e, "exit_code", 1)], src=0)
            raise
        dist.broadcast_object_list([None], src=0)
        return out
    box = [None]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise SystemExit(box[0])
    return fn(*args)


@dataclass(frozen=True)
class Shard:
    rows: list[int]  # the examples this rank computes (one with weight 0 when it has none)
    weight: float  # the rank's share of the batch's loss positions, times the world size
    ce_scale: float = 1.0  # its share of the completion positions over its share of the loss positions


def shard(ranks: Ranks, rows: list[int], positions: list[int], completions: list[int] | None = None) -> Shard:
    """This rank's rows of a global batch and the weight of its loss. `positions[i]` is
    the number of loss positions of rows[i], `completions[i]` how many of them are
    completion positions (all of them when not given). With W ranks and N positions in
    the batch, a rank holding n of them weighs its mean loss by n * W / N: DDP's average
    of the W gradients is then the gradient of the batch's mean, exactly as one process
    takes it. A term that is a mean over the C completion positions, c of them this
    rank's, is multiplied by ce_scale = (c / C) / (n / N) first, for the same result."""
    if not ranks.enabled:
        return Shard(list(rows), 1.0)
    mine = list(range(ranks.rank, len(rows), ranks.world_size))
    total = sum(positions)
    if not mine:  # a last batch smaller than the world: run one row for nothing, so every
        return Shard([rows[0]], 0.0)  # rank still takes part in the gradient all-reduce
    n = sum(positions[i] for i in mine)
    ce_scale = 1.0
    if completions is not None and completions != positions:
        ce_scale = (sum(completions[i] for i in mine) / sum(completions)) / (n / total)
    return Shard([rows[i] for i in mine], n * ranks.world_size / total, ce_scale)


def global_mean(ranks: Ranks, weight: float, *values):
    """The batch's values (0-d tensors: loss terms, means over this rank's positions) as
    one process would log them: the weighted mean over the ranks, as detached 0-d
    tensors. In a single process the values come back as they are."""
    if not ranks.enabled:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(v.detach()) * weight / ranks.world_size for v in values], dtype=torch.float64,
                     device=values[0].device)
    dist.all_reduce(t)
    return tuple(t.unbind())


class StudentStep:
    """The student as the training step runs it. Calling it with a function of the model,
    `step(selected_logits, ids, attn, mask)`, runs `fn(student, ...)` inside one module's
    forward: that is where DDP prepares its gradient all-reduce and FSDP gathers the
    weights, and it lets the step reach the model's parts (its base model, its head)
    rather than only its own forward."""

    def __init__(self, student, ranks: Ranks, fsdp: bool, device: str):
        import torch

        self.student, self.ranks, self.fsdp = student, ranks, fsdp and ranks.enabled
        module = _call_module(student)
        self.shadow = None  # FSDP: a full copy on the CPU to load and save checkpoints with
        if not ranks.enabled:
            self.module = module
        elif self.fsdp:
            from torch.distributed.fsdp import fully_shard

            self.shadow = copy.deepcopy(student).to("cpu")
            for layer in getattr(student.base_model, "layers", []):
                fully_shard(layer)
            fully_shard(module)
            self.module = module
        else:
            from torch.nn.parallel import DistributedDataParallel

            ids = [torch.cuda.current_device()] if device == "cuda" else None
            self.module = DistributedDataParallel(module, device_ids=ids)

    def __call__(self, fn, *args):
        return self.module(fn, *args)

    def reshaped(self) -> None:
        """After weights of the student changed shape (--prune-gradually's cuts): DDP
        sizes its gradient buckets when it wraps the model, so it wraps it again (every
        process made the same cut). FSDP is refused with those cuts; alone, nothing to do."""
        if not self.ranks.enabled or self.fsdp:
            return
        import gc

        import torch
        from torch.nn.parallel import DistributedDataParallel

        module = self.module.module
        self.module = None
        gc.collect()  # the old wrapper's reducer, and its hooks on the weights, go with it
        ids = [torch.cuda.current_device()] if next(module.parameters()).is_cuda else None
        self.module = DistributedDataParallel(module, device_ids=ids)

    def parameters(self):
        return self.student.parameters()

    def save_checkpoint(self, folder: Path, optimizer, state: dict[str, Any]) -> None:
        """Rank 0 writes the checkpoint; under FSDP every rank takes part in gathering it."""
        from shrink.distill.checkpoint import save_checkpoint

        if not self.fsdp:
            if self.ranks.is_main:
                save_checkpoint(folder, self.student, optimizer, state)
            return
        model, opt = self._gathered(optimizer)
        if self.ranks.is_main:
            save_checkpoint(folder, model, opt, state)

    def load_checkpoint(self, folder: Path, optimizer) -> dict[str, Any]:
        """Every rank reads the checkpoint rank 0 wrote."""
        from shrink.distill.checkpoint import load_checkpoint

        if not self.fsdp:
            return load_checkpoint(folder, self.student, optimizer)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opt = _like_optimizer(optimizer, self.shadow)
        state = load_checkpoint(folder, self.shadow, opt)
        names = self._names()
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.module, {f"model.{k}": v for k, v in self.shadow.state_dict().items()}, options=full)
        sd = opt.state_dict()
        osd = {"state": {names[i]: v for i, v in sd["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]}
        set_optimizer_state_dict(self.module, optimizer, osd, options=full)
        return state

    def final_model(self):
        """The trained student with its full weights, on rank 0 (None elsewhere). Under
        FSDP every rank takes part in gathering it."""
        if not self.fsdp:
            return self.student if self.ranks.is_main else None
        model, _ = self._gathered(None)
        return model if self.ranks.is_main else None

    def _names(self) -> list[str]:
        """FSDP's parameter names, in the optimizer's order (index i is parameter i)."""
        return [f"model.{n}" for n, _ in self.student.named_parameters()]

    def _gathered(self, optimizer):
        """The full weights (and optimizer) on rank 0's shadow copy; collective."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd = get_model_state_dict(self.module, options=full)
        osd = get_optimizer_state_dict(self.module, optimizer, options=full) if optimizer is not None else None
        if not self.ranks.is_main:
            return None, None
        self.shadow.load_state_dict({k.removeprefix("model."): v for k, v in msd.items()})
        if optimizer is None:
            return self.shadow, None
        index = {name: i for i, name in enumerate(self._names())}
        opt = _like_optimizer(optimizer, self.shadow)
        sd = opt.state_dict()
        sd["state"] = {index[name]: value for name, value in osd["state"].items()}
        opt.load_state_dict(sd)
        return self.shadow, opt


def _call_module(student):
    """A module holding the student (as `.model`) whose forward runs a function of it."""
    import torch

    class Call(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, fn, *args):
            return fn(self.model, *args)

    return Call(student)


def _like_optimizer(optimizer, model):
    """A fresh optimizer of the same kind and settings over `model`'s parameters."""
    if len(optimizer.param_groups) != 1:
        raise ShrinkError("FSDP checkpoints support one optimizer parameter group")
    fresh = type(optimizer)(model.parameters())
    fresh.param_groups[0].update({k: v for k, v in optimizer.param_groups[0].items() if k != "params"})
    return fresh
