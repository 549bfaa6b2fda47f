"""Where a model's decoder layers are, and a model rebuilt from edited weights: what the
layer cut (shrink.distill.student), layer importance and width pruning share."""

from __future__ import annotations

import re

from shrink.errors import ModelError

LAYER_KEY = re.compile(r"^(model\.layers\.)(\d+)(\..*)$")  # llama, qwen2, gemma*, mistral, phi3


def decoder_layers(model):
    """The decoder layers, model.layers.N as LAYER_KEY names their weights."""
    try:
        return model.get_submodule("model.layers")
    except AttributeError:
        raise ModelError(f"{type(model).__name__}: no decoder layers at model.layers") from None


def check_keep(total: int, keep: int) -> None:
    """A layer count a student can keep out of the teacher's `total`."""
    if not 1 <= keep <= total:
        raise ModelError(f"--layers must be between 1 and the teacher's {total} layers, got {keep}")


def model_from_state(config, state: dict, what: str):
    """A new float32 model of `config` on the CPU holding the weights in `state`."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("cpu"):
        student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    try:
        missing, unexpected = student.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a shape mismatch
        raise ModelError(f"{what} student: weights do not fit its config: {str(e).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise ModelError(f"student weights do not match the {what} config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if getattr(config, "tie_word_embeddings", False):
        student.tie_weights()
    return student
