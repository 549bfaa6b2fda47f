"""--loss-on all: the loss taken at the prompt's positions too, matched with the teacher's
past a --teacher-prefix; the teacher precomputed, online, or from a teacher cache made
with the same --loss-on."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import tiny
from shrink.cli import cli
from shrink.distill.batches import Sequence, check_aligned, collate, completion_flags, encode_examples, loss_positions
from shrink.distill.distributed import Ranks, shard
from shrink.distill.loss import IGNORE, distill_loss
from shrink.distill.train import DistillConfig, distill
from shrink.errors import ShrinkError
from shrink.hf import load_causal_lm, load_tokenizer
from shrink.tasks import load_task, with_prefix

SHOTS = "Review: the phone was great\nSentiment: positive\n\nReview: the coffee was awful\nSentiment: negative\n\n"


def predicted(seqs):
    """The token each loss position predicts, in collate's order."""
    ids, _, mask = collate(seqs, 0, "cpu")
    return ids[:, 1:][mask[:, :-1]].tolist()


def test_the_alignment_rule_on_ids():
    """Student BOS + prompt [10, 11, 12] + completion [20] + EOS; the teacher reads a
    prefix [5, 6] first. Only tokens of the two sequences' common suffix are loss tokens."""
    s = Sequence(ids=[1, 10, 11, 12, 20, 2], start=4)
    t = Sequence(ids=[1, 5, 6, 10, 11, 12, 20, 2], start=6)

    assert loss_positions([s], [t], "completion", "d") == ([s], [t])  # as before: 20 and EOS
    assert predicted([s]) == predicted([t]) == [20, 2]

    [s1], [t1] = loss_positions([s], [t], "all", "d")
    assert (s1.loss_from, s1.positions, t1.loss_from, t1.positions) == (1, 5, 3, 5)
    assert predicted([s1]) == predicted([t1]) == [10, 11, 12, 20, 2]
    _, _, s_mask = collate([s1], 0, "cpu")
    _, _, t_mask = collate([t1], 0, "cpu")
    # The student's BOS position predicts the prompt's first token, like the prefix's last.
    assert s_mask[0].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
    assert t_mask[0].nonzero().flatten().tolist() == [2, 3, 4, 5, 6]
    assert completion_flags([s1], "cpu").tolist() == [False, False, False, True, True]

    # The prefix's last piece merged with the prompt's first token (6 + 10 -> 99): token
    # 10 is not the teacher's, so the student's BOS position has no match and is left out.
    merged = Sequence(ids=[1, 5, 99, 11, 12, 20, 2], start=5)
    [s2], [t2] = loss_positions([s], [merged], "all", "d")
    assert (s2.loss_from, t2.loss_from) == (2, 3)
    assert predicted([s2]) == predicted([t2]) == [11, 12, 20, 2]
    assert completion_flags([s2], "cpu").tolist() == [False, False, True, True]

    # A teacher trimmed by --max-length (BOS kept) lost the prompt's first tokens.
    trimmed = Sequence(ids=[1, 12, 20, 2], start=2)
    [s3], [t3] = loss_positions([s], [trimmed], "all", "d")
    assert predicted([s3]) == predicted([t3]) == [12, 20, 2]

    # No prefix: one list, every token after BOS.
    seqs = [s, Sequence(ids=[1, 7, 20], start=2)]
    a, b = loss_positions(seqs, seqs, "all", "d")
    assert a is b and [q.positions for q in a] == [5, 2] and predicted(a) == [10, 11, 12, 20, 2, 7, 20]

    with pytest.raises(ShrinkError) as e:  # no prompt token is the teacher's anywhere
        loss_positions([s], [Sequence(ids=[1, 5, 98, 97, 96, 20, 2], start=5)], "all", "train.jsonl")
    assert str(e.value) == ("--loss-on all: no prompt token of train.jsonl tokenizes the same after --teacher-prefix, "
                            "so the teacher's positions cannot be matched with the student's; use --loss-on completion")


@pytest.fixture(scope="module")
def tok(teacher):
    return load_tokenizer(teacher)


