"""Benchmark for the export formats (issue 4) and the importance matrix (issue 5), on the
demo's student, measured in one run on one machine.

    python bench/export_bench.py [--student bench/demo-run/student] [--threads N]

Every artifact is exported with shrink's own flow (parity included) and then measured in
a process of its own (shrink.measure): accuracy on the demo's 300 evaluation
reviews, examples/s with the same thread count for every runtime, and peak RAM. Ratios
are taken within this run. Goals:
- ONNX int8 >= 1.3x the examples/s of ONNX fp32, losing at most 1 point of accuracy;
- GPTQ 4-bit within 2 points of the student's accuracy;
- imatrix: accuracy at Q3_K_M, IQ4_XS and Q4_K_M with and without it (recorded);
- embedding: Q4_K_M with the token embedding as Q5_0, Q4_0 and IQ4_NL (`--embedding-type`)
  against llama.cpp's own choice (Q8_0 for Gemma's tied 640-wide embedding): bytes saved
  and accuracy (recorded).
Writes bench/results/export-<time>.json. Needs the demo's output (python bench/demo_bench.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

EMBEDDINGS = ("Q5_0", "Q4_0", "IQ4_NL")  # token embedding types that fit 640-wide rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", type=Path, default=Path("bench/demo-run/student"))
    ap.add_argument("--data", type=Path, default=Path("bench/demo-run/data/eval.jsonl"))
    ap.add_argument("--out", type=Path, default=Path("bench/export-run"))
    ap.add_argument("--threads", type=int, default=None, help="[default: all cores]")
    ap.add_argument("--skip", nargs="*", default=[], help="groups to skip: onnx gptq imatrix embedding")
    args = ap.parse_args()

    import os

    from shrink.export.flow import ExportOptions, export
    from shrink.measure import measure_artifact

    threads = args.threads or os.cpu_count()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    rows = []

    def record(name, fmt, path, seconds, manifest=None):
        m = measure_artifact(path, args.data, threads, device="cpu", label=f"measuring {name}")
        from shrink.evaluate import artifact_size

        parity = (manifest.metrics.get("parity") if manifest else None) or {}
        rows.append({"name": name, "format": fmt, "size_bytes": artifact_size(path), "accuracy": m.accuracy,
                     "examples_per_s": m.examples_per_s, "peak_ram_mb": m.peak_ram_mb, "build_s": round(seconds, 1),
                     "top1_agreement": parity.get("top1_agreement"), "mean_kl": parity.get("mean_kl")})
        print(json.dumps(rows[-1]), flush=True)

    def build(name, opts):
        started = time.perf_counter()
        man = export(args.student, args.out / name, opts, eval_data=args.data, min_top1=0, max_kl=1e9)
        record(name, opts.target, args.out / name, time.perf_counter() - started, man)

    record("student torch fp32", "hf", args.student, 0)
    if "onnx" not in args.skip:
        for q in ("fp32", "int8", "int4"):
            build(f"onnx-{q}", ExportOptions("onnx", quant=q, threads=threads, device="cpu"))
    if "gptq" not in args.skip:
        build("gptq-4bit", ExportOptions("gptq", bits=4, device="cpu"))
    if "imatrix" not in args.skip:
        for q in ("Q4_K_M", "IQ4_XS", "Q3_K_M"):
            build(f"gguf-{q}", ExportOptions("gguf", quant=q, threads=threads))
            build(f"gguf-{q}-imatrix", ExportOptions("gguf", quant=q, imatrix=True, threads=threads))
    if "embedding" not in args.skip:
        if "imatrix" in args.skip:
            build("gguf-Q4_K_M", ExportOptions("gguf", quant="Q4_K_M", threads=threads))
        for e in EMBEDDINGS:
            build(f"gguf-Q4_K_M-emb-{e}", ExportOptions("gguf", quant="Q4_K_M", embedding_type=e, threads=threads))

    by = {r["name"]: r for r in rows}
    student = by["student torch fp32"]
    goals = []
    if "onnx-int8" in by:
        i8, f32 = by["onnx-int8"], by["onnx-fp32"]
        speed = i8["examples_per_s"] / f32["examples_per_s"]
        loss = f32["accuracy"] - i8["accuracy"]
        goals += [("ONNX int8 examples/s vs ONNX fp32 (x)", round(speed, 2), ">= 1.3", speed >= 1.3),
                  ("ONNX int8 accuracy lost vs fp32 (points)", round(100 * loss, 2), "<= 1", loss <= 0.01),
                  ("ONNX int8 examples/s vs torch fp32 (x)", round(i8["examples_per_s"] / student["examples_per_s"], 2),
                   "(reported)", True)]
    if "gptq-4bit" in by:
        drop = student["accuracy"] - by["gptq-4bit"]["accuracy"]
        goals.append(("GPTQ 4-bit accuracy vs student (points lost)", round(100 * drop, 2), "<= 2", drop <= 0.02))
    for q in ("Q4_K_M", "IQ4_XS", "Q3_K_M"):
        if f"gguf-{q}-imatrix" in by:
            gain = by[f"gguf-{q}-imatrix"]["accuracy"] - by[f"gguf-{q}"]["accuracy"]
            goals.append((f"{q}: imatrix accuracy gain (points)", round(100 * gain, 2), "(reported)", True))
    for e in EMBEDDINGS:
        if f"gguf-Q4_K_M-emb-{e}" in by:
            emb, base = by[f"gguf-Q4_K_M-emb-{e}"], by["gguf-Q4_K_M"]
            goals += [(f"Q4_K_M, embedding {e}: size vs llama.cpp's choice (x)",
                       round(emb["size_bytes"] / base["size_bytes"], 3), "(reported)", True),
                      (f"Q4_K_M, embedding {e}: accuracy change (points)",
                       round(100 * (emb["accuracy"] - base["accuracy"]), 2), "(reported)", True)]

    print(f"\n{'artifact':22} {'size MB':>8} {'acc %':>7} {'ex/s':>8} {'RAM MB':>8} {'top-1':>7} {'KL':>8}")
    for r in rows:
        print(f"{r['name']:22} {r['size_bytes'] / 1e6:8.1f} {100 * r['accuracy']:7.1f} {r['examples_per_s']:8.1f} "
              f"{r['peak_ram_mb']:8.0f} {r['top1_agreement'] if r['top1_agreement'] is not None else '-':>7} "
              f"{r['mean_kl'] if r['mean_kl'] is not None else '-':>8}")
    print()
    for name, value, want, ok in goals:
        print(f"{'PASS' if ok else 'MISS'}  {name}: {value} (goal {want})")
    results = Path("bench/results")
    results.mkdir(exist_ok=True)
    path = results / f"export-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"machine": machine(), "threads": threads, "student": str(args.student),
                                "data": str(args.data), "rows": rows,
                                "goals": [dict(zip(("goal", "value", "want", "met"), g)) for g in goals]}, indent=2))
    print(f"\nwritten: {path}")
    return 0 if all(ok for *_, ok in goals) else 1


if __name__ == "__main__":
    sys.exit(main())
