"""`shrink distill --prune-gradually`: the MLP width reached during training (shrink.distill.gradual)."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from shrink.cli import cli
from shrink.distill.gradual import END, START, GradualWidth
from shrink.distill.train import DistillConfig, distill
from shrink.hf import load_causal_lm


def test_the_least_used_channels_go_first_and_the_cut_answers_as_the_masked_model(teacher):
    model = load_causal_lm(teacher)
    width = model.config.intermediate_size  # 512
    dead = torch.arange(0, width, 2)  # every other channel of layer 0 contributes nothing
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, dead] = 0
    g = GradualWidth(model, 256, total_steps=100)
    assert sorted(g.schedule) == [15, 20, 25, 30, 35, 40, 45, 50, 55, 60]
    kept = [g.schedule[s] for s in sorted(g.schedule)]
    assert kept == sorted(kept, reverse=True) and width > kept[0] > kept[1] and kept[-1] == 256  # cubic: fast, then slow
    ids = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    for step in range(61):
        if g.at(step) is not None:
            assert [int(m.sum()) for m in g.masks] == [g.schedule[step]] * len(g.masks)
        with torch.no_grad():
            model(ids)
    assert [e["step"] for e in g.log] == sorted(g.schedule)
    kept0 = g.masks[0].nonzero().flatten()
    assert not set(kept0.tolist()) & set(dead.tolist())  # the dead channels went first
    state = g.state()
    model.eval()
    with torch.no_grad():
        masked = model(ids).logits
    cut = g.cut(model).eval()
    assert cut.config.intermediate_size == 256
    with torch.no_grad():
        torch.testing.assert_close(cut(ids).logits, masked, rtol=1e-4, atol=1e-4)
    again = GradualWidth(load_causal_lm(teacher), 256, total_steps=100)
    again.load(state)  # a resumed run keeps the masks it had
    assert [m.nonzero().flatten().tolist() for m in again.masks] == state["kept"] and again.log == g.log


def test_distill_prunes_gradually_and_saves_the_cut(teacher, task_files, tmp_path):
    m = distill(DistillConfig(teacher=teacher, data=task_files["train"], out=tmp_path / "s", layers=2, steps=20,
                              batch_size=8, ffn_ratio=0.5, prune_gradually=True, device="cpu"))
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