@pytest.mark.parametrize("prefix, bos_matched", [
    (SHOTS, False),  # "\n\n" + "Review:" tokenizes "Re", "view:"; the student has "▁Review:"
    ("Some words ", True),  # the prefix's last space merges into the prompt's first token "▁Review:"
])
def test_the_alignment_with_the_tokenizer(tok, task_files, prefix, bos_matched):
    examples = load_task(task_files["eval"])[:6]
    plain = encode_examples(tok, examples, 512)
    prefixed = encode_examples(tok, with_prefix(examples, prefix), 512)
    check_aligned(plain, prefixed, task_files["eval"])
    s, t = loss_positions(plain, prefixed, "all", task_files["eval"])
    for a, b, q in zip(s, t, plain):
        assert a.ids[a.loss_from:] == b.ids[b.loss_from:]  # the same tokens, predicted at matched positions
        assert a.loss_from == (1 if bos_matched else 2) and a.positions == b.positions == len(q.ids) - a.loss_from
        assert tok.decode(b.ids[: b.loss_from]).endswith(prefix.rstrip(" ")) is bos_matched
    assert predicted(s) == predicted(t)


def test_cross_entropy_on_the_completion_only():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 11, generator=g), torch.randn(6, 11, generator=g)
    targets = torch.randint(0, 11, (6,), generator=g)
    completion = torch.tensor([False, False, False, False, True, True])
    loss, kl, ce = distill_loss(s, t, targets.masked_fill(~completion, IGNORE), 2.0, 0.7)
    _, kl_all, _ = distill_loss(s, t, targets, 2.0, 0.7)
    assert kl.item() == pytest.approx(kl_all.item())  # the divergence: every position
    assert ce.item() == pytest.approx(torch.nn.functional.cross_entropy(s[4:], targets[4:]).item())
    assert loss.item() == pytest.approx(0.7 * kl.item() + 0.3 * ce.item())


def test_two_ranks_take_the_one_process_means():
    """Per-position terms of a batch of 5 rows; each rank's means, weighted as DDP then
    averages them, give the batch's means: the divergence over every loss position, the
    cross-entropy over the completion positions only."""
    g = torch.Generator().manual_seed(1)
    positions, completions = [9, 3, 14, 5, 2], [2, 1, 3, 2, 1]
    kl = [torch.rand(n, generator=g) for n in positions]
    ce = [torch.rand(c, generator=g) for c in completions]
    rows = list(range(5))
    world = 2
    kl_sum = ce_sum = 0.0
    for rank in range(world):
        part = shard(Ranks(rank=rank, world_size=world), rows, positions, completions)
        kl_mean = torch.cat([kl[i] for i in part.rows]).mean().item()
        ce_mean = torch.cat([ce[i] for i in part.rows]).mean().item() * part.ce_scale
        kl_sum += kl_mean * part.weight / world
        ce_sum += ce_mean * part.weight / world
    assert kl_sum == pytest.approx(torch.cat(kl).mean().item())
    assert ce_sum == pytest.approx(torch.cat(ce).mean().item())
    assert shard(Ranks(rank=1, world_size=2), rows, positions, positions).ce_scale == 1.0  # --loss-on completion


# --- training ----------------------------------------------------------------------------


def prompt_kl(student, teacher, tok, examples) -> float:
    """KL(teacher || student) at temperature 1, per prompt position (the positions --loss-on
    all adds: each prompt token after BOS, predicted by the position before it)."""
    seqs, _ = loss_positions(*2 * [encode_examples(tok, examples, 512)], "all", "eval")
    ids, attn, mask = collate(seqs, tok.pad_token_id, "cpu")
    prompt = ~completion_flags(seqs, "cpu")
    with torch.no_grad():
        s = student(input_ids=ids, attention_mask=attn).logits[mask][prompt].log_softmax(-1)
        t = teacher(input_ids=ids, attention_mask=attn).logits[mask][prompt].log_softmax(-1)
    return torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean").item()


