"""Per-example choice scores of GGUF models on a two-choice task, and what a bias would do (issue 15).

    python bench/choice_margins.py teacher.gguf student.gguf [...] --prefix teacher.gguf=teacher_prefix.txt \
        --data dev.jsonl [--threads 1]

Each model (a GGUF file, in llama.cpp, the way `shrink eval` scores choices: each choice's
log-probability after the prompt, shrink.evaluate.choose; `--prefix NAME=FILE` puts FILE
before every prompt of the model whose file is named NAME, as the teacher is served)
scores every example. Printed per model: its
accuracy, its false positives and negatives (the first choice taken as positive), and the
best accuracy one constant added to the first choice's score would give on this data (a
calibration a student could ship only if it were chosen on dev and held on test); then
which examples each model gets right, counted over the models. Writes
bench/results/choice-margins-<time>.json with every score.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path, help="GGUF files")
    ap.add_argument("--prefix", action="append", default=[],
                    help="MODEL=FILE: text put before every prompt of that model (its file name)")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    from shrink.evaluate import choose
    from shrink.runtime import open_runtime
    from shrink.tasks import load_task, with_prefix

    prefixes = dict(p.split("=", 1) for p in args.prefix)
    examples = load_task(args.data)
    if any(ex.choices is None or len(ex.choices) != 2 for ex in examples):
        sys.exit(f"{args.data}: every row needs exactly two choices")
    record = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
              "data": str(args.data), "models": []}
    right = []
    for path in args.models:
        prefix = Path(prefixes[path.name]).read_text(encoding="utf-8") if path.name in prefixes else ""
        rt = open_runtime(path, threads=args.threads)
        margins, gold = [], []
        for ex in with_prefix(examples, prefix):
            first, second = choose(rt, ex)[1]
            margins.append(first - second)
            gold.append(ex.completion == ex.choices[0])
        ok = [(m > 0) == g for m, g in zip(margins, gold)]
        right.append(ok)
        best = max((sum(((m + b / 20) > 0) == g for m, g in zip(margins, gold)), b / 20) for b in range(-60, 61))
        row = {"model": str(path), "prefix": prefixes.get(path.name), "accuracy": sum(ok) / len(ok),
               "false_first": sum((m > 0) and not g for m, g in zip(margins, gold)),
               "false_second": sum((m <= 0) and g for m, g in zip(margins, gold)),
               "best_bias": best[1], "best_bias_accuracy": best[0] / len(ok), "margins": margins}
        record["models"].append(row)
        print(f"{path}: accuracy {row['accuracy']:.2%}, wrong first choice {row['false_first']}, wrong second "
              f"{row['false_second']}; best constant {best[1]:+.2f} -> {row['best_bias_accuracy']:.2%}")
    patterns = Counter("".join("1" if r[i] else "0" for r in right) for i in range(len(examples)))
    record["right_patterns"] = dict(patterns)
    print("examples by which models got them right (1 = right, in the models' order):",
          dict(sorted(patterns.items(), key=lambda kv: -kv[1])))
    out = Path("bench/results") / f"choice-margins-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"recorded {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
