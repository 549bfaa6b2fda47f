"""The distillation loss, at the loss positions (shrink.distill.batches).

    loss = alpha * D(teacher_T, student_T) * T^2 + (1 - alpha) * CE(student, reference)

The loss positions are the completion's tokens, and with `--loss-on all` the prompt's
too. D is averaged over every loss position. CE is taken on the completion's positions
only, in both modes: the reference is the completion, the answer the data gives. A
prompt's tokens are given at inference, never generated, so a hard target there would
train the student as a language model of the data set's prompts (often one template
repeated), a task the student does not have and that takes capacity; the teacher's
distribution at those positions is the signal worth having, and it is the KL term that
takes it. CE keeps one meaning in both modes (the student's loss on the reference
answer), so runs with either setting log comparable `ce` values, and `--alpha 0` stays
plain supervised training on the completions.

D is one of four divergences between the teacher's distribution p and the student's q,
both at temperature T (`--loss`, with `--beta` for the last two):

    fkl  KL(p || q)                                   forward KL, the default
    rkl  KL(q || p)                                   reverse KL
    jsd  beta * KL(p || m) + (1 - beta) * KL(q || m)  generalized Jensen-Shannon,
         m = beta * p + (1 - beta) * q                as in GKD (Agarwal et al., 2024) and
                                                      TRL's generalized_jsd_loss; beta = 0.5
                                                      is the usual JSD, and the value is at
                                                      most the entropy of (beta, 1 - beta) <= ln 2
    skl  KL(p || beta * p + (1 - beta) * q)           skew KL (DistiLLM, Ko et al., 2024; their
                                                      alpha is our beta): the student is seen
                                                      through a mixture with the teacher, which
                                                      keeps the loss and its gradients bounded
                                                      while q is far from p

With --split-words (shrink.distill.split_words), a position that predicts a piece of a
split word has no teacher distribution: there D is the cross-entropy on the reference
piece (the KL to a one-hot teacher), and D's mean is over both kinds of position.

Everything is computed from log-probabilities: the mixture's log m is a logsumexp of
log(beta) + log p and log(1 - beta) + log q, never log(beta * p + (1 - beta) * q), so
logits of any size give finite values and gradients. The divergence is summed over the
vocabulary and averaged over positions, then scaled by T^2 so its gradients keep their
size as T changes (Hinton et al., 2015).
"""

from __future__ import annotations

import math

LOSSES = ("fkl", "rkl", "jsd", "skl")
IGNORE = -100  # a target without cross-entropy (torch's default ignore_index)


def distill_loss(student_logits, teacher_logits, targets, temperature: float, alpha: float,
                 *, kind: str = "fkl", beta: float = 0.5, ce_scale: float = 1.0, matched=None):
    """Returns (loss, divergence, ce) as tensors; the divergence is T^2-scaled, before
    the alpha mix. Logits are (n, vocab) at the n loss positions; targets (n,) are the
    reference tokens there, IGNORE where no cross-entropy is taken (the prompt's
    positions). `ce_scale` multiplies the CE term (under torchrun, distributed.Shard's:
    a rank whose share of the completion positions differs from its share of all
    positions). `matched` (n,) bool (--split-words: shrink.distill.split_words): the
    positions that have a teacher distribution, teacher_logits holding their rows in
    order; at the others the divergence is the cross-entropy on the target (the KL to a
    one-hot teacher), and one without a target carries none."""
    import torch.nn.functional as F

    s = student_logits.float()  # (n, vocab)
    t = teacher_logits.float()  # (n, vocab), or (matched positions, vocab)
    if matched is None:
        kl = divergence(F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1), kind,
                        beta) * temperature**2
    else:
        soft, hard = s[matched], targets[~matched]
        counted = soft.shape[0] + int((hard != IGNORE).sum())
        total = F.cross_entropy(s[~matched], hard, ignore_index=IGNORE, reduction="sum")  # 0 when none
        if soft.shape[0]:
            d = divergence(F.log_softmax(soft / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1), kind, beta)
            total = total + d * temperature**2 * soft.shape[0]
        kl = total / max(counted, 1)
    ce = F.cross_entropy(s, targets, ignore_index=IGNORE) * ce_scale  # mean over the completion positions
    return alpha * kl + (1 - alpha) * ce, kl.detach(), ce.detach()


def divergence(s_logp, t_logp, kind: str = "fkl", beta: float = 0.5):
    """D(p, q) per `kind`, averaged over positions, from log-probabilities (n, vocab) of
    the student (q) and the teacher (p)."""
    import torch.nn.functional as F

    def kl(log_a, log_b):  # KL(a || b), summed over the vocabulary, mean over positions
        return F.kl_div(log_b, log_a, log_target=True, reduction="batchmean")

    if kind == "fkl":
        return kl(t_logp, s_logp)
    if kind == "rkl":
        return kl(s_logp, t_logp)
    if kind in ("jsd", "skl"):
        m_logp = mixture(t_logp, s_logp, beta)  # log(beta * p + (1 - beta) * q)
        if kind == "skl":
            return kl(t_logp, m_logp)
        return beta * kl(t_logp, m_logp) + (1 - beta) * kl(s_logp, m_logp)
    raise ValueError(f"unknown loss {kind!r} (choose from {', '.join(LOSSES)})")


def mixture(a_logp, b_logp, weight: float):
    """log(weight * a + (1 - weight) * b) from log a and log b, without leaving log space."""
    import torch

    return torch.logaddexp(a_logp + math.log(weight), b_logp + math.log1p(-weight))
