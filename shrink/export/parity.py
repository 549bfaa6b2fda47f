"""Parity: an export measured against the Hugging Face student it was made from.

On the evaluation prompts, both runtimes read the same token ids (the student's) and
their next-token distributions are compared at every position: top-1 agreement and mean
KL(student || export). Separately, the export's own tokenizer must give the student's
ids. The figures go into the manifest; below the thresholds the export is not valid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shrink.errors import ShrinkError

MAX_PROMPTS = 64  # evaluation prompts compared (parity is about the math, not coverage)


@dataclass(frozen=True)
class Thresholds:
    min_top1: float  # fraction of positions whose argmax agrees
    max_kl: float  # mean KL(student || export) per position, nats
    min_token_match: float = 1.0  # fraction of prompts whose ids equal the student's


class ParityError(ShrinkError):
    """The export does not compute what its source computes. Exit code 1: a failed check,
    not a user error."""

    exit_code = 1


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def measure(reference, candidate, prompts: list[str], where: list[str]) -> dict:
    """Parity figures of `candidate` against `reference` (two Runtimes) on `prompts`;
    `where[i]` names prompt i (file:line) for the worst-example report."""
    agree = total = 0
    kls, worst = [], (-1.0, "")
    token_match = 0
    for prompt, name in list(zip(prompts, where))[:MAX_PROMPTS]:
        ids = reference.encode(prompt)
        token_match += candidate.encode(prompt) == ids
        ref, cand = reference.logits(ids), candidate.logits(ids)  # (seq, vocab) each
        p, q = _log_softmax(ref.astype(np.float64)), _log_softmax(cand.astype(np.float64))
        kl = (np.exp(p) * (p - q)).sum(-1)  # (seq,)
        agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        total += len(ids)
        kls.append(float(kl.mean()))
        if kls[-1] > worst[0]:
            worst = (kls[-1], name)
    n = len(kls)
    return {
        "prompts": n,
        "top1_agreement": round(agree / total, 4),
        "mean_kl": round(float(np.mean(kls)), 5),
        "token_id_match": round(token_match / n, 4),
        "worst_example": {"where": worst[1], "mean_kl": round(worst[0], 5)},
    }


def verdict(figures: dict, t: Thresholds) -> list[str]:
    """The thresholds the figures miss (empty when the export passes)."""
    failed = []
    if figures["token_id_match"] < t.min_token_match:
        failed.append(f"tokenizer ids match on {figures['token_id_match']:.1%} of prompts < {t.min_token_match:.0%}")
    if figures["top1_agreement"] < t.min_top1:
        failed.append(f"top-1 agreement {figures['top1_agreement']:.1%} < {t.min_top1:.0%}")
    if figures["mean_kl"] > t.max_kl:
        failed.append(f"mean KL {figures['mean_kl']:.4f} > {t.max_kl}")
    return failed
