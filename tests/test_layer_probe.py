"""bench/layer_probe.py: a linear probe on each layer's hidden state (issue 15, where a cut
student's layers should come from)."""

from __future__ import annotations

import json

import pytest

from bench_scripts import load

import tiny
from shrink.hf import load_causal_lm, load_tokenizer
from shrink.tasks import load_task


def test_the_probe_reads_the_task_from_a_trained_teacher_and_follows_the_training_labels(teacher, tmp_path):
    lp = load("layer_probe")
    model, tok = load_causal_lm(teacher).eval(), load_tokenizer(teacher)
    train, dev = tiny.toy_examples(160, seed=5), tiny.toy_examples(60, seed=6)
    rows = lp.probe_layers(model, tok, train, dev, "tiny")
    assert [r["layer"] for r in rows] == list(range(model.config.num_hidden_layers + 1))
    assert max(rows[-1]["last_token"].values()) >= 0.9, rows[-1]  # the teacher answers there
    swap = {" positive": " negative", " negative": " positive"}
    flipped = lp.probe_layers(model, tok, [{**r, "completion": swap[r["completion"]]} for r in train], dev, "tiny")
    for got, want in zip(flipped, rows):  # fitted on the training labels, scored on dev's
        for c, acc in want["last_token"].items():
            assert got["last_token"][c] == pytest.approx(1 - acc, abs=1e-3)


def test_a_cut_keeps_the_first_layers_narrowed(teacher, task_files):
    lp = load("layer_probe")
    model, tok = load_causal_lm(teacher).eval(), load_tokenizer(teacher)
    cut = lp.cut_model(model, tok, load_task(task_files["train"])[:32], 2, 0.5, None)
    assert cut.config.num_hidden_layers == 2
    assert cut.config.intermediate_size == model.config.intermediate_size // 2
    assert lp.parse_cut("6:0.25") == (6, 0.25, None, 1.0) and lp.parse_cut("8:0.5:512") == (8, 0.5, 512, 1.0)
    assert lp.parse_cut("8:0.25:heads=0.5") == (8, 0.25, None, 0.5)
    json.dumps(lp.probe_layers(cut, tok, tiny.toy_examples(40, seed=7), tiny.toy_examples(20, seed=8), "c",
                               only_last=True))


def test_a_cut_with_fisher_scores_keeps_the_channels_the_answer_needs(teacher, task_files):
    import torch

    from shrink.distill.fisher import fisher_scores

    lp = load("layer_probe")
    model, tok = load_causal_lm(teacher).eval(), load_tokenizer(teacher)
    examples = load_task(task_files["train"])[:32]
    cut = lp.cut_model(model, tok, examples, 2, 0.5, None, width_scores="fisher")
    scores = fisher_scores(model, [0, 1], tok, examples)
    for i, layer in enumerate(cut.model.layers):
        kept = torch.topk(scores[i]["ffn"], cut.config.intermediate_size).indices.sort().values
        torch.testing.assert_close(layer.mlp.up_proj.weight, model.model.layers[i].mlp.up_proj.weight[kept])


def test_a_pruned_student_vocabulary_is_read_in_its_own_pieces(teacher, task_files, tmp_path):
    """--student-vocab: the teacher reads each prompt in the pieces of the student's pruned
    vocabulary. A training prompt encodes to the teacher's own ids; a word the training text
    lacks comes in more, smaller pieces that still spell it; --vocab-top keeps more tokens."""
    lp = load("layer_probe")
    model, tok = load_causal_lm(teacher).eval(), load_tokenizer(teacher)
    train = load_task(task_files["train"])
    encode, size = lp.pruned_encoder(tok, train[:8], model.generation_config.eos_token_id, 0, tmp_path / "v0")
    _, wider = lp.pruned_encoder(tok, train[:8], model.generation_config.eos_token_id, 200, tmp_path / "v200")
    assert size < wider <= len(tok)
    assert encode(train[0].prompt) == tok(train[0].prompt).input_ids
    words = {w for ex in train[:8] for w in (ex.prompt + ex.completion).split()}
    unseen = next(ex.prompt for ex in train[8:] if set(ex.prompt.split()) - words)
    assert len(encode(unseen)) > len(tok(unseen).input_ids)
    assert tok.decode(encode(unseen), skip_special_tokens=True) == tok.decode(tok(unseen).input_ids, skip_special_tokens=True)
    rows = lp.probe_layers(model, tok, tiny.toy_examples(40, seed=7), tiny.toy_examples(20, seed=8), "v", encode=encode)
    assert [r["layer"] for r in rows] == list(range(model.config.num_hidden_layers + 1))
