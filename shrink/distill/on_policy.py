"""On-policy distillation (`--on-policy LAMBDA`): in a fraction LAMBDA of the batches the
student writes the completions itself and the teacher grades them.

This is generalized knowledge distillation (GKD, Agarwal et al., 2024; TRL's GKDTrainer
takes its `lmbda` the same way). Trained on reference completions only, a student never
sees its own mistakes: at generation time one wrong token puts it in states the
training data never held (exposure bias). On an on-policy batch:

1. The student samples a completion for each prompt from its own distribution at
   temperature 1: up to the reference completion's length + MARGIN tokens (and within
   --max-length), ending at one of its EOS ids (its generation config's, the chat
   template's end of turn included). Sampling, not greedy decoding: GKD's on-policy
   term is an expectation over the student's distribution, and greedy answers would show
   the teacher one sequence per prompt, the one the student is already surest of, where
   the divergence is smallest; sampling also reaches the mistakes that training should
   fix. The sampling temperature is 1, whatever --temperature is: --temperature softens
   the distributions that the divergence compares, not the student's behaviour.
2. The teacher reads its --teacher-prefix + the prompt + the student's completion (with
   --prune-vocab, the student's ids mapped back to the teacher's: plan.kept), and is
   read on the student's vocabulary rows, as in the off-policy batches.
3. The loss is the divergence (--loss, --beta, --temperature, scaled by T^2) on the
   generated positions alone, with weight 1. There is no cross-entropy term: there is no
   reference for the generated tokens. --alpha mixes divergence and cross-entropy in the
   off-policy batches only. The log records these steps with `"on_policy": true` and
   `"ce": null`.

Which batches: batch s is on-policy when floor((s + 1) * LAMBDA + phi) > floor(s * LAMBDA
+ phi), phi in [0, 1) drawn from --seed. Any run of n consecutive steps then holds
floor(n * LAMBDA) or ceil(n * LAMBDA) on-policy batches (a Bernoulli draw per step, as in
TRL, can stray far from LAMBDA over a short run), spread evenly, and the choice depends on
(seed, step) alone: every torchrun rank makes the same one without talking to the others,
and --resume makes the choices the interrupted run would have.

Which samples: each example draws its uniforms from a generator seeded by (seed, step,
example index), and tokens are drawn by inverting the student's cumulative distribution
at them. An example's completion thus depends on the student's weights and its own
seed, not on the batch it shares or on how the batch is split over torchrun ranks (up to
floating-point rounding), and a resumed run samples what the interrupted one would have.

The teacher cache (--teacher-cache) and the teacher outputs computed once before training
hold the teacher's distributions on the reference completions only: on-policy batches run
the live teacher (which distill always loads: the student is cut from it), and the cache
or the precomputed outputs serve the off-policy batches. With --on-policy 1 nothing is
precomputed.

Under torchrun each rank samples for its own rows, and weighs its mean loss by its share
of the batch's generated positions (an all-reduce of the counts). With DDP the rank
generates with its own copy of the student (no collective); with FSDP the weights are
sharded and every forward pass is a collective, so the ranks decode in lockstep until
every rank's rows have finished.

The progress bar's and the manifest's tokens/s keep counting each batch's reference
tokens, on-policy batches included, and not the sampled ones: the cost of sampling shows
as fewer tokens/s than the same run without --on-policy.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, replace
from typing import Any

from shrink.distill.batches import Sequence, collate
from shrink.distill.loss import distill_loss
from shrink.kv_cache import cache_kwargs, returned_cache
from shrink.logits import selected_logits

MARGIN = 8  # tokens a sampled completion may run past its reference's length (EOS included)


def chosen(fraction: float, seed: int, step: int) -> bool:
    """Whether batch `step` is on-policy: a fraction `fraction` of the batches, evenly
    spread, from a phase fixed by `seed` (see the module's docstring)."""
    if fraction <= 0:
        return False
    if fraction >= 1:
        return True
    phase = random.Random(f"on-policy:{seed}").random()
    return math.floor((step + 1) * fraction + phase) > math.floor(step * fraction + phase)


def example_seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of example `index` (its line in the data) at `step`."""
    return random.Random(f"on-policy:{seed}:{step}:{index}").getrandbits(63)


def uniforms(seed: int, step: int, index: int, n: int):
    """n uniforms in [0, 1) for one example's n sampled tokens (float64, on the CPU)."""
    import torch

    g = torch.Generator().manual_seed(example_seed(seed, step, index))
    return torch.rand(n, generator=g, dtype=torch.float64)


def draw(logits, u):
    """One token per row from softmax(logits) (rows, vocab), by inverting the cumulative
    distribution at the uniforms u (rows,): exact sampling, reproducible from u alone."""
    import torch

    cdf = logits.double().softmax(-1).cumsum(-1)  # (rows, vocab)
    target = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(1)  # scaled by the total: rounding keeps it <= 1
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=logits.shape[-1] - 1)


