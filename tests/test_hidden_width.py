"""Hidden-size pruning (--hidden-size, --hidden-ratio): every tensor with a hidden dimension
is sliced consistently (pruning channels that carry nothing changes no logit, also after a
save and from_pretrained, Gemma's embedding scale and tied head included), and a pruned
student trains and converts to GGUF with parity."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

import tiny
import tiny_families
from shrink.cli import cli
from shrink.distill.hidden_width import channel_scores, check_layout, hidden_width, prune_hidden
from shrink.distill.importance import task_batches
from shrink.errors import ModelError
from shrink.hf import load_causal_lm
from shrink.tasks import load_task


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_hidden_width_rounding():
    assert hidden_width(640, 0.8) == 512  # Gemma 3 270M: 2 multiples of 256
    assert hidden_width(640, 0.6) == 512  # 1.5 multiples: halves go up
    assert hidden_width(640, 0.5) == 256
    assert hidden_width(640, 0.1) == 256  # at least one multiple
    assert hidden_width(2048, 0.7) == 1536  # 5.6 multiples
    assert hidden_width(896, 0.5) == 512  # Qwen2 0.5B: 1.75 multiples
    assert hidden_width(512, 0.75) == 512  # rounds to the width itself: not pruned
    assert hidden_width(256, 0.5) == 256  # nothing below 256
    assert hidden_width(640, 1.0) == 640


def silenced(family: str, tok, seed: int = 0):
    """A random 2-layer, 512-wide model of `family` in which half the hidden channels are
    zero throughout the residual stream (their embedding columns and the o_proj/down_proj
    rows that write them), with activations large enough that RMSNorm's epsilon does not
    matter. Returns (model, the silent channels)."""
    torch.manual_seed(seed)
    model = tiny_families.build_model(family, tok, layers=2, hidden=512, seed=seed).eval()
    silent = torch.randperm(512)[:256]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # Gemma's norm weights start at 0: give them some
        model.model.embed_tokens.weight.mul_(50)
        model.model.embed_tokens.weight[:, silent] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[silent] = 0
            layer.mlp.down_proj.weight[silent] = 0
    return model, silent


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2"])
def test_pruning_silent_channels_is_exact(family, task_files, tmp_path):
    """llama: separate head; gemma3: (1 + weight) norms, pre/post feed-forward norms,
    sqrt(hidden) embedding scale, tied head; qwen2: q/k/v biases, tied head."""
    rows = tiny.toy_examples(60, seed=5)
    tok = tiny_families.build_tokenizer(tmp_path / "tok", family, [r["prompt"] + r["completion"] for r in rows])
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model, silent = silenced(family, tok)
    scores = channel_scores(model, task_batches(tok, load_task(task_files["train"]), "cpu", n=16))
    pruned, kept = prune_hidden(model, 256, scores)
    assert kept == sorted(set(range(512)) - set(silent.tolist()))  # exactly the channels that carry something
    pruned.save_pretrained(tmp_path / "p")
    loaded = load_causal_lm(tmp_path / "p")
    assert loaded.config.hidden_size == 256 and loaded.model.embed_tokens.weight.shape[1] == 256
    if family == "gemma3":  # recomputed from the config at load time: the rows were rescaled for it
        assert float(loaded.model.embed_tokens.embed_scale) == pytest.approx(math.sqrt(256))
    ids = torch.tensor([tok("Review: the coffee was awful\nSentiment: negative").input_ids])
    with torch.no_grad():
        expected = model(ids).logits
        scale = expected.abs().max()
        for got in (pruned(ids).logits, loaded(ids).logits):
            assert (got - expected).abs().max() / scale < 1e-5  # measured: 5e-7 (llama) to 2e-6 (gemma3)


def test_fused_projections_are_refused(tmp_path):
    rows = tiny.toy_examples(30, seed=5)
    tok = tiny_families.build_tokenizer(tmp_path, "phi3", [r["prompt"] + r["completion"] for r in rows])
    model = tiny_families.build_model("phi3", tok, layers=1, hidden=64)
    with pytest.raises(ModelError, match=r"Phi3ForCausalLM has hidden-sized weights shrink does not know how to "
                                         r"slice \(model.layers.0.self_attn.qkv_proj.weight"):
        check_layout(model)


# How each family's student is narrowed: llama by ratio, with hidden-state alignment (on
# the channels kept), gemma3 by size.
NARROWING = {"llama": ("--hidden-ratio", "0.5", "--hidden-weight", "0.5"), "gemma3": ("--hidden-size", "256")}


@pytest.fixture(scope="module")
def narrow_students(tmp_path_factory, wide_teacher, task_files):
    """family -> (student folder, manifest): the 512-wide teacher distilled to hidden 256."""
    made = {}

    def get(family):
        if family not in made:
            out = tmp_path_factory.mktemp("hidden") / f"{family}-student"
            r = invoke("distill", "--teacher", wide_teacher(family), "--data", task_files["train"], "--out", out,
                       "--layers", "2", "--steps", "3", "--batch-size", "8", "--device", "cpu", "--json", *NARROWING[family])
            assert r.exit_code == 0, r.output
            made[family] = out, json.loads(r.stdout)
        return made[family]

    return get


def test_hidden_pruned_student_with_alignment_records_its_widths(narrow_students):
    """--hidden-weight compares the teacher's hidden states on the channels kept."""
    out, manifest = narrow_students("llama")
    s = manifest["settings"]
    assert s["hidden_ratio"] == 0.5 and s["widths"] == {"hidden_size": [512, 256]}
    assert len(s["hidden_channels_kept"]) == 256 and s["hidden_channels_kept"] == sorted(s["hidden_channels_kept"])
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["head_dim"], config["num_attention_heads"]) == (256, 128, 4)
    log = json.loads((out / "training_log.json").read_text())
    assert all(math.isfinite(step["loss"]) for step in log)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_hidden_pruned_student_converts_to_gguf_with_parity(family, narrow_students, task_files):
    from shrink.export.flow import ExportOptions, export

    out, _ = narrow_students(family)
    m = export(out, out.parent / f"{family}-gguf", ExportOptions("gguf", quant="F16"), eval_data=task_files["eval"])
    parity = m.metrics["parity"]
    assert m.valid is True and parity["passed"] is True
    assert parity["token_id_match"] == 1.0 and parity["top1_agreement"] >= 0.99 and parity["mean_kl"] <= 0.01


@pytest.mark.parametrize(("args", "message"), [
    (["--hidden-size", "128"], "--hidden-size must be a multiple of 256 (llama.cpp's k-quant rows), at least 256, got 128"),
    (["--hidden-size", "300"], "--hidden-size must be a multiple of 256 (llama.cpp's k-quant rows), at least 256, got 300"),
    (["--hidden-size", "512"], "--hidden-size 512 must be below the teacher's hidden size 512"),
    (["--hidden-size", "256", "--hidden-ratio", "0.5"], "--hidden-size and --hidden-ratio cannot be used together"),
    (["--hidden-ratio", "0"], "--hidden-ratio must be above 0 and at most 1 (1 keeps every channel), got 0.0"),
])
def test_hidden_options_refused(args, message, wide_teacher, task_files, tmp_path):
    r = invoke("distill", "--teacher", wide_teacher("llama"), "--data", task_files["train"], "--out", tmp_path / "s", "--layers", "2",
               *args)
    assert r.exit_code == 2, r.output
    assert r.stderr.strip().splitlines() == ["Error: " + message], r.stderr
    assert not (tmp_path / "s").exists()
