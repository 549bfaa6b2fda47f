"""The GGUF format for `shrink export`: llama.cpp's converter, then llama.cpp's quantizer.

The converter writes a 16-bit (or 32-bit) GGUF; every other type is quantized from it.
The intermediate file lives in the staging folder and is removed before the manifest
is written, so the artifact holds exactly one model file. The shared flow (evaluation,
parity, manifest) is shrink.export.flow's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from shrink.errors import ShrinkError
from shrink.export.parity import Thresholds
from shrink.manifest import Manifest

DEFAULT_QUANT = "Q4_K_M"
UNQUANTIZED = {"F32": "f32", "F16": "f16", "BF16": "bf16"}  # written by the converter itself

# Parity defaults per type, from the tiny-model measurements in tests/test_gguf.py and the
# demo (bench/RESULTS.md): 16/32-bit agree almost exactly, 8-bit nearly, 2-6-bit less.
THRESHOLDS = {"F32": Thresholds(0.99, 0.01), "F16": Thresholds(0.99, 0.01), "BF16": Thresholds(0.98, 0.02),
              "Q8_0": Thresholds(0.97, 0.02)}
QUANTIZED = Thresholds(0.85, 0.15)  # the other types


def check(opts, source_manifest: Manifest | None, eval_data: Path | None):
    """The options with the default type filled in; an unknown type is refused here."""
    from shrink.quantize.gguf_types import quant_type

    qtype = quant_type(opts.quant or DEFAULT_QUANT)
    if qtype.needs_imatrix and not opts.imatrix:
        raise ShrinkError(f"--quant {qtype.name} needs an importance matrix: add --imatrix "
                          "(computed from the task's data) or choose IQ4_XS, Q4_K_M, Q3_K_M, ...")
    if opts.imatrix and qtype.name in UNQUANTIZED:
        raise ShrinkError(f"--imatrix: {qtype.name} is not quantized, there is nothing to weigh")
    if opts.embedding_type is not None:
        from shrink.quantize.gguf_types import embedding_type

        opts = dataclasses.replace(opts, embedding_type=embedding_type(opts.embedding_type, qtype.name))
    if opts.imatrix is True:  # compute it from the task's calibration data (as GPTQ chooses it)
        from shrink.export.gptq_artifact import calibration_source

        opts = dataclasses.replace(opts, calibration=calibration_source(opts, source_manifest, eval_data))
    return dataclasses.replace(opts, quant=qtype.name)


def thresholds(opts) -> Thresholds:
    return THRESHOLDS.get(opts.quant, QUANTIZED)


def build(student: Path, tmp: Path, opts, source_manifest: Manifest | None) -> dict[str, Any]:
    from shrink.quantize.gguf_types import quant_type

    qtype = quant_type(opts.quant)
    file_name = f"model-{qtype.name}.gguf"
    # A pruned vocabulary hides the teacher's BPE pre-tokenizer from the converter's hash
    # check; distill recorded its name.
    tokenizer_pre = source_manifest.settings.get("tokenizer_pre") if source_manifest else None
    embedding = _embedding(student, opts.embedding_type, qtype.name)
    imatrix, settings = _importance(student, tmp, opts)
    vocabulary = _build(student, tmp / file_name, qtype, opts.threads, tokenizer_pre, imatrix, embedding)
    return {"quant": qtype.name, "file": file_name, "threads": opts.threads, "tokenizer_pre": tokenizer_pre,
            "embedding_type": embedding, "vocabulary": vocabulary, **settings}


def _embedding(student: Path, name: str | None, quant: str) -> str | None:
    """--embedding-type, checked against the student's token embedding rows (its hidden
    size) before anything is converted."""
    if name is None:
        return None
    from transformers import AutoConfig

    from shrink.quantize.gguf_types import embedding_type

    config = AutoConfig.from_pretrained(student, local_files_only=True)
    return embedding_type(name, quant, config.get_text_config().hidden_size)


def _importance(student: Path, tmp: Path, opts) -> tuple[dict | None, dict[str, Any]]:
    """The importance matrix to quantize with: computed now from the calibration data
    (opts.imatrix True), read from a file computed before (a device target's ladder
    computes it once for every rung), or none."""
    from shrink import artifact
    from shrink.quantize.imatrix import compute_imatrix, load_imatrix
    from shrink.tasks import load_task_for

    if not opts.imatrix:
        return None, {"imatrix": None}
    if opts.imatrix is True:
        texts = [ex.prompt + (ex.completion or "") for ex in load_task_for(opts.calibration, student)]
        return compute_imatrix(student, texts), {
            "imatrix": {"calibration": str(opts.calibration), "calibration_sha256": artifact.sha256_file(opts.calibration)}}
    return load_imatrix(Path(opts.imatrix)), {"imatrix": {"file_sha256": artifact.sha256_file(Path(opts.imatrix))}}


def _build(student: Path, dst: Path, qtype, threads: int | None, tokenizer_pre: str | None,
           imatrix: dict | None = None, embedding: str | None = None) -> dict:
    """Convert (and quantize); returns how the converter wrote the vocabulary (llama.cpp's
    tokenizer model, "llama" for SentencePiece or "gpt2" for byte-level BPE, and pre-tokenizer)."""
    from shrink.export.gguf_convert import convert_hf_to_gguf
    from shrink.quantize.llama_quantize import quantize_gguf

    if qtype.name in UNQUANTIZED:
        return convert_hf_to_gguf(student, dst, UNQUANTIZED[qtype.name], tokenizer_pre=tokenizer_pre)
    intermediate = dst.with_name("intermediate-F16.gguf")
    vocabulary = convert_hf_to_gguf(student, intermediate, "f16", tokenizer_pre=tokenizer_pre)
    try:
        quantize_gguf(intermediate, dst, qtype, threads, imatrix=imatrix, embedding=embedding)
    finally:
        intermediate.unlink(missing_ok=True)
    return vocabulary
