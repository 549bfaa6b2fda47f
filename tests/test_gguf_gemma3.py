"""Gemma 3 students through llama.cpp: a cut that breaks Gemma 3's fixed pattern of
sliding-window layers must still compute what torch computes (the layer pattern is
written into the GGUF; without it llama.cpp used the wrong RoPE base for some layers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny
from shrink.distill.student import cut_student
from shrink.export.gguf_convert import convert_hf_to_gguf
from shrink.runtime.llama_cpp import LlamaCppRuntime


def test_cut_gemma3_matches_torch_in_llama_cpp(tmp_path, task_files):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    rows = tiny.toy_examples(50, seed=5)
    tok = tiny.build_tokenizer(tmp_path / "t", [r["prompt"] + r["completion"] for r in rows])
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=1, head_dim=64, sliding_window=512,
        query_pre_attn_scalar=64,  # = head_dim, as in Gemma 3 270M (llama.cpp scales by head_dim)
        max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    teacher = Gemma3ForCausalLM(config).eval()
    assert teacher.config.layer_types[5] == "full_attention"
    student = cut_student(teacher, [0, 3, 5])  # layer 2 is global here; Gemma 3's rule says sliding
    assert student.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    folder = tmp_path / "student"
    student.save_pretrained(folder)
    tok.save_pretrained(folder)
    convert_hf_to_gguf(folder, tmp_path / "s.gguf", "f32", tokenizer_pre="default")

    ids = [tok.bos_token_id] + list(range(300, 340))
    with torch.no_grad():
        expected = student(torch.tensor([ids])).logits[0].numpy()  # (seq, vocab)
    rt = LlamaCppRuntime(tmp_path / "s.gguf", threads=1)
    try:
        got = rt.logits(ids)
    finally:
        rt.close()
    scale = np.abs(expected).max()
    # measured 5e-4 with the layer pattern written, 0.12 without it
    assert np.abs(got - expected).max() / scale < 3e-3
    assert (got.argmax(-1) == expected.argmax(-1)).all()
