"""bench/swap_reviews.py: training reviews with words swapped for the teacher's guesses
(issue 15, "more data"). Only whole words are swapped, only for whole-word tokens the
teacher ranks, and the fluency ranking reads each sequence as the teacher does."""

from __future__ import annotations

import random

import torch

from bench_scripts import load

import tiny

W = "\u2581"


def test_whole_words_are_found_and_pieces_of_words_are_not():
    sr = load("swap_reviews")
    pieces = ["<bos>", "Review", ":", W + "Day", W + "trip", W + "spent", W + "more", W + "time", W + "on",
              W + "the", W + "bus", ".", "\n", "Sentiment", ":"]
    assert [pieces[i] for i in sr.word_positions(pieces)] == [W + "Day", W + "trip", W + "spent", W + "time", W + "bus"]
    # a piece the next one continues, a contraction's first half, two letters, a function word
    assert sr.word_positions([W + "un", "happy", W + "didn", "'t", W + "ok", W + "with", W + "lamp"]) == [6]
    assert sr.word_positions([W + "Lamp", ",", W + "broken"]) == [0, 2]


def test_a_swap_changes_only_candidate_positions_to_their_candidates_and_is_seeded():
    sr = load("swap_reviews")
    ids = [1, 10, 11, 12, 13, 14]
    cands = {2: ([20, 21], [0.5, 0.5]), 4: ([30], [1.0]), 5: ([], [])}
    seen_changed = set()
    for seed in range(40):
        new = sr.swap(ids, cands, random.Random(seed), rate=0.5)
        changed = {i for i, (a, b) in enumerate(zip(ids, new)) if a != b}
        assert changed and changed <= {2, 4}
        assert new[2] in (11, 20, 21) and new[4] in (13, 30)
        seen_changed |= changed
        assert sr.swap(ids, cands, random.Random(seed), rate=0.5) == new
    assert seen_changed == {2, 4}
    # rate 0 still swaps one word; no candidate anywhere: nothing to make
    assert sum(a != b for a, b in zip(ids, sr.swap(ids, cands, random.Random(0), rate=0.0))) == 1
    assert sr.swap(ids, {3: ([], [])}, random.Random(0), rate=1.0) is None


def test_the_teachers_guesses_and_likelihoods_are_the_models_own(tmp_path):
    sr = load("swap_reviews")
    examples = tiny.toy_examples(40, seed=1)
    tok = tiny.build_tokenizer(tmp_path, [r["prompt"] for r in examples], vocab_size=300)
    model = tiny.build_gemma3(tmp_path, tok, layers=2, hidden=128).eval()
    seqs = [tok(examples[i]["prompt"]).input_ids for i in range(3)]
    assert min(map(len, seqs)) >= 8 and len({len(s) for s in seqs}) > 1  # padded batches below
    positions = [[3, 5, len(seqs[0]) - 1], [], [2, 7]]
    allowed = torch.arange(5, 120)
    got, read_nll = sr.teacher_reads(model, seqs, positions, allowed, top=4, pad_id=tok.pad_token_id)
    assert got[1] == {}
    for s, pos, guesses in zip(seqs, positions, got):
        with torch.no_grad():
            logits = model(torch.tensor([s])).logits[0]
        for p in pos:
            ids, probs = guesses[p]
            ranked = logits[p - 1, allowed]
            ranked[allowed == s[p]] = float("-inf")  # the word itself is never its own candidate
            want = allowed[torch.topk(ranked, 4).indices].tolist()
            assert ids == want and s[p] not in ids
            assert abs(sum(probs) - 1) < 1e-5 and probs == sorted(probs, reverse=True)

    nll = sr.sequence_nll(model, seqs, tok.pad_token_id, batch=2)  # padded batches read as each sequence alone
    assert len(nll) == len(read_nll) == len(seqs)
    for s, n, r in zip(seqs, nll, read_nll):  # the guessing read's likelihood is the same one
        with torch.no_grad():
            x = torch.tensor([s])
            want = torch.nn.functional.cross_entropy(model(x).logits[0, :-1], x[0, 1:], reduction="sum").item()
        assert abs(n - want) < 1e-3 * max(1.0, abs(want))
        assert abs(r - want) < 1e-3 * max(1.0, abs(want))


def test_a_word_beginning_is_told_by_the_teachers_probability_of_a_continuation(tmp_path):
    sr = load("swap_reviews")
    examples = tiny.toy_examples(40, seed=1)
    tok = tiny.build_tokenizer(tmp_path, [r["prompt"] for r in examples], vocab_size=300)
    model = tiny.build_gemma3(tmp_path, tok, layers=2, hidden=128).eval()
    continues = sr.continuation_mask(tok)
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    assert continues.any() and not continues.all()
    for piece, c in zip(pieces, continues.tolist()):  # a letter first: a continuation; a word start or <...>: not
        assert c == (piece[0].isalpha() and not piece.startswith(sr.WORD_START))
    prefix = tok("It was")["input_ids"]
    candidates = [i for i, p in enumerate(pieces) if p.startswith(sr.WORD_START) and len(p) > 2][:5]
    got = sr.continuation_probability(model, prefix, candidates, continues, batch=2)
    assert len(got) == len(candidates) == 5
    for c, g in zip(candidates, got):
        with torch.no_grad():
            probs = torch.softmax(model(torch.tensor([prefix + [c]])).logits[0, -1].float(), dim=-1)
        want = probs[: len(continues)][continues].sum().item()
        assert 0.0 < g < 1.0 and abs(g - want) < 1e-5
