"""Quantize an fp32 ONNX graph with onnxruntime's own quantizers (weights only; the
activations stay float or are quantized on the fly by the kernels).

int8: `quantize_dynamic`, MatMul weights int8 per output channel. Weights are QInt8 (the
activations are always uint8 in dynamic mode): U8S8 is the fast path of onnxruntime's
x86 kernels (VPMADDUBSW on AVX2/AVX-512, VNNI where present); U8U8 exists for the
saturation that U8S8 can hit on CPUs without VNNI, which the parity check would show.
int4: `MatMulNBitsQuantizer`, MatMul weights 4-bit, symmetric, one fp32 scale per block
of 32 input channels, run by the MatMulNBits contrib kernel.

What is quantized: every MatMul with a constant weight, the lm_head included (it is one
matmul among the others, and for a small student with a big vocabulary it is the largest).
The embedding Gather stays fp32: it reads one row per token, so quantizing it saves file
size but no compute, and onnxruntime's quantized Gather variants either dequantize the
whole table (QDQ) or need a contrib op that not every build has. When the embedding is
tied to the lm_head (Gemma, small Qwen), the graph multiplies by Transpose(embedding);
`_fold_transposed_weights` gives that MatMul its own transposed copy so the quantizers
see a constant weight. The file then holds the fp32 embedding for the Gather and a
quantized copy for the lm_head: a little larger than sharing, much faster and smaller
than an fp32 lm_head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shrink.errors import ModelError, ShrinkError, requires

# quant -> what it does, for the CLI's help and the manifest
QUANTS = {
    "fp32": "no quantization",
    "int8": "onnxruntime quantize_dynamic: MatMul weights int8 per channel (U8S8 kernels)",
    "int4": "onnxruntime MatMulNBits: MatMul weights 4-bit, symmetric, block 32",
}
INT4_BLOCK = 32  # input channels per scale: as llama.cpp's Q4_0; smaller is more accurate and larger


def quantize_onnx(src_model: Path, dst_model: Path, quant: str, *, external_data: bool = False,
                  console=None) -> dict[str, Any]:
    """Write `dst_model`, the fp32 ONNX `src_model` with its MatMul weights quantized to
    `quant` (int8 or int4). `external_data`: store the weights in `<dst_model>.data`
    (models over the 2 GiB protobuf limit). Returns the settings to record."""
    from shrink.console import progress_step
    from shrink.quiet import quiet_exporters

    src_model, dst_model = Path(src_model), Path(dst_model)
    if quant not in QUANTS or quant == "fp32":
        raise ShrinkError(f"unknown ONNX quantization {quant!r}; valid: int8, int4")
    if dst_model.exists() and dst_model.resolve() == src_model.resolve():
        raise ShrinkError(f"{dst_model}: the output would overwrite the input")
    onnx = requires("onnx", "onnx")
    requires("onnxruntime", "onnx")
    try:
        model = onnx.load(str(src_model))
    except Exception as e:  # noqa: BLE001 - protobuf DecodeError, OSError, ...
        raise ModelError(f"{src_model}: not a readable ONNX file ({e})") from None

    # The quantizers are given a file, not the graph in memory: quantize_dynamic serializes
    # its input for shape inference, which fails past 2 GiB unless read from external data.
    folded_file = dst_model.with_name(dst_model.stem + "-folded.onnx")
    with progress_step(console, f"Quantizing to {quant} (onnxruntime)"), quiet_exporters():
        folded = _fold_transposed_weights(model)
        try:
            onnx.save(model, str(folded_file), save_as_external_data=external_data,
                      location=folded_file.name + ".data")
            del model  # the quantizer loads its own copy
            quantize = _int8 if quant == "int8" else _int4
            settings = quantize(folded_file, dst_model, external_data)
        except Exception as e:  # noqa: BLE001 - the quantizers raise assorted errors
            _remove(dst_model)
            raise ShrinkError(f"onnxruntime could not quantize {src_model.name} to {quant}: {e}") from None
        finally:
            _remove(folded_file)
    return {**settings, "untied_weights": folded}


def _remove(model_file: Path) -> None:
    model_file.unlink(missing_ok=True)
    model_file.with_name(model_file.name + ".data").unlink(missing_ok=True)


def _int8(src: Path, dst: Path, external: bool) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=False,
                     weight_type=QuantType.QInt8, use_external_data_format=external)
    return {"method": "quantize_dynamic", "ops": ["MatMul"], "weight_type": "QInt8", "per_channel": True}


def _int4(src: Path, dst: Path, external: bool) -> dict[str, Any]:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(str(src), bits=4, block_size=INT4_BLOCK, is_symmetric=True,
                                     op_types_to_quantize=("MatMul",))
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=external)
    return {"method": "MatMulNBits", "ops": ["MatMul"], "bits": 4, "block_size": INT4_BLOCK, "symmetric": True}


def _fold_transposed_weights(model) -> list[str]:
    """Give each MatMul whose weight is Transpose(initializer) (a tied lm_head) a transposed
    copy of that initializer, so that it has a constant weight the quantizers accept.
    Returns the names of the initializers copied. Edits `model` in place."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    copies: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in producer:
            continue
        tr = producer[node.input[1]]
        perm = next((list(a.ints) for a in tr.attribute if a.name == "perm"), None)
        if tr.op_type != "Transpose" or tr.input[0] not in inits or perm != [1, 0]:
            continue
        src = tr.input[0]
        if src not in copies:
            copies[src] = f"{src}.transposed"
            weight = numpy_helper.to_array(inits[src]).T.copy()  # (in, out) for MatMul
            graph.initializer.append(numpy_helper.from_array(weight, copies[src]))
        node.input[1] = copies[src]
    used = {name for node in graph.node for name in node.input}
    dead = [n for n in graph.node if n.op_type == "Transpose" and not any(o in used for o in n.output)
            and n.output[0] not in {o.name for o in graph.output}]
    for node in dead:
        graph.node.remove(node)
    return sorted(copies)
