"""Task-vocabulary pruning: same pieces on task text, byte fallback elsewhere, and a
pruned student that converts to GGUF with llama.cpp's ids equal to Hugging Face's."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import tiny
from shrink import artifact
from shrink.cli import cli
from shrink.distill.prune_vocab import plan_pruning, prune_model, save_pruned_tokenizer
from shrink.distill.vocab_sources import read_vocab_data
from shrink.errors import TaskDataError
from shrink.hf import load_causal_lm, load_tokenizer
from shrink.tasks import load_task


# Texts of tiny.PARITY_SUITE that the toy task never uses: the teacher's tokenizer has
# pieces for them, a vocabulary pruned to the task does not.
NOVEL = ["Ünïcödé façade naïve café", "numbers 1234567890 3.14159 -42", "日本語のテキスト and 中文"]


def texts_of(path):
    return [t for ex in load_task(path) for t in (ex.prompt, ex.prompt + ex.completion)]


def novel_rows() -> list[dict]:
    """Task rows whose reviews hold the NOVEL words."""
    return [{"prompt": f"Review: {text}, {word}\nSentiment:", "completion": f" {label}", "choices": tiny.CHOICES}
            for text, word, label in zip(NOVEL, ["great", "awful", "lovely"], ["positive", "negative", "positive"])]


def distill_pruned(teacher, task_files, out, *options) -> dict:
    """`shrink distill --prune-vocab` with `options`; returns the manifest."""
    r = CliRunner().invoke(cli, [str(a) for a in (
        "distill", "--teacher", teacher, "--data", task_files["train"], "--out", out, "--layers", "2",
        "--batch-size", "16", "--prune-vocab", "--device", "cpu", "--json", *options)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def vocab_of(student) -> dict[str, int]:
    return json.loads((student / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]


def test_pruned_tokenizer_keeps_task_pieces_and_falls_back_elsewhere(teacher, task_files, tmp_path):
    tok = load_tokenizer(teacher)
    task = texts_of(task_files["train"])[:200]
    plan = plan_pruning(tok, task)
    assert len(plan.kept) < len(tok)
    pruned = save_pruned_tokenizer(tok, plan, tmp_path)
    new_id = plan.id_map()
    for text in task:
        before = tok(text, split_special_tokens=True).input_ids
        assert pruned(text, split_special_tokens=True).input_ids == [int(new_id[i]) for i in before]
    for text in tiny.PARITY_SUITE:
        ids = pruned(text, split_special_tokens=True).input_ids
        assert len(ids) >= len(tok(text, split_special_tokens=True).input_ids)
        assert pruned.decode(ids, skip_special_tokens=True) == tok.decode(tok(text, split_special_tokens=True).input_ids, skip_special_tokens=True)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(pruned, name) == int(new_id[getattr(tok, name)])


def test_pruned_model_rows_follow_the_kept_tokens(teacher, task_files):
    import torch

    tok, model = load_tokenizer(teacher), load_causal_lm(teacher)
    plan = plan_pruning(tok, texts_of(task_files["eval"]))
    original_emb = model.get_input_embeddings().weight.detach().clone()
    original_head = model.get_output_embeddings().weight.detach().clone()
    prune_model(model, plan)
    rows = torch.tensor(plan.kept)
    torch.testing.assert_close(model.get_input_embeddings().weight, original_emb[rows])
    torch.testing.assert_close(model.get_output_embeddings().weight, original_head[rows])
    assert model.config.vocab_size == len(plan.kept)
    assert model.config.eos_token_id == plan.kept.index(tok.eos_token_id)


def test_byte_level_bpe_is_pruned_too(tmp_path):
    """GPT-2 style byte-level BPE (Llama 3, Qwen): the 256 byte characters are the fallback."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [r["prompt"] + r["completion"] for r in tiny.toy_examples(200, seed=3)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>")
    plan = plan_pruning(hf, corpus[:50])
    pruned = save_pruned_tokenizer(hf, plan, tmp_path)
    new_id = plan.id_map()
    assert len(plan.kept) < len(hf)
    for text in corpus[:50]:
        assert pruned(text).input_ids == [int(new_id[i]) for i in hf(text).input_ids]
    for text in tiny.PARITY_SUITE:
        assert pruned.decode(pruned(text).input_ids) == text


