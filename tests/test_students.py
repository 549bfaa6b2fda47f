"""Smarter students: layers chosen by importance, width pruning, hidden-state alignment,
and starting from an existing smaller model (--student)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

import tiny
from shrink.cli import cli
from shrink.distill.batches import collate, encode_examples
from shrink.distill.hidden import HiddenAlignment
from shrink.distill.importance import important_layers, layer_distances, task_batches
from shrink.distill.student import cut_student, even_layers, first_layers
from shrink.distill.train import DistillConfig, distill, with_prefix
from shrink.distill.width import (Widths, activation_scores, check_widths, ffn_width, prune_width, refit_down,
                                  rotary_dims, target_widths, widths_of)
from shrink.errors import ShrinkError
from shrink.hf import load_causal_lm, load_tokenizer
from shrink.logits import selected_logits
from shrink.prefix import PrefixCache, usable_prefix
from shrink.tasks import load_task
from test_distill import mean_kl


def edited_teacher(teacher, folder, edit):
    """A copy of the teacher folder whose weights `edit(model)` changed in place."""
    shutil.copytree(teacher, folder)
    model = load_causal_lm(folder)
    with torch.no_grad():
        edit(model)
    model.save_pretrained(folder)
    return folder


def make_identity(index):
    """Zero a layer's attention and MLP output projections: it returns its input."""
    def edit(model):
        model.model.layers[index].self_attn.o_proj.weight.zero_()
        model.model.layers[index].mlp.down_proj.weight.zero_()
    return edit


# --- layer selection -------------------------------------------------------------------

def test_important_layers_keeps_the_ends_and_the_largest_distances():
    assert important_layers([0.5, 0.1, 0.3, 0.2, 0.05], 3) == [0, 2, 4]
    assert important_layers([0.5, 0.1, 0.3, 0.2, 0.05], 4) == [0, 2, 3, 4]
    assert important_layers([0.5, 0.2, 0.2, 0.1], 3) == [0, 1, 3]  # a tie goes to the earlier layer
    assert important_layers([0.5, 0.1, 0.3], 1) == [0]
    assert important_layers([0.5, 0.1, 0.3], 2) == [0, 2]
    with pytest.raises(ShrinkError, match="between 1 and the teacher's 3 layers, got 4"):
        important_layers([0.5, 0.1, 0.3], 4)


@pytest.mark.parametrize("identity", [1, 2])
def test_an_identity_layer_has_distance_zero_and_is_dropped(identity, teacher, task_files, tmp_path):
    folder = edited_teacher(teacher, tmp_path / "t", make_identity(identity))
    model, tok = load_causal_lm(folder), load_tokenizer(folder)
    distances = layer_distances(model, task_batches(tok, load_task(task_files["train"]), "cpu", n=32))
    assert distances[identity] == pytest.approx(0.0, abs=1e-6)
    assert all(d > 0.01 for i, d in enumerate(distances) if i != identity), distances
    assert important_layers(distances, 3) == [i for i in range(4) if i != identity]


def test_distill_with_importance_records_layers_and_scores(teacher, task_files, tmp_path):
    folder = edited_teacher(teacher, tmp_path / "t", make_identity(2))
    m = distill(DistillConfig(teacher=folder, data=task_files["train"], out=tmp_path / "s", layers=3, steps=2,
                              layer_selection="importance", device="cpu"))
    s = m.settings
    assert s["layer_selection"] == "importance" and s["layers_kept"] == [0, 1, 3]
    assert len(s["layer_scores"]) == 4 and s["layer_scores"][2] == pytest.approx(0.0, abs=1e-6)
    assert load_causal_lm(tmp_path / "s").config.num_hidden_layers == 3


def test_first_layers_keep_the_teachers_computation_unbroken(teacher, task_files, tmp_path):
    """--layer-selection first: the student's layers are the teacher's first N, so before
    training its hidden state after layer i is the teacher's after layer i (even spacing
    skips layers and breaks that)."""
    assert first_layers(4, 2) == [0, 1] and even_layers(4, 2) == [0, 3]
    with pytest.raises(ShrinkError, match="between 1 and the teacher's 4 layers, got 5"):
        first_layers(4, 5)
    model, tok = load_causal_lm(teacher), load_tokenizer(teacher)
    ids = tok("Review: great value\nSentiment:", return_tensors="pt")
    with torch.no_grad():
        want = model(**ids, output_hidden_states=True).hidden_states
        got = cut_student(model, first_layers(4, 2))(**ids, output_hidden_states=True).hidden_states
        skipped = cut_student(model, even_layers(4, 2))(**ids, output_hidden_states=True).hidden_states
        normed = model.model.norm(want[2])  # a model's last hidden state is after its final norm
    assert torch.allclose(got[1], want[1], atol=1e-5) and torch.allclose(got[2], normed, atol=1e-4)
    assert not torch.allclose(skipped[2], normed, atol=1e-2)
    m = distill(DistillConfig(teacher=teacher, data=task_files["train"], out=tmp_path / "s", layers=2, steps=1,
                              layer_selection="first", device="cpu"))
    assert m.settings["layer_selection"] == "first" and m.settings["layers_kept"] == [0, 1]

