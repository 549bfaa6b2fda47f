"""Task examples as token sequences with the completion marked, and padded batches."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from shrink.errors import ShrinkError
from shrink.prefix import common_prefix
from shrink.tasks import Example


@dataclass(frozen=True)
class Sequence:
    ids: list[int]  # prompt + completion (+ EOS)
    start: int  # index of the first completion token in ids


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
    *next* token is a completion token (where the loss is taken)."""
    import torch

    width = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for row, s in enumerate(seqs):
        ids[row, : len(s.ids)] = torch.tensor(s.ids)
        attn[row, : len(s.ids)] = 1
        loss_mask[row, s.start - 1 : len(s.ids) - 1] = True  # logits here predict completion tokens
    return ids.to(device), attn.to(device), loss_mask.to(device)


def check_aligned(student_seqs, teacher_seqs, data: Path) -> None:
    """The completion must be the same tokens whether or not the teacher prefix is there,
    so that teacher and student distributions are compared position by position."""
    for line, (s, t) in enumerate(zip(student_seqs, teacher_seqs), start=1):
        if s.ids[s.start :] != t.ids[t.start :]:
            raise ShrinkError(f"{data}:{line}: the completion tokenizes differently after --teacher-prefix")