def sample(forward, prompts: list[list[int]], budgets: list[int], draws: list, eos: set[int], device: str,
           all_done=None) -> list[list[int]]:
    """Completions the model writes after each prompt (its own ids): token t of row r is
    drawn at draws[r][t]; a row stops after an id in `eos` or after budgets[r] tokens.
    `forward(fn, *args)` runs fn(model, *args) (through FSDP when the weights are sharded);
    `all_done(bool) -> bool`, when given, tells whether every rank has finished, and the
    loop goes on (its outputs unused) until they have: FSDP's forward passes are collectives."""
    import torch

    n, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros((n, width), dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    for r, p in enumerate(prompts):  # left-padded: every row's next token goes at the end
        ids[r, width - len(p):] = torch.tensor(p)
        attn[r, width - len(p):] = 1
    ids, attn = ids.to(device), attn.to(device)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # (n, width) positions that skip the padding
    out = forward(_step, ids, attn, pos, None)
    cache, logits = returned_cache(out), out.logits[:, -1]  # (n, vocab)
    u = torch.zeros((n, max(budgets)), dtype=torch.float64)  # (n, most tokens any row may write)
    for r, d in enumerate(draws):
        u[r, : len(d)] = d
    written: list[list[int]] = [[] for _ in prompts]
    done = [False] * n
    t = 0
    while True:
        tokens = draw(logits, u[:, min(t, u.shape[1] - 1)])  # (n,); past every budget (FSDP lockstep): unused
        t += 1
        for r, tok in enumerate(tokens.tolist()):
            if not done[r]:
                written[r].append(tok)
                done[r] = tok in eos or len(written[r]) >= budgets[r]
        finished = all(done) if all_done is None else all_done(all(done))
        if finished:
            return written
        attn = torch.cat([attn, attn.new_ones((n, 1))], dim=1)
        pos = pos[:, -1:] + 1
        out = forward(_step, tokens.unsqueeze(1), attn, pos, cache)
        cache, logits = returned_cache(out), out.logits[:, -1]


def _step(model, ids, attn, pos, cache):
    """One forward pass of generation: the last position's logits and the cache."""
    return model(input_ids=ids, attention_mask=attn, position_ids=pos, **cache_kwargs(model, cache), use_cache=True,
                 logits_to_keep=1)


@dataclass(frozen=True)
class Scored:
    """An on-policy batch, scored: what the training step needs from it."""

    loss: Any  # 0-d tensor: the divergence on the generated positions (T^2-scaled)
    kl: Any  # 0-d tensor, detached: the same, for the log
    ce: Any  # 0-d tensor of 0: no cross-entropy in an on-policy batch (logged as null)
    mask: Any  # (batch, seq) the student's loss positions (those predicting a generated token)
    t_mask: Any  # (batch, seq) the teacher's (its prefix before the prompt)
    shard: Any  # distributed.Shard: this rank's rows, weighed by its share of the generated positions
    student_seqs: list[Sequence]  # prompt + completion in teacher ids, as the student read them
    teacher_seqs: list[Sequence]  # --teacher-prefix + prompt + completion in teacher ids


class Rollout:
    """The on-policy batches of one distill run: which steps, the student's completions,
    the teacher's scores. `plan` is the --prune-vocab plan (None: the student reads the
    teacher's ids); `t_cache` the teacher's shared-prefix cache (or None)."""

    def __init__(self, cfg, student, trainee, teacher, plan, pad: int, device: str, ranks, t_cache=None):
        import torch

        self.cfg, self.student, self.trainee, self.teacher = cfg, student, trainee, teacher
        self.pad, self.device, self.ranks, self.t_cache = pad, device, ranks, t_cache
        self.kept = torch.tensor(plan.kept, device=device) if plan else None  # student id -> teacher id
        self.id_map = plan.id_map().to(device) if plan else None  # teacher id -> student id
        eos = student.generation_config.eos_token_id if student.generation_config is not None else None
        eos = student.config.eos_token_id if eos is None else eos
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])  # student ids
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda"
                         else contextlib.nullcontext())

    def chosen(self, step: int) -> bool:
        return chosen(self.cfg.on_policy, self.cfg.seed, step)

    def completions(self, batch: list[Sequence], rows: list[int], step: int) -> list[list[int]]:
        """The student's sampled completion after each prompt of `batch` (examples `rows`),
        in teacher ids."""
        import torch

        prompts = [s.ids[: s.start] for s in batch]  # teacher ids
        if self.id_map is not None:
            prompts = [self.id_map[torch.tensor(p, device=self.device)].tolist() for p in prompts]
        budgets = [max(1, min(len(s.ids) - s.start + MARGIN, self.cfg.max_length - s.start)) for s in batch]
        draws = [uniforms(self.cfg.seed, step, i, b) for i, b in zip(rows, budgets)]
        fsdp = getattr(self.trainee, "fsdp", False)
        forward = self.trainee if fsdp else (lambda fn, *args: fn(self.student, *args))
        was_training = self.student.training
        self.student.eval()
        try:
            with torch.no_grad(), self.autocast:
                written = sample(forward, prompts, budgets, draws, self.eos, self.device,
                                 all_done=self._all_done if fsdp else None)
        finally:
            self.student.train(was_training)
        if self.kept is not None:
            written = [self.kept[torch.tensor(w, device=self.device)].tolist() for w in written]
        return written

    def score(self, batch: list[Sequence], t_batch: list[Sequence], part, step: int) -> Scored:
        """Sample the completions of this rank's rows (`part`, a distributed.Shard), run the
        teacher on them and return the divergence on the generated positions."""
        import torch

        written = self.completions(batch, part.rows, step)
        s_seqs = [Sequence(ids=s.ids[: s.start] + w, start=s.start) for s, w in zip(batch, written)]
        t_seqs = [Sequence(ids=t.ids[: t.start] + w, start=t.start) for t, w in zip(t_batch, written)]
        ids, attn, mask = collate(s_seqs, self.pad, self.device)  # teacher-vocabulary ids
        t_ids, t_attn, t_mask = collate(t_seqs, self.pad, self.device)
        s_ids = ids if self.id_map is None else self.id_map[ids]
        targets = s_ids[:, 1:][mask[:, :-1]]  # (n,) the sampled tokens
        with torch.no_grad():
            t_logits = selected_logits(self.teacher, t_ids, t_attn, t_mask, rows=self.kept, prefix=self.t_cache)
        with self.autocast:
            s_logits = self.trainee(selected_logits, s_ids, attn, mask)  # (n, student vocab)
        cfg = self.cfg
        loss, kl, _ = distill_loss(s_logits, t_logits, targets, cfg.temperature, 1.0, kind=cfg.loss, beta=cfg.beta)
        shard = replace(part, weight=self._weight(part.weight, len(targets)))
        return Scored(loss, kl, torch.zeros((), device=loss.device), mask, t_mask, shard, s_seqs, t_seqs)

    def _weight(self, weight: float, positions: int) -> float:
        """This rank's share of the batch's generated positions, times the world size (as
        distributed.shard weighs the reference positions); a rank running a row for
        nothing (weight 0) keeps 0."""
        if not self.ranks.enabled:
            return weight
        import torch
        import torch.distributed as dist

        mine = positions if weight > 0 else 0
        total = torch.tensor([mine], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return mine * self.ranks.world_size / total.item()

    def _all_done(self, done: bool) -> bool:
        """Whether every rank's rows have finished (FSDP decodes in lockstep)."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([0 if done else 1], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() == 0
