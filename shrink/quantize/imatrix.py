"""A task-aware importance matrix for llama.cpp's quantizer, computed in PyTorch.

For each weight matrix, the importance of its input column j is the mean square of the
activations entering it, E[x_j^2], over the task's calibration text: the quantizer then
spends its rounding error where the task's activations are small. This is what
llama.cpp's `llama-imatrix` collects (sums of squares / count per column), computed here
with forward hooks on the Hugging Face student, so that no GGUF has to be run first.

The result is keyed by GGUF tensor name ("blk.0.attn_q.weight"), mapped from the Hugging
Face module names with the converter's own tables (its class for the architecture, and
gguf-py's tensor-name map), and handed to `llama_model_quantize` as
`llama_model_imatrix_data` entries (a NULL-name-terminated array). The output head is left out, as `llama-imatrix` does by default.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shrink.errors import ModelError, ShrinkError

MAX_ROWS = 256  # calibration texts: the column means settle long before this on one task


def compute_imatrix(student: Path, texts: list[str], max_rows: int = MAX_ROWS) -> dict[str, np.ndarray]:
    """E[x^2] per input column of every linear layer of the decoder, by GGUF tensor name."""
    import torch

    from shrink.console import progress
    from shrink.hf import load_causal_lm, load_tokenizer
    from shrink.tasks import spread

    if not texts:
        raise ShrinkError("the importance matrix needs calibration text (no examples)")
    model = load_causal_lm(student, "cpu")
    tokenizer = load_tokenizer(student)
    names = _gguf_names(model)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(gguf_name):
        def record(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[gguf_name] = sums.get(gguf_name, 0) + (x * x).sum(0)
            counts[gguf_name] = counts.get(gguf_name, 0) + x.shape[0]

        return record

    handles = [module.register_forward_pre_hook(hook(names[name]))
               for name, module in model.named_modules() if name in names]
    rows = spread(texts, max_rows)  # over the whole file, not its first lines
    try:
        with torch.inference_mode(), progress("ex") as bar:
            task = bar.add_task("importance matrix (torch)", total=len(rows))
            for text in rows:
                model(input_ids=torch.tensor([tokenizer(text).input_ids]))
                bar.advance(task)
    finally:
        for h in handles:
            h.remove()
    return {name: (sums[name] / counts[name]).numpy().astype(np.float32) for name in sums}


def _gguf_names(model) -> dict[str, str]:
    """Hugging Face linear-module name -> GGUF tensor name, for the decoder's layers: the
    converter's class for the config's architecture gives its gguf.MODEL_ARCH, and gguf's
    tensor map for that architecture gives the names (as the converter writes them)."""
    import torch
    from conversion import ModelType, get_model_architecture, get_model_class

    from shrink.gguf_owner import import_gguf

    gguf = import_gguf()
    model_type = model.config.model_type
    try:
        arch = get_model_class(get_model_architecture(model.config.to_dict(), ModelType.TEXT), mmproj=False).model_arch
    except (ValueError, NotImplementedError) as e:
        raise ModelError(f"importance matrix: no GGUF tensor names known for model_type {model_type!r} ({e})") from None
    table = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            mapped = table.get_name(name)
            if mapped is None:
                raise ModelError(f"importance matrix: no GGUF name for {name} ({model_type})")
            out[name] = mapped + ".weight"
    return out


def save_imatrix(data: dict[str, np.ndarray], path: Path) -> None:
    from safetensors.numpy import save_file

    save_file(data, str(path))


def load_imatrix(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def imatrix_entries(data: dict[str, np.ndarray]):
    """A NULL-name-terminated ctypes array of `llama_model_imatrix_data`, and the buffers
    it points into (keep both alive until the quantizer returns)."""
    import ctypes

    import llama_cpp

    entry = llama_cpp.llama_model_imatrix_data
    array = (entry * (len(data) + 1))()
    keep = []
    for i, (name, values) in enumerate(data.items()):
        buf = np.ascontiguousarray(values, dtype=np.float32)
        keep.append((name.encode(), buf))
        array[i].name = keep[-1][0]
        array[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        array[i].size = buf.size
    array[len(data)].name = None
    return array, keep
