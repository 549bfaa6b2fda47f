"""Weights rounded as llama.cpp's quantizer rounds them (shrink.quantize.fake_quant).

Checked against files llama.cpp wrote: a tiny Gemma 3 model quantized to Q4_K_M by
llama.cpp's own quantizer, each tensor read back and dequantized by gguf-py. The block
types (Q8_0, Q5_0, Q4_0), the k-quants (Q4_K, Q6_K; Q5_K in an IQ4_XS file), which search
each block's scale and code the scales in 6 or 8 bits, and IQ4_NL and IQ4_XS, which search
theirs among non-linear levels, must all come out value for value.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tiny
import tiny_families
from shrink.export.gguf_convert import convert_hf_to_gguf
from shrink.gguf_owner import import_gguf
from shrink.distill.size_budget import export_types
from shrink.quantize.fake_quant import RoundedWeights, fake
from shrink.quantize.gguf_types import quant_type
from shrink.quantize.llama_quantize import quantize_gguf


def quantized_by_llama_cpp(tmp_path, hidden: int, embedding: str | None, ftype: str = "Q4_K_M"):
    """(the model, its export types as predicted, {GGUF name: llama.cpp's values as floats})."""
    rows = tiny.toy_examples(40, seed=3)
    tok = tiny_families.build_tokenizer(tmp_path, "gemma3", [r["prompt"] + r["completion"] for r in rows])
    model = tiny_families.build_model("gemma3", tok, layers=3, hidden=hidden)
    with torch.no_grad():  # weights an F16 file holds exactly, so llama.cpp and fake() round the same values
        for p in model.parameters():
            p.copy_(p.half().float())
    model.save_pretrained(tmp_path)
    convert_hf_to_gguf(tmp_path, tmp_path / "f16.gguf", "f16")
    quantize_gguf(tmp_path / "f16.gguf", tmp_path / "q.gguf", quant_type(ftype), threads=1, embedding=embedding)
    gguf = import_gguf()
    from importlib import import_module

    quants = import_module(gguf.__name__ + ".quants")
    reader = gguf.GGUFReader(tmp_path / "q.gguf")
    values = {t.name: (t.tensor_type.name, quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}
    return model, export_types(model, tmp_path, ftype, embedding), values


def gguf_names(model, folder):
    from shrink.export.gguf_layout import tensor_shapes

    keys = [k for k in model.state_dict() if k != "lm_head.weight"]
    return dict(zip(keys, (n for n, _ in tensor_shapes(model, folder))))


@pytest.mark.parametrize("hidden, embedding, ftype, made", [
    (384, "Q4_0", "Q4_K_M", {"Q5_0", "Q8_0", "Q4_0"}), (512, None, "Q4_K_M", {"Q4_K", "Q6_K"}),
    (384, "Q4_0", "IQ4_XS", {"IQ4_NL", "Q4_0"}), (512, "Q4_0", "IQ4_XS", {"IQ4_XS", "Q5_K"})])
def test_rounding_matches_llama_cpp(tmp_path, hidden, embedding, ftype, made):
    """Rows of 384 take llama.cpp's fallbacks (Q5_0, Q8_0; IQ4_NL under IQ4_XS) and the token
    embedding Q4_0; rows of 512 take the k-quants (Q4_K, Q6_K) or IQ4_XS itself."""
    model, types, written = quantized_by_llama_cpp(tmp_path, hidden, embedding, ftype)
    names = gguf_names(model, tmp_path)
    params = dict(model.named_parameters())
    seen = set()
    for key, t in types.items():
        name = names[key]
        written_type, real = written[name]
        assert t == written_type, f"{name}: predicted {t}, llama.cpp wrote {written_type}"
        w = params[key].detach()
        mine = fake(w, t).numpy()
        real = real.reshape(mine.shape)
        seen.add(t)
        np.testing.assert_array_equal(mine, real, err_msg=f"{name} ({t})")
    assert seen >= made


@pytest.mark.parametrize("ggml_type", ["Q8_0", "Q5_0", "Q4_0", "Q5_1", "Q4_1"])
def test_rounding_matches_ggmls_reference_quantizers(ggml_type):
    """The block types against gguf-py's ports of ggml's reference quantizers (quants.py),
    on values with ties and all-equal blocks among them."""
    from importlib import import_module

    gguf = import_gguf()
    quants = import_module(gguf.__name__ + ".quants")
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    w[0, :32] = 0.25  # a block of one value
    w[1, :32] = torch.arange(32) / 8.0  # values that fall on half steps
    w = w.half().float()
    t = gguf.GGMLQuantizationType[ggml_type]
    ref = quants.dequantize(quants.quantize(w.numpy(), t), t)
    np.testing.assert_array_equal(fake(w, ggml_type).numpy(), ref.reshape(w.shape))


def test_rounding_leaves_grid_values_alone_and_refuses_unknown_types():
    w = torch.randn(4, 64)
    once = fake(w, "Q5_0")
    torch.testing.assert_close(fake(once, "Q5_0"), once)  # values on the grid stay on it
    assert fake(torch.zeros(2, 32), "Q4_0").abs().sum() == 0  # an all-zero block has no scale to divide by
    with pytest.raises(ValueError, match="no rounding model for ggml type IQ2_XS"):
        fake(w, "IQ2_XS")
    with pytest.raises(ValueError, match="rows of 48 do not fit Q4_K's blocks of 32"):
        fake(torch.randn(2, 48), "Q4_K")


def test_training_through_the_rounding_takes_the_gradient_at_the_rounded_weights(tmp_path):
    """round() puts the rounded values in, restore() the exact weights back; the gradient
    is the one a model holding the rounded weights gives (straight through), and the tied
    embedding is rounded once, for both of its uses."""
    rows = tiny.toy_examples(20, seed=1)
    tok = tiny_families.build_tokenizer(tmp_path, "gemma3", [r["prompt"] + r["completion"] for r in rows])
    model = tiny_families.build_model("gemma3", tok, layers=2, hidden=64)
    model.save_pretrained(tmp_path)
    types = export_types(model, tmp_path, "Q4_K_M", "Q4_0")
    assert types["model.embed_tokens.weight"] == "Q4_0" and "lm_head.weight" not in types
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([tok.encode(rows[0]["prompt"] + rows[0]["completion"])])

    reference = tiny_families.build_model("gemma3", tok, layers=2, hidden=64)
    reference.load_state_dict(before)
    with torch.no_grad():
        for key, p in reference.named_parameters():
            if key in types:
                p.copy_(fake(p.half().float(), types[key]))  # the export rounds the converter's F16 values
    reference(ids, labels=ids).loss.backward()

    rounder = RoundedWeights(model, types)
    rounder.round()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(model.model.embed_tokens.weight, fake(before["model.embed_tokens.weight"].half().float(), "Q4_0"))
    model(ids, labels=ids).loss.backward()
    rounder.restore()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    ref_params = dict(reference.named_parameters())
    for key, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[key].grad)


def test_distill_qat_trains_at_the_rounded_weights_and_saves_the_full_ones(teacher, task_files, tmp_path):
    """A --qat step's loss is the loss of a student holding the rounded weights; what it
    saves are the full-precision weights (moved by the step), not the rounded ones."""
    from shrink.distill.train import DistillConfig, distill
    from shrink.distill.student import cut_student
    from shrink.hf import load_causal_lm, load_tokenizer

    tok = load_tokenizer(teacher)
    plain = cut_student(load_causal_lm(teacher), [0, 3])
    types = export_types(plain, teacher, "Q4_K_M", "Q8_0")
    assert set(types.values()) >= {"Q4_K", "Q8_0"}  # rows of 256: k-quants; the embedding as asked
    rounded = cut_student(load_causal_lm(teacher), [0, 3])
    with torch.no_grad():
        for key, p in rounded.named_parameters():
            if key in types:
                p.copy_(fake(p.half().float(), types[key]))
    for name, model in (("plain", plain), ("rounded", rounded)):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    common = dict(teacher=teacher, data=task_files["train"], steps=1, batch_size=8, lr=1e-3, device="cpu")
    qat = distill(DistillConfig(student=tmp_path / "plain", out=tmp_path / "qat", qat=True, embedding_type="Q8_0",
                                **common))
    ref = distill(DistillConfig(student=tmp_path / "rounded", out=tmp_path / "ref", **common))
    step_loss = [json.loads((tmp_path / d / "training_log.json").read_text())[0]["loss"] for d in ("qat", "ref")]
    assert step_loss[0] == pytest.approx(step_loss[1], rel=1e-5)
    saved = load_causal_lm(tmp_path / "qat").state_dict()
    start = plain.state_dict()
    moved = [k for k in types if not torch.equal(saved[k], start[k])]
    assert moved  # the step trained the full-precision weights ...
    assert any(not torch.equal(saved[k], fake(saved[k], types[k])) for k in types)  # ... which are not on the grid
    assert qat.settings["qat"] is True and ref.settings["qat"] is False


def test_qat_refuses_files_it_cannot_round(teacher, task_files, tmp_path):
    from click.testing import CliRunner

    from shrink.cli import cli

    for args, message in ((["--qat", "--quant", "Q3_K_M"], "--qat: no rounding model for Q3_K_M files; types with one: "
                                                           "Q8_0, Q6_K, Q5_K_M"),
                          (["--qat", "--embedding-type", "Q3_K"], "--qat: no rounding model for a Q3_K token embedding")):
        r = CliRunner().invoke(cli, [str(a) for a in ("distill", "--teacher", teacher, "--data", task_files["train"],
                                                      "--out", tmp_path / "bad", "--layers", "2", *args)])
        assert r.exit_code == 2 and r.output.strip().splitlines()[-1].startswith("Error: " + message), r.output
        assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("ftype, hidden, kind", [("IQ4_XS", 64, "IQ4_NL"), ("Q4_K_M", 256, "Q4_K")])
def test_searched_weights_keep_their_scales_between_searches(tmp_path, ftype, hidden, kind):
    """IQ4 and k-quant scales come from a search (16 to 40 roundings): RoundedWeights keeps a
    weight's scales for SEARCH_EVERY rounds and rounds with them, searches again after that,
    and at once for a weight whose shape changed (a gradual cut)."""
    from shrink.quantize import fake_quant

    rows = tiny.toy_examples(20, seed=1)
    tok = tiny_families.build_tokenizer(tmp_path, "gemma3", [r["prompt"] + r["completion"] for r in rows])
    model = tiny_families.build_model("gemma3", tok, layers=2, hidden=hidden)
    model.save_pretrained(tmp_path)
    types = export_types(model, tmp_path, ftype, "Q4_0")
    key = "model.layers.0.mlp.gate_proj.weight"
    assert types[key] == kind  # rows of 64: IQ4_XS's fallback; rows of 256: Q4_K
    p = dict(model.named_parameters())[key]
    rounder = RoundedWeights(model, types)
    first = p.detach().clone()
    rounder.round()
    torch.testing.assert_close(p.detach(), fake(first.half().float(), kind), rtol=0, atol=0)  # from F16, as exported
    rounder.restore()
    kept = fake_quant.search_scales(first.half().float(), kind)
    with torch.no_grad():
        p.mul_(1.3)  # every block's best scale moves
        p.copy_(p.half().float())
    moved = p.detach().clone()
    for _ in range(fake_quant.SEARCH_EVERY - 1):
        rounder.round()
        torch.testing.assert_close(p.detach(), fake_quant.round_searched(moved, kind, kept), rtol=0, atol=0)
        rounder.restore()
    assert not torch.equal(fake_quant.round_searched(moved, kind, kept), fake(moved, kind))
    rounder.round()  # the SEARCH_EVERY-th round searches again
    torch.testing.assert_close(p.detach(), fake(moved, kind), rtol=0, atol=0)
    rounder.restore()
    mlp = model.model.layers[0].mlp
    mlp.gate_proj.weight = torch.nn.Parameter(moved[:32].clone())  # channels cut
    rounder.round()
    torch.testing.assert_close(mlp.gate_proj.weight.detach(), fake(moved[:32], kind), rtol=0, atol=0)


@pytest.mark.parametrize("ggml_type", ["Q4_K", "Q5_K", "Q6_K"])
def test_kquant_rows_between_whole_superblocks_round_as_if_zeros_followed(ggml_type):
    """A width on the way during --prune-gradually (a multiple of 32, not of 256) rounds as
    the row with zeros to the next 256 would: an all-zero block has no scale or offset, so
    the real blocks beside it round as they would in a whole super-block."""
    w = (torch.randn(8, 288, generator=torch.Generator().manual_seed(2)) * 0.03).half().float()
    padded = torch.nn.functional.pad(w, (0, 512 - 288))
    torch.testing.assert_close(fake(w, ggml_type), fake(padded, ggml_type)[:, :288], rtol=0, atol=0)
    torch.testing.assert_close(fake(w, ggml_type)[:, :256], fake(w[:, :256], ggml_type), rtol=0, atol=0)
    assert fake(padded, ggml_type)[:, 288:].abs().sum() == 0
    err = (fake(w, ggml_type) - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt()
    bound = {"Q4_K": 0.09, "Q5_K": 0.045, "Q6_K": 0.025}[ggml_type]
    assert 0.5 * bound < err < bound  # rounded, by about what the type's bits allow (measured 0.073, 0.036, 0.018)
