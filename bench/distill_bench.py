"""Distillation variants on the demo task (issue 7): the loss family, importance layer
selection and width pruning, each against the same baseline, in one run.

    python bench/distill_bench.py [--epochs 2] [--variants fkl rkl jsd skl importance ffn50]

Every variant distills Gemma 3 270M into a 3-layer student with the demo's recipe
(pruned vocabulary, the teacher's 4-shot prefix, batch 16, lr 3e-4, alpha 0.9, T 2) and
changes one thing. Accuracy is the student's in torch on the demo's 300 held-out
reviews; retention is against the teacher's (4-shot) accuracy. Needs the demo's data
(python bench/demo_bench.py, or shrink demo --out bench/demo-run). Writes
bench/results/distill-<time>.json.
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

VARIANTS = {
    "fkl": {},
    "rkl": {"loss": "rkl"},
    "jsd": {"loss": "jsd"},
    "skl": {"loss": "skl"},
    "importance": {"layer_selection": "importance"},
    "ffn50": {"ffn_ratio": 0.5},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("bench/demo-run/data"))
    ap.add_argument("--out", type=Path, default=Path("bench/distill-run"))
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()

    from shrink.demo.pipeline import demo_teacher
    from shrink.distill.config import DistillConfig
    from shrink.distill.train import distill

    teacher = demo_teacher()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    rows = []
    for name in args.variants:
        started = time.perf_counter()
        m = distill(DistillConfig(
            teacher=teacher, data=args.data / "train.jsonl", eval_data=args.data / "eval.jsonl",
            out=args.out / name, layers=3, epochs=args.epochs, batch_size=16, lr=3e-4, prune_vocab=True,
            teacher_prefix=args.data / "teacher_prefix.txt", **VARIANTS[name],
        ))
        mt, st = m["metrics"], m["settings"]
        rows.append({"variant": name, "changes": VARIANTS[name], "accuracy": mt["accuracy"],
                     "retention": mt["retention"], "teacher_accuracy": mt["teacher_accuracy"],
                     "parameters": mt["parameters"], "train_tokens_per_s": mt["train_tokens_per_s"],
                     "final_loss": mt["final_loss"], "layers_kept": st.get("layers_kept"),
                     "widths": st.get("widths"), "wall_s": round(time.perf_counter() - started, 1)})
        print(json.dumps(rows[-1]), flush=True)

    print(f"\n{'variant':12} {'acc %':>7} {'retention':>10} {'params M':>9} {'tok/s':>8} layers")
    for r in rows:
        print(f"{r['variant']:12} {100 * r['accuracy']:7.1f} {100 * r['retention']:9.1f}% "
              f"{r['parameters'] / 1e6:9.1f} {r['train_tokens_per_s']:8.0f} {r['layers_kept']}")
    results = Path("bench/results")
    results.mkdir(exist_ok=True)
    path = results / f"distill-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"machine": machine(), "epochs": args.epochs, "rows": rows}, indent=2))
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
