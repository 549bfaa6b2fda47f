"""`--width-scores fisher` (shrink.distill.fisher): channels and heads ranked by what the
teacher's answer needs."""

from __future__ import annotations

import torch
from click.testing import CliRunner

from shrink.cli import cli
from shrink.distill.batches import collate, encode_examples
from shrink.distill.fisher import fisher_scores
from shrink.distill.importance import task_batches
from shrink.distill.student import cut_student, first_layers
from shrink.distill.width import activation_scores, prune_width, target_widths, widths_of
from shrink.hf import load_causal_lm, load_tokenizer
from shrink.tasks import load_task
from test_distill import mean_kl


def masked_gradients(model, tok, examples, layer_index: int):
    """d log p(completion) / d mask, one row per example, for the MLP channels and query
    heads of one layer, by another route than fisher_scores: explicit mask parameters
    multiplied into down_proj's and o_proj's inputs, one example at a time."""
    w = widths_of(model)
    layer = model.model.layers[layer_index]
    ffn_mask = torch.ones(w.intermediate, requires_grad=True)
    head_mask = torch.ones(w.heads, requires_grad=True)
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: (a[0] * ffn_mask,)),
             layer.self_attn.o_proj.register_forward_pre_hook(
                 lambda m, a: ((a[0].unflatten(-1, (w.heads, w.head_dim)) * head_mask[:, None]).flatten(-2),))]
    rows = []
    try:
        for seq in encode_examples(tok, examples, 512):
            ids, attn, mask = collate([seq], tok.pad_token_id, "cpu")
            logits = model(input_ids=ids, attention_mask=attn).logits[mask]
            loglik = -torch.nn.functional.cross_entropy(logits, ids[:, 1:][mask[:, :-1]], reduction="sum")
            ffn, heads = torch.autograd.grad(loglik, [ffn_mask, head_mask])
            rows.append((ffn.double(), heads.double()))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def test_fisher_scores_are_the_squared_gradients_of_a_mask(teacher, task_files):
    model, tok = load_causal_lm(teacher).eval(), load_tokenizer(teacher)
    examples = load_task(task_files["train"])[:12]
    scores = fisher_scores(model, [1, 3], tok, examples, n=12)
    assert len(scores) == 2
    for slot, index in enumerate([1, 3]):
        ffn, heads = masked_gradients(model, tok, examples, index)
        torch.testing.assert_close(scores[slot]["ffn"], ffn.pow(2).mean(0), rtol=1e-3, atol=1e-9)
        torch.testing.assert_close(scores[slot]["heads"], heads.pow(2).mean(0), rtol=1e-3, atol=1e-9)
        assert scores[slot]["ffn"].gt(0).all()
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # no weight gradients
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())  # hooks removed


def loud_but_mute(model, seed: int = 0):
    """Half the MLP channels of every layer made loud (up_proj rows x 20) but mute (their
    down_proj columns zeroed): they write nothing, so the answer cannot need them. Returns
    the mute channels per layer."""
    w = widths_of(model)
    rng = torch.Generator().manual_seed(seed)
    mute = []
    with torch.no_grad():
        for layer in model.model.layers:
            chosen = torch.randperm(w.intermediate, generator=rng)[: w.intermediate // 2]
            layer.mlp.up_proj.weight[chosen] *= 20
            layer.mlp.down_proj.weight[:, chosen] = 0
            mute.append(set(chosen.tolist()))
    return mute


def test_fisher_keeps_what_the_answer_needs_where_activations_keep_the_loud(teacher, task_files):
    model, tok = load_causal_lm(teacher).eval(), load_tokenizer(teacher)
    train = load_task(task_files["train"])
    held_out = load_task(task_files["eval"])[:40]
    mute = loud_but_mute(model)
    activation = activation_scores(model, task_batches(tok, train, "cpu"))
    fisher = fisher_scores(model, list(range(len(model.model.layers))), tok, train, n=64)
    target = target_widths(widths_of(model), 0.5, 1.0)
    for layer, scores in enumerate(fisher):
        assert all(float(scores["ffn"][c]) == 0.0 for c in mute[layer])  # a mute channel moves nothing
        kept = set(torch.topk(activation[layer]["ffn"], target.intermediate).indices.tolist())
        assert len(kept & mute[layer]) > 0.9 * len(kept)  # activations keep the loud mute channels
    by_fisher = mean_kl(prune_width(model, target, [{**a, **f} for a, f in zip(activation, fisher)]), model, tok, held_out)
    by_activation = mean_kl(prune_width(model, target, activation), model, tok, held_out)
    assert by_fisher < 1e-6 < 0.01 < by_activation, (by_fisher, by_activation)


def test_fisher_scores_follow_the_cut_layers(teacher, task_files):
    """A student cut from layers keep[i] is scored by those teacher layers."""
    model, tok = load_causal_lm(teacher).eval(), load_tokenizer(teacher)
    examples = load_task(task_files["train"])[:8]
    both = fisher_scores(model, [0, 2], tok, examples, n=8)
    alone = fisher_scores(model, [2], tok, examples, n=8)
    torch.testing.assert_close(both[1]["ffn"], alone[0]["ffn"])
    assert not torch.allclose(both[0]["ffn"], both[1]["ffn"])
    assert widths_of(cut_student(model, first_layers(4, 2))).intermediate == len(both[0]["ffn"])


def test_distill_with_fisher_scores_records_the_choice(teacher, task_files, tmp_path):
    import json

    r = CliRunner().invoke(cli, ["distill", "--teacher", teacher, "--data", task_files["train"], "--out", tmp_path / "s",
                                 "--layers", "2", "--ffn-ratio", "0.5", "--heads-ratio", "0.5", "--width-scores",
                                 "fisher", "--steps", "2", "--batch-size", "4"])
    assert r.exit_code == 0, r.output
    settings = json.loads((tmp_path / "s" / "manifest.json").read_text())["settings"]
    assert settings["width_scores"] == "fisher"
    assert settings["widths"] == {"intermediate_size": [512, 256], "attention_heads": [4, 2], "kv_heads": [2, 1],
                                  "head_dim": [64, 64]}
    assert "width pruned (fisher scores)" in r.stderr
