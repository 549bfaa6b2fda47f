"""Logits only where they are needed.

A large vocabulary makes the output head the most expensive layer (Gemma 3 270M: 262,144
x 640, more than half the model). The loss needs logits at completion positions only,
so the decoder runs on the whole batch and the head on the selected positions alone,
optionally on a subset of vocabulary rows (a pruned student's kept tokens).
"""

from __future__ import annotations


def selected_logits(model, ids, attn, mask, rows=None, prefix=None):
    """(n, vocab) logits at the positions where `mask` (batch, seq) is True; with `rows`
    (a LongTensor of token ids), only those vocabulary columns, in that order. With
    `prefix` (a PrefixCache every row starts with, and before every masked position),
    the prefix is not computed again."""
    if prefix is not None and len(prefix):
        hidden = prefix.hidden(model, ids, attn)  # (batch, seq - prefix, d)
        mask = mask[:, len(prefix) :]
    else:
        hidden = model.base_model(input_ids=ids, attention_mask=attn).last_hidden_state  # (batch, seq, d)
    return head_logits(model, hidden[mask], rows)  # hidden[mask]: (n, d)


def head_logits(model, h, rows=None):
    """The output head on hidden states h (..., d), with the model's final soft-capping."""
    head = model.get_output_embeddings()
    weight = head.weight if rows is None else head.weight[rows]  # (vocab or len(rows), d)
    logits = h @ weight.T.to(h.dtype)
    if getattr(head, "bias", None) is not None:
        logits = logits + (head.bias if rows is None else head.bias[rows])
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = (logits / cap).tanh() * cap
    return logits
