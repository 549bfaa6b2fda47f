"""bench/pool_readout.py: a student's last layer made to pool the prompt (issue 15)."""

from __future__ import annotations

import pytest
import torch

from bench_scripts import load

import tiny


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_uniform_attention_gives_every_position_the_mean_of_what_it_sees(family, tmp_path):
    pr = load("pool_readout")
    tok = tiny.build_tokenizer(tmp_path, [r["prompt"] for r in tiny.toy_examples(40, seed=1)], vocab_size=300)
    build = tiny.build_gemma3 if family == "gemma3" else tiny.build_llama
    model = build(tmp_path, tok, layers=2, hidden=128).eval()
    model.set_attn_implementation("eager")  # attention weights come back only from eager attention
    ids = torch.tensor([tok(tiny.toy_examples(1, seed=2)[0]["prompt"]).input_ids[:12]])
    first_before, last_before = model(ids, output_attentions=True).attentions
    before = last_before[0]
    assert not torch.allclose(before[:, -1], torch.full_like(before[:, -1], 1 / ids.shape[1]), atol=1e-3)

    assert pr.uniform_attention(model.model.layers[-1]) == ("q_norm" if family == "gemma3" else "q_proj")
    after = model(ids, output_attentions=True).attentions
    n = ids.shape[1]
    want = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1).unsqueeze(1)  # row i: 1/(i+1) over 0..i
    for head in after[-1][0]:
        torch.testing.assert_close(head, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(after[0], first_before)  # the layer below is as it was

    model.train()  # it can still learn another pattern: the query side has a gradient
    model(ids, labels=ids).loss.backward()
    attn = model.model.layers[-1].self_attn
    grad = attn.q_norm.weight.grad if family == "gemma3" else attn.q_proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
