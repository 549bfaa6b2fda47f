"""Choose a demo task's student recipe on its dev split (issues 11 and 15).

    python bench/demo_tune.py [--task sentiment] --variant '{}' --variant '{"loss_on": "all"}' ...

Every variant is a JSON object of DistillConfig fields put over the task's recipe
(shrink.demo.pipeline.TASKS[task].recipe). Each one distills the teacher (Gemma 3 270M)
into a student on the training split, then measures it on the **dev** split: in torch,
and as its Q4_K_M GGUF (`--quant`: another type) through llama.cpp (its size too, since the recipe has to fit the
size goal). The test split is never read here: `shrink demo` reports it with the recipe
this picks. Writes bench/results/demo-tune-<task>-<time>.json, one record per variant
as it finishes (a long sweep that stops keeps what it measured).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="sentiment")
    ap.add_argument("--variant", action="append", type=json.loads, default=None,
                    help="DistillConfig fields over the task's recipe, as JSON (repeatable; default: the recipe as is)")
    ap.add_argument("--out", type=Path, default=Path("bench/tune-run"))
    ap.add_argument("--no-gguf", action="store_true", help="measure in torch only")
    ap.add_argument("--embedding-type", default=None,
                    help="also measure the Q4_K_M with the token embedding in this type (shrink export --embedding-type)")
    ap.add_argument("--quant", default="Q4_K_M",
                    help="the GGUF type measured (and shipped with --embedding-type); the record's dev_q4_k_m* "
                         "fields hold this type's figures, and its `quant` field names it")
    ap.add_argument("--keep", action="store_true", help="keep each variant's student and GGUF (OUT/v<i>)")
    ap.add_argument("--labels", type=Path, default=None,
                    help="inputs-only tasks: the teacher's labels of the training split from an earlier run "
                         "(DIR/data/train-labeled.jsonl of shrink demo or of this script), instead of labeling again")
    ap.add_argument("--train-size", type=int, default=None,
                    help="extract only: this many training inputs (the default split's first, then more from the "
                         "same generator); the record counts the labeled rows trained on")
    ap.add_argument("--extra-train", type=Path, default=None,
                    help="more labeled training rows in shrink's task format (say bench/teacher_reviews.py's "
                         "WORK/labeled.jsonl), trained on after the training split's; the record hashes them")
    ap.add_argument("--threads", type=int, default=None,
                    help="llama.cpp threads for labeling and the Q4_K_M's score (default: all cores; 1 when two "
                         "sweeps share the machine, since llama.cpp's threads spin)")
    args = ap.parse_args()

    from shrink.demo.pipeline import TASKS, demo_teacher
    from shrink.distill.config import DistillConfig
    from shrink.distill.train import distill
    from shrink.evaluate import evaluate
    from shrink.export.flow import ExportOptions, export
    from shrink.export.parity import ParityError
    from shrink.runtime import open_runtime
    from shrink.runtime.torch_runtime import TorchRuntime
    from shrink.tasks import load_task

    import importlib

    task = TASKS[args.task]
    shutil.rmtree(args.out, ignore_errors=True)
    module = importlib.import_module(task.module)
    if args.train_size is not None and args.task != "extract":
        sys.exit("--train-size: only the extract task generates its training inputs")
    more = {"train_size": args.train_size} if args.train_size is not None else {}
    files = module.write_task_files(args.out / "data", **more)  # test is written, never read
    teacher = demo_teacher()
    train = files["train"]
    if not task.labeled and args.labels:  # labeled before: its inputs must be this training split's
        inputs = [json.loads(line)["prompt"] for line in files["train"].read_text(encoding="utf-8").splitlines()]
        labeled = [json.loads(line) for line in args.labels.read_text(encoding="utf-8").splitlines()]
        if not labeled or not {r["prompt"] for r in labeled} <= set(inputs):
            sys.exit(f"{args.labels}: not labels of this training split's inputs")
        train = args.out / "data" / "train-labeled.jsonl"
        shutil.copyfile(args.labels, train)
    elif not task.labeled:  # the teacher labels the inputs once, for every variant
        from shrink.label import LabelConfig, label

        train = args.out / "data" / "train-labeled.jsonl"
        label(LabelConfig(teacher=teacher, data=files["train"], out=train, teacher_prefix=files["prefix"],
                          max_new_tokens=task.max_new_tokens, threads=args.threads))
    extra = {}
    if args.extra_train is not None:
        rows = [line for line in args.extra_train.read_text(encoding="utf-8").splitlines() if line.strip()]
        plus = args.out / "data" / "train-plus-extra.jsonl"
        plus.write_text(train.read_text(encoding="utf-8") + "".join(r + "\n" for r in rows), encoding="utf-8")
        extra = {"extra_train": str(args.extra_train), "extra_train_rows": len(rows),
                 "extra_train_sha256": hashlib.sha256(args.extra_train.read_bytes()).hexdigest()}
        train = plus
    name = args.out.name.removeprefix("tune-")  # two sweeps started in the same second keep both records
    record_path = Path("bench/results") / f"demo-tune-{args.task}-{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    record = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(), "split": "dev",
              "task": args.task, "quant": args.quant, "recipe": task.recipe, "train_examples": len(train.read_text(encoding="utf-8").splitlines()),
              "train_sha256": hashlib.sha256(train.read_bytes()).hexdigest(), **extra, "runs": []}
    for i, variant in enumerate(args.variant or [{}]):
        fields = {**task.recipe, **variant}
        folder = args.out / f"v{i}"
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        m = distill(DistillConfig(teacher=teacher, data=train, out=folder / "student", prune_vocab=True,
                                  teacher_prefix=files["prefix"], metric=task.metric, **fields))
        distill_s = time.perf_counter() - started
        dev = load_task(files["dev"])
        torch_res = evaluate(TorchRuntime(folder / "student", "cpu"), dev, "student on dev (torch)", metric=task.metric)
        run = {"variant": variant, "distill_seconds": round(distill_s, 1), "dev_torch": round(torch_res.accuracy, 4),
               "parameters": m.metrics["parameters"], "vocab_kept": m.settings.get("vocab_kept"),
               "final_loss": m.metrics["final_loss"], "train_tokens_per_s": m.metrics["train_tokens_per_s"]}
        if not args.no_gguf:
            try:
                q = export(folder / "student", folder / args.quant,
                           ExportOptions("gguf", quant=args.quant, metric=task.metric, threads=args.threads),
                           eval_data=files["dev"])
                run.update(dev_q4_k_m=round(q.metrics["accuracy"], 4), q4_k_m_bytes=q.metrics["size_bytes"])
            except ParityError as e:  # the file is written and marked not valid: still measured, and said so
                gguf = next((folder / args.quant).glob("*.gguf"))
                res = evaluate(open_runtime(gguf, threads=args.threads), dev, f"{args.quant} on dev (llama.cpp)", metric=task.metric)
                run.update(dev_q4_k_m=round(res.accuracy, 4), q4_k_m_bytes=gguf.stat().st_size, parity_failed=str(e))
            if args.embedding_type:
                e = export(folder / "student", folder / f"{args.quant}-embedding",
                           ExportOptions("gguf", quant=args.quant, metric=task.metric, threads=args.threads,
                                         embedding_type=args.embedding_type), eval_data=files["dev"], min_top1=0, max_kl=1e9)
                run.update(embedding_type=e.settings["embedding_type"], dev_q4_k_m_embedding=round(e.metrics["accuracy"], 4),
                           q4_k_m_embedding_bytes=e.metrics["size_bytes"],
                           q4_k_m_embedding_top1=e.metrics["parity"]["top1_agreement"])
        record["runs"].append(run)
        print(json.dumps(run), flush=True)
        record_path.parent.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(record, indent=2) + "\n")
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print("\n| variant | dev (torch) | dev (Q4_K_M) | Q4_K_M MB | distill s |\n|---|---|---|---|---|")
    for r in record["runs"]:
        q4 = f"{r['dev_q4_k_m']:.1%} | {r['q4_k_m_bytes'] / 1e6:.1f}" if "dev_q4_k_m" in r else "- | -"
        print(f"| {json.dumps(r['variant'])} | {r['dev_torch']:.1%} | {q4} | {r['distill_seconds']:.0f} |")
    print(f"\nrecorded {record_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
