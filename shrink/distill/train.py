"""The distillation recipe, written out in full.

teacher (folder or GGUF) + task data  ->  student folder (Hugging Face model + manifest.json)

1. Check every input before anything is loaded or written.
2. Load the teacher (a GGUF file is converted once into a cached folder); build the
   student (shrink.distill.student.build_student): the teacher's layers cut evenly or by
   importance on the task (as many as a size budget allows: shrink.distill.size_budget),
   optionally narrowed (shrink.distill.width, shrink.distill.hidden_width), or an
   existing smaller model (--student); optionally prune its vocabulary to the tokens of
   the training data and --vocab-data (shrink.distill.prune_vocab, never the evaluation
   data; planned first, as a size budget counts the rows kept), the teacher then being
   read on those tokens only.
3. Train the student on completion tokens (`loss_on` all: the prompt's too, matched with
   the teacher's past a teacher prefix: shrink.distill.batches): a divergence to the
   teacher at temperature T (fkl, rkl, jsd or skl: shrink.distill.loss) mixed with
   cross-entropy on the reference completion, plus optional hidden-state alignment
   (shrink.distill.hidden); --split-words spells copied words in the student's smaller
   pieces (shrink.distill.split_words). The teacher's outputs come from the teacher itself or from
   a teacher cache (shrink.distill.teacher_cache). bf16 autocast on CUDA; under
   torchrun, each rank takes its share of every global batch (shrink.distill.distributed).
4. Save an atomic checkpoint every `save_every` steps (rank 0), with the sha256 of every
   input file (shrink.distill.input_hashes); `resume` continues from it when the inputs
   are byte for byte the same.
5. Optionally evaluate student and teacher on held-out data.
6. Write the student folder atomically, manifest last.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shrink import artifact
from shrink.console import console, progress, spinner
from shrink.distill.batches import (LOSS_ON, batch_order, check_aligned, collate, completion_flags, encode_examples,
                                    loss_positions)
from shrink.distill import distributed, input_hashes, on_policy, teacher_cache
from shrink.distill.checkpoint import read_state
from shrink.distill.gradual import GradualWidth
from shrink.distill.config import DistillConfig
from shrink.distill.loss import IGNORE, distill_loss
from shrink.distill.size_budget import export_types, shipped_gguf
from shrink.distill.prune_vocab import plan_pruning, prune_model, save_pruned_tokenizer
from shrink.distill.split_words import WordSplitter, teacher_rows
from shrink.distill.trainable import TRAINABLE, mark_trainable
from shrink.distill.tokenizer_files import check_teacher_files, keep_teacher_files
from shrink.distill.hidden import HiddenAlignment, parse_targets
from shrink.distill.student import build_student, even_layers, keep_end_of_turn, stop_at_end_of_turn, student_eos
from shrink.distill.vocab_sources import read_vocab_data, task_texts
from shrink.errors import ShrinkError
from shrink.hf import check_model_dir, load_causal_lm, load_tokenizer, resolve_device
from shrink.logits import selected_logits
from shrink.prefix import PrefixCache, usable_prefix
from shrink.quantize.fake_quant import RoundedWeights
from shrink.manifest import Manifest
from shrink.tasks import load_task, with_prefix

WARMUP_FRACTION = 0.05  # of all steps, linear warm-up before the cosine decay
MIN_LR_FRACTION = 0.1  # the cosine decays to this fraction of the peak learning rate
GRAD_CLIP = 1.0  # max global gradient norm


def checkpoint_dir(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".checkpoint")


@dataclass(frozen=True)
class Checked:
    """What validate() read and found."""

    train: list  # training examples (shrink.tasks.Example)
    evals: list | None  # held-out examples (--eval)
    vocab_texts: list[str]  # --vocab-data texts the pruned vocabulary covers too
    teacher_dir: Path  # the teacher's Hugging Face folder (a GGUF teacher converted into the cache)
    teacher_layers: int
    inputs: list[dict] | None  # every input file by sha256 (shrink.distill.input_hashes); None unless hashed


def validate(cfg: DistillConfig, hash_inputs: bool = True) -> Checked:
    """Every user error, before any model is loaded or anything written. `hash_inputs`:
    hash every input file (under torchrun, rank 0 alone does), to refuse a --resume or a
    --teacher-cache that read other bytes."""
    teacher_path = Path(cfg.teacher)
    if teacher_path.is_file() and teacher_path.suffix != ".gguf":
        raise ShrinkError(f"teacher {teacher_path} is a file but not .gguf (expected a model folder or a GGUF file)")
    if not teacher_path.is_file():
        check_model_dir(teacher_path, "teacher")
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
    from shrink.distill.loss import LOSSES

    if cfg.loss not in LOSSES:
        raise ShrinkError(f"--loss must be one of {', '.join(LOSSES)}, got {cfg.loss!r}")
    if cfg.loss_on not in LOSS_ON:
        raise ShrinkError(f"--loss-on must be one of {', '.join(LOSS_ON)}, got {cfg.loss_on!r}")
    if not 0.0 < cfg.beta < 1.0:
        raise ShrinkError(f"--beta must be strictly between 0 and 1, got {cfg.beta}")
    if not 0.0 <= cfg.on_policy <= 1.0:
        raise ShrinkError(f"--on-policy must be between 0 and 1 (the fraction of on-policy batches), got {cfg.on_policy}")
    if cfg.hidden_weight < 0:
        raise ShrinkError(f"--hidden-weight must be 0 (off) or positive, got {cfg.hidden_weight}")
    if not 0.0 <= cfg.split_words <= 1.0:
        raise ShrinkError(f"--split-words must be between 0 and 1 (the chance a copied word is split), got {cfg.split_words}")
    if cfg.hidden_targets is not None and not cfg.hidden_weight:
        raise ShrinkError("--hidden-targets: only with --hidden-weight (it says which teacher layers to align with)")
    if cfg.split_words and cfg.hidden_weight:
        raise ShrinkError("--split-words: not with --hidden-weight (a split sequence has more positions than the "
                          "teacher's, so their hidden states do not pair up)")
    if cfg.trainable not in TRAINABLE:
        raise ShrinkError(f"--trainable must be one of {', '.join(TRAINABLE)}, got {cfg.trainable!r}")
    if cfg.trainable != "all" and cfg.fsdp:
        raise ShrinkError(f"--trainable {cfg.trainable}: not with --fsdp (FSDP shards the weights that train; "
                          "DDP, the default under torchrun, trains a subset)")
    if cfg.layer_selection not in ("even", "importance", "first"):
        raise ShrinkError(f"--layer-selection must be even, importance or first, got {cfg.layer_selection!r}")
    if cfg.ffn_refit and cfg.ffn_ratio >= 1.0:
        raise ShrinkError("--ffn-refit: only with --ffn-ratio below 1 (it re-fits what width pruning keeps)")
    if cfg.head_dim is not None and cfg.student is not None:
        raise ShrinkError("--head-dim: not with --student (it narrows the heads of the layers cut from the teacher)")
    if cfg.head_dim is not None and cfg.head_dim <= 0:
        raise ShrinkError(f"--head-dim must be a positive number of dimensions, got {cfg.head_dim}")
    if cfg.width_scores != "activation" and cfg.ffn_ratio >= 1.0 and cfg.heads_ratio >= 1.0:
        raise ShrinkError(f"--width-scores {cfg.width_scores}: only with --ffn-ratio or --heads-ratio below 1 "
                          "(it ranks what width pruning keeps)")
    if cfg.width_scores == "fisher" and cfg.student is not None:
        raise ShrinkError("--width-scores fisher: not with --student (the scores are the teacher's layers', "
                          "and --student's layers are not the teacher's)")
    for flag, ratio in (("--ffn-ratio", cfg.ffn_ratio), ("--heads-ratio", cfg.heads_ratio)):
        if not 0.0 < ratio <= 1.0:
            raise ShrinkError(f"{flag} must be above 0 and at most 1 (1 keeps every one), got {ratio}")
    if cfg.prune_gradually and cfg.ffn_ratio >= 1.0:
        raise ShrinkError("--prune-gradually: only with --ffn-ratio below 1 (it is how the MLPs reach that width)")
    if cfg.prune_gradually and cfg.ffn_refit:
        raise ShrinkError("--prune-gradually: not with --ffn-refit (the re-fit is for channels cut before training)")
    for flag, on in (("--prune-gradually", cfg.prune_gradually), ("--qat", cfg.qat)):
        if on and cfg.fsdp:
            raise ShrinkError(f"{flag}: not with --fsdp (it works on each weight whole; DDP, the default under "
                              "torchrun, keeps them whole)")
    from shrink.distill.size_budget import budget_of

    budget = budget_of(cfg)  # --max-size-mb/--for-target, checked
    if cfg.qat:
        from shrink.quantize.fake_quant import FILE_TYPES, MODELED

        quant, embedding = shipped_gguf(cfg)
        if quant not in FILE_TYPES:
            raise ShrinkError(f"--qat: no rounding model for {quant} files; types with one: {', '.join(FILE_TYPES)}")
        if embedding is not None and embedding not in MODELED:
            raise ShrinkError(f"--qat: no rounding model for a {embedding} token embedding; types with one: "
                              f"{', '.join(MODELED)}")
    if cfg.student is None and cfg.layers is None and budget is None:
        raise ShrinkError("--layers is required (or --max-size-mb/--for-target to fit a size, or --student DIR, "
                          "to start from an existing smaller model)")
    if cfg.student is not None:
        if cfg.layers is not None:
            raise ShrinkError("--layers and --student cannot be used together: --student starts from that model, no layers are cut")
        if cfg.layer_selection != "even":
            raise ShrinkError("--layer-selection: not with --student (no layers are cut from the teacher)")
        if cfg.hidden_weight:
            raise ShrinkError("--hidden-weight: not with --student (its layers were not copied from the teacher's)")
        check_model_dir(Path(cfg.student), "student")
    if cfg.vocab_top and not cfg.prune_vocab:
        raise ShrinkError("--vocab-top: only with --prune-vocab (it chooses the tokens a pruned vocabulary keeps)")
    if cfg.vocab_top < 0:
        raise ShrinkError(f"--vocab-top must be 0 or more, got {cfg.vocab_top}")
    if cfg.vocab_data and not cfg.prune_vocab:
        raise ShrinkError("--vocab-data: only with --prune-vocab (it chooses the tokens a pruned vocabulary keeps)")
    from shrink.chat import resolve_template
    from shrink.chat import template_spec

    template = resolve_template(template_spec(cfg.chat_template, cfg.data), cfg.teacher)
    train = load_task(cfg.data, template)
    evals = load_task(cfg.eval_data, template) if cfg.eval_data else None
    if cfg.teacher_prefix is not None and not Path(cfg.teacher_prefix).is_file():
        raise ShrinkError(f"--teacher-prefix: no such file {cfg.teacher_prefix}")
    vocab_texts = [text for path in cfg.vocab_data for text in read_vocab_data(path)]

    ckpt = checkpoint_dir(cfg.out)
    artifact.check_output_free(Path(cfg.out), cfg.force)
    if cfg.resume and not ckpt.exists():
        raise ShrinkError(f"--resume: no checkpoint at {ckpt}")
    if ckpt.exists() and not cfg.resume and not cfg.force:
        raise ShrinkError(f"an interrupted run left {ckpt}; pass --resume to continue it or --force to start over")
    if cfg.resume and read_state(ckpt).get("settings") != cfg.settings():
        raise ShrinkError(f"--resume: {ckpt} was made with other settings; use the same options or --force")
    inputs = input_hashes.distill_inputs(cfg) if hash_inputs else None
    if cfg.resume and inputs is not None:
        input_hashes.check_unchanged(read_state(ckpt).get("inputs", []), inputs)

    from shrink.teacher_gguf import resolve_teacher

    folder = resolve_teacher(teacher_path)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    total = config.get("num_hidden_layers") or config.get("text_config", {}).get("num_hidden_layers")
    if not isinstance(total, int):
        raise ShrinkError(f"{folder}/config.json has no num_hidden_layers")
    if cfg.student is not None:
        from shrink.distill.student import check_student_folder

        check_student_folder(Path(cfg.student), folder, train)
    elif cfg.layers is not None:
        even_layers(total, cfg.layers)  # raises on an out-of-range --layers
    from shrink.distill.hidden_width import check_hidden_options

    check_hidden_options(cfg, Path(cfg.student or folder), "--student's" if cfg.student else "the teacher's")
    if inputs is not None:
        teacher_cache.check_matches(cfg, folder, inputs)  # a --teacher-cache made for this run
    check_teacher_files(folder, cfg.student, cfg.prune_vocab)  # a student llama.cpp's converter can export
    return Checked(train, evals, vocab_texts, folder, total, inputs)


def lr_at(step: int, total: int, peak: float) -> float:
    warmup = max(1, int(total * WARMUP_FRACTION))
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * t)))


def distill(cfg: DistillConfig) -> Manifest | None:
    """Run the recipe; returns the student's manifest. Under torchrun (shrink.distill.
    distributed) every process trains on its share of each batch; rank 0 alone evaluates
    and writes, the others return None once it is done."""
    with distributed.process_group(cfg.device) as ranks:
        manifest = _distill(cfg, ranks)
        ranks.barrier()  # the other ranks wait here while rank 0 evaluates and writes
    return manifest


def _distill(cfg: DistillConfig, ranks: distributed.Ranks) -> Manifest | None:
    import torch

    checked = distributed.main_first(ranks, validate, cfg, ranks.is_main)
    train_examples, eval_examples = checked.train, checked.evals
    teacher_dir, teacher_layers = checked.teacher_dir, checked.teacher_layers
    if cfg.hidden_targets and cfg.hidden_weight and cfg.layers:  # refused before the teacher loads
        parse_targets(cfg.hidden_targets, cfg.layers, teacher_layers)
    device = resolve_device(cfg.device)
    ckpt = checkpoint_dir(cfg.out)
    if cfg.force and not cfg.resume:
        shutil.rmtree(ckpt, ignore_errors=True)
    torch.manual_seed(cfg.seed)

    with spinner() as sp:
        sp.add_task(f"loading teacher {cfg.teacher}", total=None)
        teacher_dtype = torch.bfloat16 if device == "cuda" else torch.float32
        teacher = load_causal_lm(teacher_dir, device, teacher_dtype)
        tokenizer = load_tokenizer(teacher_dir)
    plan = None
    if cfg.prune_vocab:  # planned before the student is built: a size budget counts the rows it keeps
        plan = plan_pruning(tokenizer, task_texts(train_examples) + checked.vocab_texts,  # never the eval data
                            student_eos(teacher, tokenizer, train_examples), top=cfg.vocab_top)
    student, keep, student_info = build_student(cfg, teacher, tokenizer, train_examples, teacher_layers, device,
                                                teacher_dir, plan)
    turn_ends = stop_at_end_of_turn(student, tokenizer, train_examples)
    if turn_ends:
        console.print(f"the student stops at its chat template's end of turn (eos ids {student.generation_config.eos_token_id})")
    student_tokenizer, scratch = tokenizer, tempfile.TemporaryDirectory()
    if plan is not None:
        prune_model(student, plan)
        student_tokenizer = save_pruned_tokenizer(tokenizer, plan, Path(scratch.name))
        console.print(f"vocabulary pruned to the task: {len(plan.kept):,} of {plan.teacher_vocab_size:,} tokens kept")
    student = student.to(device)
    student.train()
    kept_rows = torch.tensor(plan.kept, device=device) if plan else None  # teacher columns the student has
    id_map = plan.id_map().to(device) if plan else None  # teacher id -> student id
    console.print(
        (f"student: {len(keep)} of {teacher_layers} layers {keep}, " if keep else f"student: {cfg.student}, ")
        + f"{_params(student) / 1e6:.1f}M parameters (teacher {_params(teacher) / 1e6:.1f}M)"
    )
    # --hidden-weight: hooks catch both models' layer outputs in the forward passes below.
    align = None
    if cfg.hidden_weight:
        pairs = parse_targets(cfg.hidden_targets, len(keep), teacher_layers) if cfg.hidden_targets else keep
        if cfg.hidden_targets:
            paired = ", ".join(f"{i}->{'none' if j is None else j}" for i, j in enumerate(pairs))
            console.print(f"hidden-state alignment (student layer -> teacher layer): {paired}")
        align = HiddenAlignment(student, teacher, pairs, student_info.get("hidden_channels_kept"))

    seqs = encode_examples(tokenizer, train_examples, cfg.max_length)  # what the student reads
    t_seqs = seqs
    if cfg.teacher_prefix:
        prefix_text = Path(cfg.teacher_prefix).read_text(encoding="utf-8")
        t_seqs = encode_examples(tokenizer, with_prefix(train_examples, prefix_text), cfg.max_length)
        check_aligned(seqs, t_seqs, cfg.data)
    seqs, t_seqs = loss_positions(seqs, t_seqs, cfg.loss_on, cfg.data)  # the same list when no prefix
    if cfg.loss_on == "all":
        _report_prompt_positions(seqs)
    shared = usable_prefix([s.ids for s in t_seqs], min(s.loss_from for s in t_seqs) - 1)
    t_cache = PrefixCache(teacher, shared, device) if shared and not cfg.teacher_cache else None
    if t_cache:
        console.print(f"shared prompt prefix: {len(shared)} tokens, run once through the teacher")
    per_epoch = math.ceil(len(seqs) / cfg.batch_size)
    total_steps = cfg.steps or max(1, math.ceil(per_epoch * cfg.epochs))
    count = mark_trainable(student, cfg.trainable)  # before DDP, which syncs the gradients of what trains
    if cfg.trainable != "all":
        console.print(f"training only the {cfg.trainable.replace('-', ' and ')}: {count:,} weights")
    gradual = None  # --prune-gradually: the MLP channels shrink during training (shrink.distill.gradual)
    if cfg.prune_gradually:
        gradual = GradualWidth(student, student_info["widths"]["intermediate_size"][1], total_steps)
        if cfg.resume:  # cut to the checkpoint's channels before its weights load
            gradual.load(read_state(ckpt)["gradual"])
    rounder = None  # --qat: each step sees the weights as the export will round them (shrink.quantize.fake_quant)
    if cfg.qat:
        quant, embedding = shipped_gguf(cfg)
        types = export_types(student, teacher_dir, quant, embedding)
        rounder = RoundedWeights(student, types)
        console.print(f"training through the rounding of {quant}" + (f" (embedding {embedding})" if embedding else "")
                      + f": {len(types)} weights, as {', '.join(sorted(set(types.values())))}")
    trainee = distributed.StudentStep(student, ranks, cfg.fsdp, device)  # DDP or FSDP under torchrun
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)

    step, history = 0, []
    if cfg.resume:
        state = trainee.load_checkpoint(ckpt, optimizer)
        step, history = state["step"], state["history"]
        console.print(f"resuming from {ckpt} at step {step}/{total_steps}")

    # The teacher is frozen, so its outputs are the same every epoch: when training reads
    # every example at least once and the outputs fit in memory, they are computed once
    # (float16) and training reads them from there.
    vocab_out = len(plan.kept) if plan else student.get_output_embeddings().weight.shape[0]
    positions = sum(q.positions for q in seqs)  # loss positions per pass over the data
    pad = tokenizer.pad_token_id
    teacher_outputs = None  # with --teacher-cache, read from the cache instead of computed
    if cfg.teacher_cache:
        teacher_outputs = teacher_cache.CachedTeacher(cfg.teacher_cache, [q.positions for q in seqs], device, id_map)
    whole_epochs = (total_steps - step) >= per_epoch
    # Not with --hidden-weight: the alignment needs the teacher's hidden states every batch.
    # Over the memory budget (`loss_on` all multiplies the positions), the teacher runs online.
    if teacher_outputs is None and whole_epochs and not cfg.hidden_weight and cfg.on_policy < 1 and positions * vocab_out * 2 <= cfg.teacher_memory_mb * 2**20:
        teacher_outputs = precompute_teacher(teacher, t_seqs, cfg.batch_size, pad, device, kept_rows, t_cache)

    # --on-policy: the batches the student writes itself (shrink.distill.on_policy), scored by the live teacher.
    rollout = on_policy.Rollout(cfg, student, trainee, teacher, plan, pad, device, ranks, t_cache) if cfg.on_policy else None
    # --split-words: copied words spelled in smaller pieces (shrink.distill.split_words).
    splitter = None
    if cfg.split_words:
        splitter = WordSplitter(tokenizer, student_tokenizer, plan.kept if plan else None, cfg.split_words, cfg.seed,
                                cfg.max_length)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    tokens_seen, started = 0, time.perf_counter()
    with progress("step", "loss", "tok_s") as bar:
        task = bar.add_task("distilling", total=total_steps, completed=step, loss="", tok_s="")
        while step < total_steps:
            if gradual is not None and (kept := gradual.at(step, optimizer)) is not None:
                trainee.reshaped()  # DDP's gradient buckets follow the cut weights
                bar.console.print(f"step {step}: MLP channels kept {kept:,} of {gradual.width:,}")
            if rounder is not None:
                rounder.round()
            epoch, index = divmod(step, per_epoch)
            rows = batch_order(len(seqs), cfg.batch_size, cfg.seed, epoch)[index]
            on_policy_step = rollout is not None and rollout.chosen(step)
            split = {i: splitter.split(seqs[i], epoch, i) for i in rows} if splitter and not on_policy_step else {}
            reads = {i: split[i].seq if split else seqs[i] for i in rows}  # what the student reads, row by row
            batch_tokens = sum(len(q.ids) for q in reads.values())  # over every rank
            part = distributed.shard(ranks, rows, [reads[i].positions for i in rows],
                                     [len(reads[i].ids) - reads[i].start for i in rows])  # completion positions
            rows = part.rows  # this process's share of the batch (all of it without torchrun)
            if on_policy_step:  # --on-policy: the student writes the completions, the live teacher scores them
                scored = rollout.score([seqs[i] for i in rows], [t_seqs[i] for i in rows], part, step)
                loss, kl, ce, mask, t_mask, part = scored.loss, scored.kl, scored.ce, scored.mask, scored.t_mask, scored.shard
            else:
                read = [reads[i] for i in rows]
                ids, attn, mask = collate(read, pad, device)  # teacher-vocabulary ids
                t_ids, t_attn, t_mask = (collate([t_seqs[i] for i in rows], pad, device) if t_seqs is not seqs or split
                                         else (ids, attn, mask))
                s_ids = ids if id_map is None else id_map[ids]  # the same text in the student's ids
                targets = s_ids[:, 1:][mask[:, :-1]]  # (n,) the token each selected position predicts
                targets = targets.masked_fill(~completion_flags(read, device), IGNORE)  # CE: completion
                if teacher_outputs is not None:
                    t_logits = torch.cat([teacher_outputs[i] for i in rows]).float()  # (n, student vocab)
                else:
                    with torch.no_grad():
                        t_logits = selected_logits(teacher, t_ids, t_attn, t_mask, rows=kept_rows, prefix=t_cache)  # (n, student vocab)
                matched = None
                if split:  # the teacher's rows for the positions that predict a token it read whole
                    t_rows, matched = teacher_rows([split[i].teacher for i in rows], [t_seqs[i].positions for i in rows],
                                                   device)
                    t_logits = t_logits[t_rows]
                with autocast:
                    s_logits = trainee(selected_logits, s_ids, attn, mask)  # (n, student vocab)
                loss, kl, ce = distill_loss(s_logits, t_logits, targets, cfg.temperature, cfg.alpha, kind=cfg.loss,
                                            beta=cfg.beta, ce_scale=part.ce_scale, matched=matched)
            if align is not None:  # the hooks caught this batch's layer outputs of both models
                loss = loss + cfg.hidden_weight * align.loss(mask, t_mask)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, cfg.lr)
            optimizer.zero_grad(set_to_none=True)
            (loss * part.weight).backward()  # under torchrun, DDP/FSDP average the weighted gradients
            if rounder is not None:
                rounder.restore()  # the optimizer updates the full-precision weights
            torch.nn.utils.clip_grad_norm_(student.parameters(), GRAD_CLIP)
            optimizer.step()

            step += 1
            tokens_seen += batch_tokens
            loss, kl, ce = distributed.global_mean(ranks, part.weight, loss, kl, ce)  # the whole batch's
            history.append({"step": step, "loss": round(loss.item(), 5), "kl": round(kl.item(), 5), "ce": round(ce.item(), 5)})
            if on_policy_step:
                history[-1].update(ce=None, on_policy=True)  # no reference completion: no cross-entropy
            rate = tokens_seen / (time.perf_counter() - started)
            bar.update(task, advance=1, loss=f"loss {loss.item():.4f}", tok_s=f"{rate:,.0f} tok/s")
            if step % cfg.save_every == 0 or step == total_steps:
                state = {"step": step, "history": history, "settings": cfg.settings(), "inputs": checked.inputs}
                if gradual is not None:
                    state["gradual"] = gradual.state()
                trainee.save_checkpoint(ckpt, optimizer, state)
    elapsed = time.perf_counter() - started
    student = trainee.final_model()  # with its full weights (FSDP gathers them), on rank 0
    if not ranks.is_main:
        return None  # rank 0 evaluates and writes the student
    if gradual is not None:
        student = gradual.finish(student)  # already cut to the final width during training
        student_info["prune_gradually"] = gradual.log

    metrics: dict[str, Any] = {
        "final_loss": history[-1]["loss"] if history else None,
        "train_tokens_per_s": round(tokens_seen / elapsed, 1) if elapsed > 0 else None,
        "train_processes": ranks.world_size,  # torchrun processes (GPUs) the tokens/s is over
        "parameters": _params(student),
        "teacher_parameters": _params(teacher),
    }
    student.eval()
    if eval_examples:
        teacher_examples = eval_examples
        if cfg.teacher_prefix:
            teacher_examples = with_prefix(eval_examples, Path(cfg.teacher_prefix).read_text(encoding="utf-8"))
        metrics.update(_evaluate_pair(student, student_tokenizer, teacher, tokenizer, device,
                                      eval_examples, teacher_examples, cfg.eval_data, cfg.metric))

    settings = {
        **cfg.settings(),
        "layers_kept": keep,
        "teacher_layers": teacher_layers,
        "steps": total_steps,
        "loss_positions": positions,  # per pass over the training data
        "data_sha256": input_hashes.sha256_of(checked.inputs, "data"),
        "device": device,
        "teacher_folder": str(teacher_dir),
        "teacher_prefix_sha256": input_hashes.sha256_of(checked.inputs, "teacher-prefix"),
        "teacher_weights_sha256": {e["path"]: e["sha256"] for e in input_hashes.of_roles(checked.inputs, "teacher-weights")},
        "teacher_cache_manifest_sha256": artifact.manifest_hash(Path(cfg.teacher_cache)) if cfg.teacher_cache else None,
        **student_info,  # layer_scores (--layer-selection importance), widths, size_budget (shrink.distill.student)
    }
    if plan is not None:
        settings.update(vocab_kept=len(plan.kept), teacher_vocab=plan.teacher_vocab_size,
                        tokenizer_pre=teacher_pre_tokenizer(tokenizer),
                        vocab_sources=input_hashes.of_roles(checked.inputs, "data", "vocab-data"))
    with artifact.staged_folder(cfg.out, cfg.force, "the student") as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        student_tokenizer.save_pretrained(tmp)
        settings["tokenizer_files"] = keep_teacher_files(teacher_dir, tmp, plan)  # tokenizer.model, ...
        if turn_ends:  # the teacher's generation_config.json, with the template's end of turn added
            keep_end_of_turn(tmp / "generation_config.json", student.generation_config.eos_token_id)
        (tmp / "training_log.json").write_text(json.dumps(history))
        manifest = artifact.finish(
            tmp, kind="student", format="hf", source=Path(cfg.teacher), settings=settings, metrics=metrics
        )
    shutil.rmtree(ckpt, ignore_errors=True)
    scratch.cleanup()
    return manifest


def precompute_teacher(teacher, seqs, batch_size: int, pad: int, device: str, rows, cache) -> list:
    """The teacher's logits at every loss position, per example: a list of (k_i, vocab)
    float16 tensors on `device`, in the order of `seqs`."""
    import torch

    outputs = []
    with progress("ex") as bar, torch.no_grad():
        task = bar.add_task("teacher pass", total=len(seqs))
        for i in range(0, len(seqs), batch_size):
            part = seqs[i : i + batch_size]
            ids, attn, mask = collate(part, pad, device)
            logits = selected_logits(teacher, ids, attn, mask, rows=rows, prefix=cache)  # (n, vocab)
            counts = [q.positions for q in part]  # loss positions per example
            outputs += [t.to(torch.float16) for t in logits.split(counts)]
            bar.advance(task, len(part))
    return outputs


def _report_prompt_positions(seqs) -> None:
    """`loss_on` all: how many positions the prompts add, and how many prompt tokens carry
    no loss because the teacher's tokens differ there (see shrink.distill.batches)."""
    added = sum(q.prompt_loss for q in seqs)
    left_out = sum(q.start - 1 - q.prompt_loss for q in seqs)
    note = f"loss on the prompts too: {added:,} positions added to {sum(q.positions for q in seqs) - added:,}"
    if left_out:
        note += (f"; {left_out:,} prompt tokens left out, where the teacher's tokens differ (the start of the prompt "
                 "after --teacher-prefix, or a prompt --max-length cut shorter for the teacher)")
    console.print(note)


def teacher_pre_tokenizer(tokenizer) -> str | None:
    """The name llama.cpp's converter gives the teacher's BPE pre-tokenizer (it recognises
    tokenizers by hashing their output, which a pruned vocabulary changes), so that the
    pruned student can be converted with the same pre-tokenizer. None when not recognised
    or not needed (SentencePiece-style tokenizers take another path)."""
    from conversion.base import TextModel

    from shrink.quiet import quiet_converter

    with quiet_converter():  # the converter logs a banner for unknown hashes
        try:
            return TextModel.get_vocab_base_pre(None, tokenizer)
        except Exception:  # NotImplementedError for unknown hashes
            return None


def _evaluate_pair(student, student_tokenizer, teacher, tokenizer, device, examples, teacher_examples, eval_path,
                   metric: str | None = None) -> dict[str, Any]:
    from shrink.evaluate import evaluate, retention
    from shrink.runtime.torch_runtime import TorchRuntime

    s = evaluate(TorchRuntime.from_model(student, student_tokenizer, device), examples, "evaluating student",
                 metric=metric)
    t = evaluate(TorchRuntime.from_model(teacher, tokenizer, device), teacher_examples, "evaluating teacher",
                 metric=metric)
    return {
        "metric": s.metric,
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

