"""The offline teacher-logit cache: its format and manifest, training from it, and refusals."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from click.testing import CliRunner

from shrink import artifact
from shrink.cli import cli
from shrink.distill.teacher_cache import CacheConfig, build_cache, dense_logprobs, shard_name
from shrink.distill.train import DistillConfig, distill
from shrink.errors import ShrinkError
from shrink.manifest import Manifest

# Measured on the tiny teacher (768 tokens), 10 steps: with K = 768 (float16 log-probs)
# the per-step losses are the online ones to at most 1.3e-3 relative (5e-5 at step 1,
# before the rounding has moved the weights); with K = 128 at T = 1 to at most 2%.
EXACT_RTOL = 5e-3
TOP128_RTOL = 0.05


@pytest.fixture(scope="module")
def caches(teacher, task_files, tmp_path_factory):
    d = tmp_path_factory.mktemp("caches")
    full = build_cache(CacheConfig(teacher=teacher, data=task_files["train"], out=d / "full", top_k=100_000, device="cpu"))
    top = build_cache(CacheConfig(teacher=teacher, data=task_files["train"], out=d / "top128", top_k=128, device="cpu"))
    return {"full": (d / "full", full), "top128": (d / "top128", top)}


def run(teacher, task_files, out, **kw) -> list[float]:
    cfg = DistillConfig(teacher=teacher, data=task_files["train"], out=out, layers=2, steps=10, batch_size=8,
                        lr=1e-3, device="cpu", **kw)
    manifest = distill(cfg)
    assert manifest.settings["teacher_cache"] == (str(kw["teacher_cache"]) if kw.get("teacher_cache") else None)
    return [h["loss"] for h in json.loads((out / "training_log.json").read_text())]


def test_manifest_and_files(caches, teacher, task_files):
    folder, manifest = caches["top128"]
    assert manifest == Manifest.read(folder)
    assert manifest.kind == "teacher-cache" and manifest.format == "safetensors"
    s = manifest.settings
    assert s["data_sha256"] == artifact.sha256_file(task_files["train"])
    assert s["teacher"] == str(teacher) and s["teacher_fingerprint"]["config_sha256"] == artifact.sha256_file(teacher / "config.json")
    assert s["teacher_fingerprint"]["tokenizer_sha256"]["tokenizer.json"] == artifact.sha256_file(teacher / "tokenizer.json")
    assert s["teacher_fingerprint"]["weights_sha256"] == {"model.safetensors": artifact.sha256_file(teacher / "model.safetensors")}
    assert s["format_version"] == 2
    assert (s["top_k"], s["vocab_size"], s["max_length"], s["logprob_dtype"]) == (128, 768, 512, "float16")
    assert s["teacher_prefix"] is None and s["teacher_prefix_sha256"] is None
    assert s["shards"] == [shard_name(0, 1)] and list(manifest.files) == s["shards"]
    assert s["examples"] == 600 and s["positions"] == 1200  # " positive"/" negative" and EOS
    assert caches["full"][1].settings["top_k"] == 768  # --top-k above the vocabulary: all of it

    from safetensors import safe_open

    with safe_open(str(folder / s["shards"][0]), framework="pt") as f:
        assert f.metadata()["format"] == "teacher-cache"
        t = {k: f.get_tensor(k) for k in f.keys()}
    assert t["top_ids"].dtype == torch.int32 and t["top_ids"].shape == (1200, 128)
    assert t["top_logprobs"].dtype == torch.float16 and t["rest_logprob"].dtype == torch.float32
    assert t["example_index"].tolist() == list(range(600)) and t["offsets"][-1].item() == 1200
    logp = t["top_logprobs"].float()
    assert (logp[:, :-1] >= logp[:, 1:]).all()  # most likely first
    total = torch.logaddexp(logp.logsumexp(-1), t["rest_logprob"])  # top-k mass and the rest: all of it
    torch.testing.assert_close(total, torch.zeros_like(total), atol=2e-3, rtol=0)


def test_training_from_the_cache(caches, teacher, task_files, tmp_path):
    """K = vocabulary reproduces online training (float16 rounding aside); K = 128 comes
    close, not equal."""
    online = run(teacher, task_files, tmp_path / "online")
    cached = run(teacher, task_files, tmp_path / "cached", teacher_cache=caches["full"][0])
    assert cached[0] == pytest.approx(online[0], rel=2e-4)
    for a, b in zip(online, cached):
        assert b == pytest.approx(a, rel=EXACT_RTOL)

    online_t1 = run(teacher, task_files, tmp_path / "online-t1", temperature=1.0)
    top = run(teacher, task_files, tmp_path / "top128-t1", temperature=1.0, teacher_cache=caches["top128"][0])
    diffs = [abs(a - b) / a for a, b in zip(online_t1, top)]
    assert max(diffs) < TOP128_RTOL
    assert max(diffs) > EXACT_RTOL / 5  # the flat tail is an approximation: visibly not the same


def test_dense_logprobs_equal_the_teacher_with_every_token(teacher, task_files):
    """The dense form of a full cache is the teacher's log-softmax, and with a vocabulary
    plan it is the teacher read on the kept rows, renormalised by the loss's softmax."""
    from shrink.distill.batches import collate, encode_examples
    from shrink.distill.prune_vocab import VocabPruning
    from shrink.hf import load_causal_lm, load_tokenizer
    from shrink.logits import selected_logits
    from shrink.tasks import load_task

    model, tok = load_causal_lm(teacher), load_tokenizer(teacher)
    ids, attn, mask = collate(encode_examples(tok, load_task(task_files["eval"])[:8], 512), tok.pad_token_id, "cpu")
    with torch.no_grad():
        logits = selected_logits(model, ids, attn, mask)  # (n, 768)
    logp = logits.log_softmax(-1)
    vocab = logp.shape[1]
    top, top_ids = logp.topk(vocab)
    dense = dense_logprobs(top_ids.int(), top.half(), torch.full((len(top),), -math.inf), vocab)
    for temperature in (1.0, 2.0):  # the loss tempers the dense log-probs as it tempers logits
        torch.testing.assert_close((dense / temperature).log_softmax(-1), (logits / temperature).log_softmax(-1),
                                   atol=5e-3, rtol=0)

    plan = VocabPruning(kept=sorted(set(range(0, vocab, 3)) | set(top_ids[:, 0].tolist())), teacher_vocab_size=vocab)
    pruned = dense_logprobs(top_ids.int(), top.half(), torch.full((len(top),), -math.inf), vocab, plan.id_map())
    online = selected_logits(model, ids, attn, mask, rows=torch.tensor(plan.kept)).detach()
    torch.testing.assert_close(pruned.log_softmax(-1), online.log_softmax(-1), atol=5e-3, rtol=0)

    k = 4  # a short cache: the rest spread evenly, the total mass kept
    rest = logp.scatter(1, top_ids[:, :k], -math.inf).logsumexp(-1)
    approx = dense_logprobs(top_ids[:, :k].int(), top[:, :k].half(), rest, vocab)
    torch.testing.assert_close(approx.logsumexp(-1), torch.zeros(len(top)), atol=2e-3, rtol=0)
    torch.testing.assert_close(approx.gather(1, top_ids[:, :k]), top[:, :k], atol=5e-3, rtol=0)
    others = torch.ones_like(approx, dtype=torch.bool).scatter(1, top_ids[:, :k], False)
    torch.testing.assert_close(approx[others].view(len(top), vocab - k),
                               (rest - math.log(vocab - k))[:, None].expand(-1, vocab - k))


