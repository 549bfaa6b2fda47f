"""On-policy distillation (`--on-policy LAMBDA`, shrink.distill.on_policy): which batches,
what the student samples, what the teacher reads, and that training on the student's own
completions brings it closer to the teacher there."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from shrink.cli import cli
from shrink.distill import distributed
from shrink.distill.batches import collate, encode_examples
from shrink.distill.on_policy import MARGIN, Rollout, chosen, draw, uniforms
from shrink.distill.prune_vocab import plan_pruning, prune_model
from shrink.distill.student import cut_student
from shrink.distill.train import DistillConfig, checkpoint_dir, distill
from shrink.distill.vocab_sources import task_texts
from shrink.hf import load_causal_lm, load_tokenizer
from shrink.tasks import load_task, with_prefix

PREFIX = "Review: the phone was great\nSentiment: positive\n\n"


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 0.7, 1.0])
def test_batch_choice_is_reproducible_and_takes_the_fraction(fraction):
    picks = [chosen(fraction, 3, s) for s in range(1000)]
    assert picks == [chosen(fraction, 3, s) for s in range(1000)]  # from (seed, step) alone: resume, every rank
    assert abs(sum(picks) - 1000 * fraction) <= 1
    for start in (0, 137, 500):  # any 40 consecutive steps: floor or ceil of 40 * fraction
        assert sum(picks[start : start + 40]) in (math.floor(40 * fraction), math.ceil(40 * fraction))


def test_batch_choice_depends_on_the_seed():
    patterns = {tuple(chosen(0.3, seed, s) for s in range(30)) for seed in range(6)}
    assert len(patterns) > 1


def test_draw_samples_the_softmax():
    probs = torch.tensor([0.2, 0.5, 0.3])
    logits = probs.log().expand(20_000, 3)
    u = torch.rand(20_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    freq = torch.bincount(draw(logits, u), minlength=3) / 20_000
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    edges = draw(torch.tensor([[0.0, -1e9, 0.0]]).expand(2, 3), torch.tensor([0.0, 1 - 1e-12]))
    assert edges.tolist() == [0, 2]  # never a token without mass


def make_rollout(teacher_dir, task_file, prune: bool, **cfg_kw):
    """A rollout over a freshly cut 2-layer student, with the teacher reading PREFIX first."""
    tok = load_tokenizer(teacher_dir)
    teacher = load_causal_lm(teacher_dir)
    examples = load_task(task_file)[:12]
    student = cut_student(teacher, [0, 3])
    plan = None
    if prune:
        plan = plan_pruning(tok, task_texts(examples), student.generation_config.eos_token_id)
        prune_model(student, plan)
    seqs = encode_examples(tok, examples, 512)
    t_seqs = encode_examples(tok, with_prefix(examples, PREFIX), 512)
    cfg = DistillConfig(teacher=teacher_dir, data=task_file, out=Path("unused"), layers=2, on_policy=1.0, **cfg_kw)
    trainee = distributed.StudentStep(student, distributed.Ranks(), False, "cpu")
    rollout = Rollout(cfg, student, trainee, teacher, plan, tok.pad_token_id, "cpu", distributed.Ranks())
    return rollout, student, teacher, plan, seqs, t_seqs


@pytest.mark.parametrize("prune", [False, True])
def test_on_policy_batch_is_the_students_samples_read_by_the_teacher(teacher, task_files, prune):
    rollout, student, t_model, plan, seqs, t_seqs = make_rollout(teacher, task_files["train"], prune)
    rows = list(range(8))
    teacher_read = []
    hook = t_model.model.embed_tokens.register_forward_pre_hook(lambda m, args: teacher_read.append(args[0].clone()))
    scored = rollout.score([seqs[i] for i in rows], [t_seqs[i] for i in rows], distributed.Shard(rows, 1.0), step=3)
    hook.remove()
    to_student = (lambda ids: ids) if plan is None else (lambda ids: [plan.id_map()[i].item() for i in ids])
    eos = set(student.generation_config.eos_token_id if isinstance(student.generation_config.eos_token_id, list)
              else [student.generation_config.eos_token_id])

    for r, i in enumerate(rows):
        s, t = scored.student_seqs[r], scored.teacher_seqs[r]
        prompt, completion = seqs[i].ids[: seqs[i].start], s.ids[s.start :]
        assert s.ids[: s.start] == prompt and s.start == seqs[i].start
        assert t.ids == t_seqs[i].ids[: t_seqs[i].start] + completion  # teacher: prefix + prompt + the student's tokens
        budget = len(seqs[i].ids) - seqs[i].start + MARGIN
        own = to_student(completion)
        assert 1 <= len(own) <= budget
        assert all(tok not in eos for tok in own[:-1]) and (own[-1] in eos or len(own) == budget)
        if plan is not None:
            assert set(completion) <= set(plan.kept)
        # Each token is the student's inverse-CDF draw at its uniform, computed here with a
        # plain forward pass over the whole text (no cache, no padding).
        with torch.no_grad():
            logits = student(torch.tensor([to_student(prompt) + own])).logits[0, len(prompt) - 1 : -1]
        u = uniforms(0, 3, i, budget)[: len(own)]
        assert draw(logits, u).tolist() == own

    # The teacher read exactly those sequences, and the loss is on the generated positions.
    t_ids, _, t_mask = collate(scored.teacher_seqs, rollout.pad, "cpu")
    assert len(teacher_read) == 1 and torch.equal(teacher_read[0], t_ids)
    for r, t in enumerate(scored.teacher_seqs):
        generated = len(t.ids) - t.start
        assert t_mask[r].nonzero().flatten().tolist() == list(range(t.start - 1, len(t.ids) - 1))
        assert scored.mask[r].sum().item() == generated
    assert torch.equal(scored.t_mask, t_mask)
    assert scored.loss.item() > 0 and scored.kl.item() == pytest.approx(scored.loss.item())

    # Reproducible from (seed, step, example), whatever else is in the batch; another step samples anew.
    again = rollout.completions([seqs[i] for i in rows[::-1][:5]], rows[::-1][:5], step=3)
    assert again == [s.ids[s.start :] for s in scored.student_seqs][::-1][:5]
    other = rollout.completions([seqs[i] for i in rows], rows, step=4)
    assert other != [s.ids[s.start :] for s in scored.student_seqs]


def divergence_on_own_samples(student_dir_or_model, teacher_dir, task_file) -> float:
    """The student's jsd to the teacher (T = 1) on completions it samples itself for the
    first 24 prompts of `task_file` (fixed seeds)."""
    tok = load_tokenizer(teacher_dir)
    teacher = load_causal_lm(teacher_dir)
    student = student_dir_or_model if not isinstance(student_dir_or_model, Path) else load_causal_lm(student_dir_or_model)
    seqs = encode_examples(tok, load_task(task_file)[:24], 512)
    cfg = DistillConfig(teacher=teacher_dir, data=task_file, out=Path("unused"), layers=2, on_policy=1.0,
                        loss="jsd", temperature=1.0, seed=7)
    trainee = distributed.StudentStep(student, distributed.Ranks(), False, "cpu")
    rollout = Rollout(cfg, student, trainee, teacher, None, tok.pad_token_id, "cpu", distributed.Ranks())
    with torch.no_grad():
        return rollout.score(seqs, seqs, distributed.Shard(list(range(24)), 1.0), step=0).kl.item()


def test_on_policy_training_brings_the_student_closer_on_its_own_samples(teacher, task_files, tmp_path):
    # On prompts distilled on: held-out ones are no gauge with the toy teacher (tests/test_distill.py).
    before = divergence_on_own_samples(cut_student(load_causal_lm(teacher), [0, 3]), teacher, task_files["train"])
    manifest = distill(DistillConfig(teacher=teacher, data=task_files["train"], out=tmp_path / "s", layers=2,
                                     steps=10, batch_size=8, lr=3e-4, loss="jsd", temperature=1.0, on_policy=1.0,
                                     device="cpu"))
    after = divergence_on_own_samples(tmp_path / "s", teacher, task_files["train"])
    # measured on an Intel Xeon: 0.043x (0.0066 -> 0.00029); at lr 1e-3 Adam's first steps
    # overshoot a student this close to its teacher (1.1x)
    assert after < 0.3 * before, (before, after)
    log = json.loads((tmp_path / "s" / "training_log.json").read_text())
    assert all(h["on_policy"] and h["ce"] is None for h in log)
    assert manifest.settings["on_policy"] == 1.0


def test_mixed_run_resumes_with_the_same_choices_and_samples(teacher, task_files, tmp_path, monkeypatch):
    """--on-policy 0.5 with --prune-vocab and --teacher-prefix: stopped at step 6 after the
    step-4 checkpoint and resumed, the run logs what an uninterrupted one logs."""
    import shrink.distill.train as train

    prefix = tmp_path / "prefix.txt"
    prefix.write_text(PREFIX)

    def cfg(out, resume=False):
        return DistillConfig(teacher=teacher, data=task_files["train"], out=out, layers=2, steps=8, batch_size=8,
                             lr=1e-3, save_every=4, on_policy=0.5, prune_vocab=True, teacher_prefix=prefix,
                             device="cpu", resume=resume)

    distill(cfg(tmp_path / "straight"))
    real = train.lr_at

    def stop_at_6(step, total, peak):
        if step == 6:
            raise KeyboardInterrupt
        return real(step, total, peak)

    monkeypatch.setattr(train, "lr_at", stop_at_6)
    with pytest.raises(KeyboardInterrupt):
        distill(cfg(tmp_path / "resumed"))
    assert checkpoint_dir(tmp_path / "resumed").exists()
    monkeypatch.setattr(train, "lr_at", real)
    distill(cfg(tmp_path / "resumed", resume=True))

    a, b = (json.loads((tmp_path / n / "training_log.json").read_text()) for n in ("straight", "resumed"))
    assert sum(bool(h.get("on_policy")) for h in a) == 4
    assert [h.get("on_policy", False) for h in a] == [h.get("on_policy", False) for h in b]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan"])
def test_bad_fraction_is_one_error_line(teacher, task_files, tmp_path, value):
    r = CliRunner().invoke(cli, ["distill", "--teacher", str(teacher), "--data", str(task_files["train"]),
                                 "--out", str(tmp_path / "s"), "--layers", "2", "--on-policy", value])
    assert r.exit_code == 2, r.output
    assert r.stderr.splitlines() == [
        f"Error: --on-policy must be between 0 and 1 (the fraction of on-policy batches), got {float(value)}"]
    assert not (tmp_path / "s").exists()


def test_two_processes_sample_and_weigh_as_one(teacher, task_files, tmp_path):
    """Under torchrun (two CPU processes, FSDP: the ranks decode in lockstep), each rank
    samples its rows as one process would and weighs its loss by its share of the
    generated positions: the logged losses are the single process's. Measured: equal to
    5 decimals at every step, with DDP too."""
    from test_distributed import losses, spawn

    def cfg(out, **kw):
        return DistillConfig(teacher=teacher, data=task_files["train"], out=out, layers=2, steps=6, batch_size=8,
                             lr=1e-3, save_every=100, on_policy=0.5, device="cpu", **kw)

    distill(cfg(tmp_path / "one"))
    (tmp_path / "writes").mkdir()
    spawn(cfg(tmp_path / "two", fsdp=True), tmp_path / "writes")
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert y == pytest.approx(x, rel=1e-3)
