"""`--split-words P` (shrink.distill.split_words): copied words spelled in smaller pieces,
the teacher's outputs matched to the positions that predict a token it read whole, the
cross-entropy at the others, and a student trained this way copying split words better."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tiny
from shrink.distill.batches import collate, encode_examples
from shrink.distill.loss import IGNORE, distill_loss
from shrink.distill.prune_vocab import plan_pruning, save_pruned_tokenizer
from shrink.distill.split_words import WordSplitter, teacher_rows, unsplit
from shrink.distill.train import DistillConfig, distill
from shrink.distill.vocab_sources import task_texts
from shrink.errors import ShrinkError
from shrink.hf import load_causal_lm, load_tokenizer
from shrink.tasks import load_task

NAMES = ("Denver", "Lisbon", "Maria", "Lopez", "Oslo", "Kettle", "Garcia", "Bergen", "Porto", "Osaka")


def copy_rows(n: int, seed: int) -> list[dict]:
    """Messages whose completion copies two words of the prompt."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.sample(NAMES, 2)
        rows.append({"prompt": f"Note from {a} about {b} today.\nWho:", "completion": f" {a} {b}"})
    return rows


@pytest.fixture(scope="module")
def copy_task(tmp_path_factory):
    """A tokenizer that has every name as one token, a trained 4-layer copy teacher, and its data."""
    d = tmp_path_factory.mktemp("copy")
    train = copy_rows(400, 1)
    data = tiny.write_jsonl(d / "train.jsonl", train)
    held_out = tiny.write_jsonl(d / "held_out.jsonl", copy_rows(40, 2))
    teacher = tiny.make_teacher(d / "teacher", train, steps=150)
    return {"teacher": teacher, "data": data, "held_out": held_out}


def test_names_are_whole_tokens(copy_task):
    tok = load_tokenizer(copy_task["teacher"])
    for name in NAMES:  # the premise of the tests below: the vocabulary has each name whole
        assert tok.convert_ids_to_tokens(tok(name, add_special_tokens=False).input_ids) == ["▁" + name]


def splitter_for(teacher: Path, rate: float, examples, prune: bool = False, max_length: int = 512):
    tok = load_tokenizer(teacher)
    plan, student_tok = None, tok
    if prune:
        plan = plan_pruning(tok, task_texts(examples), tok.eos_token_id)
        student_tok = save_pruned_tokenizer(tok, plan, Path(teacher).parent / "pruned-tok")
    return tok, plan, WordSplitter(tok, student_tok, plan.kept if plan else None, rate, seed=0, max_length=max_length)


@pytest.mark.parametrize("prune", [False, True])
def test_every_copied_word_is_split_alike_and_the_rest_matches_the_teacher(copy_task, prune):
    examples = load_task(copy_task["data"])[:20]
    tok, plan, splitter = splitter_for(copy_task["teacher"], 1.0, examples, prune)
    for row, seq in enumerate(encode_examples(tok, examples, 512)):
        out = splitter.split(seq, epoch=0, row=row)
        new = out.seq
        assert tok.decode(new.ids) == tok.decode(seq.ids)  # the same text, other tokens
        assert tok.decode(new.ids[new.start :]) == tok.decode(seq.ids[seq.start :])  # the completion is where it was
        copied = set(seq.ids[seq.start :]) & set(seq.ids[1 : seq.start])
        names = {i for i in copied if tok.convert_ids_to_tokens(i).lstrip("▁") in NAMES}
        assert len(names) == 2 and not names & set(new.ids)  # both names split, in the prompt and the completion
        # The prompt and the completion spell each name with the same pieces.
        for name in names:
            text = tok.convert_ids_to_tokens(name)
            pieces = splitter.pieces(name, random.Random(0))
            assert len(pieces) >= 2 and "".join(tok.convert_ids_to_tokens(pieces)) == text
        comp = new.ids[new.start : -1]
        assert any(comp[k : k + 2] == new.ids[j : j + 2] for k in range(len(comp) - 1) for j in range(1, new.start))
        assert len(out.teacher) == new.positions
        for j, t in enumerate(out.teacher):
            predicted = new.ids[new.loss_from + j]
            if t >= 0:  # a token the teacher read whole: the teacher's position that predicted it
                assert seq.ids[seq.loss_from + t] == predicted
            else:
                assert predicted not in names  # a piece of a split word, never the whole name
        assert sum(t < 0 for t in out.teacher) >= 2
        if plan is not None:
            assert set(new.ids) <= set(plan.kept)  # every piece is a token the pruned student has


def test_splits_are_fixed_by_epoch_and_row_and_rate_zero_splits_nothing(copy_task):
    examples = load_task(copy_task["data"])[:30]
    tok, _, half = splitter_for(copy_task["teacher"], 0.5, examples)
    seqs = encode_examples(tok, examples, 512)
    first = [half.split(s, 0, r).seq.ids for r, s in enumerate(seqs)]
    assert first == [half.split(s, 0, r).seq.ids for r, s in enumerate(seqs)]  # a resumed run reads the same
    assert first != [half.split(s, 1, r).seq.ids for r, s in enumerate(seqs)]  # another epoch, other splits
    assert any(f == s.ids for f, s in zip(first, seqs)) and any(f != s.ids for f, s in zip(first, seqs))
    _, _, none = splitter_for(copy_task["teacher"], 0.0, examples)
    for r, s in enumerate(seqs):
        assert none.split(s, 0, r) == unsplit(s)