@pytest.fixture(scope="module")
def pruned_student(tmp_path_factory, teacher, task_files):
    """Evaluated on the toy eval rows and rows with NOVEL words, which it never saw."""
    d = tmp_path_factory.mktemp("pruned")
    prefix = d / "prefix.txt"
    prefix.write_text("Review: the phone was great\nSentiment: positive\n\n")
    evals = tiny.write_jsonl(d / "eval.jsonl", tiny.toy_examples(100, seed=99) + novel_rows())
    m = distill_pruned(teacher, task_files, d / "student", "--eval", evals, "--steps", "60", "--lr", "1e-3",
                       "--teacher-prefix", prefix)
    return d, m


def test_pruned_student_distills_and_records_its_vocabulary(pruned_student, teacher):
    d, m = pruned_student
    s = m["settings"]
    assert s["prune_vocab"] and s["vocab_kept"] < s["teacher_vocab"] == len(load_tokenizer(teacher))
    assert s["teacher_prefix_sha256"] == artifact.sha256_file(d / "prefix.txt")
    assert load_causal_lm(d / "student").config.vocab_size == s["vocab_kept"]
    assert m["metrics"]["accuracy"] >= 0.9 and m["metrics"]["retention"] >= 0.9


def test_pruned_student_gguf_has_tokenizer_parity(pruned_student, task_files):
    from shrink.export.flow import ExportOptions, export
    from shrink.runtime.llama_cpp import LlamaCppRuntime

    d, _ = pruned_student
    m = export(d / "student", d / "f16", ExportOptions("gguf", quant="F16"), eval_data=d / "eval.jsonl")
    assert m.metrics["accuracy"] >= 0.9
    hf = load_tokenizer(d / "student")
    novel = texts_of(d / "eval.jsonl")[-2 * len(NOVEL):]  # the eval rows with NOVEL words
    for text in novel:  # their words were pruned: they encode in byte-fallback pieces, and decode back
        assert any(piece.startswith("<0x") for piece in hf.tokenize(text)), text
        assert hf.decode(hf(text).input_ids, skip_special_tokens=True) == text
    rt = LlamaCppRuntime(d / "f16")
    try:
        for text in texts_of(task_files["eval"])[:60] + novel + tiny.PARITY_SUITE:
            assert rt.encode(text) == hf(text, split_special_tokens=True).input_ids, text
    finally:
        rt.close()


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory, teacher, task_files):
    """Two-step runs with --prune-vocab: plain, with an --eval file of NOVEL words, and
    with --vocab-data (a text file and a JSONL file holding NOVEL words)."""
    d = tmp_path_factory.mktemp("short")
    evals = tiny.write_jsonl(d / "novel-eval.jsonl", novel_rows())
    lines = d / "unlabeled.txt"
    lines.write_text(f"{NOVEL[0]}\n\n{NOVEL[1]}\n", encoding="utf-8")
    rows = tiny.write_jsonl(d / "unlabeled.jsonl", [{"prompt": "Review: ", "completion": NOVEL[2]}])
    return d, {
        "plain": distill_pruned(teacher, task_files, d / "plain", "--steps", "2"),
        "eval": distill_pruned(teacher, task_files, d / "eval", "--steps", "2", "--eval", evals),
        "vocab-data": distill_pruned(teacher, task_files, d / "vocab-data", "--steps", "2",
                                     "--vocab-data", lines, "--vocab-data", rows),
    }


def test_the_eval_data_does_not_shape_the_vocabulary(short_runs, teacher, task_files):
    d, m = short_runs
    assert m["eval"]["metrics"]["eval_examples"] == len(NOVEL)
    pieces = {p for text in texts_of(d / "novel-eval.jsonl") for p in load_tokenizer(teacher).tokenize(text)}
    assert pieces - set(vocab_of(d / "plain"))  # the eval texts hold tokens the training data does not
    assert vocab_of(d / "eval") == vocab_of(d / "plain")
    assert load_tokenizer(d / "eval").get_vocab() == load_tokenizer(d / "plain").get_vocab()
    assert m["eval"]["settings"]["vocab_kept"] == m["plain"]["settings"]["vocab_kept"] == len(vocab_of(d / "plain"))
    data = {"role": "data", "path": str(task_files["train"]), "sha256": artifact.sha256_file(task_files["train"])}
    assert m["eval"]["settings"]["vocab_sources"] == m["plain"]["settings"]["vocab_sources"] == [data]


