"""The size of a GGUF file before it exists: the ggml type llama.cpp's quantizer gives each
tensor under a file type, the bytes of that type, and the file's layout.

The types follow llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp) for the file
types in SIZED, for dense models (no experts, not Falcon, not the 70B special case):

- the file type's default type (`llama_ftype_get_default_type`) for every 2-D weight;
- the output head, or the token embeddings when they are the head (tied, no
  output.weight): Q8_0 when its rows do not fit the default type's blocks, Q8_0 under
  Q8_0, else Q6_K;
- attn_v and ffn_down get more bits in the layers `use_more_bits` picks (Q4_K_M, Q5_K_M),
  in the first layers (Q3_K_M, Q4_K_S, IQ4_*), or everywhere (Q2_K, Q3_K_L), and
  attn_output under Q2_K and Q3_K_*;
- a row length that is not a multiple of the type's block falls back
  (`tensor_type_fallback`): Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K and Q3_K ->
  Q4_0, IQ4_XS -> IQ4_NL, and F16 when even that block does not fit.

1-D tensors (norms, biases) stay F32. F32, F16 and BF16 files are written by the converter
itself: 2-D weights in that type, 1-D tensors in F32. Block sizes and bytes per block
come from gguf-py's GGML_QUANT_SIZES (ggml's type traits): Q8_0 34 bytes per 32 values,
Q4_K 144 per 256, Q6_K 210 per 256, ...

The file (gguf-py's and llama.cpp's writers, GGUF v3): a 24-byte header, the key-values,
one info record per tensor (its name, dimensions, type and offset), padding to the
32-byte alignment, then each tensor's data padded to 32 bytes. tests/test_size_budget.py
checks every type here against files llama.cpp wrote, tensor by tensor and in bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT
HEADER = 24  # magic, version, tensor count, key-value count

# File type -> the default ggml type of its 2-D weights (llama_ftype_get_default_type).
SIZED = {
    "F32": "F32", "F16": "F16", "BF16": "BF16",
    "Q8_0": "Q8_0", "Q6_K": "Q6_K", "Q5_K_M": "Q5_K", "Q5_K_S": "Q5_K", "Q5_0": "Q5_0",
    "Q4_K_M": "Q4_K", "Q4_K_S": "Q4_K", "Q4_0": "Q4_0", "IQ4_XS": "IQ4_XS", "IQ4_NL": "IQ4_NL",
    "Q3_K_L": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_S": "Q3_K", "Q2_K": "Q2_K",
}
UNQUANTIZED = ("F32", "F16", "BF16")  # the converter's own output types
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "Q2_K": "Q4_0", "Q3_K": "Q4_0", "IQ4_XS": "IQ4_NL"}
_LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class TensorCost:
    name: str  # GGUF tensor name (blk.3.attn_v.weight)
    shape: tuple[int, ...]  # as PyTorch holds it: (rows, row length)
    type: str  # ggml type llama.cpp writes it in
    bytes: int  # its data, before the padding to ALIGNMENT


def block(ggml_type: str) -> tuple[int, int]:
    """(values per block, bytes per block) of a ggml type."""
    from shrink.gguf_owner import import_gguf

    gguf = import_gguf()
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]]


def data_bytes(ggml_type: str, shape: tuple[int, ...]) -> int:
    values, size = block(ggml_type)
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows * (shape[-1] // values) * size


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, and
    every third layer between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], ftype: str, n_layers: int, n_gqa: int, tied: bool,
                imatrix: bool = False, embedding: str | None = None) -> str:
    """The ggml type of one tensor in a GGUF of file type `ftype` (a SIZED key); `embedding`:
    the token embedding's own type (--embedding-type), which llama.cpp applies as given."""
    default = SIZED[ftype]
    if len(shape) < 2 or not name.endswith("weight") or "_norm.weight" in name:
        return "F32"
    if ftype in UNQUANTIZED:
        return default
    if embedding is not None and name == "token_embd.weight":
        return embedding
    wanted = _mixed_type(name, shape[-1], ftype, default, n_layers, n_gqa, tied, imatrix)
    return _fallback(wanted, shape[-1])


def _mixed_type(name: str, ncols: int, ftype: str, t: str, n: int, gqa: int, tied: bool, imatrix: bool) -> str:
    m = _LAYER.match(name)
    i = int(m.group(1)) if m else 0  # llama.cpp counts attn_v and ffn_down tensors in layer order
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return "Q8_0" if ncols % block(t)[0] or t == "Q8_0" else "Q6_K"
    if "attn_v.weight" in name or "attn_qkv.weight" in name:
        if ftype == "Q2_K":
            return "Q4_K" if gqa >= 4 else "Q3_K"
        if ftype in ("IQ4_NL", "IQ4_XS") and gqa >= 4:
            return "Q5_K"
        if ftype == "Q3_K_M":
            return "Q5_K" if i < 2 else "Q4_K"
        if ftype == "Q3_K_L":
            return "Q5_K"
        if ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
            return "Q6_K"
        if ftype == "Q4_K_S" and i < 4:
            return "Q5_K"
    elif "ffn_down" in name:
        first = i < n // 8
        rules = {"Q2_K": "Q3_K", "Q3_K_M": "Q5_K" if i < n // 16 else "Q4_K", "Q3_K_L": "Q5_K",
                 "Q4_K_M": "Q6_K" if use_more_bits(i, n) else t,
                 "IQ4_NL": "Q5_K" if first and not imatrix else t, "IQ4_XS": "Q5_K" if first and not imatrix else t,
                 "Q5_K_M": "Q6_K" if use_more_bits(i, n) else t, "Q4_K_S": "Q5_K" if first else t,
                 "Q4_0": "Q4_1" if first and imatrix else t, "Q5_0": "Q5_1" if first and imatrix else t}
        return rules.get(ftype, t)
    elif "attn_output.weight" in name:
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(ftype, t)
    return t


def _fallback(t: str, ncols: int) -> str:
    """tensor_type_fallback: a type whose blocks fit the row length."""
    if ncols % block(t)[0] == 0:
        return t
    t = FALLBACK.get(t, "F16")
    return t if ncols % block(t)[0] == 0 else "F16"


def tensor_costs(tensors: list[tuple[str, tuple[int, ...]]], ftype: str, n_layers: int, n_gqa: int,
                 imatrix: bool = False, embedding: str | None = None) -> list[TensorCost]:
    """Each tensor of a GGUF ((name, shape) as the converter writes them) with its type and bytes."""
    tied = not any(name == "output.weight" for name, _ in tensors)
    costs = []
    for name, shape in tensors:
        t = tensor_type(name, shape, ftype, n_layers, n_gqa, tied, imatrix, embedding)
        costs.append(TensorCost(name, tuple(shape), t, data_bytes(t, shape)))
    return costs


def file_bytes(metadata_bytes: int, costs: list[TensorCost]) -> int:
    """The whole file: `metadata_bytes` (the header and key-values), the tensor infos with
    their padding, and each tensor's data padded to ALIGNMENT."""
    infos = sum(8 + len(c.name.encode()) + 4 + 8 * len(c.shape) + 4 + 8 for c in costs)
    return _pad(metadata_bytes + infos) + sum(_pad(c.bytes) for c in costs)


def _pad(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
