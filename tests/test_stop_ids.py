"""One end of generation for every runtime: torch, onnxruntime and llama.cpp stop at the
generation config's EOS list plus the tokenizer's EOS, and a student carries that list.

The tiny teacher's generation_config.json is given a second EOS id: a token the model
emits a few tokens into its answer, so that stopping there changes the text. The same
folder is then served in torch, exported to ONNX and converted to GGUF, and all three
must give the same greedy texts, cut at the same token.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import gguf
import pytest

import tiny
from shrink.hf import load_tokenizer
from shrink.runtime.base import end_of_generation, stop_ids
from shrink.runtime.llama_cpp import LlamaCppRuntime
from shrink.runtime.onnx_runtime import OnnxRuntime
from shrink.runtime.torch_runtime import TorchRuntime

PROMPTS = ["Review:", "Review: I found"] + [r["prompt"] for r in tiny.toy_examples(4, seed=12, choices=False)]
MAX_TOKENS = 12


@dataclass
class Served:
    folder: Path  # the Hugging Face folder, with the EOS list
    eos: int  # the tokenizer's EOS
    early: int  # the second EOS id: a token the model emits early
    plain: dict[str, str]  # prompt -> greedy text with the tokenizer's EOS alone


def greedy_ids(rt: TorchRuntime, prompt: str, n: int) -> list[int]:
    ids = rt.encode(prompt)
    out: list[int] = []
    for _ in range(n):
        out.append(int(rt.logits(ids + out)[-1].argmax()))
    return out


@pytest.fixture(scope="module")
def served(teacher, tmp_path_factory) -> Served:
    folder = tmp_path_factory.mktemp("stop") / "model"
    shutil.copytree(teacher, folder)
    rt = TorchRuntime(folder, device="cpu")
    eos = rt.tokenizer.eos_token_id
    assert rt.stop_ids == {eos}
    plain = {p: rt.generate(p, MAX_TOKENS) for p in PROMPTS}
    answer = greedy_ids(rt, PROMPTS[0], 6)  # the teacher writes a review: " I found the ..."
    early = answer[2]
    assert eos not in answer[:3], answer
    rt.close()
    generation = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [eos, early]}))
    return Served(folder, eos, early, plain)


@pytest.fixture(scope="module")
def runtimes(served, tmp_path_factory):
    from shrink.export.gguf_convert import convert_hf_to_gguf
    from shrink.export.onnx_export import export_onnx

    root = tmp_path_factory.mktemp("exports")
    (root / "onnx").mkdir()
    export_onnx(served.folder, root / "onnx", "fp32")
    convert_hf_to_gguf(served.folder, root / "model.gguf", "f16")
    opened = {"torch": TorchRuntime(served.folder, device="cpu"), "onnxruntime": OnnxRuntime(root / "onnx", threads=2),
              "llama.cpp": LlamaCppRuntime(root / "model.gguf", threads=2)}
    yield opened
    for rt in opened.values():
        rt.close()


def test_stop_ids_read_the_generation_config_list(served):
    tok = load_tokenizer(served.folder)
    assert stop_ids(served.folder, tok) == {served.eos, served.early}
    assert end_of_generation(None, tok) == {served.eos}
    assert end_of_generation(7, tok) == {7, served.eos}


def test_gguf_declares_the_eos_list(runtimes, served):
    """The converter writes the tokenizer's EOS only; shrink adds the list's other id as eot."""
    reader = gguf.GGUFReader(runtimes["llama.cpp"].path)
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == served.eos
    assert reader.fields["tokenizer.ggml.eot_token_id"].contents() == served.early


def test_every_runtime_stops_at_the_same_tokens(runtimes, served):
    for name, rt in runtimes.items():
        assert rt.stop_ids == {served.eos, served.early}, name
    texts = {name: [rt.generate(p, MAX_TOKENS) for p in PROMPTS] for name, rt in runtimes.items()}
    assert texts["onnxruntime"] == texts["torch"]
    assert texts["llama.cpp"] == texts["torch"]
    cut = texts["torch"][0]  # " I found": the answer up to the early id
    assert cut and cut != served.plain[PROMPTS[0]] and served.plain[PROMPTS[0]].startswith(cut)


def test_student_keeps_the_eos_list_and_no_auto_map(served, task_files, tmp_path):
    """distill: the student inherits the teacher's EOS list, renumbered with a pruned
    vocabulary and kept whole though no training text holds its second id, and never
    an auto_map."""
    from click.testing import CliRunner

    from shrink.cli import cli

    teacher = tmp_path / "teacher"
    shutil.copytree(served.folder, teacher)
    tok = load_tokenizer(teacher)
    used = {i for line in task_files["train"].read_text().splitlines()
            for i in tok(json.loads(line)["prompt"] + json.loads(line)["completion"]).input_ids}
    unused = max(set(range(len(tok))) - used - set(tok.all_special_ids))
    generation = json.loads((teacher / "generation_config.json").read_text())
    (teacher / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [served.eos, unused]}))
    config = json.loads((teacher / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}  # model_type stays llama
    (teacher / "config.json").write_text(json.dumps(config))
    out = tmp_path / "student"
    r = CliRunner().invoke(cli, ["distill", "--teacher", str(teacher), "--data", str(task_files["train"]),
                                 "--out", str(out), "--layers", "2", "--steps", "1", "--prune-vocab"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    student = TorchRuntime(out, device="cpu")
    assert len(student.tokenizer) < len(tok)  # pruned
    expected = {student.tokenizer.eos_token_id, student.tokenizer.convert_tokens_to_ids(tok.convert_ids_to_tokens(unused))}
    assert student.stop_ids == expected and len(expected) == 2
    assert set(json.loads((out / "generation_config.json").read_text())["eos_token_id"]) == expected
    student.close()
