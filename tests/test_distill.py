"""Distillation: the cut student, the loss going where it should, checkpoints and resume."""

from __future__ import annotations

import json

import pytest
import torch

from shrink import artifact
from shrink.distill.batches import collate, encode_examples
from shrink.distill.checkpoint import read_state
from shrink.distill.student import cut_student, even_layers
from shrink.distill.train import DistillConfig, checkpoint_dir, distill
from shrink.errors import ModelError
from shrink.hf import load_causal_lm, load_tokenizer
from shrink.manifest import Manifest
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
    """The KL to the teacher on the examples distilled on falls far. Held-out reviews are
    no gauge at this scale: the cut toy student starts within 0.01-0.05 nats of the toy
    teacher there, and how 600 examples move that depends on how the session's teacher
    happened to train (measured: 0.28x on an AMD EPYC, 4.3x on an Intel Xeon, where the
    training-set KL fell 55x)."""
    seen = load_task(task_files["train"])[:40]
    tok = load_tokenizer(teacher)
    t_model = load_causal_lm(teacher)
    fresh = cut_student(t_model, even_layers(4, 2))
    kl_before = mean_kl(fresh, t_model, tok, seen)

    cfg = DistillConfig(teacher=teacher, data=task_files["train"], out=tmp_path / "s", layers=2,
                        steps=60, batch_size=16, lr=1e-3, device="cpu")
    manifest = distill(cfg)
    trained = load_causal_lm(tmp_path / "s")
    kl_after = mean_kl(trained, t_model, tok, seen)
    assert kl_after < 0.1 * kl_before, (kl_before, kl_after)  # measured: 0.018x (0.0204 -> 0.00037)

    assert manifest.kind == "student" and manifest.format == "hf"
    assert manifest.settings["layers_kept"] == [0, 3]
    assert manifest.settings["data_sha256"] == artifact.sha256_file(task_files["train"])
    on_disk = Manifest.read(tmp_path / "s")
    assert on_disk.files["model.safetensors"].sha256 == artifact.sha256_file(tmp_path / "s" / "model.safetensors")
    assert not checkpoint_dir(tmp_path / "s").exists()


def interrupt_at_step(monkeypatch, n: int) -> None:
    """The nth loss computation raises KeyboardInterrupt (Ctrl-C in the middle of a run);
    the others are the real ones."""
    import shrink.distill.train as train

    real_loss, calls = train.distill_loss, {"n": 0}

    def loss_or_interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train, "distill_loss", loss_or_interrupt)


def test_resume_continues_to_the_same_weights(teacher, task_files, tmp_path, monkeypatch):
    def cfg(out, resume=False):
        return DistillConfig(teacher=teacher, data=task_files["train"], out=out, layers=2, steps=12,
                             batch_size=8, lr=1e-3, save_every=5, device="cpu", resume=resume)

    distill(cfg(tmp_path / "straight"))
    interrupt_at_step(monkeypatch, 8)
    with pytest.raises(KeyboardInterrupt):
        distill(cfg(tmp_path / "resumed"))
    assert not (tmp_path / "resumed").exists()
    assert checkpoint_dir(tmp_path / "resumed").exists()

    distill(cfg(tmp_path / "resumed", resume=True))
    a = load_causal_lm(tmp_path / "straight").state_dict()
    b = load_causal_lm(tmp_path / "resumed").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    log = Manifest.read(tmp_path / "resumed")
    assert log.settings["steps"] == 12