def test_vocab_data_adds_its_tokens_and_is_recorded(short_runs, teacher, task_files):
    d, m = short_runs
    teacher_tok, student_tok = load_tokenizer(teacher), load_tokenizer(d / "vocab-data")
    plain = load_tokenizer(d / "plain")
    for text in NOVEL:  # in whole pieces, as the teacher encodes them; byte fallback without --vocab-data
        assert student_tok.tokenize(text) == teacher_tok.tokenize(text), text
        assert plain.tokenize(text) != teacher_tok.tokenize(text), text
    assert set(vocab_of(d / "plain")) < set(vocab_of(d / "vocab-data"))
    assert m["vocab-data"]["settings"]["vocab_kept"] == len(vocab_of(d / "vocab-data"))
    assert m["vocab-data"]["settings"]["vocab_data"] == [str(d / "unlabeled.txt"), str(d / "unlabeled.jsonl")]
    assert m["vocab-data"]["settings"]["vocab_sources"] == [
        {"role": role, "path": str(path), "sha256": artifact.sha256_file(path)}
        for role, path in [("data", task_files["train"]), ("vocab-data", d / "unlabeled.txt"),
                           ("vocab-data", d / "unlabeled.jsonl")]
    ]


def test_vocab_data_files(tmp_path):
    """Plain text: every non-empty line. JSONL: each row's prompt, with its completion and
    with each choice; a bad row is named by file and line."""
    lines = tmp_path / "lines.txt"
    lines.write_text("first line\n\n  \nsecond {not json}\n", encoding="utf-8")
    assert read_vocab_data(lines) == ["first line", "second {not json}"]
    rows = tiny.write_jsonl(tmp_path / "rows.jsonl", [
        {"prompt": "a"}, {"prompt": "b", "completion": "c"}, {"prompt": "d", "choices": ["e", "f"], "label": 1}])
    assert read_vocab_data(rows) == ["a", "b", "bc", "d", "de", "df"]
    for body, message in [
        ('{"prompt": "a"}\n{"prompt": "b",\n', "2: not JSON (Expecting property name enclosed in double quotes at column 16)"),
        ('\n{"text": "a"}\n', "2: expected a JSON object with a string 'prompt'"),
        ('{"prompt": "a", "completion": 3}\n', "1: 'completion' must be a string, got int"),
        ('{"prompt": "a", "choices": "b"}\n', "1: 'choices' must be a list of strings"),
    ]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(body, encoding="utf-8")
        with pytest.raises(TaskDataError) as e:
            read_vocab_data(bad)
        assert str(e.value) == f"{bad}:{message}"
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(TaskDataError, match="empty.txt: empty file"):
        read_vocab_data(tmp_path / "empty.txt")


def test_teacher_prefix_that_changes_the_completion_tokens_is_refused(teacher, task_files, tmp_path):
    from shrink.distill.batches import encode_examples
    from shrink.distill.train import check_aligned, with_prefix
    from shrink.errors import ShrinkError

    tok = load_tokenizer(teacher)
    examples = load_task(task_files["eval"])[:3]
    plain = encode_examples(tok, examples, 512)
    check_aligned(plain, encode_examples(tok, with_prefix(examples, "Note:\n"), 512), task_files["eval"])
    shifted = [type(q)(ids=q.ids + [5], start=q.start) for q in plain]
    with pytest.raises(ShrinkError, match=r"eval.jsonl:1: the completion tokenizes differently"):
        check_aligned(plain, shifted, task_files["eval"])


def test_gguf_teacher_through_the_cli(teacher, task_files, tmp_path, monkeypatch):
    from shrink.export.gguf_convert import convert_hf_to_gguf

    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "cache"))
    convert_hf_to_gguf(teacher, tmp_path / "teacher.gguf", "f16")
    r = CliRunner().invoke(cli, [str(a) for a in (
        "distill", "--teacher", tmp_path / "teacher.gguf", "--data", task_files["train"], "--eval", task_files["eval"],
        "--out", tmp_path / "s", "--layers", "2", "--steps", "40", "--batch-size", "16", "--lr", "1e-3", "--json")],
        catch_exceptions=False)
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["metrics"]["teacher_accuracy"] >= 0.9
    assert str(tmp_path / "cache") in m["settings"]["teacher_folder"]