def test_all_trains_on_the_prompt_positions_too(teacher, task_files, tok, tmp_path):
    """Measured (10 steps): the cut student's KL on prompt positions goes from 0.082 to
    0.030 with --loss-on all; trained on the completion only, it grows to 2.2 (the
    student forgets what the prompts look like to the teacher)."""
    from shrink.distill.student import cut_student

    t_model = load_causal_lm(teacher)
    held_out = load_task(task_files["eval"])[:40]
    before = prompt_kl(cut_student(t_model, [0, 3]), t_model, tok, held_out)
    after, positions = {}, {}
    for loss_on in ("completion", "all"):
        out = tmp_path / loss_on
        manifest = distill(DistillConfig(teacher=teacher, data=task_files["train"], out=out, layers=2, steps=10,
                                         batch_size=16, lr=1e-3, device="cpu", loss_on=loss_on))
        assert manifest.settings["loss_on"] == loss_on
        positions[loss_on] = manifest.settings["loss_positions"]
        after[loss_on] = prompt_kl(load_causal_lm(out), t_model, tok, held_out)
    seqs = encode_examples(tok, load_task(task_files["train"]), 512)
    assert positions == {"completion": 1200, "all": sum(len(q.ids) - 1 for q in seqs)}  # 1200: label and EOS
    assert positions["all"] > 3 * positions["completion"]
    assert after["all"] < 0.5 * before, (before, after)
    assert after["completion"] > 5 * before, (before, after)


STEPS = 10  # one epoch of SMALL at batch 16: the teacher can be precomputed


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """160 rows and a few-shot prefix: with --loss-on all the dense teacher outputs take
    more than 1 MiB, the completion's less."""
    d = tmp_path_factory.mktemp("small")
    (d / "shots.txt").write_text(SHOTS, encoding="utf-8")
    return {"data": tiny.write_jsonl(d / "train.jsonl", tiny.toy_examples(160, seed=3)), "prefix": d / "shots.txt"}


def run(teacher, small, out, **kw):
    """A short --loss-on all run with the prefix; its manifest and per-step losses."""
    cfg = {"teacher": teacher, "data": small["data"], "out": out, "layers": 2, "steps": STEPS, "batch_size": 16,
           "lr": 1e-3, "device": "cpu", "loss_on": "all", "teacher_prefix": small["prefix"], **kw}
    manifest = distill(DistillConfig(**cfg))
    return manifest, [h["loss"] for h in json.loads((out / "training_log.json").read_text())]


@pytest.fixture(scope="module")
def online(teacher, small, tmp_path_factory):
    """Over a 1 MiB budget: the teacher runs online, every batch."""
    import shrink.distill.train as train

    calls, real = [], train.precompute_teacher
    train.precompute_teacher = lambda *a: calls.append(1) or real(*a)
    out = tmp_path_factory.mktemp("online") / "s"
    try:
        manifest, losses = run(teacher, small, out, teacher_memory_mb=1)
    finally:
        train.precompute_teacher = real
    assert not calls
    return manifest, losses, out


def test_the_teacher_in_memory_or_online(teacher, small, online, tmp_path, monkeypatch):
    """The positions --loss-on all adds can take the teacher's outputs over the memory
    budget (here 1 MiB, which the completion's alone fit in): it then runs online, and
    both ways train alike (float16 rounding aside)."""
    import shrink.distill.train as train

    manifest, online_losses, _ = online
    vocab = 768
    positions = manifest.settings["loss_positions"]
    completion = 2 * 160  # label and EOS
    assert completion * vocab * 2 <= 2**20 < positions * vocab * 2

    calls, real = [], train.precompute_teacher
    monkeypatch.setattr(train, "precompute_teacher", lambda *a: calls.append(1) or real(*a))
    _, losses = run(teacher, small, tmp_path / "s")  # the default 2 GiB budget
    assert calls == [1]
    for a, b in zip(online_losses, losses):
        assert b == pytest.approx(a, rel=5e-3)


