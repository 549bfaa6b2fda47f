"""Choose the demo's distillation settings on its dev split (issue 11).

    python bench/demo_tune.py [--lr 2e-4 3e-4 5e-4] [--epochs 4] [--alpha 0.9]

Every combination distills Gemma 3 270M into the demo's student (3 layers, pruned
vocabulary, the teacher's 4-shot prefix, batch 16) on the training split and measures
the student in torch on the dev split. The test split is never read here: `shrink demo`
reports it with the settings this picks. Writes bench/results/demo-tune-<time>.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/tune-run"))
    ap.add_argument("--lr", type=float, nargs="+", default=[2e-4, 3e-4, 5e-4])
    ap.add_argument("--epochs", type=float, nargs="+", default=[4.0])
    ap.add_argument("--alpha", type=float, nargs="+", default=[0.9])
    ap.add_argument("--layers", type=int, default=3)
    args = ap.parse_args()

    from shrink.demo.pipeline import DemoConfig, demo_teacher
    from shrink.demo.task import write_task_files
    from shrink.distill.config import DistillConfig
    from shrink.distill.train import distill

    shutil.rmtree(args.out, ignore_errors=True)
    files = write_task_files(args.out / "data")  # dev and train only are used below
    teacher, defaults = demo_teacher(), DemoConfig(out=args.out)
    runs = []
    for lr, epochs, alpha in itertools.product(args.lr, args.epochs, args.alpha):
        started = time.perf_counter()
        m = distill(DistillConfig(
            teacher=teacher, data=files["train"], eval_data=files["dev"], out=args.out / f"lr{lr:g}-e{epochs:g}-a{alpha:g}",
            layers=args.layers, epochs=epochs, batch_size=defaults.batch_size, lr=lr, alpha=alpha, prune_vocab=True,
            teacher_prefix=files["prefix"],
        ))
        run = {"lr": lr, "epochs": epochs, "alpha": alpha, "dev_accuracy": m["metrics"]["accuracy"],
               "teacher_dev_accuracy": m["metrics"]["teacher_accuracy"], "seconds": round(time.perf_counter() - started, 1)}
        runs.append(run)
        print(json.dumps(run), flush=True)
    best = max(runs, key=lambda r: r["dev_accuracy"])
    print("\n| lr | epochs | alpha | dev accuracy | seconds |\n|---|---|---|---|---|")
    for r in runs:
        mark = " **(chosen)**" if r is best else ""
        print(f"| {r['lr']:g} | {r['epochs']:g} | {r['alpha']:g} | {r['dev_accuracy']:.1%}{mark} | {r['seconds']:.0f} |")
    record = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(), "split": "dev",
              "layers": args.layers, "runs": runs, "chosen": best}
    path = Path("bench/results") / f"demo-tune-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    print(f"\nrecorded {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