def test_resume_refuses_inputs_that_changed(teacher, task_files, tmp_path, monkeypatch):
    """--resume compares every input's bytes (sha256) with the interrupted run's: the
    data, --eval, --teacher-prefix and the teacher's weights, each changed in place at the
    same size, are refused; restored, the run resumes."""
    import shutil

    from click.testing import CliRunner

    import tiny
    from shrink.cli import cli

    shutil.copytree(teacher, tmp_path / "teacher")
    data = tmp_path / "train.jsonl"
    shutil.copy(task_files["train"], data)
    evals = tiny.write_jsonl(tmp_path / "eval.jsonl", tiny.toy_examples(8, seed=99))
    prefix = tmp_path / "prefix.txt"
    prefix.write_text("Review: the phone was great\nSentiment: positive\n\n")
    args = [str(a) for a in (
        "distill", "--teacher", tmp_path / "teacher", "--data", data, "--eval", evals, "--teacher-prefix", prefix,
        "--out", tmp_path / "s", "--layers", "2", "--steps", "4", "--batch-size", "8", "--save-every", "2",
        "--device", "cpu", "--json")]
    interrupt_at_step(monkeypatch, 3)
    assert CliRunner().invoke(cli, args, catch_exceptions=False).exit_code == 130
    weights = tmp_path / "teacher" / "model.safetensors"
    assert read_state(checkpoint_dir(tmp_path / "s"))["inputs"] == [
        {"role": role, "path": str(path), "sha256": artifact.sha256_file(path)}
        for role, path in [("data", data), ("eval", evals), ("teacher-prefix", prefix), ("teacher-weights", weights)]]

    def refused(path):
        r = CliRunner().invoke(cli, args + ["--resume"], catch_exceptions=False)
        assert r.exit_code == 2, r.output
        assert r.stderr.strip() == (f"Error: --resume: {path} changed since the interrupted run (sha256 differs); "
                                    "use the same inputs or --force to start over")

    for path in (data, evals, prefix):
        original = path.read_bytes()
        path.write_bytes(original.replace(b"Review", b"REVIEW", 1))  # still valid, the same size
        refused(path)
        path.write_bytes(original)
    (tmp_path / "teacher").rename(tmp_path / "teacher.orig")
    tiny.corrupted_copy(tmp_path / "teacher.orig", tmp_path / "teacher")  # loadable, other bytes
    assert weights.stat().st_size == (tmp_path / "teacher.orig" / "model.safetensors").stat().st_size
    refused(weights)
    shutil.rmtree(tmp_path / "teacher")
    (tmp_path / "teacher.orig").rename(tmp_path / "teacher")

    r = CliRunner().invoke(cli, args + ["--resume"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert [h["step"] for h in json.loads((tmp_path / "s" / "training_log.json").read_text())] == [1, 2, 3, 4]
    assert json.loads(r.stdout)["settings"]["teacher_weights_sha256"] == {str(weights): artifact.sha256_file(weights)}


def test_resume_names_a_teacher_weight_file_that_came_or_went():
    from shrink.distill.input_hashes import check_unchanged
    from shrink.errors import ShrinkError

    one, two = ({"role": "teacher-weights", "path": f"t/model-0000{i}.safetensors", "sha256": str(i)} for i in (1, 2))
    check_unchanged([one, two], [one, two])
    for before, now, message in [
        ([one], [one, two], "t/model-00002.safetensors changed since the interrupted run (it is new)"),
        ([one, two], [two], "t/model-00001.safetensors changed since the interrupted run (it is gone)"),
        ([one], [{**one, "sha256": "3"}], "t/model-00001.safetensors changed since the interrupted run (sha256 differs)"),
    ]:
        with pytest.raises(ShrinkError) as e:
            check_unchanged(before, now)
        assert str(e.value) == f"--resume: {message}; use the same inputs or --force to start over"


def test_selected_logits_match_the_full_forward(teacher, task_files):
    from shrink.logits import selected_logits

    model, tok = load_causal_lm(teacher), load_tokenizer(teacher)
    ids, attn, mask = collate(encode_examples(tok, load_task(task_files["eval"])[:6], 512), tok.pad_token_id, "cpu")
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=attn).logits[mask]
        part = selected_logits(model, ids, attn, mask)
        rows = torch.tensor([5, 2, 40])
        some = selected_logits(model, ids, attn, mask, rows=rows)
    torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(some, full[:, rows], rtol=1e-5, atol=1e-5)


def test_loss_terms():
    from shrink.distill.loss import distill_loss

    torch.manual_seed(0)
    s, t = torch.randn(5, 11), torch.randn(5, 11)
    targets = torch.randint(0, 11, (5,))
    loss, kl, ce = distill_loss(s, s.clone(), targets, temperature=2.0, alpha=1.0)
    assert kl.item() == pytest.approx(0.0, abs=1e-6) and loss.item() == pytest.approx(0.0, abs=1e-6)
    loss, kl, ce = distill_loss(s, t, targets, temperature=1.0, alpha=0.0)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(s, targets).item(), rel=1e-6)
    _, kl3, _ = distill_loss(s, t, targets, temperature=3.0, alpha=0.5)
    p3 = (t / 3).softmax(-1)
    assert kl3.item() == pytest.approx(((p3 * (p3.log() - (s / 3).log_softmax(-1))).sum(-1).mean() * 9).item(), rel=1e-5)


def test_shared_prefix_cache_gives_the_full_forward(teacher):
    """The teacher's prefix run once (training) and in the torch runtime (evaluation)
    give the same numbers as running every token."""
    from shrink.distill.batches import Sequence
    from shrink.logits import selected_logits
    from shrink.prefix import PrefixCache, common_prefix, usable_prefix
    from shrink.runtime.torch_runtime import TorchRuntime

    model, tok = load_causal_lm(teacher), load_tokenizer(teacher)
    head = "Review: the phone was great\nSentiment: positive\n\nReview: the coffee was awful\nSentiment: negative\n\n"
    texts = [head + f"Review: {t}\nSentiment: {lab}" for t, lab in
             [("our dinner was lovely", "positive"), ("this book was dreadful honestly", "negative"), ("perfect", "positive")]]
    seqs = []
    for t in texts:
        ids = tok(t).input_ids
        seqs.append(Sequence(ids=ids, start=len(ids) - 1))
    shared = usable_prefix([s.ids for s in seqs], min(s.start for s in seqs) - 1)
    assert len(shared) >= 15 and shared == common_prefix([s.ids for s in seqs])
    ids, attn, mask = collate(seqs, tok.pad_token_id, "cpu")
    with torch.no_grad():
        full = selected_logits(model, ids, attn, mask)
        cached = selected_logits(model, ids, attn, mask, prefix=PrefixCache(model, shared, "cpu"))
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)

    rt = TorchRuntime(teacher, device="cpu")
    prompt = rt.encode(head + "Review: the service was poor\nSentiment:")
    conts = [[rt.encode(head + "Review: the service was poor\nSentiment: positive")[-1]], [5]]
    two_tokens = [[7, 9], [11, 13]]
    plain = rt.score_continuations(prompt, conts), rt.score_continuations(prompt, two_tokens)
    rt.share_prefix(shared)
    assert rt.prefix is not None
    cached = rt.score_continuations(prompt, conts), rt.score_continuations(prompt, two_tokens)
    for a, b in zip(plain, cached):
        assert a == pytest.approx(b, abs=1e-3)
