"""Cutting a student from a teacher: the same architecture with fewer decoder layers."""

from __future__ import annotations

import re

from shrink.errors import ModelError

LAYER_KEY = re.compile(r"^(model\.layers\.)(\d+)(\..*)$")  # llama, qwen2, gemma*, mistral, phi3


def even_layers(total: int, keep: int) -> list[int]:
    """`keep` evenly spaced layer indices out of `total`, always the first and the last."""
    if not 1 <= keep <= total:
        raise ModelError(f"--layers must be between 1 and the teacher's {total} layers, got {keep}")
    if keep == 1:
        return [0]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def cut_student(teacher, keep: list[int]):
    """A new model built from the teacher's config with only the layers in `keep`,
    their weights copied (so layer-index bookkeeping such as KV-cache slots is right)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    text_config = config.get_text_config()
    text_config.num_hidden_layers = len(keep)
    if getattr(text_config, "layer_types", None):
        text_config.layer_types = [text_config.layer_types[i] for i in keep]
    new_index = {old: new for new, old in enumerate(keep)}

    state = {}
    for key, tensor in teacher.state_dict().items():
        m = LAYER_KEY.match(key)
        if m is None:
            state[key] = tensor
        elif int(m.group(2)) in new_index:
            state[f"{m.group(1)}{new_index[int(m.group(2))]}{m.group(3)}"] = tensor
    if not any(LAYER_KEY.match(k) for k in teacher.state_dict()):
        raise ModelError(
            f"cannot cut layers from {type(teacher).__name__}: its weights are not under model.layers.N"
        )

    with torch.device("cpu"):
        student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise ModelError(f"student weights do not match the cut config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if getattr(config, "tie_word_embeddings", False):
        student.tie_weights()
    return student
