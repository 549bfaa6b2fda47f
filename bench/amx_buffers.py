"""What keeping llama.cpp's weights out of its AMX buffers costs (README, "Patches of upstream libraries").

    python bench/amx_buffers.py [--run bench/demo-run] [--split test] [--threads N] [--repeats 2]

On a CPU with Intel AMX, shrink loads GGUF weights into llama.cpp's plain CPU buffers,
because its AMX buffers segfault on some models (ggml-org/llama.cpp#20824). This measures,
for the demo's served teacher (its GGUF with its prefix) and the student's Q8_0 and Q4_K_M
files from a `shrink demo` folder, the score and examples/s both ways, each in its own
process (a crash is recorded, not fatal), alternating the two ways `--repeats` times so
that drift in the machine's speed falls on both. Writes RESULTS/amx-buffers-<time>.json
(`--results`, default bench/results).
On a CPU without AMX the two ways are the same load, and the script says so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

WAYS = ("plain", "llama.cpp defaults")


def one(way: str, gguf: str, data: str, prefix: str | None, threads: int | None) -> dict:
    """Score one file one way, in this process (a child of main)."""
    import shrink.runtime.llama_cpp as llama_rt
    from shrink.evaluate import evaluate
    from shrink.tasks import load_task, with_prefix

    if way == "llama.cpp defaults":
        llama_rt.plain_weight_buffers = contextlib.nullcontext  # what shrink does without its patch
    examples = load_task(data)
    if prefix:
        examples = with_prefix(examples, Path(prefix).read_text(encoding="utf-8"))
    with llama_rt.LlamaCppRuntime(gguf, threads=threads) as rt:
        res = evaluate(rt, examples, f"{Path(gguf).name}, {way}")
    return {"accuracy": res.accuracy, "examples_per_s": res.examples_per_s}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("bench/demo-run"), help="a `shrink demo` output folder")
    ap.add_argument("--split", default="test")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--results", type=Path, default=Path("bench/results"), help="where the record goes")
    ap.add_argument("--one", nargs=4, metavar=("WAY", "GGUF", "DATA", "PREFIX"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        way, gguf, data, prefix = args.one
        print(json.dumps(one(way, gguf, data, prefix or None, args.threads)))
        return 0

    from shrink.runtime.llama_cpp import amx_cpu

    results = json.loads((args.run / "results.json").read_text(encoding="utf-8"))
    data = args.run / "data" / f"{args.split}.jsonl"
    models = [("teacher as served", results["teacher"], str(args.run / "data" / "teacher_prefix.txt"))]
    models += [(f"student {q}", str(next((args.run / f"student-{q}").glob("*.gguf"))), "") for q in ("Q8_0", "Q4_K_M")]
    rows = []
    for name, gguf, prefix in models:
        runs: dict[str, list] = {w: [] for w in WAYS}
        for _ in range(args.repeats):
            for way in WAYS:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--one", way, gguf, str(data), prefix]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    runs[way].append({"crashed": proc.returncode, "stderr_tail": proc.stderr[-400:]})
                else:
                    runs[way].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        row = {"model": name, "file": gguf, "runs": runs}
        for way in WAYS:
            ok = [r for r in runs[way] if "crashed" not in r]
            row[way] = ({"accuracy": ok[0]["accuracy"], "examples_per_s": statistics.median(r["examples_per_s"] for r in ok)}
                        if ok else {"crashed": runs[way][0]["crashed"]})
        if all("examples_per_s" in row[w] for w in WAYS):
            row["defaults_over_plain"] = round(row[WAYS[1]]["examples_per_s"] / row[WAYS[0]]["examples_per_s"], 2)
        rows.append(row)
        print(f"{name}: {json.dumps({w: row[w] for w in WAYS})} {row.get('defaults_over_plain', '')}")
    record = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(), "amx_cpu": amx_cpu(),
              "split": args.split, "run": str(args.run), "repeats": args.repeats, "rows": rows}
    if not record["amx_cpu"]:
        print("this CPU has no AMX: both ways load the same plain buffers")
    out = args.results / f"amx-buffers-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"recorded {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
