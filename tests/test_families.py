"""Faithful students for every family: a tiny teacher of each (tests/tiny_families.py, with
the tokenizer files its real models ship) is distilled for a few steps, with and without
--prune-vocab, and exported to GGUF Q8_0 with --eval. The student keeps the teacher's
tokenizer files (tokenizer.model rewritten when pruned), converts, and agrees with its
GGUF: checked here independently of shrink's parity code (transformers against llama.cpp:
token ids on the evaluation prompts and the drift suite, top-1 and KL). Families
llama.cpp's converter cannot take are refused before training.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import tiny
import tiny_families
from shrink.cli import cli
from shrink.export.parity import DRIFT_SUITE, suite_texts

FAMILIES = list(tiny_families.FAMILIES)
SENTENCEPIECE = [f for f, fam in tiny_families.FAMILIES.items() if fam.tokenizer == "sentencepiece"]
CASES = [(f, False) for f in FAMILIES] + [(f, True) for f in ("llama", "phi3", "gemma3", "qwen2")]

NFD = "cafe\u0301 nai\u0308ve"
# Drift-suite texts llama.cpp tokenizes differently from the student's Hugging Face
# tokenizer (measured): transformers 5's LlamaTokenizer (model_type llama) splits with
# Metaspace(prepend_scheme="first"), which adds no '▁' before a text that starts with a
# space, where SentencePiece and llama.cpp add one; Qwen's tokenizer NFC-normalizes,
# llama.cpp does not.
LEADING_SPACE = {"  two leading spaces", " one leading space", "  \n\t \n"}
KNOWN_DRIFT = {"llama": LEADING_SPACE, "qwen2": {NFD}, "qwen3": {NFD}}
Q8_TOP1, Q8_KL = 0.97, 0.02  # GGUF Q8_0 against the torch student (shrink's own thresholds)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    return {"rows": tiny.toy_examples(160, seed=1),
            "train": tiny.write_jsonl(d / "train.jsonl", tiny.toy_examples(160, seed=1)),
            "eval": tiny.write_jsonl(d / "eval.jsonl", tiny.toy_examples(12, seed=99))}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, task):
    """family -> a tiny trained teacher folder, built on first use."""
    made = {}

    def get(family):
        if family not in made:
            made[family] = tiny_families.make_teacher(tmp_path_factory.mktemp(family) / "teacher", family, task["rows"])
        return made[family]

    return get


@pytest.fixture(scope="module")
def students(tmp_path_factory, teachers, task):
    """(family, pruned) -> (student folder, its manifest), distilled on first use."""
    made = {}

    def get(family, prune):
        if (family, prune) not in made:
            # Named for its family, as users name them: llama.cpp treats a model whose
            # name says phi3 specially (it looks up "</s>" and "<|endoftext|>" by name).
            out = tmp_path_factory.mktemp("students") / f"{family}-student"
            r = invoke("distill", "--teacher", teachers(family), "--data", task["train"], "--out", out, "--layers", "1",
                       "--steps", "4", "--batch-size", "8", "--lr", "1e-3", "--device", "cpu", "--json",
                       *(["--prune-vocab"] if prune else []))
            assert r.exit_code == 0, r.output
            made[family, prune] = out, json.loads(r.stdout)
        return made[family, prune]

    return get


def listed(ids) -> list[int]:
    return ids if isinstance(ids, list) else [ids]


def expected_files(family: str, prune: bool) -> dict[str, str]:
    files = {"special_tokens_map.json": "kept", "generation_config.json": "kept",
             "tokenizer_config.json added_tokens_decoder": "kept", "chat_template": "kept"}
    if prune:
        files.update({"generation_config.json": "rewritten: ids renumbered",
                      "tokenizer_config.json added_tokens_decoder": "rewritten: ids renumbered"})
    return files


@pytest.mark.parametrize("family,prune", CASES, ids=[f"{f}{'-pruned' if p else ''}" for f, p in CASES])
def test_student_keeps_the_teachers_files_and_its_gguf_agrees(family, prune, students, teachers, task, tmp_path):
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student, manifest = students(family, prune)
    teacher = teachers(family)
    recorded = dict(manifest["settings"]["tokenizer_files"])
    model_file = recorded.pop("tokenizer.model", None)
    assert recorded == expected_files(family, prune)
    if family in SENTENCEPIECE:
        assert re.fullmatch(r"rewritten: \d+ of 400 pieces" if prune else "kept", model_file)
    assert json.loads((student / "special_tokens_map.json").read_text()) == \
        json.loads((teacher / "special_tokens_map.json").read_text())
    tok, t_tok = AutoTokenizer.from_pretrained(student), AutoTokenizer.from_pretrained(teacher)
    assert tok.chat_template == t_tok.chat_template
    generation = json.loads((student / "generation_config.json").read_text())
    t_generation = json.loads((teacher / "generation_config.json").read_text())
    assert tok.convert_ids_to_tokens(listed(generation["eos_token_id"])) == \
        t_tok.convert_ids_to_tokens(listed(t_generation["eos_token_id"]))
    assert {k: v for k, v in generation.items() if "token_id" not in k} == \
        {k: v for k, v in t_generation.items() if "token_id" not in k}  # sampling defaults
    texts = [ex["prompt"] + ex["completion"] for ex in task["rows"][:50]]
    if model_file:  # the student's SentencePiece model: the teacher's pieces on task text, its own numbering
        sp = spm.SentencePieceProcessor(model_file=str(student / "tokenizer.model"))
        t_sp = spm.SentencePieceProcessor(model_file=str(teacher / "tokenizer.model"))
        for text in texts:
            assert sp.encode(text, out_type=str) == t_sp.encode(text, out_type=str), text
        pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        assert pieces == tok.convert_ids_to_tokens(list(range(len(pieces))))
        assert len(pieces) < t_sp.get_piece_size() if prune else len(pieces) == t_sp.get_piece_size()

    out = tmp_path / "q8"
    r = invoke("export", student, "--target", "gguf", "--quant", "Q8_0", "--eval", task["eval"], "--out", out, "--json")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    parity = m["metrics"]["parity"]
    assert m["valid"] is True and parity["passed"] is True and parity["token_id_match"] == 1.0
    assert m["settings"]["vocabulary"]["tokenizer_model"] == ("llama" if model_file else "gpt2")
    suite = parity["suite"]
    assert suite["total"] == len(DRIFT_SUITE) + 1 and [r["text"] for r in suite["texts"]] == suite_texts(tok)
    drift = {r["text"] for r in suite["texts"] if not r["ids_equal"]}
    assert drift == KNOWN_DRIFT.get(family, set())
    assert suite["equal"] == suite["total"] - len(drift)
    if drift:
        assert "drift-suite texts" in r.stderr and all(repr(t) in r.stderr for t in drift)

    # Independently of shrink's parity code: transformers against llama.cpp.
    import llama_cpp

    gguf = next(out.glob("*.gguf"))
    from shrink.runtime.llama_cpp import plain_weight_buffers

    with plain_weight_buffers():  # llama.cpp's AMX buffers segfault on toy models (ggml-org/llama.cpp#20824)
        llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    add_bos = tok.bos_token_id is not None and tok("a").input_ids[0] == tok.bos_token_id

    def ids(text):
        return llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)

    for text in suite_texts(tok):
        assert (ids(text) == tok(text, split_special_tokens=True).input_ids) == (text not in drift), text
    agree = total = 0
    kls = []
    for ex in tiny.toy_examples(12, seed=99):
        hf_ids = tok(ex["prompt"], split_special_tokens=True).input_ids
        assert ids(ex["prompt"]) == hf_ids
        llm.reset()
        llm.eval(hf_ids)
        got = np.array(llm.scores[: len(hf_ids)], dtype=np.float64)  # (seq, vocab)
        with torch.no_grad():
            want_logits = model(torch.tensor([hf_ids])).logits[0].double().numpy()  # (seq, vocab)
        p, q = torch.log_softmax(torch.from_numpy(want_logits), -1), torch.log_softmax(torch.from_numpy(got), -1)
        kls.append(float((p.exp() * (p - q)).sum(-1).mean()))
        agree += int((want_logits.argmax(-1) == got.argmax(-1)).sum())
        total += len(hf_ids)
    llm.close()
    assert agree / total >= Q8_TOP1 and np.mean(kls) <= Q8_KL, (agree / total, np.mean(kls))


def test_drift_on_the_suite_alone_fails_with_strict_tokenizer(students, task, tmp_path):
    student, _ = students("llama", False)
    out = tmp_path / "q8"
    r = invoke("export", student, "--target", "gguf", "--quant", "Q8_0", "--eval", task["eval"], "--out", out,
               "--strict-tokenizer")
    assert r.exit_code == 1, r.output
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"Error: {out}: parity with {student} failed (tokenizer ids differ on 3 of 23 "
                           "drift-suite texts ('  two leading spaces', ' one leading space', '  \\n\\t \\n')); "
                           f"worst example {task['eval']}:"), line
    m = json.loads((out / "manifest.json").read_text())
    assert m["valid"] is False and m["metrics"]["parity"]["thresholds"]["min_suite_match"] == 1.0
    assert m["metrics"]["parity"]["token_id_match"] == 1.0  # the evaluation prompts agree


def refused(r, line: str, out) -> None:
    assert r.exit_code == 2, r.output
    assert r.stderr.strip().splitlines() == [f"Error: {line}"]
    assert not out.exists() and not out.with_name(out.name + ".checkpoint").exists()


def distill_args(teacher, task, out, *extra):
    return ("distill", "--teacher", teacher, "--data", task["train"], "--out", out, "--layers", "1", "--steps", "1",
            "--device", "cpu", *extra)


def test_phi3_without_its_sentencepiece_model_is_refused_before_training(teachers, task, tmp_path):
    teacher = shutil.copytree(teachers("phi3"), tmp_path / "phi3")
    (teacher / "tokenizer.model").unlink()
    r = invoke(*distill_args(teacher, task, tmp_path / "s"))
    refused(r, "the phi3 family (Phi3ForCausalLM) cannot be exported to GGUF: llama.cpp's converter cannot read "
               "this model's vocabulary (Missing tokenizer.model)", tmp_path / "s")


def test_an_architecture_the_converter_lacks_is_refused_before_training(teachers, task, tmp_path):
    from transformers import HeliumConfig, HeliumForCausalLM

    teacher = tmp_path / "helium"
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        (teacher / name).parent.mkdir(exist_ok=True)
        shutil.copy(teachers("llama") / name, teacher / name)
    HeliumForCausalLM(HeliumConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16)).save_pretrained(teacher)
    r = invoke(*distill_args(teacher, task, tmp_path / "s"))
    refused(r, "the helium family (HeliumForCausalLM) cannot be exported to GGUF: llama.cpp's converter does not "
               "support the HeliumForCausalLM architecture", tmp_path / "s")


def test_an_unknown_bpe_pre_tokenizer_is_refused_before_training(task, tmp_path):
    """A byte-level BPE with GPT-2's split: neither its hash nor its definition is known."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    teacher = tmp_path / "bpe"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([r["prompt"] for r in task["rows"]], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>")
    hf.save_pretrained(teacher)
    tiny.build_llama(teacher, hf, layers=2, hidden=64).save_pretrained(teacher)
    r = invoke(*distill_args(teacher, task, tmp_path / "s"))
    refused(r, "the llama family (LlamaForCausalLM) cannot be exported to GGUF: llama.cpp's converter does not "
               "recognise this model's BPE pre-tokenizer (neither by the hash of its token ids, get_vocab_base_pre, "
               "nor by its definition), so llama.cpp would tokenize text differently from the original", tmp_path / "s")


