"""`--split-words P`: train the student to copy words its vocabulary splits into pieces.

A student with a pruned vocabulary (--prune-vocab) keeps whole-word tokens for the words
of its training text only. A word it has never seen (a new name, a new city) reaches it
as two to four smaller pieces ("▁F", "res", "no" for Fresno), and a student trained on
whole words copies the first piece and finishes the word from memory ("Fresden"). This
splits words in the training text the same way, so that copying piece by piece is what
the training data asks for.

Each step, in each training sequence, every token that the completion copies from the
prompt (it occurs in both) and that is a word or a word's part (two letters or more) is
split with probability P: the token's text is cut at a random point and each part is
encoded with the student's own BPE (its merges, over its kept tokens), so the pieces are
ones it has. Every occurrence in the sequence is split the same way, in the prompt and in
the completion, as a word the vocabulary lacks is at inference. The text is unchanged; only
its tokens are.

The teacher read the unsplit text. A position that predicts a token left whole is matched
with the teacher's position that predicted it (its context differs by the split pieces
before it, the token it predicts does not) and keeps the divergence to the teacher. A
position that predicts a split piece has no teacher distribution: the teacher would predict
the whole word there. In the completion its target is the reference piece itself (the
divergence is replaced by cross-entropy, the KL to a one-hot teacher); in the prompt
(--loss-on all) it carries no loss. The choice of splits is fixed by (seed, epoch, row), so
a resumed run trains on the same sequences.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from shrink.distill.batches import Sequence

WORD_STARTS = ("▁", "Ġ")  # SentencePiece-style and byte-level BPE word-start marks
MIN_LETTERS = 2  # a token needs this many letters (after a word-start mark) to be split


@dataclass(frozen=True)
class Split:
    """A sequence with some tokens split, and where each of its loss positions finds the
    teacher's output: `teacher[j]` is the index, among the unsplit sequence's loss
    positions, of the position matched with the split one's j-th loss position, or -1."""

    seq: Sequence
    teacher: list[int]


class WordSplitter:
    """Splits copied words of training sequences (see the module docstring). `tokenizer`
    is the teacher's (the sequences hold its ids); `student_tokenizer` encodes the pieces,
    and `kept` (the --prune-vocab plan's student id -> teacher id; None when the vocabulary
    is not pruned) maps them back to the teacher's ids."""

    def __init__(self, tokenizer, student_tokenizer, kept: list[int] | None, rate: float, seed: int,
                 max_length: int):
        self.rate, self.seed, self.max_length = rate, seed, max_length
        self.tokenizer = tokenizer
        self.model = student_tokenizer.backend_tokenizer.model  # BPE: encodes a piece without normalising it
        self.kept = kept
        self.special = set(tokenizer.all_special_ids)
        self._letters: dict[int, tuple[str, str] | None] = {}

    def parts(self, token_id: int) -> tuple[str, str] | None:
        """(mark, letters) of a splittable token: its word-start mark ('' if none) and its
        letters; None for any other token."""
        if token_id not in self._letters:
            text = self.tokenizer.convert_ids_to_tokens(token_id)
            found = None
            if token_id not in self.special and isinstance(text, str):
                mark = text[0] if text[:1] in WORD_STARTS else ""
                letters = text[len(mark):]
                if len(letters) >= MIN_LETTERS and letters.isalpha():
                    found = (mark, letters)
            self._letters[token_id] = found
        return self._letters[token_id]

    def pieces(self, token_id: int, rng: random.Random) -> list[int]:
        """The token's text cut at a random point, each part encoded by the student's BPE:
        two or more teacher ids that spell the same text."""
        mark, letters = self.parts(token_id)
        cut = rng.randint(1, len(letters) - 1)
        out = []
        for text in (mark + letters[:cut], letters[cut:]):
            ids = [t.id for t in self.model.tokenize(text)]
            out += [self.kept[i] for i in ids] if self.kept is not None else ids
        return out

    def split(self, seq: Sequence, epoch: int, row: int) -> Split:
        """`seq` with its copied words split for this (epoch, row), and its teacher map.
        A sequence with nothing chosen, or one the pieces would make longer than
        --max-length, comes back as it is."""
        rng = random.Random(f"{self.seed}-{epoch}-{row}")
        prompt = set(seq.ids[1 : seq.start])
        copied = sorted({t for t in seq.ids[seq.start :] if t in prompt and self.parts(t)})
        chosen = {t: self.pieces(t, rng) for t in copied if rng.random() < self.rate}
        if not chosen:
            return unsplit(seq)
        ids, origin, whole = [], [], []  # per new token: its index in seq.ids, and whether it is that token
        for k, t in enumerate(seq.ids):
            if k > 0 and t in chosen:
                ids += chosen[t]
                origin += [k] * len(chosen[t])
                whole += [False] * len(chosen[t])
            else:
                ids.append(t)
                origin.append(k)
                whole.append(True)
        if len(ids) > self.max_length:
            return unsplit(seq)
        start = origin.index(seq.start)  # the first piece of the first completion token
        loss_from = origin.index(seq.loss_from)
        teacher = [origin[n] - seq.loss_from if whole[n] else -1 for n in range(loss_from, len(ids))]
        return Split(replace(seq, ids=ids, start=start, prompt_loss=start - loss_from), teacher)


def unsplit(seq: Sequence) -> Split:
    """The sequence as it is: every loss position matched with the teacher's own."""
    return Split(seq, list(range(seq.positions)))


def teacher_rows(maps: list[list[int]], counts: list[int], device: str):
    """--split-words: (the rows of the batch's teacher outputs, in the order of the
    student's positions that have one; the (n,) bool mask of those positions). `maps[r]`
    is row r's Split.teacher, `counts[r]` how many teacher rows row r has."""
    import torch

    rows, matched, offset = [], [], 0
    for teacher, count in zip(maps, counts):
        rows += [offset + j for j in teacher if j >= 0]
        matched += [j >= 0 for j in teacher]
        offset += count
    return (torch.tensor(rows, dtype=torch.long, device=device),
            torch.tensor(matched, dtype=torch.bool, device=device))
