"""Distillation from the offline teacher cache against the online teacher: speed and memory.

    python bench/teacher_cache_bench.py --teacher DIR --data train.jsonl \\
        [--layers 3] [--steps 100 | --epochs E] [--batch-size 8] [--top-k 64] \\
        [--teacher-prefix FILE] [--prune-vocab] [--device auto] [--work DIR]

Runs, each in a process of its own (so that its peak memory is its own):

1. `shrink teacher-cache`: the teacher once over the data, top-K log-probs written;
2. distill online, as `shrink distill` does by default: the teacher's outputs computed in
   one pass before training when the run covers an epoch and they fit in memory, else
   the teacher run every step;
3. distill online with the teacher run every step (--teacher-memory-mb 0);
4. distill from the cache.

For each: wall time of the process (imports and model loading included), the training
loop's tokens/s (distill's `train_tokens_per_s`: the teacher's forward passes inside the
loop count, a pass before it does not), peak resident memory (VmHWM) and, on CUDA, peak
allocated GPU memory, and the final loss. Writes bench/results/teacher-cache-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def child(kind: str, options: dict, result: Path) -> None:
    """Run one measured job in this process and write what it measured to `result`."""
    import torch

    from shrink.measure import peak_rss_bytes

    started = time.perf_counter()
    if kind == "cache":
        from shrink.distill.teacher_cache import CacheConfig, build_cache

        manifest = build_cache(CacheConfig(**{k: Path(v) if k in ("teacher", "data", "out", "teacher_prefix") and v else v
                                              for k, v in options.items()}))
    else:
        from shrink.distill.config import DistillConfig
        from shrink.distill.train import distill

        manifest = distill(DistillConfig.from_dict(options))
    out = {
        "wall_s": round(time.perf_counter() - started, 2),
        "peak_rss_mb": round(peak_rss_bytes() / 1e6, 1),
        "cuda_peak_mb": round(torch.cuda.max_memory_allocated() / 1e6, 1) if torch.cuda.is_available() else None,
        "metrics": manifest.metrics,
    }
    result.write_text(json.dumps(out))


def measure(kind: str, options: dict, work: Path) -> dict:
    result = work / f"{kind}-{options['out'].rsplit('/', 1)[-1]}.result.json"
    cmd = [sys.executable, __file__, "--child", kind, "--options", json.dumps(options), "--result", str(result)]
    print(f"--- {kind}: {options['out']}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} run failed (exit code {proc.returncode})")
    return json.loads(result.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--epochs", type=float)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--teacher-prefix", type=Path)
    ap.add_argument("--prune-vocab", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", type=Path, default=Path("bench/teacher-cache-run"), help="Scratch folder (replaced).")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--options", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, json.loads(args.options), args.result)
        return 0
    if args.teacher is None or args.data is None:
        ap.error("--teacher and --data are required")
    if args.steps is None and args.epochs is None:
        args.steps = 100

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    prefix = str(args.teacher_prefix) if args.teacher_prefix else None
    common = {"teacher": str(args.teacher), "data": str(args.data), "max_length": args.max_length,
              "teacher_prefix": prefix, "device": args.device}
    train = {**common, "layers": args.layers, "batch_size": args.batch_size, "prune_vocab": args.prune_vocab,
             **({"steps": args.steps} if args.steps else {"epochs": args.epochs})}
    cache_dir = str(args.work / "cache")
    runs = {
        "cache_build": measure("cache", {**common, "out": cache_dir, "top_k": args.top_k,
                                         "batch_size": args.batch_size}, args.work),
        "online": measure("distill", {**train, "out": str(args.work / "online")}, args.work),
        "online_teacher_every_step": measure("distill", {**train, "out": str(args.work / "online-every-step"),
                                                         "teacher_memory_mb": 0}, args.work),
        "cached": measure("distill", {**train, "out": str(args.work / "cached"), "teacher_cache": cache_dir},
                          args.work),
    }
    from shrink.manifest import Manifest

    cache_manifest = Manifest.read(cache_dir)
    record = {
        "bench": "teacher-cache",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                     if k not in ("child", "options", "result")},
        "cache": {k: cache_manifest.settings[k] for k in ("top_k", "vocab_size", "examples", "positions")}
        | {"size_bytes": cache_manifest.metrics["size_bytes"]},
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"teacher-cache-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")

    print(f"{'run':28} {'wall s':>8} {'loop tok/s':>11} {'peak RSS MB':>12} {'GPU peak MB':>12} {'final loss':>11}")
    for name, r in runs.items():
        m = r["metrics"]
        rate = m.get("train_tokens_per_s") or m.get("teacher_tokens_per_s")
        print(f"{name:28} {r['wall_s']:>8.1f} {rate or 0:>11,.0f} {r['peak_rss_mb']:>12,.0f} "
              f"{r['cuda_peak_mb'] if r['cuda_peak_mb'] is not None else '-':>12} {m.get('final_loss') or '-':>11}")
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