def test_a_cache_for_another_run_is_refused(caches, teacher, task_files, tmp_path):
    folder = caches["top128"][0]
    result = CliRunner().invoke(cli, ["distill", "--teacher", str(teacher), "--data", str(task_files["eval"]),
                                      "--out", str(tmp_path / "s"), "--layers", "2", "--teacher-cache", str(folder)])
    assert result.exit_code == 2
    train, data = task_files["train"], task_files["eval"]
    assert result.stderr.strip().splitlines() == [
        f"Error: --teacher-cache {folder} was made from other data ({train}, sha256 {artifact.sha256_file(train)[:12]}...), "
        f"not {data} (sha256 {artifact.sha256_file(data)[:12]}...); rebuild it: shrink teacher-cache --teacher {teacher} "
        f"--data {data} --out DIR"]
    assert not (tmp_path / "s").exists()

    def refused(**kw):
        base = dict(teacher=teacher, data=task_files["train"], out=tmp_path / "s", layers=2, device="cpu",
                    teacher_cache=folder)
        with pytest.raises(ShrinkError) as e:
            distill(DistillConfig(**{**base, **kw}))
        return str(e.value)

    assert "was made with --max-length 512; this run has --max-length 64" in refused(max_length=64)
    prefix = tmp_path / "prefix.txt"
    prefix.write_text("Review: great\nSentiment: positive\n\n")
    assert "was made with no --teacher-prefix; this run has --teacher-prefix" in refused(teacher_prefix=prefix)
    assert "holds its output distributions only" in refused(hidden_weight=1.0)
    other = tmp_path / "other-teacher"
    shutil.copytree(teacher, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    assert "was made with another teacher" in refused(teacher=other)
    assert "is a 'student' artifact, not a teacher cache" in refused(teacher_cache=not_a_cache(tmp_path))
    assert not (tmp_path / "s").exists()


def test_a_cache_from_other_weights_of_the_same_size_is_refused(caches, teacher, task_files, tmp_path):
    """The teacher is identified by its weights' bytes: a copy elsewhere is the same
    teacher, a copy with one tensor changed (the same file size) is another."""
    import tiny
    from shrink.distill.train import validate

    folder = caches["top128"][0]
    same = tmp_path / "same-teacher"
    shutil.copytree(teacher, same)
    validate(DistillConfig(teacher=same, data=task_files["train"], out=tmp_path / "s", layers=2, teacher_cache=folder))

    other = tiny.corrupted_copy(teacher, tmp_path / "other-teacher")
    assert (other / "model.safetensors").stat().st_size == (teacher / "model.safetensors").stat().st_size
    result = CliRunner().invoke(cli, [str(a) for a in (
        "distill", "--teacher", other, "--data", task_files["train"], "--out", tmp_path / "s", "--layers", "2",
        "--teacher-cache", folder)])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (
        f"Error: --teacher-cache {folder} was made with another teacher ({teacher}): not the same weight files as "
        f"{other} (sha256); rebuild it: shrink teacher-cache --teacher {other} --data {task_files['train']} --out DIR")
    assert not (tmp_path / "s").exists()


def not_a_cache(tmp_path):
    """A folder with another kind of shrink manifest."""
    folder = tmp_path / "not-a-cache"
    folder.mkdir()
    (folder / "w.txt").write_text("x")
    artifact.finish(folder, kind="student", format="hf", source=None, settings={}, metrics={})
    return folder