@pytest.mark.parametrize("which", ["norms", "norms-embeddings"])
def test_trainable_norms_leave_the_linear_weights_as_the_teacher_had_them(which, teacher, task_files, tmp_path):
    """--trainable norms(-embeddings): only the weights llama.cpp keeps at high precision
    change; every linear weight stays the teacher's (so a quantized teacher's grid, and
    Q4_K_M's rounding of it, is what training left); `all` changes them too."""
    def weights(folder):
        return {n: p.detach().clone() for n, p in load_causal_lm(folder).named_parameters()}

    t = weights(teacher)
    changed = {}
    for mode in (which, "all"):
        out = tmp_path / mode
        m = distill(DistillConfig(teacher=teacher, data=task_files["train"], out=out, layers=2, steps=3, lr=1e-2,
                                  layer_selection="first", trainable=mode, device="cpu"))
        assert m.settings["trainable"] == mode
        s = weights(out)
        changed[mode] = {n for n, w in s.items() if not torch.allclose(w, t[n], atol=1e-6)}
    norms = {n for n in t if "norm" in n and n in weights(tmp_path / which)}
    linear = {n for n in weights(tmp_path / which) if n.endswith("proj.weight")}
    assert linear and norms and norms <= changed[which] and not linear & changed[which]
    assert ("model.embed_tokens.weight" in changed[which]) == (which == "norms-embeddings")
    assert linear <= changed["all"]


# --- width pruning ---------------------------------------------------------------------

def test_ffn_width_rounding():
    assert ffn_width(512, 0.5) == 256
    assert ffn_width(512, 0.3) == 256  # at least one multiple of 256
    assert ffn_width(2048, 0.4) == 768  # 819.2 -> the nearest multiple of 256
    assert ffn_width(8192, 0.55) == 4608
    assert ffn_width(4864, 0.5) == 2560  # 9.5 multiples of 256: halves go up
    assert ffn_width(4864, 0.4) == 2048  # 7.6 multiples
    assert ffn_width(1000, 0.5) == 512  # not a multiple of 256: multiples of 32 (500 -> 512)
    assert ffn_width(1000, 1.0) == 1000
    assert target_widths(Widths(512, 4, 2, 64), 0.5, 0.5) == Widths(256, 2, 1, 64)
    assert target_widths(Widths(512, 8, 8, 64), 1.0, 0.4) == Widths(512, 3, 3, 64)  # MHA: groups of one
    assert target_widths(Widths(512, 4, 1, 64), 1.0, 0.5) == Widths(512, 2, 1, 64)  # one group: query heads go
    assert target_widths(Widths(512, 32, 8, 128), 1.0, 0.5) == Widths(512, 16, 4, 128)  # Llama 3: groups of 4 stay
    assert target_widths(Widths(512, 32, 8, 128), 1.0, 0.1) == Widths(512, 3, 1, 128)


