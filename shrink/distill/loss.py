"""The distillation loss, on completion tokens only.

    loss = alpha * KL(teacher_T || student_T) * T^2 + (1 - alpha) * CE(student, reference)

KL at temperature T is scaled by T^2 so its gradients keep their size as T changes
(Hinton et al., 2015).
"""

from __future__ import annotations


def distill_loss(student_logits, teacher_logits, targets, temperature: float, alpha: float):
    """Returns (loss, kl, ce) as tensors. Logits are (n, vocab) at the n completion
    positions; targets (n,) are the reference tokens there."""
    import torch.nn.functional as F

    s = student_logits.float()  # (n, vocab)
    t = teacher_logits.float()  # (n, vocab)
    s_logp = F.log_softmax(s / temperature, dim=-1)
    t_logp = F.log_softmax(t / temperature, dim=-1)
    kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean") * temperature**2
    ce = F.cross_entropy(s, targets)
    return alpha * kl + (1 - alpha) * ce, kl.detach(), ce.detach()
