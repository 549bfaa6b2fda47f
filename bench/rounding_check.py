"""Does `--qat` round a student's weights as its shipped GGUF holds them? (issue 15)

    python bench/rounding_check.py STUDENT_FOLDER FILE.gguf [FILE.gguf ...] [--name WORD]

For each quantized tensor of each file (dequantized by gguf-py), the student's weight is
rounded by shrink.quantize.fake_quant.fake from its F16 values (what the export's converter
hands llama.cpp's quantizer) as the type the file holds, and compared value for value.
Prints and records, per ggml type, how many values differ and the rms rounding error of the
model and of the file. Writes bench/results/rounding-check-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import import_module
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402


def check(student: Path, gguf_file: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from shrink.export.gguf_layout import tensor_shapes
    from shrink.gguf_owner import import_gguf
    from shrink.quantize.fake_quant import fake

    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    keys = [k for k in model.state_dict() if k != "lm_head.weight"]
    by_name = dict(zip((n for n, _ in tensor_shapes(model, student)), keys))
    params = model.state_dict()
    gguf = import_gguf()
    quants = import_module(gguf.__name__ + ".quants")
    out: dict[str, dict] = {}
    for t in gguf.GGUFReader(gguf_file).tensors:
        kind = t.tensor_type.name
        if kind in ("F32", "F16", "BF16") or t.name not in by_name:
            continue
        w = params[by_name[t.name]].detach().half().float()
        mine = fake(w, kind).numpy()
        real = quants.dequantize(t.data, t.tensor_type).reshape(mine.shape)
        row = out.setdefault(kind, {"tensors": 0, "values": 0, "differ": 0, "sq_model": 0.0, "sq_file": 0.0})
        row["tensors"] += 1
        row["values"] += mine.size
        row["differ"] += int((mine != real).sum())
        row["sq_model"] += float(((mine - w.numpy()) ** 2).sum())
        row["sq_file"] += float(((real - w.numpy()) ** 2).sum())
    for row in out.values():
        row["rms_model"] = (row.pop("sq_model") / row["values"]) ** 0.5
        row["rms_file"] = (row.pop("sq_file") / row["values"]) ** 0.5
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("student", type=Path, help="the student's Hugging Face folder (the export's input)")
    ap.add_argument("files", nargs="+", type=Path, help="GGUF files exported from it")
    ap.add_argument("--name", default="", help="a word for the record's file name")
    args = ap.parse_args()
    record = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
              "student": str(args.student), "files": {}}
    for f in args.files:
        types = record["files"][str(f)] = check(args.student, f)
        for kind, row in sorted(types.items()):
            print(f"{f.name} {kind:7s} {row['tensors']:3d} tensors {row['values']:10,d} values, "
                  f"{row['differ']:9,d} differ; rms error model {row['rms_model']:.3e}, file {row['rms_file']:.3e}")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out = Path(__file__).resolve().parent / "results" / f"rounding-check{'-' + args.name if args.name else ''}-{stamp}.json"
    out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