def test_prune_vocab_refuses_a_sentencepiece_model_it_cannot_cut(teachers, task, tmp_path):
    """A unigram model segments by probabilities over all its pieces: cutting pieces out
    would change how kept text splits."""
    teacher = shutil.copytree(teachers("llama"), tmp_path / "llama")
    corpus = [r["prompt"] + r["completion"] for r in task["rows"]]
    fam = tiny_families.FAMILIES["llama"]
    unigram = tiny_families.train_sentencepiece(corpus, fam, vocab_size=300, model_type="unigram")
    (teacher / "tokenizer.model").write_bytes(unigram)
    r = invoke(*distill_args(teacher, task, tmp_path / "s", "--prune-vocab"))
    refused(r, "--prune-vocab: the teacher's tokenizer.model cannot follow a pruned vocabulary (it is not a BPE "
               "model); distill without --prune-vocab", tmp_path / "s")


def test_files_that_cannot_follow_a_pruned_vocabulary_are_removed_with_the_reason(tmp_path):
    from shrink.distill.prune_vocab import VocabPruning
    from shrink.distill.tokenizer_files import keep_teacher_files

    teacher, student = tmp_path / "teacher", tmp_path / "student"
    teacher.mkdir()
    student.mkdir()
    (teacher / "tokenizer.model").write_text("IQ== 0\nIg== 1\n")  # tiktoken's format: base64 token, rank
    (teacher / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7], "pad_token_id": 0,
                                                                "temperature": 0.6}))
    (teacher / "added_tokens.json").write_text(json.dumps({"<a>": 5, "<b>": 6}))
    (teacher / "vocab.json").write_text("{}")
    (student / "vocab.json").write_text("{}")
    plan = VocabPruning(kept=[0, 2, 5], teacher_vocab_size=8)
    assert keep_teacher_files(teacher, student, plan) == {
        "tokenizer.model": "removed: not a SentencePiece model, so it cannot be cut to the pruned vocabulary",
        "generation_config.json": "rewritten: ids renumbered; not in the pruned vocabulary, removed: eos_token_id 7",
        "added_tokens.json": "rewritten: ids renumbered; not in the pruned vocabulary, removed: <b>",
        "vocab.json": "removed: another encoding of the full vocabulary (tokenizer.json holds the pruned one)"}
    assert json.loads((student / "generation_config.json").read_text()) == {"eos_token_id": [1], "pad_token_id": 0,
                                                                           "temperature": 0.6}
    assert json.loads((student / "added_tokens.json").read_text()) == {"<a>": 2}
    assert sorted(p.name for p in student.iterdir()) == ["added_tokens.json", "generation_config.json"]
