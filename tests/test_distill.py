"""Distillation: the cut student, the loss going where it should, checkpoints and resume."""

from __future__ import annotations

import pytest
import torch

from shrink import artifact
from shrink.distill.batches import collate, encode_examples
from shrink.distill.student import cut_student, even_layers
from shrink.distill.train import DistillConfig, checkpoint_dir, distill
from shrink.errors import ModelError
from shrink.hf import load_causal_lm, load_tokenizer
from shrink.tasks import load_task


def test_even_layers():
    assert even_layers(4, 2) == [0, 3]
    assert even_layers(12, 4) == [0, 4, 7, 11]
    assert even_layers(5, 5) == [0, 1, 2, 3, 4]
    assert even_layers(6, 1) == [0]
    with pytest.raises(ModelError, match="between 1 and the teacher's 4 layers, got 5"):
        even_layers(4, 5)


def test_cut_keeping_every_layer_is_the_teacher(teacher):
    model = load_causal_lm(teacher)
    ids = torch.tensor([[1, 40, 50, 60, 70]])
    same = cut_student(model, [0, 1, 2, 3])
    torch.testing.assert_close(same(ids).logits, model(ids).logits, rtol=0, atol=0)
    cut = cut_student(model, [0, 3])
    assert cut.config.num_hidden_layers == 2
    for new, old in [(0, 0), (1, 3)]:
        torch.testing.assert_close(cut.model.layers[new].mlp.up_proj.weight, model.model.layers[old].mlp.up_proj.weight)
    assert not torch.allclose(cut(ids).logits, model(ids).logits)


def mean_kl(student, teacher, tokenizer, examples) -> float:
    """KL(teacher || student) per completion token, at temperature 1."""
    seqs = encode_examples(tokenizer, examples, 512)
    ids, attn, mask = collate(seqs, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        s = student(input_ids=ids, attention_mask=attn).logits[mask].log_softmax(-1)
        t = teacher(input_ids=ids, attention_mask=attn).logits[mask].log_softmax(-1)
    return torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean").item()


def test_distillation_pulls_student_towards_teacher(teacher, task_files, tmp_path):
    held_out = load_task(task_files["eval"])[:40]
    tok = load_tokenizer(teacher)
    t_model = load_causal_lm(teacher)
    fresh = cut_student(t_model, even_layers(4, 2))
    kl_before = mean_kl(fresh, t_model, tok, held_out)

    cfg = DistillConfig(teacher=teacher, data=task_files["train"], out=tmp_path / "s", layers=2,
                        steps=60, batch_size=16, lr=1e-3, device="cpu")
    manifest = distill(cfg)
    trained = load_causal_lm(tmp_path / "s")
    kl_after = mean_kl(trained, t_model, tok, held_out)
    assert kl_after < 0.25 * kl_before, (kl_before, kl_after)

    assert manifest["kind"] == "student" and manifest["format"] == "hf"
    assert manifest["settings"]["layers_kept"] == [0, 3]
    assert manifest["settings"]["data_sha256"] == artifact.sha256_file(task_files["train"])
    on_disk = artifact.read_manifest(tmp_path / "s")
    assert on_disk["files"]["model.safetensors"]["sha256"] == artifact.sha256_file(tmp_path / "s" / "model.safetensors")
    assert not checkpoint_dir(tmp_path / "s").exists()


def test_resume_continues_to_the_same_weights(teacher, task_files, tmp_path, monkeypatch):
    import shrink.distill.train as train

    def cfg(out, resume=False):
        return DistillConfig(teacher=teacher, data=task_files["train"], out=out, layers=2, steps=12,
                             batch_size=8, lr=1e-3, save_every=5, device="cpu", resume=resume)

    distill(cfg(tmp_path / "straight"))

    real_loss, calls = train.distill_loss, {"n": 0}

    def crash_on_step_8(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train, "distill_loss", crash_on_step_8)
    with pytest.raises(KeyboardInterrupt):
        distill(cfg(tmp_path / "resumed"))
    monkeypatch.setattr(train, "distill_loss", real_loss)
    assert not (tmp_path / "resumed").exists()
    assert checkpoint_dir(tmp_path / "resumed").exists()

    distill(cfg(tmp_path / "resumed", resume=True))
    a = load_causal_lm(tmp_path / "straight").state_dict()
    b = load_causal_lm(tmp_path / "resumed").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    log = artifact.read_manifest(tmp_path / "resumed")
    assert log["settings"]["steps"] == 12
