"""shrink's distillation against TRL's GKDTrainer: the same teacher, student, data and schedule.

    pip install trl        # not a dependency of shrink; only this script needs it
    python bench/trl_bench.py --teacher DIR --data train.jsonl --eval eval.jsonl \\
        [--layers 3] [--steps 100] [--batch-size 8] [--lr 2e-4] [--temperature 1] [--device auto]

What is held equal:
- teacher: the folder given, fp32 on the CPU, bf16 weights on CUDA (as shrink loads it);
- student: cut the same way (shrink.distill.student.even_layers + cut_student), fp32 weights;
- data: prompt + completion + EOS tokenized by shrink (batches.encode_examples), the loss
  on the completion tokens only (TRL: labels -100 elsewhere), the same batches in the
  same order (shrink's batch_order fed to TRL's data loader);
- objective: GKD with lmbda = 0 (no student-generated sequences: plain logit
  distillation) and beta = 0. In TRL 1.16's GKDTrainer.generalized_jsd_loss, beta = 0
  takes `F.kl_div(student_log_probs, teacher_log_probs, log_target=True)`, which is
  KL(teacher || student), the forward KL, shrink's `--loss fkl`; beta = 1 would be the
  reverse KL. GKD has no cross-entropy term, so shrink runs with --alpha 1. Both
  average over completion positions;
- temperature: TRL's compute_loss calls generalized_jsd_loss without a temperature (its
  `temperature` setting only drives sampling, unused at lmbda = 0), so its loss is at T = 1.
  At --temperature 1 (the default) both run as shipped; at another T this script makes
  TRL's loss divide the logits by T and multiply the result by T^2, as shrink's does, and
  says so in the results;
- optimizer: AdamW (weight decay 0), shrink's warm-up + cosine schedule (train.lr_at),
  gradient norm clipped to 1, the same seed; bf16 autocast on CUDA for both.

Measured: distillation tokens/s (tokens of the batches over the training loop's time)
and the final retention: the student's accuracy on --eval (torch, shrink.evaluate) over
the teacher's. Writes bench/results/trl-<time>.json.
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

RESULTS = Path(__file__).resolve().parent / "results"


def need_trl():
    try:
        import trl
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError as e:
        raise SystemExit(f"this benchmark needs TRL ({e}): pip install trl") from None
    return trl, GKDConfig, GKDTrainer


def run_shrink(args, work: Path) -> dict:
    from shrink.distill.config import DistillConfig
    from shrink.distill.train import distill

    cfg = DistillConfig(teacher=args.teacher, data=args.data, eval_data=args.eval, out=work / "shrink-student",
                        layers=args.layers, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        temperature=args.temperature, alpha=1.0, max_length=args.max_length, device=args.device,
                        seed=args.seed, save_every=10**9, force=True)
    m = distill(cfg)["metrics"]
    losses = [h["loss"] for h in json.loads((work / "shrink-student" / "training_log.json").read_text())]
    return {"tokens_per_s": m["train_tokens_per_s"], "accuracy": m["accuracy"], "teacher_accuracy": m["teacher_accuracy"],
            "retention": m["retention"], "final_loss": m["final_loss"], "losses": losses}


def run_trl(args, work: Path, teacher_accuracy: float) -> dict:
    trl, GKDConfig, GKDTrainer = need_trl()
    import torch
    from datasets import Dataset

    from shrink.distill.batches import batch_order, encode_examples
    from shrink.distill.student import cut_student, even_layers
    from shrink.distill.train import GRAD_CLIP, lr_at
    from shrink.evaluate import evaluate
    from shrink.hf import load_causal_lm, load_tokenizer, resolve_device
    from shrink.runtime.torch_runtime import TorchRuntime
    from shrink.tasks import load_task

    device = resolve_device(args.device)
    cuda = device == "cuda"
    torch.manual_seed(args.seed)
    teacher = load_causal_lm(args.teacher, device, torch.bfloat16 if cuda else torch.float32)
    tokenizer = load_tokenizer(args.teacher)
    total = teacher.config.get_text_config().num_hidden_layers
    student = cut_student(teacher, even_layers(total, args.layers)).to(device)

    seqs = encode_examples(tokenizer, load_task(args.data), args.max_length)
    rows = [dict(input_ids=s.ids, start=s.start) for s in seqs]
    per_epoch = -(-len(seqs) // args.batch_size)
    batches = [batch_order(len(seqs), args.batch_size, args.seed, step // per_epoch)[step % per_epoch]
               for step in range(args.steps)]  # shrink's batches, step by step
    tokens = sum(len(seqs[i].ids) for b in batches for i in b)
    pad = tokenizer.pad_token_id

    def collate(examples):
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for r, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[r, :n] = torch.tensor(e["input_ids"])
            attn[r, :n] = 1
            labels[r, e["start"] : n] = ids[r, e["start"] : n]  # completion tokens (+ EOS) only
        return {"input_ids": ids, "attention_mask": attn, "labels": labels}

    class ShrinkBatches(GKDTrainer):
        """GKDTrainer reading shrink's batches in shrink's order."""

        def get_train_dataloader(self):
            loader = torch.utils.data.DataLoader(self.train_dataset, batch_sampler=batches, collate_fn=collate)
            return self.accelerator.prepare(loader)

    T = args.temperature
    if T != 1.0:  # see the docstring: TRL's loss is at T = 1 as shipped
        plain = GKDTrainer.generalized_jsd_loss

        def tempered(*a, **kw):
            return plain(*a, temperature=T, **kw) * T**2

        ShrinkBatches.generalized_jsd_loss = staticmethod(tempered)

    config = GKDConfig(
        output_dir=str(work / "trl-output"), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=args.lr, lmbda=0.0, beta=0.0, temperature=T, max_grad_norm=GRAD_CLIP, weight_decay=0.0,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=not cuda, bf16=cuda, seed=args.seed,
        max_length=args.max_length, disable_dropout=True, gradient_accumulation_steps=1,
    )
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, args.steps, args.lr) / args.lr)
    trainer = ShrinkBatches(model=student, teacher_model=teacher, args=config, train_dataset=Dataset.from_list(rows),
                            processing_class=tokenizer, data_collator=collate, optimizers=(optimizer, schedule))
    out = trainer.train()
    seconds = out.metrics["train_runtime"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    student.eval()
    result = evaluate(TorchRuntime.from_model(student, tokenizer, device), load_task(args.eval), "evaluating TRL student")
    return {"trl_version": trl.__version__, "tokens_per_s": round(tokens / seconds, 1), "train_runtime_s": seconds,
            "accuracy": result.accuracy, "retention": result.accuracy / teacher_accuracy if teacher_accuracy else None,
            "final_loss": losses[-1] if losses else None, "losses": losses, "loss_temperature_patched": T != 1.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--eval", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", type=Path, default=Path("bench/trl-run"), help="Scratch folder (replaced).")
    args = ap.parse_args()
    need_trl()  # fail before any work

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    shrink_result = run_shrink(args, args.work)
    trl_result = run_trl(args, args.work, shrink_result["teacher_accuracy"])
    record = {
        "bench": "trl-gkd",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        | {"objective": "forward KL on completion tokens (shrink --loss fkl --alpha 1; TRL GKD lmbda=0 beta=0)"},
        "shrink": shrink_result,
        "trl": trl_result,
        "speedup_tokens_per_s": round(shrink_result["tokens_per_s"] / trl_result["tokens_per_s"], 2),
        # The same objective on the same batches: the per-step losses should agree (shrink
        # logs them to 5 decimals); a large difference means the setups drifted apart.
        "max_relative_loss_difference": max((abs(a - b) / a for a, b in
                                             zip(shrink_result["losses"], trl_result["losses"]) if a), default=None),
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"trl-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{'':8} {'tokens/s':>10} {'accuracy':>9} {'retention':>10} {'final loss':>11}")
    for name, r in (("shrink", shrink_result), ("TRL GKD", trl_result)):
        ret = f"{r['retention']:.3f}" if r["retention"] is not None else "-"
        print(f"{name:8} {r['tokens_per_s']:>10,.0f} {r['accuracy']:>9.3f} {ret:>10} {r['final_loss'] or 0:>11.4f}")
    print(f"teacher accuracy {shrink_result['teacher_accuracy']:.3f}; written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