def test_query_heads_within_a_single_group_are_pruned_by_their_scores(teacher, tmp_path):
    """Gemma 3 270M has one key/value group: --heads-ratio keeps it and drops query heads.
    Heads whose o_proj columns are zero add nothing, so dropping exactly them (as their
    scores say) leaves the logits unchanged; q_proj rows and o_proj columns must agree."""
    tok = load_tokenizer(teacher)
    model = tiny.build_gemma3(tmp_path, tok, layers=2, hidden=256).eval()
    w = widths_of(model)
    assert (w.heads, w.kv_heads) == (4, 1)
    with torch.no_grad():
        for layer in model.model.layers:
            for h in (0, 2):
                layer.self_attn.o_proj.weight[:, h * w.head_dim:(h + 1) * w.head_dim] = 0
    scores = [{"ffn": torch.ones(w.intermediate, dtype=torch.float64),
               "heads": torch.tensor([0.1, 0.9, 0.2, 0.8], dtype=torch.float64)} for _ in model.model.layers]
    pruned = prune_width(model, target_widths(w, 1.0, 0.5), scores)
    assert widths_of(pruned) == Widths(w.intermediate, 2, 1, w.head_dim)
    keep = torch.cat([torch.arange(h * w.head_dim, (h + 1) * w.head_dim) for h in (1, 3)])
    torch.testing.assert_close(pruned.model.layers[0].self_attn.q_proj.weight,
                               model.model.layers[0].self_attn.q_proj.weight[keep])
    ids = torch.tensor([tok("Review: the coffee was awful\nSentiment: negative").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def silence(model, heads: bool, seed: int = 0):
    """Silence half the MLP channels (their up_proj rows) and, with `heads`, one KV group
    (its v_proj rows and bias) in every layer, in place. Returns the kept group per layer."""
    w = widths_of(model)
    rng = torch.Generator().manual_seed(seed)
    kept_groups = []
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[torch.randperm(w.intermediate, generator=rng)[: w.intermediate // 2]] = 0
            silent = int(torch.randint(0, w.kv_heads, (1,), generator=rng))
            kept_groups.append(1 - silent)
            if heads:
                rows = slice(silent * w.head_dim, (silent + 1) * w.head_dim)
                layer.self_attn.v_proj.weight[rows] = 0
                if layer.self_attn.v_proj.bias is not None:
                    layer.self_attn.v_proj.bias[rows] = 0
    return kept_groups


def check_pruning_silent_parts_is_exact(model, tok, examples, heads_ratio, folder):
    """Activation importance must drop exactly the silenced parts, and the pruned model
    must compute what the original does, also after a save and from_pretrained. This
    checks that q/k/v/o (and biases) and gate/up/down are sliced consistently, GQA
    groups included."""
    kept_groups = silence(model, heads=heads_ratio < 1)
    scores = activation_scores(model, task_batches(tok, examples, "cpu", n=16))
    pruned = prune_width(model, target_widths(widths_of(model), 0.5, heads_ratio), scores)
    w = widths_of(model)
    if heads_ratio < 1:
        for i, layer in enumerate(pruned.model.layers):
            rows = slice(kept_groups[i] * w.head_dim, (kept_groups[i] + 1) * w.head_dim)
            torch.testing.assert_close(layer.self_attn.k_proj.weight, model.model.layers[i].self_attn.k_proj.weight[rows])
    pruned.save_pretrained(folder)
    loaded = load_causal_lm(folder)
    ids = torch.tensor([tok("Review: the coffee was awful\nSentiment: negative").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    return widths_of(loaded)


def test_pruning_what_does_nothing_leaves_the_logits_unchanged(teacher, task_files, tmp_path):
    model, tok = load_causal_lm(teacher), load_tokenizer(teacher)
    got = check_pruning_silent_parts_is_exact(model, tok, load_task(task_files["train"]), 0.5, tmp_path / "p")
    assert got == Widths(256, 2, 1, 64)


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_width_pruning_other_families(family, teacher, task_files, tmp_path):
    """Qwen2: q/k/v biases and a tied embedding. Gemma 3: q_norm/k_norm per head, an
    explicit head_dim, a single KV group (so its heads stay)."""
    tok = load_tokenizer(teacher)
    build = {"qwen2": tiny.build_qwen2, "gemma3": tiny.build_gemma3}[family]
    model = build(tmp_path, tok, layers=2, hidden=256).eval()
    heads_ratio = 0.5 if family == "qwen2" else 1.0
    got = check_pruning_silent_parts_is_exact(model, tok, load_task(task_files["train"]), heads_ratio, tmp_path / "p")
    assert got == (Widths(256, 2, 1, 64) if family == "qwen2" else Widths(256, 4, 1, 32))


def silence_head_dims(model, kept: int, seed: int = 0) -> None:
    """In place: zero the query and key rows (and biases) of the dimensions --head-dim
    `kept` drops, and in each key/value group the value rows of a random half of its
    dimensions, so that the value scores rank exactly those last."""
    w = widths_of(model)
    drop_qk = torch.tensor([d for d in range(w.head_dim) if d not in set(rotary_dims(w.head_dim, kept).tolist())])
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            for proj, units in ((attn.q_proj, w.heads), (attn.k_proj, w.kv_heads)):
                rows = (torch.arange(units)[:, None] * w.head_dim + drop_qk).flatten()
                proj.weight[rows] = 0
                if proj.bias is not None:
                    proj.bias[rows] = 0
            for g in range(w.kv_heads):
                rows = g * w.head_dim + torch.randperm(w.head_dim, generator=rng)[: w.head_dim - kept]
                attn.v_proj.weight[rows] = 0
                if attn.v_proj.bias is not None:
                    attn.v_proj.bias[rows] = 0


@pytest.mark.parametrize("family", ["gemma3", "qwen2"])
def test_narrower_heads_compute_what_their_kept_dimensions_did(family, teacher, task_files, tmp_path):
    """--head-dim 16 of 32: with the dimensions it drops silent, the narrower heads compute
    what the whole ones did, after a save too. That needs the kept query/key dimensions to
    turn at the teacher's rotary frequencies (Gemma 3 has two bases, one per layer type),
    q/k/v/o and the per-head norms sliced alike, value dimensions chosen per key/value group
    (Qwen 2 has two), and the attention scale followed (query_pre_attn_scalar). Gemma 3's
    q_norm renormalizes the kept dimensions, so the queries' rescaling by 2^1/2 restores
    the scores exactly; Qwen 2 has no q_norm, so its queries come out 2^1/2 larger while the
    scale grows by 2^1/2 too: the model with its queries doubled."""
    tok = load_tokenizer(teacher)
    build = {"qwen2": tiny.build_qwen2, "gemma3": tiny.build_gemma3}[family]
    model = build(tmp_path, tok, layers=2, hidden=128).eval()
    w = widths_of(model)
    assert w.head_dim == 32
    assert check_widths(model, 1.0, 1.0, 16).head_dim == 16  # both of Gemma 3's rotary bases rebuilt from the config
    silence_head_dims(model, 16)
    scores = activation_scores(model, task_batches(tok, load_task(task_files["train"]), "cpu", n=16))
    pruned = prune_width(model, target_widths(w, 1.0, 1.0, 16), scores).eval()
    assert widths_of(pruned) == Widths(w.intermediate, w.heads, w.kv_heads, 16)
    if family == "gemma3":
        assert pruned.config.query_pre_attn_scalar == 16
        assert {n for n, _ in pruned.named_buffers() if n.endswith("_inv_freq")} >= {
            "model.rotary_emb.sliding_attention_inv_freq", "model.rotary_emb.full_attention_inv_freq"}
        reference = model
    else:
        reference = build(tmp_path, tok, layers=2, hidden=128).eval()
        reference.load_state_dict(model.state_dict())
        with torch.no_grad():
            for layer in reference.model.layers:
                layer.self_attn.q_proj.weight.mul_(2)
                layer.self_attn.q_proj.bias.mul_(2)
    pruned.save_pretrained(tmp_path / "p")
    loaded = load_causal_lm(tmp_path / "p")
    ids = torch.tensor([tok("Review: the coffee was awful and the service slow, never again\nSentiment: negative").input_ids])
    assert ids.shape[1] > 16  # past the tiny Gemma's sliding window
    with torch.no_grad():
        want = reference(ids).logits
        torch.testing.assert_close(pruned(ids).logits, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-4, atol=1e-4)
        if family == "gemma3":  # not a vacuous check: the whole model's other dimensions do matter
            assert (build(tmp_path, tok, layers=2, hidden=128).eval()(ids).logits - want).abs().max() > 1e-2
    if family == "gemma3":  # the global layers' frequencies are checked too, not only the sliding ones'
        edited = build(tmp_path, tok, layers=2, hidden=128)
        edited.model.rotary_emb.full_attention_inv_freq[2] *= 0.5  # a kept frequency (every other one is)
        with pytest.raises(ShrinkError, match=r"rotary_emb\.full_attention_inv_freq: not every dimension turns"):
            check_widths(edited, 1.0, 1.0, 16)


def test_head_dim_keeps_every_kth_rotary_pair_and_refuses_what_it_cannot_keep(teacher, tmp_path):
    from shrink.distill.width import check_head_dim

    assert rotary_dims(8, 4).tolist() == [0, 2, 4, 6]  # pairs (0, 4) and (2, 6): frequencies 0 and 2 of 0..3
    assert rotary_dims(256, 128).tolist()[:3] == [0, 2, 4] and rotary_dims(256, 128).tolist()[64:67] == [128, 130, 132]
    assert rotary_dims(256, 64).tolist()[:2] == [0, 4]
    assert check_head_dim(256, 256) == 256 and check_head_dim(256, 128) == 128
    with pytest.raises(ShrinkError, match=r"--head-dim 96: the heads have 256 dimensions; it must divide them and be "
                                          r"smaller \(e\.g\. 128, 64, 32"):
        check_head_dim(256, 96)
    with pytest.raises(ShrinkError, match="--head-dim 512: the heads have 256 dimensions"):
        check_head_dim(256, 512)
    # frequencies the narrower config does not compute (per-frequency factors, as LongRoPE's): refused
    tok = load_tokenizer(teacher)
    model = tiny.build_qwen2(tmp_path, tok, layers=1, hidden=128).eval()
    scores = [{"ffn": torch.ones(256), "heads": torch.ones(4), "v_dims": torch.rand(4, 32)}]
    assert widths_of(prune_width(model, target_widths(widths_of(model), 1.0, 1.0, 16), scores)).head_dim == 16
    assert check_widths(model, 1.0, 1.0, 16).head_dim == 16  # checked from the config, before any scores' pass
    model.model.rotary_emb.inv_freq[2] *= 0.5
    with pytest.raises(ShrinkError, match=r"--head-dim: narrowing Qwen2ForCausalLM's heads would change how they rotate "
                                          r"\(model\.rotary_emb\.inv_freq: "):
        check_widths(model, 1.0, 1.0, 16)


def test_mlp_importance_beats_a_random_slice(teacher, task_files):
    model, tok = load_causal_lm(teacher), load_tokenizer(teacher)
    held_out = load_task(task_files["eval"])[:40]
    scores = activation_scores(model, task_batches(tok, load_task(task_files["train"]), "cpu"))
    target = target_widths(widths_of(model), 0.5, 1.0)
    by_importance = mean_kl(prune_width(model, target, scores), model, tok, held_out)
    randoms = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        shuffled = [{k: torch.rand(v.shape, generator=g, dtype=torch.float64) for k, v in s.items()} for s in scores]
        randoms.append(mean_kl(prune_width(model, target, shuffled), model, tok, held_out))
    assert by_importance < 0.5 * min(randoms), (by_importance, randoms)  # measured: 0.00027 against >= 0.0015


def test_refit_down_recovers_a_dropped_channel_its_kept_ones_explain():
    """Least-squares compensation: a dropped channel that is a mix of kept ones loses
    nothing once down_proj is re-fitted; plain slicing loses its share of the output."""
    g = torch.Generator().manual_seed(0)
    kept_acts = torch.randn(400, 3, generator=g, dtype=torch.float64)
    acts = torch.cat([kept_acts, (kept_acts @ torch.tensor([[0.5], [-1.0], [2.0]], dtype=torch.float64))], 1)
    weight = torch.randn(5, 4, generator=g, dtype=torch.float64)  # (hidden, intermediate)
    kept = torch.tensor([0, 1, 2])
    gram = acts.T @ acts / len(acts)
    want = acts @ weight.T

    def error(w):
        return float((acts[:, kept] @ w.T - want).norm() / want.norm())

    assert error(refit_down(weight, kept, gram)) < 0.02 < 0.3 < error(weight[:, kept])


def test_mlp_refit_brings_the_pruned_model_closer_to_the_teacher(teacher, task_files):
    model, tok = load_causal_lm(teacher), load_tokenizer(teacher)
    held_out = load_task(task_files["eval"])[:40]
    scores = activation_scores(model, task_batches(tok, load_task(task_files["train"]), "cpu"), gram=True)
    target = target_widths(widths_of(model), 0.25, 1.0)
    plain = [{k: v for k, v in s.items() if k != "gram"} for s in scores]
    refit = mean_kl(prune_width(model, target, scores), model, tok, held_out)
    sliced = mean_kl(prune_width(model, target, plain), model, tok, held_out)
    assert refit < 0.8 * sliced, (refit, sliced)


def test_refit_refuses_gram_matrices_over_its_memory(teacher, task_files, monkeypatch):
    import shrink.distill.width as width

    model, tok = load_causal_lm(teacher), load_tokenizer(teacher)
    monkeypatch.setattr(width, "GRAM_BYTES", 2**20)
    with pytest.raises(ShrinkError, match=r"--ffn-refit: the least-squares fit holds a 512 x 512 matrix per layer, "
                                          r"0\.0 GiB for 4 layers, over the 0 GiB it may use"):
        activation_scores(model, task_batches(tok, load_task(task_files["train"]), "cpu"), gram=True)


@pytest.fixture(scope="module")
def narrow_student(tmp_path_factory, teacher, task_files):
    d = tmp_path_factory.mktemp("narrow")
    manifest = distill(DistillConfig(teacher=teacher, data=task_files["train"], out=d / "s", layers=3, steps=3,
                                     batch_size=16, ffn_ratio=0.5, heads_ratio=0.5, head_dim=32, device="cpu"))
    return d, manifest


def test_width_pruned_student_loads_with_its_widths(narrow_student):
    d, manifest = narrow_student
    config = json.loads((d / "s" / "config.json").read_text())
    assert (config["intermediate_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (256, 2, 1)
    assert config["head_dim"] == 32 and config["num_hidden_layers"] == 3
    assert manifest.settings["widths"] == {"intermediate_size": [512, 256], "attention_heads": [4, 2], "kv_heads": [2, 1],
                                           "head_dim": [64, 32]}
    assert (manifest.settings["ffn_ratio"], manifest.settings["heads_ratio"]) == (0.5, 0.5)
    model = load_causal_lm(d / "s")
    assert model.model.layers[0].self_attn.o_proj.weight.shape == (256, 64)  # 2 heads of 32 dimensions
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (32, 256)
    assert model.model.layers[0].mlp.down_proj.weight.shape == (256, 256)


def test_width_pruned_student_converts_to_gguf_with_parity(narrow_student, task_files):
    from shrink.export.flow import ExportOptions, export

    d, _ = narrow_student
    m = export(d / "s", d / "gguf", ExportOptions("gguf", quant="F16"), eval_data=task_files["eval"])
    parity = m.metrics["parity"]
    assert m.valid is True and parity["passed"] is True
    assert parity["token_id_match"] == 1.0 and parity["top1_agreement"] >= 0.99 and parity["mean_kl"] <= 0.01


# --- hidden-state alignment ------------------------------------------------------------

def alignment(student, teacher, pairs, tok, examples, teacher_examples=None):
    """The alignment term of `student` against `teacher` on `examples`, without training."""
    s_seqs = encode_examples(tok, examples, 512)
    t_seqs = encode_examples(tok, teacher_examples or examples, 512)
    ids, attn, mask = collate(s_seqs, tok.pad_token_id, "cpu")
    t_ids, t_attn, t_mask = collate(t_seqs, tok.pad_token_id, "cpu")
    shared = usable_prefix([s.ids for s in t_seqs], min(s.start for s in t_seqs) - 1)
    align = HiddenAlignment(student, teacher, pairs)
    try:
        with torch.no_grad():
            selected_logits(teacher, t_ids, t_attn, t_mask, prefix=PrefixCache(teacher, shared, "cpu") if shared else None)
            selected_logits(student, ids, attn, mask)
            return align.loss(mask, t_mask).item()
    finally:
        align.remove()


def test_hidden_alignment_is_zero_for_the_teacher_and_follows_the_prefix(teacher, task_files, monkeypatch):
    model, tok = load_causal_lm(teacher), load_tokenizer(teacher)
    examples = load_task(task_files["eval"])[:8]
    assert alignment(cut_student(model, [0, 1, 2, 3]), model, [0, 1, 2, 3], tok, examples) == pytest.approx(0.0, abs=1e-5)
    assert alignment(cut_student(model, [0, 3]), model, [0, 3], tok, examples) > 0.01
    # With a teacher prefix, the teacher's positions are the student's shifted by the prefix:
    # the prefix cache (teacher runs only the tokens after it) must give the full pass's term.
    prefixed = with_prefix(examples, "Review: the phone was great\nSentiment: positive\n\n")
    student = cut_student(model, [0, 3])
    cached = alignment(student, model, [0, 3], tok, examples, prefixed)
    monkeypatch.setattr(PrefixCache, "MIN_TOKENS", 10_000)  # no cache: the full forward
    full = alignment(student, model, [0, 3], tok, examples, prefixed)
    assert cached == pytest.approx(full, abs=1e-5) and cached != pytest.approx(alignment(student, model, [0, 3], tok, examples), abs=1e-3)


def test_hidden_alignment_term_decreases_with_training(teacher, task_files, tmp_path):
    model, tok = load_causal_lm(teacher), load_tokenizer(teacher)
    seen = load_task(task_files["train"])[:40]  # distilled on: held-out toy reviews are no gauge (tests/test_distill.py)
    before = alignment(cut_student(model, even_layers(4, 2)), model, [0, 3], tok, seen)
    m = distill(DistillConfig(teacher=teacher, data=task_files["train"], out=tmp_path / "s", layers=2, steps=25,
                              batch_size=16, lr=3e-4, hidden_weight=1.0, device="cpu"))
    after = alignment(load_causal_lm(tmp_path / "s"), model, [0, 3], tok, seen)
    # measured on an Intel Xeon: 0.035 -> 0.011; without the term it stays at 0.036
    assert after < 0.5 * before, (before, after)
    assert m.settings["hidden_weight"] == 1.0


def test_hidden_alignment_with_prune_vocab_and_teacher_prefix(teacher, task_files, tmp_path):
    prefix = tmp_path / "prefix.txt"
    prefix.write_text("Review: the phone was great\nSentiment: positive\n\n")
    r = CliRunner().invoke(cli, [str(a) for a in (
        "distill", "--teacher", teacher, "--data", task_files["train"], "--out", tmp_path / "s", "--layers", "2",
        "--steps", "3", "--batch-size", "8", "--hidden-weight", "0.5", "--prune-vocab", "--teacher-prefix", prefix,
        "--device", "cpu", "--json")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    settings = json.loads(r.stdout)["settings"]
    assert settings["hidden_weight"] == 0.5 and settings["vocab_kept"] < settings["teacher_vocab"]


# --- --student DIR ---------------------------------------------------------------------

def small_model(folder, tokenizer):
    model = tiny.build_llama(folder, tokenizer, layers=2, hidden=128, seed=1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_student_folder_is_distilled_with_pruned_vocabulary_and_heads(teacher, task_files, tmp_path):
    tok = load_tokenizer(teacher)
    start = small_model(tmp_path / "small", tok)
    m = distill(DistillConfig(teacher=teacher, data=task_files["train"], out=tmp_path / "s", student=start,
                              steps=20, batch_size=16, lr=1e-3, prune_vocab=True, heads_ratio=0.5, device="cpu"))
    s = m.settings
    assert s["student"] == str(start) and s["layers"] is None and s["layers_kept"] is None
    trained = load_causal_lm(tmp_path / "s")
    assert trained.config.hidden_size == 128 and trained.config.num_hidden_layers == 2
    assert (trained.config.num_attention_heads, trained.config.num_key_value_heads) == (2, 1)
    assert trained.config.vocab_size == s["vocab_kept"] < s["teacher_vocab"]
    log = json.loads((tmp_path / "s" / "training_log.json").read_text())
    assert log[-1]["kl"] < 0.7 * log[0]["kl"], (log[0], log[-1])  # measured: 10.0 -> 5.9


def test_student_folder_with_another_tokenizer_is_refused(teacher, task_files, tmp_path):
    tok = load_tokenizer(teacher)
    # The same vocabulary size, two task tokens swapped: other ids for the same text.
    swapped = small_model(tmp_path / "swapped", tok)
    spec = json.loads((swapped / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = "▁positive", "▁negative"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (swapped / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ShrinkError) as e:
        distill(DistillConfig(teacher=teacher, data=task_files["train"], out=tmp_path / "s", student=swapped, steps=1))
    assert str(e.value).startswith(f"--student {swapped} does not share the tokenizer of the teacher {teacher}: other token ids for")

    other = tiny.build_tokenizer(tmp_path / "other", ["completely different words here"] * 20, vocab_size=300)
    small_model(tmp_path / "other", other)
    with pytest.raises(ShrinkError, match=f"--student {tmp_path / 'other'} does not share the tokenizer of the teacher "
                                          f"{teacher}: vocabulary size"):
        distill(DistillConfig(teacher=teacher, data=task_files["train"], out=tmp_path / "s", student=tmp_path / "other", steps=1))
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(("args", "message"), [
    ([], "--layers is required (or --max-size-mb/--for-target to fit a size, or --student DIR, to start from an "
         "existing smaller model)"),
    (["--layers", "2", "--student", "{teacher}"],
     "--layers and --student cannot be used together: --student starts from that model, no layers are cut"),
    (["--student", "{teacher}", "--layer-selection", "importance"],
     "--layer-selection: not with --student (no layers are cut from the teacher)"),
    (["--student", "{teacher}", "--hidden-weight", "1"],
     "--hidden-weight: not with --student (its layers were not copied from the teacher's)"),
    (["--layers", "2", "--ffn-ratio", "0"], "--ffn-ratio must be above 0 and at most 1 (1 keeps every one), got 0.0"),
    (["--layers", "2", "--heads-ratio", "1.5"], "--heads-ratio must be above 0 and at most 1 (1 keeps every one), got 1.5"),
    (["--layers", "2", "--head-dim", "0"], "--head-dim must be a positive number of dimensions, got 0"),
    (["--student", "{teacher}", "--head-dim", "32"],
     "--head-dim: not with --student (it narrows the heads of the layers cut from the teacher)"),
    (["--layers", "2", "--hidden-weight", "-1"], "--hidden-weight must be 0 (off) or positive, got -1.0"),
    (["--layers", "2", "--ffn-refit"], "--ffn-refit: only with --ffn-ratio below 1 (it re-fits what width pruning keeps)"),
    (["--layers", "2", "--trainable", "norms", "--fsdp"], "--trainable norms: not with --fsdp (FSDP shards the weights "
                                                          "that train; DDP, the default under torchrun, trains a subset)"),
    (["--layers", "2", "--width-scores", "fisher"],
     "--width-scores fisher: only with --ffn-ratio or --heads-ratio below 1 (it ranks what width pruning keeps)"),
    (["--student", "{teacher}", "--ffn-ratio", "0.5", "--width-scores", "fisher"],
     "--width-scores fisher: not with --student (the scores are the teacher's layers', and --student's layers are "
     "not the teacher's)"),
    (["--layers", "2", "--trainable", "mlp"], "Invalid value for '--trainable': 'mlp' is not one of 'all', 'norms', "
                                              "'norms-embeddings'."),
])
def test_student_options_refused_on_the_command_line(args, message, teacher, task_files, tmp_path):
    r = CliRunner().invoke(cli, [str(a).format(teacher=teacher) for a in (
        "distill", "--teacher", teacher, "--data", task_files["train"], "--out", tmp_path / "s", *args)])
    assert r.exit_code == 2, r.output
    assert r.stderr.strip().splitlines() == ["Error: " + message], r.stderr
    assert not (tmp_path / "s").exists()


def test_a_head_dim_that_does_not_divide_the_heads_is_refused_before_training(teacher, task_files, tmp_path):
    r = CliRunner().invoke(cli, [str(a) for a in ("distill", "--teacher", teacher, "--data", task_files["train"],
                                                  "--out", tmp_path / "s", "--layers", "2", "--head-dim", "24")])
    assert r.exit_code == 2, r.output
    assert r.stderr.strip().splitlines()[-1] == ("Error: --head-dim 24: the heads have 64 dimensions; it must divide "
                                                 "them and be smaller (e.g. 32, 16, 8, 4, 2)"), r.stderr
    assert "Traceback" not in r.output and not (tmp_path / "s").exists()


def test_hidden_targets_pair_student_layers_with_the_teacher_layers_asked(teacher, task_files, tmp_path):
    """--hidden-targets: student layer i is aligned with the teacher layer named i-th ('-':
    none). A 2-layer cut of layers 0 and 1 pulled towards the teacher's 1 and 3 (deeper) ends
    nearer those than the same run aligned with the layers it came from; misuse is refused
    in one line before the teacher loads."""
    from shrink.distill.hidden import parse_targets

    model, tok = load_causal_lm(teacher), load_tokenizer(teacher)
    seen = load_task(task_files["train"])[:40]
    assert parse_targets("1, 3", 2, 4) == [1, 3] and parse_targets("-,3", 2, 4) == [None, 3]
    # the term over the pairs given only: unpaired layers add nothing
    cut = cut_student(model, [0, 1])
    assert alignment(cut, model, [None, 1], tok, seen) == pytest.approx(0.0, abs=1e-5)
    assert alignment(cut, model, [1, None], tok, seen) > 0.01
    deep = {}
    for name, targets in (("copied", None), ("deeper", "1,3")):
        m = distill(DistillConfig(teacher=teacher, data=task_files["train"], out=tmp_path / name, layers=2,
                                  layer_selection="first", steps=25, batch_size=16, lr=3e-4, hidden_weight=1.0,
                                  hidden_targets=targets, device="cpu"))
        assert m.settings["hidden_targets"] == targets
        deep[name] = alignment(load_causal_lm(tmp_path / name), model, [1, 3], tok, seen)
    assert deep["deeper"] < 0.7 * deep["copied"], deep
    for args, message in (
        (["--hidden-targets", "1,3"], "--hidden-targets: only with --hidden-weight"),
        (["--hidden-weight", "1", "--hidden-targets", "1,2,3"], "--hidden-targets '1,2,3': 3 entries for a student of 2 layers"),
        (["--hidden-weight", "1", "--hidden-targets", "1,9"], "--hidden-targets '1,9': '9' is not a teacher layer (0 to 3)"),
        (["--hidden-weight", "1", "--hidden-targets", "-,-"], "--hidden-targets '-,-': no layer is paired"),
    ):
        r = CliRunner().invoke(cli, [str(a) for a in ("distill", "--teacher", teacher, "--data", task_files["train"],
                                                      "--out", tmp_path / "bad", "--layers", "2", "--device", "cpu", *args)])
        assert r.exit_code == 2 and r.output.strip().splitlines()[-1].startswith("Error: " + message), r.output
        assert not (tmp_path / "bad").exists()


def test_heads_the_familys_config_refuses_fail_before_any_work(teacher, task_files, tmp_path, monkeypatch):
    """Gemma 3's config wants the hidden size (128 here, 640 in Gemma 3 270M) a multiple of
    the query heads although its head_dim is explicit: 3 of 4 heads used to train to the end
    and fail when the student was saved. It is refused before the width scores' pass."""
    import shrink.distill.student as student_module
    import shrink.export.gguf_convert as gguf_convert

    monkeypatch.setattr(gguf_convert, "check_convertible", lambda *a: None)  # the fixture's tokenizer is not Gemma's
    tok = load_tokenizer(teacher)
    gemma = tmp_path / "gemma"
    tiny.build_gemma3(gemma, tok, layers=2, hidden=128).save_pretrained(gemma)
    tok.save_pretrained(gemma)
    scored = []
    real = student_module.width_scores
    monkeypatch.setattr(student_module, "width_scores", lambda *a, **k: scored.append(1) or real(*a, **k))
    r = CliRunner().invoke(cli, [str(a) for a in ("distill", "--teacher", gemma, "--data", task_files["train"],
                                                  "--out", tmp_path / "bad", "--layers", "2", "--device", "cpu",
                                                  "--heads-ratio", "0.75")])
    assert r.exit_code == 2, r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("Error: --heads-ratio 0.75: 3 of 4 query heads, which Gemma3TextConfig refuses ("), last
    assert "not a multiple of the number of attention heads (3)" in last
    assert last.endswith("ratios it accepts: 0.25, 0.5, 1"), last
    assert not scored and not (tmp_path / "bad").exists()
    scored.clear()
    # the ratios it names are the ones that work: 2 of 4 heads prunes and saves
    m = distill(DistillConfig(teacher=gemma, data=task_files["train"], out=tmp_path / "ok", layers=1, steps=1,
                              batch_size=8, heads_ratio=0.5, device="cpu"))
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["num_attention_heads"] == 2
    assert m.settings["widths"]["attention_heads"] == [4, 2]
