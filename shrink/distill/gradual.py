"""`--prune-gradually`: the student's MLPs reach the width --ffn-ratio keeps during
training instead of before it (gradual pruning, Zhu & Gupta 2017).

The student starts with all of the teacher's MLP channels. From START to END of the
training steps, at UPDATES evenly spaced steps, the channels kept shrink on a cubic
schedule (many early, few late) to the final width: at each update, each layer keeps the
channels with the most mean |input of down_proj| x |down_proj column| since the last
update, so what a channel carried can move into the ones kept before it goes. The others
are cut for real there and then (their rows of gate_proj and up_proj, their column of
down_proj, and the optimizer's moments for them), so the student trains at the width it
has reached, and from END on as it will be saved. Every width on the way is a multiple of
32, the block of llama.cpp's quantization types (and of `--qat`'s rounding).
"""

from __future__ import annotations

START, END, UPDATES = 0.1, 0.6, 10
BLOCK = 32  # every width on the schedule is a multiple of it
PARTS = {"gate_proj": 0, "up_proj": 0, "down_proj": 1}  # the dimension of each MLP weight that is its channels


class GradualWidth:
    """Each decoder layer's MLP channels, cut down during training, with the scores
    gathered in the training passes since the last update."""

    def __init__(self, model, final: int, total_steps: int):
        import torch

        from shrink.distill.layers import decoder_layers
        from shrink.distill.width import check_layout

        check_layout(model)  # separate gate/up/down projections, else a ModelError naming what is missing
        self.model, self.final = model, final
        self.mlps = [layer.get_submodule("mlp") for layer in decoder_layers(model)]
        self.width = width = self.mlps[0].down_proj.weight.shape[1]
        device = self.mlps[0].down_proj.weight.device
        self.kept = [torch.arange(width, device=device) for _ in self.mlps]  # the teacher's channels each layer has now
        self.sums = [torch.zeros(width, dtype=torch.float64, device=device) for _ in self.mlps]
        self.counts = [0] * len(self.mlps)
        self.log: list[dict] = []  # {"step", "kept"} per update, for the manifest
        self.handles = [m.down_proj.register_forward_pre_hook(self._hook(i)) for i, m in enumerate(self.mlps)]
        # Only the batch's real tokens score, not its padding (which differs with how the
        # batch is split over processes): the base model's attention mask says which.
        self.real = None
        self.handles.append(model.base_model.register_forward_pre_hook(self._mask_hook, with_kwargs=True))
        # update step -> channels kept then, on the cubic schedule from START to END
        start, end = int(total_steps * START), int(total_steps * END)
        steps = [start + round(k * (end - start) / UPDATES) for k in range(1, UPDATES + 1)]
        block = BLOCK if width % BLOCK == 0 and final % BLOCK == 0 else 1
        self.schedule = {}
        for s in steps:
            left = (1 - min(1.0, (s - start) / max(1, end - start))) ** 3
            self.schedule[s] = final + int(round((width - final) * left / block)) * block

    def _mask_hook(self, module, args, kwargs):
        attn = kwargs.get("attention_mask")
        self.real = attn.bool() if attn is not None and attn.dim() == 2 else None

    def _hook(self, i):
        def pre(module, args):
            if module.training:
                x = args[0].detach()
                real = self.real if self.real is not None and self.real.shape == x.shape[:-1] else None
                flat = x[real] if real is not None else x.reshape(-1, x.shape[-1])
                self.sums[i] += flat.abs().sum(0).double()
                self.counts[i] += flat.shape[0]
        return pre

    def at(self, step: int, optimizer=None) -> int | None:
        """Before training step `step`: cut the channels the schedule says to, in the
        model and in `optimizer`'s state; returns the channels kept then (None when
        nothing changed). A caller wrapping the model (DDP) re-wraps it after a cut."""
        import torch

        keep = self.schedule.get(step)
        if keep is None or (self.log and self.log[-1]["step"] >= step):
            return None
        for i, mlp in enumerate(self.mlps):
            sums = _all_reduced(self.sums[i])
            count = _all_reduced(torch.tensor([float(self.counts[i])], device=sums.device)).item()
            norms = mlp.down_proj.weight.detach().double().norm(dim=0).to(sums.device)
            score = sums / count * norms if count else norms  # no pass read yet (a cut at step 0): the weights alone
            chosen = torch.topk(score, keep).indices.sort().values  # the same on every process: the scores were summed
            self._cut(i, chosen, optimizer)
        self.log.append({"step": step, "kept": keep})
        return keep

    def _cut(self, i: int, chosen, optimizer) -> None:
        """Layer i keeps the channels `chosen` (indices into the ones it has now)."""
        import torch

        mlp = self.mlps[i]
        for name, dim in PARTS.items():
            linear = getattr(mlp, name)
            for attr in ("weight", "bias") if dim == 0 else ("weight",):  # down_proj's bias is per hidden unit
                old = getattr(linear, attr)
                if old is None:
                    continue
                along = dim if old.dim() > 1 else 0
                # A new weight, not new .data: autograd keeps the old one's shape in its graph nodes.
                new = torch.nn.Parameter(old.detach().index_select(along, chosen.to(old.device)).contiguous(),
                                         requires_grad=old.requires_grad)
                setattr(linear, attr, new)
                if optimizer is not None:
                    _follow(optimizer, old, new, along, chosen)
            if dim == 0:
                linear.out_features = len(chosen)
            else:
                linear.in_features = len(chosen)
        self.kept[i] = self.kept[i][chosen.to(self.kept[i].device)]
        self.sums[i] = torch.zeros(len(chosen), dtype=torch.float64, device=self.sums[i].device)
        self.counts[i] = 0
        self.model.config.get_text_config().intermediate_size = len(chosen)  # the model says what it holds

    def state(self) -> dict:
        """What a checkpoint keeps to resume: the teacher channels each layer has, the
        scores gathered since the last update (summed over the torchrun processes: every
        process calls this) and the log."""
        import torch

        sums = [_all_reduced(s).tolist() for s in self.sums]
        counts = [int(_all_reduced(torch.tensor([float(c)], device=s.device)).item()) for c, s in zip(self.counts, self.sums)]
        return {"kept": [k.tolist() for k in self.kept], "sums": sums, "counts": counts, "log": self.log}

    def load(self, state: dict) -> None:
        """Cut the model to a checkpoint's channels (before its weights load into it)."""
        import torch

        for i, kept in enumerate(state["kept"]):
            now = {c: j for j, c in enumerate(self.kept[i].tolist())}
            self._cut(i, torch.tensor([now[c] for c in kept], dtype=torch.long), None)
            if _rank() == 0:  # the checkpoint holds every process's share: one of them carries it on
                self.sums[i] = torch.tensor(state["sums"][i], dtype=torch.float64, device=self.sums[i].device)
                self.counts[i] = state["counts"][i]
        self.log = list(state["log"])

    def finish(self, model):
        """`model` (the student these cuts were made on), with the hooks removed and
        checked to hold the final width."""
        for h in self.handles:
            h.remove()
        kept = [len(k) for k in self.kept]
        if set(kept) != {self.final}:
            raise RuntimeError(f"gradual pruning ended with {kept} channels kept, not {self.final}")
        return model


def _follow(optimizer, old, new, along: int, chosen) -> None:
    """`optimizer` trains `new` in place of `old`, with its moments for the kept channels."""
    import torch

    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state:
        optimizer.state[new] = {k: v.index_select(along, chosen.to(v.device)).contiguous()
                                if torch.is_tensor(v) and v.shape == old.shape else v for k, v in state.items()}


def _all_reduced(t):
    """`t` summed over the torchrun processes (each saw its share of the batches)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
