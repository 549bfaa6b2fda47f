"""A shared prompt prefix, run once.

Task prompts often start with the same instruction or few-shot examples. For a frozen
model (the teacher, or any model at evaluation) the keys and values of that prefix are
the same for every example, so they are computed once and reused: the cost per example
falls to its own tokens. The result equals the full forward pass (tested).
"""

from __future__ import annotations

import copy

from shrink.kv_cache import cache_kwargs, returned_cache


def common_prefix(seqs: list[list[int]]) -> list[int]:
    if not seqs:
        return []
    first = seqs[0]
    n = len(first)
    for s in seqs[1:]:
        n = min(n, len(s))
        for i in range(n):
            if s[i] != first[i]:
                n = i
                break
    return list(first[:n])


class PrefixCache:
    """Keys and values of `prefix` for a frozen model; worth it from a few tokens on."""

    MIN_TOKENS = 8

    def __init__(self, model, prefix: list[int], device: str):
        import torch

        self.ids = list(prefix)
        with torch.inference_mode():
            x = torch.tensor([self.ids], device=device)
            self._cache = returned_cache(model.base_model(input_ids=x, use_cache=True))

    def __len__(self) -> int:
        return len(self.ids)

    def for_batch(self, batch: int):
        """A copy of the cache repeated `batch` times (a forward pass extends it in place)."""
        cache = copy.deepcopy(self._cache)
        cache.batch_repeat_interleave(batch)
        return cache

    def hidden(self, model, ids, attn):
        """Last hidden states (batch, seq - len(prefix), d) of full sequences `ids` that all
        start with the prefix, computing only the tokens after it."""
        import torch

        n = len(self.ids)
        full_mask = torch.cat([torch.ones_like(attn[:, :n]), attn[:, n:]], dim=1)
        out = model.base_model(
            input_ids=ids[:, n:], attention_mask=full_mask, **cache_kwargs(model.base_model, self.for_batch(ids.shape[0])),
            use_cache=True,
        )
        return out.last_hidden_state


def usable_prefix(seqs: list[list[int]], first_needed: int) -> list[int]:
    """The shared prefix, cut so that every position whose logits are needed (from
    `first_needed` on) is still computed; [] when too short to be worth a cache."""
    prefix = common_prefix(seqs)[: max(0, first_needed)]
    return prefix if len(prefix) >= PrefixCache.MIN_TOKENS else []