def test_a_split_longer_than_max_length_is_left_whole(copy_task):
    examples = load_task(copy_task["data"])[:5]
    tok, _, splitter = splitter_for(copy_task["teacher"], 1.0, examples, max_length=0)
    for r, s in enumerate(encode_examples(tok, examples, 512)):
        assert splitter.split(s, 0, r).seq == s


def test_teacher_rows_pick_the_matched_positions_across_the_batch():
    rows, matched = teacher_rows([[0, -1, 1], [-1, 0, 1, 2]], [2, 3], "cpu")
    assert rows.tolist() == [0, 1, 2, 3, 4] and matched.tolist() == [True, False, True, False, True, True, True]


def test_unmatched_positions_take_cross_entropy_in_place_of_the_divergence():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 11, generator=g)
    t = torch.randn(6, 11, generator=g)
    targets = torch.tensor([IGNORE, 3, 4, 5, 6, 7])
    every = torch.ones(6, dtype=torch.bool)
    plain = distill_loss(s, t, targets, 2.0, 0.7)
    same = distill_loss(s, t, targets, 2.0, 0.7, matched=every)
    for a, b in zip(plain, same):
        torch.testing.assert_close(a, b)
    matched = torch.tensor([True, False, True, False, True, True])  # position 1 and 3: split pieces
    loss, kl, ce = distill_loss(s, t[matched], targets, 2.0, 0.7, kind="jsd", matched=matched)
    p = F.log_softmax(t[matched] / 2.0, dim=-1)
    q = F.log_softmax(s[matched] / 2.0, dim=-1)
    m = torch.logaddexp(p + torch.tensor(0.5).log(), q + torch.tensor(0.5).log())
    js = 0.5 * (p.exp() * (p - m)).sum(-1) + 0.5 * (q.exp() * (q - m)).sum(-1)
    hard = F.cross_entropy(s[~matched], targets[~matched], reduction="none")
    want_kl = (js.sum() * 4.0 + hard.sum()) / 6
    torch.testing.assert_close(kl, want_kl)
    torch.testing.assert_close(ce, F.cross_entropy(s, targets, ignore_index=IGNORE))
    torch.testing.assert_close(loss, 0.7 * want_kl + 0.3 * ce)
    prompt_piece = torch.tensor([IGNORE, 3, 4, 5, 6, 7])  # an unmatched prompt position carries no loss
    only = torch.tensor([False, True, True, True, True, True])
    _, kl0, _ = distill_loss(s, t[only], prompt_piece, 1.0, 0.5, matched=only)
    _, kl1, _ = distill_loss(s[1:], t[1:], prompt_piece[1:], 1.0, 0.5)
    torch.testing.assert_close(kl0, kl1)


def split_copy_loss(student_dir: Path, teacher: Path, held_out: Path) -> float:
    """The student's mean cross-entropy on held-out completions whose names are split."""
    tok = load_tokenizer(teacher)
    model = load_causal_lm(student_dir)
    examples = load_task(held_out)
    splitter = WordSplitter(tok, tok, None, 1.0, seed=7, max_length=512)
    seqs = [splitter.split(s, 0, r).seq for r, s in enumerate(encode_examples(tok, examples, 512))]
    ids, attn, mask = collate(seqs, tok.pad_token_id, "cpu")
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits
    return F.cross_entropy(logits[:, :-1][mask[:, :-1]], ids[:, 1:][mask[:, :-1]]).item()


def test_a_student_trained_on_split_words_copies_split_words_better(copy_task, tmp_path):
    losses = {}
    for rate in (0.0, 0.5):
        cfg = DistillConfig(teacher=copy_task["teacher"], data=copy_task["data"], out=tmp_path / f"s{rate}", layers=2,
                            steps=60, batch_size=16, lr=1e-3, alpha=0.5, temperature=1.0, split_words=rate, seed=0)
        manifest = distill(cfg)
        settings = json.loads((tmp_path / f"s{rate}" / "manifest.json").read_text())["settings"]
        assert settings["split_words"] == rate and manifest is not None
        losses[rate] = split_copy_loss(tmp_path / f"s{rate}", copy_task["teacher"], copy_task["held_out"])
    assert losses[0.5] < 0.5 * losses[0.0], losses


@pytest.mark.parametrize("kw, message", [({"split_words": 1.5}, "--split-words must be between 0 and 1"),
                                         ({"split_words": 0.5, "hidden_weight": 0.1}, "not with --hidden-weight")])
def test_bad_split_words_options(copy_task, tmp_path, kw, message):
    cfg = DistillConfig(teacher=copy_task["teacher"], data=copy_task["data"], out=tmp_path / "s", layers=2, **kw)
    with pytest.raises(ShrinkError, match=message):
        distill(cfg)
