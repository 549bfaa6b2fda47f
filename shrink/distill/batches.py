"""Task examples as token sequences with the completion marked, and padded batches.

Where the loss is taken (`--loss-on`): a position is trained on when the token it
predicts is a loss token. With `completion` (the default) the loss tokens are the
completion's (and the EOS after it); with `all`, the prompt's tokens are loss tokens too,
from the first one after BOS. The teacher may read more than the student
(`--teacher-prefix`):

    student  BOS  prompt          completion  EOS
    teacher  BOS  prefix  prompt  completion  EOS

Student position i, which predicts the student's token i + 1, is matched with the
teacher position that predicts the same token of the text. The rule (loss_positions):
the loss tokens are the longest common suffix of the two id sequences, leaving out the
first id of each (BOS, which no position predicts). The student's token k and the
teacher's token k + len(teacher) - len(student) are then one token, and the positions
before them are matched. Without a prefix the two sequences are one, and every token
after BOS counts. With one, the prompt's first tokens may tokenize differently where
the prefix ends: the prefix's last piece can merge with the prompt's first characters,
or the prompt's first word can lose the word-start mark it has at the start of a text
(a blank line + "Review" gives "Re", "view" where the student has "▁Review"). The
common suffix stops before the first token that differs, so the tokens before it carry
no loss. A merge may also give the student's own token ("words " + "Review" gives
"▁Review", as the student's text does): the prompt then aligns in full. The student's
BOS position is trained only when the prompt's first token is the same in both, and is
then matched with the teacher's last prefix position. A teacher sequence that --max-length trimmed more than the student's (it is
longer by the prefix) loses its first prompt tokens the same way. The completion itself
must lie in the common suffix (check_aligned refuses the data otherwise).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

from shrink.errors import ShrinkError
from shrink.prefix import common_prefix
from shrink.tasks import Example


@dataclass(frozen=True)
class Sequence:
    ids: list[int]  # prompt + completion (+ EOS), BOS first when the tokenizer adds one
    start: int  # index of the first completion token in ids
    prompt_loss: int = 0  # prompt tokens just before the completion that are loss tokens too (--loss-on all)

    @property
    def loss_from(self) -> int:
        """Index of the first loss token: the loss is taken at positions loss_from - 1 .. len(ids) - 2."""
        return self.start - self.prompt_loss

    @property
    def positions(self) -> int:
        """How many positions the loss is taken at."""
        return len(self.ids) - self.loss_from


def encode_examples(tokenizer, examples: list[Example], max_length: int) -> list[Sequence]:
    """Tokenize prompt+completion as one text, split where the prompt's own tokens end (as
    evaluation does), append EOS so the student learns to stop, and trim long prompts from
    the left, keeping BOS."""
    eos = tokenizer.eos_token_id
    seqs = []
    for ex in examples:
        # A chat template's text holds special tokens as text: parsed as the tokens they are.
        prompt = tokenizer(ex.prompt, split_special_tokens=not ex.chat).input_ids
        full = tokenizer(ex.prompt + ex.completion, split_special_tokens=not ex.chat).input_ids
        start = max(len(common_prefix([prompt, full])), 1)
        ids = full + ([eos] if eos is not None else [])
        if len(ids) > max_length:
            cut = len(ids) - max_length
            if cut >= start:  # the completion alone is too long: keep its beginning
                ids, start = ids[:1] + ids[start : start + max_length - 1], 1
            else:
                ids, start = ids[:1] + ids[1 + cut :], start - cut
        seqs.append(Sequence(ids=ids, start=start))
    return seqs


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: a shuffle fixed by (seed, epoch), so a resumed run
    sees exactly the batches the interrupted one would have."""
    order = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def collate(seqs: list[Sequence], pad_id: int, device: str):
    """Right-padded (batch, seq) ids, attention mask, and the mask of positions whose
    *next* token is a loss token (where the loss is taken)."""
    import torch

    width = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for row, s in enumerate(seqs):
        ids[row, : len(s.ids)] = torch.tensor(s.ids)
        attn[row, : len(s.ids)] = 1
        loss_mask[row, s.loss_from - 1 : len(s.ids) - 1] = True  # logits here predict loss tokens
    return ids.to(device), attn.to(device), loss_mask.to(device)


def completion_flags(seqs: list[Sequence], device: str):
    """(n,) bool over the positions collate's mask selects, row by row: True where the
    predicted token is a completion token (the reference the cross-entropy is taken on)."""
    import torch

    flags = [f for s in seqs for f in [False] * s.prompt_loss + [True] * (len(s.ids) - s.start)]
    return torch.tensor(flags, dtype=torch.bool, device=device)


def check_aligned(student_seqs, teacher_seqs, data: Path) -> None:
    """The completion must be the same tokens whether or not the teacher prefix is there,
    so that teacher and student distributions are compared position by position."""
    for line, (s, t) in enumerate(zip(student_seqs, teacher_seqs), start=1):
        if s.ids[s.start :] != t.ids[t.start :]:
            raise ShrinkError(f"{data}:{line}: the completion tokenizes differently after --teacher-prefix")


LOSS_ON = ("completion", "all")


def loss_positions(student_seqs, teacher_seqs, loss_on: str, data: Path):
    """The student's and the teacher's sequences with their loss tokens set for `loss_on`
    (LOSS_ON; see the module's docstring for the rule). Call check_aligned first: the
    completion is then in the common suffix. `teacher_seqs` may be `student_seqs` itself (no
    --teacher-prefix): one list comes back as both."""
    if loss_on == "completion":
        return student_seqs, teacher_seqs
    if teacher_seqs is student_seqs:
        marked = [replace(s, prompt_loss=s.start - 1) for s in student_seqs]
        return marked, marked
    students, teachers = [], []
    for s, t in zip(student_seqs, teacher_seqs):
        shared = common_suffix(s.ids, t.ids, min(len(s.ids), len(t.ids)) - 1)  # never the first id
        prompt = max(0, shared - (len(s.ids) - s.start))  # of the student's start - 1 prompt tokens
        students.append(replace(s, prompt_loss=prompt))
        teachers.append(replace(t, prompt_loss=prompt))
    if not any(s.prompt_loss for s in students) and any(s.start > 1 for s in students):
        raise ShrinkError(f"--loss-on all: no prompt token of {data} tokenizes the same after --teacher-prefix, so "
                          "the teacher's positions cannot be matched with the student's; use --loss-on completion")
    return students, teachers


def common_suffix(a: list[int], b: list[int], limit: int) -> int:
    """How many ids a and b end with in common, at most `limit`."""
    n = 0
    while n < limit and a[-1 - n] == b[-1 - n]:
        n += 1
    return n