def test_a_teacher_cache_with_the_prompt_positions(teacher, small, online, tmp_path):
    """`shrink teacher-cache --loss-on all` keeps the prompt's positions; with every token
    kept, training from it gives the online losses. A cache made for the other --loss-on
    is refused before anything is loaded."""
    manifest, online_losses, _ = online
    cache = tmp_path / "cache"
    r = CliRunner().invoke(cli, [str(a) for a in (
        "teacher-cache", "--teacher", teacher, "--data", small["data"], "--teacher-prefix", small["prefix"],
        "--loss-on", "all", "--top-k", 100_000, "--device", "cpu", "--out", cache, "--json")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    settings = json.loads(r.stdout)["settings"]
    assert settings["loss_on"] == "all" and settings["positions"] == manifest.settings["loss_positions"]

    _, cached = run(teacher, small, tmp_path / "cached", teacher_cache=cache)
    assert cached[0] == pytest.approx(online_losses[0], rel=2e-4)
    for a, b in zip(online_losses, cached):
        assert b == pytest.approx(a, rel=5e-3)

    def refused(loss_on, folder):
        r = CliRunner().invoke(cli, [str(a) for a in (
            "distill", "--teacher", teacher, "--data", small["data"], "--teacher-prefix", small["prefix"],
            "--out", tmp_path / "s", "--layers", 2, "--teacher-cache", folder, "--loss-on", loss_on)])
        assert r.exit_code == 2, r.output
        return r.stderr.strip()

    rebuild = f"rebuild it: shrink teacher-cache --teacher {teacher} --data {small['data']} --out DIR"
    assert refused("completion", cache) == (f"Error: --teacher-cache {cache} was made with --loss-on all; this run has "
                                            f"--loss-on completion; {rebuild} --loss-on completion")
    from shrink.distill.teacher_cache import CacheConfig, build_cache

    plain = tmp_path / "plain"
    build_cache(CacheConfig(teacher=teacher, data=small["data"], out=plain, teacher_prefix=small["prefix"],
                            top_k=4, device="cpu"))
    assert refused("all", plain) == (f"Error: --teacher-cache {plain} was made with --loss-on completion; this run "
                                     f"has --loss-on all; {rebuild} --loss-on all")
    assert not (tmp_path / "s").exists()


def test_with_hidden_alignment_and_a_pruned_vocabulary(teacher, small, tmp_path):
    """--hidden-weight aligns the hidden states at the same positions as the loss (the
    student's and the prefixed teacher's, matched), on a pruned vocabulary."""
    manifest, _ = run(teacher, small, tmp_path / "s", steps=3, hidden_weight=1.0, prune_vocab=True)
    assert manifest.settings["vocab_kept"] < manifest.settings["teacher_vocab"]
    for h in json.loads((tmp_path / "s" / "training_log.json").read_text()):
        hidden = h["loss"] - (0.9 * h["kl"] + 0.1 * h["ce"])  # what the alignment term added
        assert 1e-3 < hidden < 2


def test_resume_refuses_another_loss_on(teacher, small, tmp_path):
    from shrink.distill.train import checkpoint_dir, validate

    base = dict(teacher=teacher, data=small["data"], out=tmp_path / "s", layers=2, device="cpu")
    folder = checkpoint_dir(tmp_path / "s")
    folder.mkdir()
    (folder / "state.json").write_text(json.dumps({"settings": DistillConfig(**base).settings()}))
    validate(DistillConfig(**base, resume=True), hash_inputs=False)
    with pytest.raises(ShrinkError, match="--resume: .* was made with other settings"):
        validate(DistillConfig(**base, loss_on="all", resume=True), hash_inputs=False)


def test_two_processes_train_as_one(teacher, small, online, tmp_path):
    """Under torchrun (two CPU processes, gloo) the batches split by rows: each rank
    weighs its divergence by its share of the loss positions and its cross-entropy by its
    share of the completion positions, for the one process's losses and weights."""
    from test_distributed import DDP_ATOL, LOSS_RTOL, max_weight_diff, spawn

    _, single, single_out = online
    out, log_dir = tmp_path / "s", tmp_path / "writes"
    log_dir.mkdir()
    spawn(DistillConfig(teacher=teacher, data=small["data"], out=out, layers=2, steps=STEPS, batch_size=16, lr=1e-3,
                        device="cpu", loss_on="all", teacher_prefix=small["prefix"], teacher_memory_mb=1), log_dir)
    two = [h["loss"] for h in json.loads((out / "training_log.json").read_text())]
    for a, b in zip(single, two):
        assert b == pytest.approx(a, rel=LOSS_RTOL)
    assert max_weight_diff(single_out, out) < DDP_ATOL
