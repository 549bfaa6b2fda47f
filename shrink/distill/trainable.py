"""Which of the student's weights distillation changes: `--trainable all|norms|norms-embeddings`.

A student cut from a quantized teacher (a GGUF teacher is dequantized to load it) starts
with its decoder's linear weights on the quantizer's grid. A gentle run (a small learning
rate, which keeps what the teacher's layers already compute) moves them by a fraction of
one quantization step, so the export's Q4_K_M rounds most of what was learned away:
measured on the demo's 8-layer student (lr 5e-5), 99.7% of the q_proj changes were under
half a Q5_0 step, and its Q4_K_M fell to 55% on dev where its Q8_0 kept 95%.
llama.cpp keeps the norms' weights in float32 and the token embedding at 6 or 8 bits, so
what training changes there survives the export:

- `all`: every weight trains (the default).
- `norms`: only the normalization weights (each RMSNorm/LayerNorm scale, the per-head
  q/k norms and the final norm).
- `norms-embeddings`: the norms and the token embedding (with tied embeddings, the output
  layer too), whose answer rows are a linear read-out of the last hidden state. On the
  demo this one learned the task (92.7% on dev as Q4_K_M) where the norms alone, at the
  same learning rate, did not (54%).
"""

from __future__ import annotations

from shrink.errors import ModelError

TRAINABLE = ("all", "norms", "norms-embeddings")


def is_norm(module) -> bool:
    """A normalization module: RMSNorm/LayerNorm of any family, by its class name."""
    name = type(module).__name__.lower()
    return "norm" in name and getattr(module, "weight", None) is not None


def mark_trainable(model, which: str) -> int:
    """Lets only the weights `which` names require gradients (so no gradient is computed
    for the others, and an optimizer over `requires_grad` ones leaves them alone);
    returns how many weights train."""
    if which not in TRAINABLE:
        raise ValueError(f"trainable must be one of {', '.join(TRAINABLE)}, got {which!r}")
    if which == "all":
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    keep = set()
    for module in model.modules():
        if is_norm(module):
            keep.update(id(p) for p in module.parameters(recurse=False))
    if which == "norms-embeddings":
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            if emb is not None:
                keep.update(id(p) for p in emb.parameters(recurse=False))
    if not keep:
        raise ModelError(f"--trainable {which}: {type(model).__name__} has no norm weights to train")
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
