"""The distillation recipe, written out in full.

teacher folder + task data  ->  student folder (Hugging Face model + manifest.json)

1. Check every input before anything is loaded or written.
2. Load the teacher; cut the student (evenly spaced layers, weights copied).
3. Train the student on completion tokens: KL to the teacher at temperature T mixed
   with cross-entropy on the reference (shrink.distill.loss). bf16 autocast on CUDA.
4. Save an atomic checkpoint every `save_every` steps; `resume` continues from it.
5. Optionally evaluate student and teacher on held-out data.
6. Write the student folder atomically, manifest last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shrink import artifact
from shrink.console import console, progress, spinner
from shrink.distill.batches import batch_order, collate, encode_examples
from shrink.distill.checkpoint import load_checkpoint, read_state, save_checkpoint
from shrink.distill.loss import distill_loss
from shrink.distill.student import cut_student, even_layers
from shrink.errors import ShrinkError
from shrink.hf import check_model_dir, load_causal_lm, load_tokenizer, resolve_device
from shrink.tasks import load_task

WARMUP_FRACTION = 0.05  # of all steps, linear warm-up before the cosine decay
MIN_LR_FRACTION = 0.1  # the cosine decays to this fraction of the peak learning rate
GRAD_CLIP = 1.0  # max global gradient norm


@dataclass(frozen=True)
class DistillConfig:
    teacher: Path  # Hugging Face model folder
    data: Path  # task JSONL used for training
    out: Path  # student folder to write
    layers: int  # decoder layers the student keeps
    eval_data: Path | None = None  # held-out task JSONL for accuracy after training
    steps: int | None = None  # optimizer steps; None = derived from epochs
    epochs: float = 2.0  # passes over the data when steps is None
    batch_size: int = 8  # sequences per step
    lr: float = 2e-4  # peak AdamW learning rate
    temperature: float = 2.0  # softens both distributions in the KL term
    alpha: float = 0.9  # weight of the KL term; 1 - alpha goes to cross-entropy
    max_length: int = 512  # tokens per sequence; longer prompts are trimmed on the left
    save_every: int = 200  # steps between checkpoints
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    resume: bool = False
    force: bool = False

    def settings(self) -> dict[str, Any]:
        """What decides the result (paths as given, not the run-control flags)."""
        d = dataclasses.asdict(self)
        for k in ("resume", "force", "out", "device"):
            d.pop(k)
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


def checkpoint_dir(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".checkpoint")


def validate(cfg: DistillConfig) -> tuple[list, list | None, int]:
    """Every user error, before any model is loaded or anything written."""
    check_model_dir(cfg.teacher, "teacher")
    config = json.loads((Path(cfg.teacher) / "config.json").read_text(encoding="utf-8"))
    total = config.get("num_hidden_layers") or config.get("text_config", {}).get("num_hidden_layers")
    if not isinstance(total, int):
        raise ShrinkError(f"{cfg.teacher}/config.json has no num_hidden_layers")
    even_layers(total, cfg.layers)  # raises on an out-of-range --layers
    if cfg.steps is not None and cfg.steps < 1:
        raise ShrinkError(f"--steps must be at least 1, got {cfg.steps}")
    if cfg.epochs <= 0:
        raise ShrinkError(f"--epochs must be positive, got {cfg.epochs}")
    if cfg.batch_size < 1:
        raise ShrinkError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if not 0.0 <= cfg.alpha <= 1.0:
        raise ShrinkError(f"--alpha must be between 0 and 1, got {cfg.alpha}")
    if cfg.temperature <= 0 or cfg.lr <= 0:
        raise ShrinkError("--temperature and --lr must be positive")
    train = load_task(cfg.data)
    evals = load_task(cfg.eval_data) if cfg.eval_data else None

    ckpt = checkpoint_dir(cfg.out)
    if Path(cfg.out).exists() and not cfg.force:
        raise ShrinkError(f"output folder {cfg.out} already exists (use --force to replace it)")
    if not Path(cfg.out).parent.exists():
        raise ShrinkError(f"--out: parent folder {Path(cfg.out).parent} does not exist")
    if cfg.resume and not ckpt.exists():
        raise ShrinkError(f"--resume: no checkpoint at {ckpt}")
    if ckpt.exists() and not cfg.resume and not cfg.force:
        raise ShrinkError(f"an interrupted run left {ckpt}; pass --resume to continue it or --force to start over")
    if cfg.resume and read_state(ckpt).get("settings") != cfg.settings():
        raise ShrinkError(f"--resume: {ckpt} was made with other settings; use the same options or --force")
    return train, evals, total


def lr_at(step: int, total: int, peak: float) -> float:
    warmup = max(1, int(total * WARMUP_FRACTION))
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * t)))


def distill(cfg: DistillConfig) -> dict[str, Any]:
    """Run the recipe; returns the student's manifest."""
    import torch

    train_examples, eval_examples, teacher_layers = validate(cfg)
    device = resolve_device(cfg.device)
    ckpt = checkpoint_dir(cfg.out)
    if cfg.force and not cfg.resume:
        shutil.rmtree(ckpt, ignore_errors=True)
    torch.manual_seed(cfg.seed)

    with spinner() as sp:
        sp.add_task(f"loading teacher {cfg.teacher}", total=None)
        teacher_dtype = torch.bfloat16 if device == "cuda" else torch.float32
        teacher = load_causal_lm(Path(cfg.teacher), device, teacher_dtype)
        tokenizer = load_tokenizer(Path(cfg.teacher))
    keep = even_layers(teacher_layers, cfg.layers)
    student = cut_student(teacher, keep).to(device)
    student.train()
    console.print(
        f"student: {len(keep)} of {teacher_layers} layers {keep}, "
        f"{_params(student) / 1e6:.1f}M parameters (teacher {_params(teacher) / 1e6:.1f}M)"
    )

    seqs = encode_examples(tokenizer, train_examples, cfg.max_length)
    per_epoch = math.ceil(len(seqs) / cfg.batch_size)
    total_steps = cfg.steps or max(1, math.ceil(per_epoch * cfg.epochs))
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)

    step, history = 0, []
    if cfg.resume:
        state = load_checkpoint(ckpt, student, optimizer)
        step, history = state["step"], state["history"]
        console.print(f"resuming from {ckpt} at step {step}/{total_steps}")

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    pad = tokenizer.pad_token_id
    tokens_seen, started = 0, time.perf_counter()
    with progress("step", "loss", "tok_s") as bar:
        task = bar.add_task("distilling", total=total_steps, completed=step, loss="", tok_s="")
        while step < total_steps:
            epoch, index = divmod(step, per_epoch)
            batch = [seqs[i] for i in batch_order(len(seqs), cfg.batch_size, cfg.seed, epoch)[index]]
            ids, attn, mask = collate(batch, pad, device)
            with torch.no_grad():
                t_logits = teacher(input_ids=ids, attention_mask=attn).logits  # (batch, seq, vocab)
            with autocast:
                s_logits = student(input_ids=ids, attention_mask=attn).logits  # (batch, seq, vocab)
            loss, kl, ce = distill_loss(s_logits, t_logits, ids, mask, cfg.temperature, cfg.alpha)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, cfg.lr)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), GRAD_CLIP)
            optimizer.step()

            step += 1
            tokens_seen += int(attn.sum())
            history.append({"step": step, "loss": round(loss.item(), 5), "kl": round(kl.item(), 5), "ce": round(ce.item(), 5)})
            rate = tokens_seen / (time.perf_counter() - started)
            bar.update(task, advance=1, loss=f"loss {loss.item():.4f}", tok_s=f"{rate:,.0f} tok/s")
            if step % cfg.save_every == 0 or step == total_steps:
                save_checkpoint(ckpt, student, optimizer, {"step": step, "history": history, "settings": cfg.settings()})
    elapsed = time.perf_counter() - started

    metrics: dict[str, Any] = {
        "final_loss": history[-1]["loss"] if history else None,
        "train_tokens_per_s": round(tokens_seen / elapsed, 1) if elapsed > 0 else None,
        "parameters": _params(student),
        "teacher_parameters": _params(teacher),
    }
    student.eval()
    if eval_examples:
        metrics.update(_evaluate_pair(student, teacher, tokenizer, device, eval_examples, cfg.eval_data))

    settings = {
        **cfg.settings(),
        "layers_kept": keep,
        "teacher_layers": teacher_layers,
        "steps": total_steps,
        "data_sha256": artifact.sha256_file(Path(cfg.data)),
        "device": device,
    }
    with artifact.staged_folder(cfg.out, cfg.force) as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "training_log.json").write_text(json.dumps(history))
        manifest = artifact.finish(
            tmp, kind="student", format="hf", source=Path(cfg.teacher), settings=settings, metrics=metrics
        )
    shutil.rmtree(ckpt, ignore_errors=True)
    return manifest


def _evaluate_pair(student, teacher, tokenizer, device, examples, eval_path) -> dict[str, Any]:
    from shrink.evaluate import evaluate, retention
    from shrink.runtime.torch_runtime import TorchRuntime

    s = evaluate(TorchRuntime.from_model(student, tokenizer, device), examples, "evaluating student")
    t = evaluate(TorchRuntime.from_model(teacher, tokenizer, device), examples, "evaluating teacher")
    return {
        "accuracy": s.accuracy,
        "examples_per_s": s.examples_per_s,
        "teacher_accuracy": t.accuracy,
        "teacher_examples_per_s": t.examples_per_s,
        "retention": retention(s.accuracy, t.accuracy),
        "eval_examples": s.examples,
        "eval_data_sha256": artifact.sha256_file(Path(eval_path)),
        "eval_runtime": s.runtime,
    }


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())

