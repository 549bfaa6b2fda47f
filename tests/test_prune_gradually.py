"""`shrink distill --prune-gradually`: the MLP width reached during training (shrink.distill.gradual)."""

from __future__ import annotations

import copy
import json

import torch
from click.testing import CliRunner

from shrink.cli import cli
from shrink.distill.gradual import END, START, GradualWidth
from shrink.distill.train import DistillConfig, distill
from shrink.hf import load_causal_lm
from shrink.quantize.fake_quant import RoundedWeights, fake


def test_the_least_used_channels_go_first_and_each_cut_answers_as_the_model_masked(teacher):
    model = load_causal_lm(teacher)
    width = model.config.intermediate_size  # 512
    dead = torch.arange(0, width, 2)  # every other channel of layer 0 contributes nothing
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, dead] = 0
    whole = copy.deepcopy(model)  # the student before any cut
    g = GradualWidth(model, 256, total_steps=100)
    assert sorted(g.schedule) == [15, 20, 25, 30, 35, 40, 45, 50, 55, 60]
    kept = [g.schedule[s] for s in sorted(g.schedule)]
    assert kept == sorted(kept, reverse=True) and width > kept[0] > kept[1] and kept[-1] == 256  # cubic: fast, then slow
    assert all(k % 32 == 0 for k in kept)  # llama.cpp's blocks fit every width on the way
    down = "model.layers.0.mlp.down_proj.weight"
    rounder = RoundedWeights(model, {down: "Q4_0"})  # made before the cuts, as --qat's is
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)  # small: the dead channels stay near dead
    ids = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    for step in range(61):
        if g.at(step, optimizer) is not None:
            mlp = model.model.layers[1].mlp
            assert mlp.gate_proj.weight.shape[0] == mlp.up_proj.weight.shape[0] == g.schedule[step]
            assert mlp.down_proj.weight.shape[1] == model.config.intermediate_size == g.schedule[step]
            moments = optimizer.state[mlp.down_proj.weight]
            assert moments["exp_avg"].shape == moments["exp_avg_sq"].shape == mlp.down_proj.weight.shape
        optimizer.zero_grad()
        model(ids).logits.float().pow(2).mean().backward()
        optimizer.step()
    assert [e["step"] for e in g.log] == sorted(g.schedule)
    assert not set(g.kept[0].tolist()) & set(dead.tolist())  # the dead channels went first
    assert g.finish(model) is model and model.model.layers[0].mlp.down_proj.weight.shape == (model.config.hidden_size, 256)
    exact = model.get_parameter(down).detach().clone()
    rounder.round()
    assert torch.equal(model.get_parameter(down), fake(exact.half().float(), "Q4_0")) and not torch.equal(exact, fake(exact, "Q4_0"))
    rounder.restore()
    assert torch.equal(model.get_parameter(down), exact)

    # The cut model answers as the student it came from with the other channels silenced,
    # its weights those channels' trained weights.
    with torch.no_grad():
        for layer, cut, kept in zip(whole.model.layers, model.model.layers, g.kept):
            for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
                getattr(layer.mlp, name).weight.index_copy_(dim, kept, getattr(cut.mlp, name).weight)
            gone = torch.ones(width, dtype=torch.bool)
            gone[kept] = False
            layer.mlp.down_proj.weight[:, gone] = 0
        trained = model.state_dict()
        for key, value in whole.state_dict().items():
            if ".mlp." not in key:
                value.copy_(trained[key])
    model.eval()
    whole.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, whole(ids).logits, rtol=1e-4, atol=1e-4)

    state = json.loads(json.dumps(g.state()))  # as a checkpoint's state.json holds it
    again = GradualWidth(load_causal_lm(teacher), 256, total_steps=100)
    again.load(state)  # a resumed run is cut to the channels it had, before its weights load
    assert [k.tolist() for k in again.kept] == state["kept"] and again.log == g.log
    again.model.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again.model.eval()(ids).logits, model(ids).logits)


def test_distill_prunes_gradually_and_saves_the_cut(teacher, task_files, tmp_path):
    m = distill(DistillConfig(teacher=teacher, data=task_files["train"], out=tmp_path / "s", layers=2, steps=20,
                              batch_size=8, ffn_ratio=0.5, prune_gradually=True, qat=True, device="cpu"))
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["intermediate_size"] == 256
    log = m.settings["prune_gradually"]
    assert [e["step"] for e in log] == sorted(e["step"] for e in log)
    assert int(20 * START) < log[0]["step"] and log[-1]["step"] == int(20 * END) and log[-1]["kept"] == 256
    assert log[0]["kept"] > 256 and m.settings["widths"]["intermediate_size"] == [512, 256]
    assert load_causal_lm(tmp_path / "s").model.layers[0].mlp.down_proj.weight.shape == (256, 256)


def test_prune_gradually_needs_a_width_to_reach(teacher, task_files, tmp_path):
    for args, message in ((["--prune-gradually"], "--prune-gradually: only with --ffn-ratio below 1"),
                          (["--prune-gradually", "--ffn-ratio", "0.5", "--ffn-refit"],
                           "--prune-gradually: not with --ffn-refit")):
        r = CliRunner().invoke(cli, [str(a) for a in ("distill", "--teacher", teacher, "--data", task_files["train"],
                                                      "--out", tmp_path / "bad", "--layers", "2", *args)])
        assert r.exit_code == 2 and r.output.strip().splitlines()[-1].startswith("Error: " + message), r.output
        assert not (tmp_path / "bad").exists()


def test_a_cut_before_any_pass_keeps_the_largest_columns(teacher):
    """A run this short cuts at step 0, before the hooks saw a token: the down_proj
    columns of most weight stay."""
    model = load_causal_lm(teacher)
    g = GradualWidth(model, 256, total_steps=3)
    assert 0 in g.schedule and g.schedule[max(g.schedule)] == 256
    norms = model.model.layers[0].mlp.down_proj.weight.detach().norm(dim=0)
    keep = g.at(0)
    assert g.kept[0].tolist() == torch.topk(norms, keep).indices.sort().values.tolist()
