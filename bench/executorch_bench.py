"""Phones two ways (issue 16): the demo's student as an ExecuTorch .pte 8da4w and as a GGUF
Q4_K_M, each measured through its own runtime, in one run on one machine.

    python bench/executorch_bench.py [--student bench/demo-run/student] [--data bench/demo-run/data/test.jsonl]
                                     [--threads N] [--context 2048]

Both are exported with shrink's own flow (parity against the student included), then
measured as a device target measures a candidate (shrink.measure), each in processes of
its own with the same thread count:
- size: the model file;
- accuracy and examples/s on the demo's test split, through ExecuTorch's runtime
  (XNNPACK) and llama.cpp;
- peak RAM: of a process running the candidate's run.py (as a bundle ships it) with a
  context of --context tokens: the .pte is exported with a KV cache of that many tokens,
  llama.cpp gets it as n_ctx. The .pte's figure includes torch, which ExecuTorch's Python
  bindings import (an app linking the C++ runtime has no Python and no torch), so the peak
  of a process that only imports each runtime (and loads no model) is measured too, and
  the difference ("model RAM") is what the model, its cache and its buffers take.
The unquantized student in torch is measured too, as the reference. Writes
bench/results/executorch-<time>.json and prints a table. Needs the demo's output
(`shrink demo --out DIR` writes DIR/student and DIR/data/test.jsonl) and the executorch extra.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", type=Path, default=Path("bench/demo-run/student"))
    ap.add_argument("--data", type=Path, default=Path("bench/demo-run/data/test.jsonl"))
    ap.add_argument("--out", type=Path, default=Path("bench/executorch-run"))
    ap.add_argument("--threads", type=int, default=None, help="[default: all cores]")
    ap.add_argument("--context", type=int, default=2048, help="tokens of context both serve (the .pte's KV cache)")
    args = ap.parse_args()

    from shrink.evaluate import artifact_size
    from shrink.export.bundle import Serving, write_run_script
    from shrink.export.flow import TARGET_FORMATS, ExportOptions, export
    from shrink.measure import measure_artifact, serving_peak_ram_mb
    from shrink.tasks import load_task_for

    threads = args.threads or os.cpu_count()
    prompt = load_task_for(args.data, args.student)[0].prompt
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    rows = []
    imports = {  # what run.py imports before it loads a model, per runtime
        "executorch": "import torch\nimport executorch.kernels.quantized\nfrom executorch.runtime import Runtime\n"
                      "Runtime.get()\nfrom tokenizers import Tokenizer\n",
        "llama.cpp": "from llama_cpp import Llama\n",
    }
    import_ram = {}
    for runtime, code in imports.items():
        script = args.out / f"import-{runtime}.py"
        script.write_text(code)
        import_ram[runtime] = serving_peak_ram_mb(script)

    def record(name, fmt, path, build_s=0.0, manifest=None, runtime=None):
        m = measure_artifact(path, args.data, threads, device="cpu", label=f"measuring {name}",
                             context_length=args.context if fmt != "hf" else None)
        ram = None
        if runtime is not None:  # a process running run.py, as a bundle ships it
            serve = Serving(runtime=runtime, context_length=args.context, threads=threads, device="cpu",
                            logits_all=False if runtime == "llama.cpp" else None)
            ram = serving_peak_ram_mb(write_run_script(path, fmt, prompt, serve))
        imported = import_ram.get(runtime)
        parity = (manifest.metrics.get("parity") if manifest else None) or {}
        rows.append({"name": name, "format": fmt, "runtime": m.runtime, "size_bytes": artifact_size(path),
                     "accuracy": m.accuracy, "examples_per_s": m.examples_per_s, "peak_ram_mb": ram,
                     "runtime_import_ram_mb": imported,
                     "model_ram_mb": round(ram - imported, 1) if ram is not None else None,
                     "scoring_peak_ram_mb": m.peak_ram_mb, "build_s": round(build_s, 1),
                     "top1_agreement": parity.get("top1_agreement"), "mean_kl": parity.get("mean_kl")})
        print(json.dumps(rows[-1]), flush=True)

    def build(name, opts, runtime):
        started = time.perf_counter()
        man = export(args.student, args.out / name, opts, eval_data=args.data, min_top1=0, max_kl=1e9)
        record(name, TARGET_FORMATS[opts.target], args.out / name, time.perf_counter() - started, man, runtime)

    record("student torch fp32", "hf", args.student)
    build("pte-8da4w", ExportOptions("executorch", quant="8da4w", max_context=args.context, threads=threads,
                                     device="cpu"), "executorch")
    build("gguf-Q4_K_M", ExportOptions("gguf", quant="Q4_K_M", threads=threads), "llama.cpp")

    by = {r["name"]: r for r in rows}
    pte, gguf = by["pte-8da4w"], by["gguf-Q4_K_M"]
    compare = {
        "size (pte / gguf)": round(pte["size_bytes"] / gguf["size_bytes"], 3),
        "accuracy (pte - gguf, points)": round(100 * (pte["accuracy"] - gguf["accuracy"]), 2),
        "examples/s (pte / gguf)": round(pte["examples_per_s"] / gguf["examples_per_s"], 3),
        "peak RAM (pte / gguf)": round(pte["peak_ram_mb"] / gguf["peak_ram_mb"], 3),
        "model RAM above the runtime's import (pte / gguf)": round(pte["model_ram_mb"] / gguf["model_ram_mb"], 3),
    }
    print(f"\n{'artifact':20} {'runtime':11} {'size MB':>8} {'acc %':>7} {'ex/s':>8} {'RAM MB':>8} {'model MB':>9} "
          f"{'top-1':>7} {'KL':>8} {'build s':>8}")
    for r in rows:
        ram = f"{r['peak_ram_mb']:8.0f}" if r["peak_ram_mb"] is not None else f"{'-':>8}"
        model = f"{r['model_ram_mb']:9.0f}" if r["model_ram_mb"] is not None else f"{'-':>9}"
        print(f"{r['name']:20} {r['runtime']:11} {r['size_bytes'] / 1e6:8.1f} {100 * r['accuracy']:7.1f} "
              f"{r['examples_per_s']:8.1f} {ram} {model} "
              f"{r['top1_agreement'] if r['top1_agreement'] is not None else '-':>7} "
              f"{r['mean_kl'] if r['mean_kl'] is not None else '-':>8} {r['build_s']:8.1f}")
    print(f"RAM MB: peak of a process running run.py; model MB: that minus the peak of one that only imports "
          f"the runtime ({', '.join(f'{k} {v:.0f} MB' for k, v in import_ram.items())})")
    print()
    for name, value in compare.items():
        print(f"{name}: {value}")
    results = Path("bench/results")
    results.mkdir(exist_ok=True)
    path = results / f"executorch-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"machine": machine(), "threads": threads, "context": args.context,
                                "runtime_import_ram_mb": import_ram,
                                "student": str(args.student), "data": str(args.data), "rows": rows,
                                "compare": compare}, indent=2))
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
