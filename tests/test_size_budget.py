"""Size-budgeted students (--max-size-mb, --for-target) and the byte-cost model under them.

The model of llama.cpp's quantizer (shrink.quantize.gguf_size) is checked against files
llama.cpp wrote: every tensor's type under every file type it models, and the file's
size. The chooser picks, in the rule's order (the most layers, then the widest hidden
size), the first student that fits; the student it picks exports to a GGUF of the size
it predicted; a budget nothing fits is refused with the smallest size.

Tolerance between the predicted and the real size: TOLERANCE bytes. The key-values are
measured by letting the converter write them for the teacher's folder, without its
tensors: general.size_label (the parameter count, '12M') is then missing, and
general.name is the teacher folder's name, not the student's. Measured: 32 to 96 bytes.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import tiny
import tiny_families
from shrink.cli import cli
from shrink.distill.config import DistillConfig
from shrink.distill.size_budget import Budget, Candidates, choose_size
from shrink.errors import ShrinkError
from shrink.export.gguf_convert import convert_hf_to_gguf
from shrink.export.gguf_layout import metadata_bytes, tensor_shapes
from shrink.gguf_owner import import_gguf
from shrink.hf import load_causal_lm
from shrink.quantize.gguf_size import SIZED, UNQUANTIZED, file_bytes, tensor_costs
from shrink.quantize.gguf_types import quant_type
from shrink.quantize.llama_quantize import quantize_gguf

TOLERANCE = 256  # bytes; see the module docstring

# Tiny models whose shapes reach llama.cpp's rules: (family, layers, hidden).
SHAPES = {
    "llama-9x256": ("llama", 9, 256),  # use_more_bits over 9 layers, GQA 2, an untied head
    "gemma3-3x384": ("gemma3", 3, 384),  # GQA 4, a tied head, rows of 384: every k-quant falls back
    "qwen2-2x80": ("qwen2", 2, 80),  # rows of 80 fit no block: F16; q/k/v biases
}


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def written(path: Path) -> tuple[dict[str, str], list[tuple[str, tuple[int, ...]]], int]:
    """A GGUF file's tensor types, its (name, shape) list as PyTorch shapes, and the bytes
    of its header and key-values."""
    reader = import_gguf().GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    shapes = [(t.name, tuple(int(d) for d in reversed(t.shape.tolist()))) for t in reader.tensors]
    metadata = sum(part.nbytes for field in reader.fields.values() for part in field.parts)
    return types, shapes, metadata


@pytest.mark.parametrize("shape", SHAPES)
def test_types_and_sizes_match_llama_cpp(shape, tmp_path):
    family, layers, hidden = SHAPES[shape]
    rows = tiny.toy_examples(40, seed=3)
    tok = tiny_families.build_tokenizer(tmp_path, family, [r["prompt"] + r["completion"] for r in rows])
    model = tiny_families.build_model(family, tok, layers=layers, hidden=hidden)
    model.save_pretrained(tmp_path)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        predicted_shapes = tensor_shapes(AutoModelForCausalLM.from_config(model.config), tmp_path)
    measured = metadata_bytes(tmp_path)
    config = model.config
    gqa = config.num_attention_heads // config.num_key_value_heads
    problems = []
    for ftype in SIZED:
        path = tmp_path / f"{ftype}.gguf"
        if ftype in UNQUANTIZED:
            convert_hf_to_gguf(tmp_path, path, ftype.lower())
        else:
            if not (tmp_path / "F16.gguf").exists():
                convert_hf_to_gguf(tmp_path, tmp_path / "F16.gguf", "f16")
            quantize_gguf(tmp_path / "F16.gguf", path, quant_type(ftype), threads=1)
        types, shapes, metadata = written(path)
        assert sorted(predicted_shapes) == sorted(shapes)  # the converter's names and shapes
        costs = tensor_costs(predicted_shapes, ftype, layers, gqa)
        problems += [f"{ftype} {c.name}: {c.type}, llama.cpp wrote {types[c.name]}" for c in costs if c.type != types[c.name]]
        real = os.path.getsize(path)
        if file_bytes(metadata, costs) != real:  # the layout, given the file's own key-values
            problems.append(f"{ftype}: {file_bytes(metadata, costs)} bytes predicted, {real} written")
        if abs(file_bytes(measured, costs) - real) > TOLERANCE:  # with the key-values measured beforehand
            problems.append(f"{ftype}: {file_bytes(measured, costs)} bytes with measured key-values, {real} written")
    assert problems == []


def test_the_types_reach_the_fallbacks():
    """The shapes above do reach the rules they are there for (checked on the model alone)."""
    emb = ("token_embd.weight", (400, 384))
    layer = [("blk.0.attn_q.weight", (64, 384)), ("blk.0.attn_v.weight", (16, 384)), ("blk.0.ffn_down.weight", (384, 768))]
    costs = {c.name: c.type for c in tensor_costs([emb, *layer], "Q4_K_M", 1, 4)}
    assert costs == {"token_embd.weight": "Q8_0", "blk.0.attn_q.weight": "Q5_0", "blk.0.attn_v.weight": "Q8_0",
                     "blk.0.ffn_down.weight": "Q6_K"}
    assert {c.type for c in tensor_costs([("blk.0.attn_q.weight", (64, 80))], "Q8_0", 1, 1)} == {"F16"}


# --- the chooser -----------------------------------------------------------------------

def config(folder, **options):
    return DistillConfig(teacher=folder, data=Path("train.jsonl"), out=Path("student"), **options)


def test_the_choice_follows_the_rule(wide_teacher):
    """Candidates in the rule's order: (2 layers, 512), (2, 256), (1, 512), (1, 256). With
    the limit at each one's exact size, the choice is the first in that order that fits;
    one byte less, the first that fits then."""
    folder = wide_teacher("llama")
    teacher = load_causal_lm(folder)
    budget = Budget(10**9, "Q4_K_M", False, None, "--max-size-mb 1000 --quant Q4_K_M")
    found = Candidates(budget, config(folder), teacher, folder)
    assert found.hiddens == [512, 256]
    order = [(2, 512), (2, 256), (1, 512), (1, 256)]
    size = {c: found.size(*c)[0] for c in order}
    assert size[(2, 512)] > size[(2, 256)] > size[(1, 256)] and size[(2, 512)] > size[(1, 512)] > size[(1, 256)]
    for limit in sorted({s + d for s in size.values() for d in (0, -1)}):
        fits = [c for c in order if size[c] <= limit]
        if not fits:
            with pytest.raises(ShrinkError, match=re.escape(
                    f"no student fits {limit / 1e6:.2f} MB: the smallest, 1 layer with hidden size 256 and "
                    f"{found.rows:,} vocabulary rows, is {size[(1, 256)] / 1e6:.2f} MB; --prune-vocab keeps only")):
                choose_size(Budget(limit, "Q4_K_M", False, None, "x"), config(folder), teacher, folder, 2)
            continue
        layers, hidden, record = choose_size(Budget(limit, "Q4_K_M", False, None, "x"), config(folder), teacher, folder, 2)
        assert (layers, hidden) == fits[0], limit
        assert record["predicted_bytes"] == size[fits[0]] <= limit
    fixed = Candidates(budget, config(folder, hidden_size=256), teacher, folder)
    assert fixed.hiddens == [256]  # --hidden-size leaves the budget the layers to choose
    # --head-dim: the candidates' heads are as narrow as the student's will be
    from shrink.distill.width import widths_of

    w = widths_of(teacher)
    narrow_bytes, costs = Candidates(budget, config(folder, head_dim=w.head_dim // 2), teacher, folder).size(2, 512)
    shapes = {c.name: c.shape for c in costs}
    assert shapes["blk.0.attn_k.weight"] == (w.kv_heads * w.head_dim // 2, 512)
    assert shapes["blk.1.attn_output.weight"] == (512, w.heads * w.head_dim // 2)
    assert narrow_bytes < size[(2, 512)]


def test_a_budgeted_student_exports_to_the_size_predicted(wide_teacher, task_files, tmp_path):
    """--for-target: the target's max_size_mb at its ladder's first GGUF type (Q6_K here,
    the largest), with --prune-vocab: the kept rows are counted. 2.2 MB holds both layers
    256 wide (2.10 MB), not 512 wide (4.19 MB)."""
    from shrink.export.flow import ExportOptions, export

    targets = tmp_path / "targets.toml"
    targets.write_text('[targets.watch]\ndescription = "a watch"\nruntime = "llama.cpp"\nformats = ["gguf"]\n'
                       'quants = ["Q6_K", "Q4_K_M"]\nmax_size_mb = 2.2\n')
    r = invoke("distill", "--teacher", wide_teacher("llama"), "--data", task_files["train"], "--out", tmp_path / "s",
               "--for-target", "watch", "--targets", targets, "--prune-vocab", "--steps", "2", "--batch-size", "8",
               "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    assert re.search(r"size budget: 2 of 2 layers, hidden size 256: 2\.\d\d MB at Q6_K, within 2\.20 MB "
                     r"\(--for-target watch \(max_size_mb 2\.2, Q6_K\)\)", " ".join(r.stderr.split())), r.stderr
    settings = json.loads(r.stdout)["settings"]
    budget = settings["size_budget"]
    assert (budget["layers"], budget["hidden_size"], budget["quant"], budget["target"]) == (2, 256, "Q6_K", "watch")
    assert budget["vocab_rows"] == settings["vocab_kept"] < settings["teacher_vocab"]
    assert settings["widths"] == {"hidden_size": [512, 256]} and settings["layers"] is None
    export(tmp_path / "s", tmp_path / "q6", ExportOptions("gguf", quant="Q6_K"))
    real = os.path.getsize(tmp_path / "q6" / "model-Q6_K.gguf")
    assert real <= budget["limit_bytes"] and abs(real - budget["predicted_bytes"]) <= TOLERANCE, (real, budget)
    types, _, _ = written(tmp_path / "q6" / "model-Q6_K.gguf")
    assert {name: t for name, t, _ in budget["tensors"]} == types


def test_a_budget_nothing_fits_is_refused(wide_teacher, task_files, tmp_path):
    r = invoke("distill", "--teacher", wide_teacher("llama"), "--data", task_files["train"], "--out", tmp_path / "s",
               "--max-size-mb", "0.2", "--device", "cpu")
    assert r.exit_code == 2, r.output
    assert re.fullmatch(r"Error: --max-size-mb 0\.2 --quant Q4_K_M: no student fits 0\.20 MB: the smallest, 1 layer "
                        r"with hidden size 256 and \d{3} vocabulary rows, is 0\.\d\d MB; --prune-vocab keeps only the "
                        r"task's tokens", r.stderr.strip().splitlines()[-1]), r.stderr  # after the teacher's spinner
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--max-size-mb", "5", "--layers", "2"],
     "--layers and --max-size-mb cannot be used together: the size budget chooses the layers"),
    (["--for-target", "phone", "--layers", "2"],
     "--layers and --for-target cannot be used together: the size budget chooses the layers"),
    (["--max-size-mb", "5", "--for-target", "phone"], "--max-size-mb and --for-target cannot be used together"),
    (["--layers", "2", "--quant", "Q8_0"], "--quant: only with --max-size-mb or --qat (the GGUF type the student is sized or trained for)"),
    (["--layers", "2", "--targets", "targets.toml"], "--targets: only with --for-target"),
    (["--max-size-mb", "0"], "--max-size-mb must be positive, got 0.0"),
    (["--for-target", "phone", "--quant", "Q8_0"],
     "--quant: not with --for-target (the target's ladder names the GGUF type)"),
    (["--for-target", "cpu-server"],
     "--for-target cpu-server: it is served as onnx, not GGUF; a size budget is for GGUF files"),
    (["--for-target", "watch"], "--for-target watch: no such target in {targets} (targets: laptop, phone, phone-pte, "
                                "cpu-server, gpu-server)"),
    (["--max-size-mb", "5", "--student", "{teacher}"],
     "--max-size-mb: not with --student (the student's size is that model's)"),
    (["--layers", "2", "--embedding-type", "Q4_0"],
     "--embedding-type: only with --max-size-mb or --qat (the GGUF file the student is sized or trained for)"),
    (["--for-target", "phone", "--embedding-type", "Q4_0"],
     "--embedding-type: not with --for-target (the target's ladder decides the GGUF types)"),
    (["--max-size-mb", "5", "--quant", "F16", "--embedding-type", "Q4_0"],
     "--embedding-type: F16 is written by the converter, not quantized; choose a quantized --quant (Q4_K_M, ...)"),
    (["--max-size-mb", "5", "--embedding-type", "Q9"],
     "--embedding-type 'Q9': unknown; valid: F32, F16, BF16, Q8_0, Q6_K, Q5_K, Q5_1, Q5_0, Q4_K, Q4_1, Q4_0, IQ4_NL, "
     "IQ4_XS, Q3_K, Q2_K"),
])
def test_budget_options_refused(args, message, wide_teacher, task_files, tmp_path):
    from shrink.targets import DEFAULT_FILE

    teacher = wide_teacher("llama")
    r = invoke("distill", "--teacher", teacher, "--data", task_files["train"], "--out", tmp_path / "s",
               *[a.format(teacher=teacher) for a in args])
    assert r.exit_code == 2, r.output
    assert r.stderr.strip().splitlines() == ["Error: " + message.format(targets=DEFAULT_FILE)], r.stderr
    assert not (tmp_path / "s").exists()


def test_quant_must_be_a_modelled_type(wide_teacher, task_files, tmp_path):
    r = invoke("distill", "--teacher", wide_teacher("llama"), "--data", task_files["train"], "--out", tmp_path / "s",
               "--max-size-mb", "5", "--quant", "IQ2_XS")
    assert r.exit_code == 2 and "Invalid value for '--quant': 'IQ2_XS' is not one of 'F32', 'F16'" in r.stderr, r.stderr


def test_embedding_type_is_written_predicted_and_checked(tmp_path):
    """`shrink export --embedding-type` gives the token embedding its own type: llama.cpp
    writes it (a tied head included) and gguf_size predicts the file to the byte; a type
    whose blocks the rows do not fit is one error line naming the width and the types that
    do, before anything is written (llama.cpp itself would fail the whole file)."""
    family, layers, hidden = SHAPES["gemma3-3x384"]
    rows = tiny.toy_examples(40, seed=3)
    model_dir = tmp_path / "model"
    tok = tiny_families.build_tokenizer(model_dir, family, [r["prompt"] + r["completion"] for r in rows])
    model = tiny_families.build_model(family, tok, layers=layers, hidden=hidden)
    model.save_pretrained(model_dir)
    gqa = model.config.num_attention_heads // model.config.num_key_value_heads

    sizes = {}
    for emb in (None, "q4_0"):
        out = tmp_path / f"gguf-{emb}"
        result = invoke("export", model_dir, "--target", "gguf", "--quant", "Q4_K_M", "--out", out, "--threads", 1,
                        *(["--embedding-type", emb] if emb else []))
        assert result.exit_code == 0, result.output
        (path,) = out.glob("*.gguf")
        types, shapes, metadata = written(path)
        costs = tensor_costs(shapes, "Q4_K_M", layers, gqa, embedding=emb and emb.upper())
        assert {c.name: c.type for c in costs} == types
        assert file_bytes(metadata, costs) == os.path.getsize(path)
        assert json.loads((out / "manifest.json").read_text())["settings"]["embedding_type"] == (emb and emb.upper())
        sizes[emb] = (types["token_embd.weight"], os.path.getsize(path))
    assert sizes[None][0] == "Q8_0" and sizes["q4_0"][0] == "Q4_0"  # 384-wide rows: Q8_0 is llama.cpp's choice
    assert sizes["q4_0"][1] < sizes[None][1]

    result = invoke("export", model_dir, "--target", "gguf", "--quant", "Q4_K_M", "--embedding-type", "Q4_K",
                    "--out", tmp_path / "bad")
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        "Error: --embedding-type Q4_K: the token embedding's rows are 384 wide, not a multiple of Q4_K's 256-value "
        "blocks; types that fit: F32, F16, BF16, Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, IQ4_NL")
    assert not (tmp_path / "bad").exists()
    for args, message in ((("--quant", "F16", "--embedding-type", "Q4_0"), "--embedding-type: F16 is written by"),
                          (("--quant", "Q4_K_M", "--embedding-type", "Q9"), "--embedding-type 'Q9': unknown")):
        result = invoke("export", model_dir, "--target", "gguf", *args, "--out", tmp_path / "bad")
        assert result.exit_code == 2 and message in result.output, result.output
    result = invoke("export", model_dir, "--target", "onnx", "--embedding-type", "Q4_0", "--out", tmp_path / "bad")
    assert result.exit_code == 2 and "--embedding-type: only for --target gguf" in result.output


def test_a_budget_with_an_embedding_type_buys_what_the_export_writes(wide_teacher, task_files, tmp_path):
    """--max-size-mb with --embedding-type Q2_K sizes the file with that embedding (this
    untied Llama's is Q4_K under Q4_K_M otherwise): a limit between the two sizes of the
    widest 2-layer student takes it only with Q2_K (else 256 wide), and `shrink export
    --embedding-type Q2_K` writes the size and types the manifest predicted."""
    folder = wide_teacher("llama")
    teacher = load_causal_lm(folder)
    plain = Candidates(Budget(10**9, "Q4_K_M", False, None, "x"), config(folder), teacher, folder).size(2, 512)[0]
    q2_k = Candidates(Budget(10**9, "Q4_K_M", False, None, "x", "Q2_K"), config(folder), teacher, folder).size(2, 512)[0]
    assert q2_k < plain
    limit = (q2_k + plain) / 2 / 1e6
    for emb, hidden in ((None, 256), ("Q2_K", 512)):
        out = tmp_path / f"s-{emb}"
        r = invoke("distill", "--teacher", folder, "--data", task_files["train"], "--out", out, "--max-size-mb", limit,
                   "--steps", "2", "--batch-size", "8", "--device", "cpu", "--json",
                   *(["--embedding-type", emb] if emb else []))
        assert r.exit_code == 0, r.output
        budget = json.loads(r.stdout)["settings"]["size_budget"]
        assert (budget["layers"], budget["hidden_size"], budget["embedding_type"]) == (2, hidden, emb)
    r = invoke("export", tmp_path / "s-Q2_K", "--target", "gguf", "--embedding-type", "Q2_K", "--out", tmp_path / "q4",
               "--threads", "1")
    assert r.exit_code == 0, r.output
    real = os.path.getsize(tmp_path / "q4" / "model-Q4_K_M.gguf")
    assert real <= budget["limit_bytes"] and abs(real - budget["predicted_bytes"]) <= TOLERANCE, (real, budget)
    types, _, _ = written(tmp_path / "q4" / "model-Q4_K_M.gguf")
    assert {name: t for name, t, _ in budget["tensors"]} == types and types["token_embd.weight"] == "Q2_K"


def test_a_device_targets_embedding_type(teacher, task_files, tmp_path):
    """A target's `embedding_type` (targets.toml) gives every quantized GGUF rung's token
    embedding that type, as `shrink export --embedding-type` does, and leaves the rungs the
    converter writes (F16) as they are; the bundle's manifest records it per rung. A type
    the student's rows do not fit is one error line naming the file and key, before
    anything is built. `--for-target` sizes the student for the file with that embedding."""
    from shrink.distill.size_budget import budget_of

    def target(embedding: str, quants: str = '["F16", "Q8_0", "Q4_K_M"]') -> Path:
        path = tmp_path / f"targets-{embedding}.toml"
        path.write_text(f'[targets.tiny]\ndescription = "a test device"\nruntime = "llama.cpp"\nformats = ["gguf"]\n'
                        f'quants = {quants}\nthreads = 1\nmax_size_mb = 1000\nembedding_type = "{embedding}"\n')
        return path

    # The tiny teacher (a trained 256-wide Llama): llama.cpp gives its embedding Q4_K under Q4_K_M.
    r = invoke("export", teacher, "--target", "gguf", "--quant", "Q4_K_M", "--out", tmp_path / "plain")
    assert r.exit_code == 0, r.output
    assert written(tmp_path / "plain" / "model-Q4_K_M.gguf")[0]["token_embd.weight"] == "Q4_K"
    r = invoke("export", teacher, "--target", "tiny", "--targets", target("q8_0"), "--eval", task_files["eval"],
               "--out", tmp_path / "bundle", "--json")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["target"]["embedding_type"] == "Q8_0" and m["settings"]["quant"] == "Q4_K_M"  # the smallest rung
    assert {c["quant"]: c.get("embedding_type") for c in m["metrics"]["candidates"]} == {
        "F16": None, "Q8_0": "Q8_0", "Q4_K_M": "Q8_0"}
    assert m["settings"]["embedding_type"] == "Q8_0"
    assert written(tmp_path / "bundle" / "model-Q4_K_M.gguf")[0]["token_embd.weight"] == "Q8_0"

    family, layers, hidden = SHAPES["gemma3-3x384"]  # rows of 384 take no 256-value block
    rows = tiny.toy_examples(40, seed=3)
    model_dir = tmp_path / "model"
    tok = tiny_families.build_tokenizer(model_dir, family, [r["prompt"] + r["completion"] for r in rows])
    tiny_families.build_model(family, tok, layers=layers, hidden=hidden).save_pretrained(model_dir)
    bad = target("Q4_K")
    r = invoke("export", model_dir, "--target", "tiny", "--targets", bad, "--eval", task_files["eval"],
               "--out", tmp_path / "no")
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1] == (
        f"Error: {bad}: targets.tiny.embedding_type Q4_K: the token embedding's rows are 384 wide, not a multiple of "
        "Q4_K's 256-value blocks; types that fit: F32, F16, BF16, Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, IQ4_NL")
    assert not (tmp_path / "no").exists() and not list(tmp_path.glob(".no*"))

    budget = budget_of(config(model_dir, for_target="tiny", targets_file=target("q4_0", '["Q4_K_M", "Q8_0"]')))
    assert (budget.quant, budget.embedding) == ("Q4_K_M", "Q4_0")
    assert budget.origin == "--for-target tiny (max_size_mb 1000, Q4_K_M, embedding_type Q4_0)"
