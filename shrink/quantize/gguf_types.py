"""The GGUF quantization types shrink offers, and how a user's spelling maps to one.

`ftype` is the value of llama.cpp's `llama_ftype` enum (llama.h), as exposed by
llama-cpp-python: `llama_cpp.LLAMA_FTYPE_MOSTLY_<NAME>` (F32 is `LLAMA_FTYPE_ALL_F32`).
The numbers are written out here so that importing this module (for `--help`, for
argument checking) does not load llama.cpp; tests/test_gguf.py checks them against llama_cpp.

`bits` is nominal: the bits per weight of the ggml block type that dominates the file
(e.g. Q4_K: 144 bytes per 256 weights = 4.5). The K-quant mixes (_S/_M/_L) keep some
tensors (attention V, FFN down, output) at a higher type, so real files are a little
larger, and a tiny model's embedding/output tensors weigh far more than in a big one.

`needs_imatrix`: llama.cpp refuses these without an importance matrix ("this
quantization requires an imatrix"); shrink does not compute one, so they fail early.
"""

from __future__ import annotations

from dataclasses import dataclass

from shrink.errors import ShrinkError


@dataclass(frozen=True)
class QuantType:
    name: str  # canonical spelling, as llama.cpp's llama-quantize accepts it
    ftype: int  # llama_ftype value passed to llama_model_quantize
    bits: float  # nominal bits per weight
    needs_imatrix: bool
    description: str


_Q = QuantType
# fmt: off
#     name        ftype  bits    imatrix  description                                       # llama_cpp constant
_TABLE = [
    _Q("F32",        0, 32.0,    False, "32-bit float, no rounding at all (large)"),         # LLAMA_FTYPE_ALL_F32
    _Q("F16",        1, 16.0,    False, "16-bit float, practically lossless"),               # LLAMA_FTYPE_MOSTLY_F16
    _Q("BF16",      32, 16.0,    False, "bfloat16, lossless for bf16-trained weights"),      # LLAMA_FTYPE_MOSTLY_BF16
    _Q("Q8_0",       7,  8.5,    False, "8-bit, near lossless"),                             # LLAMA_FTYPE_MOSTLY_Q8_0
    _Q("Q6_K",      18,  6.5625, False, "6-bit k-quant, near lossless"),                     # LLAMA_FTYPE_MOSTLY_Q6_K
    _Q("Q5_K_M",    17,  5.5,    False, "5-bit k-quant mix, very small loss"),               # LLAMA_FTYPE_MOSTLY_Q5_K_M
    _Q("Q5_K_S",    16,  5.5,    False, "5-bit k-quant, small loss"),                        # LLAMA_FTYPE_MOSTLY_Q5_K_S
    _Q("Q5_0",       8,  5.5,    False, "5-bit legacy quant"),                               # LLAMA_FTYPE_MOSTLY_Q5_0
    _Q("Q4_K_M",    15,  4.5,    False, "4-bit k-quant mix, the usual size/quality balance"),  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    _Q("Q4_K_S",    14,  4.5,    False, "4-bit k-quant, a little smaller than Q4_K_M"),      # LLAMA_FTYPE_MOSTLY_Q4_K_S
    _Q("Q4_0",       2,  4.5,    False, "4-bit legacy quant, fast on many CPUs"),            # LLAMA_FTYPE_MOSTLY_Q4_0
    _Q("IQ4_XS",    30,  4.25,   False, "4-bit non-linear i-quant, smaller than Q4_K_S"),    # LLAMA_FTYPE_MOSTLY_IQ4_XS
    _Q("IQ4_NL",    25,  4.5,    False, "4-bit non-linear i-quant"),                         # LLAMA_FTYPE_MOSTLY_IQ4_NL
    _Q("Q3_K_L",    13,  3.4375, False, "3-bit k-quant mix, larger/better of the 3-bit"),    # LLAMA_FTYPE_MOSTLY_Q3_K_L
    _Q("Q3_K_M",    12,  3.4375, False, "3-bit k-quant mix, noticeable loss"),               # LLAMA_FTYPE_MOSTLY_Q3_K_M
    _Q("Q3_K_S",    11,  3.4375, False, "3-bit k-quant, high loss"),                         # LLAMA_FTYPE_MOSTLY_Q3_K_S
    _Q("IQ3_M",     27,  3.4375, False, "3-bit i-quant mix"),                                # LLAMA_FTYPE_MOSTLY_IQ3_M
    _Q("IQ3_S",     26,  3.4375, False, "3.4-bit i-quant"),                                  # LLAMA_FTYPE_MOSTLY_IQ3_S
    _Q("Q2_K",      10,  2.625,  False, "2-bit k-quant mix, very high loss"),                # LLAMA_FTYPE_MOSTLY_Q2_K
    _Q("IQ3_XS",    22,  3.0625, True,  "3.3-bit i-quant mix"),                              # LLAMA_FTYPE_MOSTLY_IQ3_XS
    _Q("IQ3_XXS",   23,  3.0625, True,  "3-bit i-quant"),                                    # LLAMA_FTYPE_MOSTLY_IQ3_XXS
    _Q("Q2_K_S",    21,  2.625,  True,  "2-bit k-quant, smallest k-quant"),                  # LLAMA_FTYPE_MOSTLY_Q2_K_S
    _Q("IQ2_M",     29,  2.5,    True,  "2.7-bit i-quant mix"),                              # LLAMA_FTYPE_MOSTLY_IQ2_M
    _Q("IQ2_S",     28,  2.5,    True,  "2.5-bit i-quant"),                                  # LLAMA_FTYPE_MOSTLY_IQ2_S
    _Q("IQ2_XS",    20,  2.3125, True,  "2.3-bit i-quant"),                                  # LLAMA_FTYPE_MOSTLY_IQ2_XS
    _Q("IQ2_XXS",   19,  2.0625, True,  "2-bit i-quant"),                                    # LLAMA_FTYPE_MOSTLY_IQ2_XXS
    _Q("IQ1_M",     31,  1.75,   True,  "1.75-bit i-quant, extreme loss"),                   # LLAMA_FTYPE_MOSTLY_IQ1_M
    _Q("IQ1_S",     24,  1.5625, True,  "1.56-bit i-quant, extreme loss"),                   # LLAMA_FTYPE_MOSTLY_IQ1_S
]
# fmt: on

QUANT_TYPES: dict[str, QuantType] = {q.name: q for q in _TABLE}
# llama-quantize's own short names for the medium mixes.
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
DEFAULT = "Q4_K_M"


def names() -> list[str]:
    """Canonical names, largest first (the order of the table)."""
    return list(QUANT_TYPES)


def quant_type(name: str) -> QuantType:
    """Look up a type by name, case-insensitively; ShrinkError lists the valid ones."""
    key = str(name).strip().upper()
    key = ALIASES.get(key, key)
    try:
        return QUANT_TYPES[key]
    except KeyError:
        raise ShrinkError(f"unknown quant type {name!r}; valid: {', '.join(names())}") from None
