"""The GGUF quantization types shrink offers, and how a user's spelling maps to one.

`ftype` is the value of llama.cpp's `llama_ftype` enum (llama.h), read from gguf-py's
copy of it, `gguf.LlamaFileType.MOSTLY_<NAME>` (F32 is `ALL_F32`), when a file is
quantized: importing this module (for `--help`, for argument checking) loads neither
gguf nor llama.cpp. tests/test_gguf.py checks the values against llama_cpp's constants.

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
    bits: float  # nominal bits per weight
    needs_imatrix: bool
    description: str

    @property
    def ftype(self) -> int:
        """The llama_ftype value passed to llama_model_quantize (gguf.LlamaFileType)."""
        from shrink.gguf_owner import import_gguf

        return int(import_gguf().LlamaFileType["ALL_F32" if self.name == "F32" else f"MOSTLY_{self.name}"])


_Q = QuantType
# fmt: off
#     name       bits    imatrix description    (ftype: gguf.LlamaFileType.MOSTLY_<name>)
_TABLE = [
    _Q("F32",      32.0,   False, "32-bit float, no rounding at all (large)"),
    _Q("F16",      16.0,   False, "16-bit float, practically lossless"),
    _Q("BF16",     16.0,   False, "bfloat16, lossless for bf16-trained weights"),
    _Q("Q8_0",     8.5,    False, "8-bit, near lossless"),
    _Q("Q6_K",     6.5625, False, "6-bit k-quant, near lossless"),
    _Q("Q5_K_M",   5.5,    False, "5-bit k-quant mix, very small loss"),
    _Q("Q5_K_S",   5.5,    False, "5-bit k-quant, small loss"),
    _Q("Q5_0",     5.5,    False, "5-bit legacy quant"),
    _Q("Q4_K_M",   4.5,    False, "4-bit k-quant mix, the usual size/quality balance"),
    _Q("Q4_K_S",   4.5,    False, "4-bit k-quant, a little smaller than Q4_K_M"),
    _Q("Q4_0",     4.5,    False, "4-bit legacy quant, fast on many CPUs"),
    _Q("IQ4_XS",   4.25,   False, "4-bit non-linear i-quant, smaller than Q4_K_S"),
    _Q("IQ4_NL",   4.5,    False, "4-bit non-linear i-quant"),
    _Q("Q3_K_L",   3.4375, False, "3-bit k-quant mix, larger/better of the 3-bit"),
    _Q("Q3_K_M",   3.4375, False, "3-bit k-quant mix, noticeable loss"),
    _Q("Q3_K_S",   3.4375, False, "3-bit k-quant, high loss"),
    _Q("IQ3_M",    3.4375, False, "3-bit i-quant mix"),
    _Q("IQ3_S",    3.4375, False, "3.4-bit i-quant"),
    _Q("Q2_K",     2.625,  False, "2-bit k-quant mix, very high loss"),
    _Q("IQ3_XS",   3.0625, True,  "3.3-bit i-quant mix"),
    _Q("IQ3_XXS",  3.0625, True,  "3-bit i-quant"),
    _Q("Q2_K_S",   2.625,  True,  "2-bit k-quant, smallest k-quant"),
    _Q("IQ2_M",    2.5,    True,  "2.7-bit i-quant mix"),
    _Q("IQ2_S",    2.5,    True,  "2.5-bit i-quant"),
    _Q("IQ2_XS",   2.3125, True,  "2.3-bit i-quant"),
    _Q("IQ2_XXS",  2.0625, True,  "2-bit i-quant"),
    _Q("IQ1_M",    1.75,   True,  "1.75-bit i-quant, extreme loss"),
    _Q("IQ1_S",    1.5625, True,  "1.56-bit i-quant, extreme loss"),
]
# fmt: on

QUANT_TYPES: dict[str, QuantType] = {q.name: q for q in _TABLE}
# llama-quantize's own short names for the medium mixes.
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
DEFAULT = "Q4_K_M"


# ggml tensor types the token embedding can be given on its own (llama-quantize's
# --token-embedding-type). A row length that is not a multiple of the type's block
# cannot take it: llama.cpp then fails the whole file instead of falling back, as it does
# for the types it chooses itself, so shrink checks first.
EMBEDDING_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0",
                   "IQ4_NL", "IQ4_XS", "Q3_K", "Q2_K")


def embedding_fits(name: str, row_length: int) -> bool:
    """Whether rows of `row_length` values fit the blocks of the embedding type `name`."""
    from shrink.quantize.gguf_size import block

    return row_length % block(name)[0] == 0


def embedding_type(name: str, quant: str, row_length: int | None = None, what: str = "--embedding-type") -> str:
    """A token-embedding type by name, case-insensitively, for a file of type `quant`;
    ShrinkError when `quant` is not quantized (the converter writes it), and lists the
    valid types, or, given the embedding's row length (the model's hidden size), those
    that fit it. `what`: where the name came from, for the message (a targets.toml key)."""
    from shrink.quantize.gguf_size import UNQUANTIZED, block

    if quant in UNQUANTIZED:
        raise ShrinkError(f"{what}: {quant} is written by the converter, not quantized; "
                          "choose a quantized --quant (Q4_K_M, ...)")
    key = str(name).strip().upper()
    if key not in EMBEDDING_TYPES:
        raise ShrinkError(f"{what} {name!r}: unknown; valid: {', '.join(EMBEDDING_TYPES)}")
    if row_length is not None and not embedding_fits(key, row_length):
        fits = [t for t in EMBEDDING_TYPES if embedding_fits(t, row_length)]
        raise ShrinkError(f"{what} {key}: the token embedding's rows are {row_length} wide, not a multiple "
                          f"of {key}'s {block(key)[0]}-value blocks; types that fit: {', '.join(fits)}")
    return key


def ggml_type(name: str) -> int:
    """The ggml_type value of a tensor type (gguf.GGMLQuantizationType)."""
    from shrink.gguf_owner import import_gguf

    return int(import_gguf().GGMLQuantizationType[name])


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
