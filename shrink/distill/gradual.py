"""`--prune-gradually`: the student's MLPs reach the width --ffn-ratio keeps during
training instead of before it (gradual pruning, Zhu & Gupta 2017).

The student starts with all of the teacher's MLP channels. From START to END of the
training steps, at UPDATES evenly spaced steps, the channels kept shrink on a cubic
schedule (many early, few late) to the final width: at each update, each layer masks to
zero the channels with the least mean |input of down_proj| x |down_proj column| since
the last update, so what a channel carried can move into the ones kept before it goes.
The rest of the steps train the student as it will be saved. When training ends the
masked channels are cut for real (shrink.distill.width.prune_width), which gives the
masked model's outputs exactly.
"""

from __future__ import annotations

START, END, UPDATES = 0.1, 0.6, 10


class GradualWidth:
    """Masks on each decoder layer's MLP channels (the input of down_proj), with the
    scores gathered in the training passes since the last update."""

    def __init__(self, model, final: int, total_steps: int):
        import torch

        from shrink.distill.layers import decoder_layers
        from shrink.distill.width import check_layout

        check_layout(model)  # separate gate/up/down projections, else a ModelError naming what is missing
        self.final = final
        self.downs = [layer.get_submodule("mlp.down_proj") for layer in decoder_layers(model)]
        self.width = width = self.downs[0].weight.shape[1]
        self.masks = [torch.ones(width, dtype=d.weight.dtype, device=d.weight.device) for d in self.downs]
        self.sums = [torch.zeros(width, dtype=torch.float64, device=d.weight.device) for d in self.downs]
        self.counts = [0] * len(self.downs)
        self.log: list[dict] = []  # {"step", "kept"} per update, for the manifest
        self.handles = [d.register_forward_pre_hook(self._hook(i)) for i, d in enumerate(self.downs)]
        # update step -> channels kept then, on the cubic schedule from START to END
        start, end = int(total_steps * START), int(total_steps * END)
        steps = [start + round(k * (end - start) / UPDATES) for k in range(1, UPDATES + 1)]
        self.schedule = {s: int(round(final + (width - final) * (1 - min(1.0, (s - start) / max(1, end - start))) ** 3))
                         for s in steps}

    def _hook(self, i):
        def pre(module, args):
            x = args[0]
            if module.training:
                flat = x.detach().reshape(-1, x.shape[-1])
                self.sums[i] += flat.abs().sum(0).double()
                self.counts[i] += flat.shape[0]
            return (x * self.masks[i].to(x.dtype),) + tuple(args[1:])
        return pre

    def at(self, step: int) -> int | None:
        """Before training step `step`: update the masks when the schedule says so;
        returns the channels kept then (None when nothing changed)."""
        import torch

        keep = self.schedule.get(step)
        if keep is None or (self.log and self.log[-1]["step"] >= step):
            return None
        for i, down in enumerate(self.downs):
            sums = _all_reduced(self.sums[i])
            count = _all_reduced(torch.tensor([float(self.counts[i])], device=sums.device)).item()
            mean = sums / max(1.0, count)
            score = mean * down.weight.detach().double().norm(dim=0).to(mean.device)
            score[self.masks[i].to(score.device) == 0] = -1.0  # a masked channel stays masked
            mask = torch.zeros_like(self.masks[i])
            mask[torch.topk(score, keep).indices.to(mask.device)] = 1
            self.masks[i] = mask  # a new tensor: a graph built with the old one keeps it
            self.sums[i].zero_()
            self.counts[i] = 0
        self.log.append({"step": step, "kept": keep})
        return keep

    def state(self) -> dict:
        """What a checkpoint keeps to resume: the kept channels of every layer and the log."""
        return {"kept": [m.nonzero().flatten().tolist() for m in self.masks], "log": self.log}

    def load(self, state: dict) -> None:
        for mask, kept in zip(self.masks, state["kept"]):
            mask.zero_()
            mask[kept] = 1
        self.log = list(state["log"])

    def cut(self, model):
        """`model` (the student these masks were on) with the masked channels removed."""
        import torch

        from shrink.distill.width import Widths, prune_width, widths_of

        for h in self.handles:
            h.remove()
        now = widths_of(model)
        kept = [int(m.sum().item()) for m in self.masks]
        if set(kept) != {self.final}:
            raise RuntimeError(f"gradual pruning ended with {kept} channels kept, not {self.final}")
        scores = [{"ffn": m.double().cpu(), "heads": torch.ones(now.heads, dtype=torch.float64)} for m in self.masks]
        return prune_width(model, Widths(self.final, now.heads, now.kv_heads, now.head_dim), scores)


def _all_reduced(t):
    """`t` summed over the torchrun processes (each saw its share of the batches)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t
