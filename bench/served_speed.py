"""Served examples/s of students against the teacher as served, over repeated passes (issue 15).

    python bench/served_speed.py STUDENT.gguf-or-folder [...] --data test.jsonl \
        --teacher gemma-3-270m-q4_k_m.gguf --teacher-prefix teacher_prefix.txt [--passes 5] [--threads 2]

A small student answers the demo's 300 reviews in 2-3 s, and one pass timed that short
moves by +-15% between runs on a quiet 2-core machine, while the teacher's 30 s pass is
steady. So this times every model the way `shrink eval` does (shrink.evaluate.evaluate:
one pass over the data, tokenization and prefix set-up included, in its own runtime,
the teacher with its few-shot prefix), PASSES times, the models taking turns pass by pass
so that a slow spell of the machine falls on all of them, and reports each model's median
examples/s and its ratio to the teacher's median. The answers are the same every pass
(greedy); the accuracy printed is the first pass's. Writes
bench/results/served-speed-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("students", nargs="+", type=Path, help="student artifacts (GGUF export folders or files)")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--teacher", type=Path, required=True, help="the teacher as served: its GGUF file")
    ap.add_argument("--teacher-prefix", type=Path, default=None)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="", help="a word for the record's file name")
    args = ap.parse_args()

    from shrink.evaluate import evaluate
    from shrink.runtime import open_runtime
    from shrink.tasks import load_task, with_prefix

    examples = load_task(args.data, None, need_completion=True)
    teacher_examples = examples
    if args.teacher_prefix:
        teacher_examples = with_prefix(examples, args.teacher_prefix.read_text(encoding="utf-8"))
    models = [("teacher", args.teacher, teacher_examples)] + [(str(p), p, examples) for p in args.students]
    runtimes = {name: open_runtime(path, threads=args.threads) for name, path, _ in models}
    rates: dict[str, list[float]] = {name: [] for name, _, _ in models}
    accuracy: dict[str, float] = {}
    try:
        for k in range(args.passes):
            for name, _, rows in models:
                r = evaluate(runtimes[name], rows, f"pass {k + 1}/{args.passes}")
                rates[name].append(r.examples_per_s)
                accuracy.setdefault(name, r.accuracy)
    finally:
        for rt in runtimes.values():
            rt.close()

    teacher = statistics.median(rates["teacher"])
    out = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(), "threads": args.threads,
           "data": str(args.data), "examples": len(examples), "passes": args.passes, "models": {}}
    print(f"{'model':60s} {'accuracy':>8s} {'median ex/s':>12s} {'range':>17s} {'x teacher':>9s}")
    for name, _, _ in models:
        med = statistics.median(rates[name])
        out["models"][name] = {"accuracy": accuracy[name], "examples_per_s": rates[name], "median": round(med, 2),
                               "times_teacher": round(med / teacher, 2)}
        print(f"{name[-60:]:60s} {accuracy[name]:8.1%} {med:12.1f} {min(rates[name]):8.1f}-{max(rates[name]):<8.1f}"
              f" {med / teacher:9.2f}")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = Path(__file__).resolve().parent / "results" / f"served-speed{'-' + args.name if args.name else ''}-{stamp}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"recorded {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
