"""Tiny teachers of six families, each with the tokenizer files its real models ship.

| family  | model class        | tokenizer files (as on the Hub)                                         |
|---------|--------------------|-------------------------------------------------------------------------|
| llama   | LlamaForCausalLM   | SentencePiece tokenizer.model + tokenizer.json (Llama 2)                 |
| mistral | MistralForCausalLM | SentencePiece tokenizer.model + tokenizer.json, [INST] chat template     |
| phi3    | Phi3ForCausalLM    | SentencePiece tokenizer.model + added tokens after it (<|end|>, ...)     |
| gemma3  | Gemma3ForCausalLM  | SentencePiece tokenizer.model without a dummy prefix, turn markers       |
| qwen2   | Qwen2ForCausalLM   | byte-level BPE tokenizer.json only (NFC + Qwen2's split regex), ChatML  |
| qwen3   | Qwen3ForCausalLM   | the same tokenizer as qwen2                                              |

The SentencePiece models are trained here (SentencePieceTrainer, BPE, byte fallback) on
the toy task; tokenizer.json is derived from them as the Hub's files are (vocabulary and
merges from the model's pieces; Llama 2's Prepend + Replace normalizer, Gemma's Replace).
Every family also ships special_tokens_map.json, a chat template and generation_config.json.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

import tiny

QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

LLAMA_TEMPLATE = "{% for m in messages %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]{% endfor %}"
PHI3_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|>\n{% else %}<|assistant|>\n{% endif %}"
                 "{{ m['content'] }}<|end|>\n{% endfor %}<|assistant|>\n")
GEMMA_TEMPLATE = "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
CHATML_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


@dataclass(frozen=True)
class Family:
    tokenizer: str  # "sentencepiece" (tokenizer.model + tokenizer.json) or "byte-bpe" (tokenizer.json)
    tokenizer_class: str  # tokenizer_config.json's tokenizer_class, as the family's repositories name it
    specials: tuple[str, ...]  # control pieces at the start of the vocabulary, in id order
    bos: str | None
    eos: str
    template: str  # chat template
    dummy_prefix: bool = True  # SentencePiece adds '▁' before the text (Llama) or not (Gemma)
    user_defined: tuple[str, ...] = ()  # pieces of the SentencePiece model matched as whole tokens
    added: tuple[str, ...] = ()  # added tokens after the SentencePiece pieces (Phi-3)
    extra_eos: tuple[str, ...] = ()  # generation_config.json's other end-of-generation tokens
    template_file: bool = False  # chat_template.jinja (newer repositories) instead of tokenizer_config.json
    sampling: dict = field(default_factory=dict)  # generation_config.json's sampling defaults


FAMILIES = {
    "llama": Family("sentencepiece", "LlamaTokenizer", ("<unk>", "<s>", "</s>"), "<s>", "</s>", LLAMA_TEMPLATE,
                    sampling={"temperature": 0.6, "top_p": 0.9}),
    "mistral": Family("sentencepiece", "LlamaTokenizer", ("<unk>", "<s>", "</s>"), "<s>", "</s>", LLAMA_TEMPLATE,
                      template_file=True),
    "phi3": Family("sentencepiece", "LlamaTokenizer", ("<unk>", "<s>", "</s>"), "<s>", "<|endoftext|>", PHI3_TEMPLATE,
                   added=("<|endoftext|>", "<|assistant|>", "<|user|>", "<|end|>"), extra_eos=("<|end|>",)),
    "gemma3": Family("sentencepiece", "GemmaTokenizer", ("<pad>", "<eos>", "<bos>", "<unk>"), "<bos>", "<eos>",
                     GEMMA_TEMPLATE, dummy_prefix=False, user_defined=("<start_of_turn>", "<end_of_turn>"),
                     extra_eos=("<end_of_turn>",), template_file=True, sampling={"top_k": 64, "top_p": 0.95}),
    "qwen2": Family("byte-bpe", "Qwen2Tokenizer", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None,
                    "<|endoftext|>", CHATML_TEMPLATE, extra_eos=("<|im_end|>",)),
    "qwen3": Family("byte-bpe", "Qwen2Tokenizer", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None,
                    "<|endoftext|>", CHATML_TEMPLATE, extra_eos=("<|im_end|>",), template_file=True),
}


def train_sentencepiece(corpus: list[str], fam: Family, vocab_size: int = 400, model_type: str = "bpe") -> bytes:
    """A SentencePiece model (serialized ModelProto; BPE unless `model_type` says
    otherwise) with byte fallback, trained in memory."""
    import sentencepiece as spm

    ids = {"unk_id": fam.specials.index("<unk>"), "bos_id": fam.specials.index(fam.bos),
           "eos_id": fam.specials.index(fam.eos if fam.eos in fam.specials else "</s>"),
           "pad_id": fam.specials.index("<pad>") if "<pad>" in fam.specials else -1}
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=out, vocab_size=vocab_size, model_type=model_type,
        byte_fallback=True, character_coverage=1.0, split_digits=True, add_dummy_prefix=fam.dummy_prefix,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, normalization_rule_name="identity",
        user_defined_symbols=list(fam.user_defined), minloglevel=2, num_threads=1, **ids,
    )
    return out.getvalue()


def sentencepiece_tokenizer_json(model: bytes, fam: Family):
    """tokenizer.json for a SentencePiece BPE model, laid out as the Hub's Llama 2 / Gemma files."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers.tokenization_utils_base import generate_merges

    proto = pb.ModelProto()
    proto.ParseFromString(model)
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    scores = {p.piece: p.score for p in proto.pieces if p.type == 1}  # normal pieces merge by score
    merges = generate_merges(vocab, scores)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    if fam.dummy_prefix:  # Llama 2: '▁' before the text, spaces as '▁', no pre-tokenizer
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        strip = [decoders.Strip(" ", 1, 0)]
    else:  # Gemma: spaces as '▁', nothing before the text
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
        strip = []
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in fam.specials])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in fam.user_defined + fam.added])
    bos_id = tok.token_to_id(fam.bos)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{fam.bos} $A", pair=f"{fam.bos} $A {fam.bos} $B", special_tokens=[(fam.bos, bos_id)])
    return tok


def byte_bpe_tokenizer_json(corpus: list[str], fam: Family, vocab_size: int = 600):
    """A byte-level BPE with Qwen2's normalizer and pre-tokenizer, trained on `corpus`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in fam.specials])
    return tok


def build_tokenizer(folder: Path, family: str, corpus: list[str]):
    """Write the family's tokenizer files into `folder`; returns the tokenizer as loaded back."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    fam = FAMILIES[family]
    folder.mkdir(parents=True, exist_ok=True)
    if fam.tokenizer == "sentencepiece":
        model = train_sentencepiece(corpus, fam)
        (folder / "tokenizer.model").write_bytes(model)
        backend = sentencepiece_tokenizer_json(model, fam)
    else:
        backend = byte_bpe_tokenizer_json(corpus, fam)
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=fam.bos, eos_token=fam.eos,
                                 unk_token="<unk>" if "<unk>" in fam.specials else None,
                                 pad_token="<pad>" if "<pad>" in fam.specials else None)
    hf.chat_template = fam.template
    hf.save_pretrained(folder)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = fam.tokenizer_class
    config["added_tokens_decoder"] = {  # as the Hub's files list them (transformers 5 no longer writes them)
        str(i): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": t.special} for i, t in sorted(hf.added_tokens_decoder.items())}
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    if fam.template_file:
        (folder / "chat_template.jinja").write_text(fam.template)
        config.pop("chat_template", None)
    else:
        config["chat_template"] = fam.template
    config_file.write_text(json.dumps(config, indent=2))
    specials = {"bos_token": fam.bos, "eos_token": fam.eos,
                "additional_special_tokens": list(fam.added + fam.user_defined)}
    (folder / "special_tokens_map.json").write_text(json.dumps({k: v for k, v in specials.items() if v}, indent=2))
    return AutoTokenizer.from_pretrained(folder)


def build_model(family: str, tokenizer, layers: int = 2, hidden: int = 64, seed: int = 0):
    """A tiny model of the family, its special token ids from `tokenizer`."""
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                              Qwen3Config, Qwen3ForCausalLM)

    torch.manual_seed(seed)
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **common))
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(num_key_value_heads=2, sliding_window=None, **common))
    if family == "phi3":
        return Phi3ForCausalLM(Phi3Config(num_key_value_heads=4, original_max_position_embeddings=256, **common))
    if family == "gemma3":
        return Gemma3ForCausalLM(Gemma3TextConfig(
            num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
            layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"], **common))
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **common))
    if family == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, **common))
    raise ValueError(family)


def make_teacher(folder: Path, family: str, rows: list[dict], steps: int = 30, layers: int = 2,
                 hidden: int = 64) -> Path:
    """A briefly trained tiny teacher of `family` saved with its tokenizer files and generation config."""
    fam = FAMILIES[family]
    corpus = [r["prompt"] + r["completion"] for r in rows] + tiny.PARITY_SUITE
    tok = build_tokenizer(folder, family, corpus)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = build_model(family, tok, layers=layers, hidden=hidden)
    tiny.train_lm(model, tok, rows, steps=steps, lr=3e-3)
    model.save_pretrained(folder)
    eos = [tok.convert_tokens_to_ids(t) for t in (fam.eos, *fam.extra_eos)]
    generation = {"bos_token_id": tok.bos_token_id, "eos_token_id": eos if len(eos) > 1 else eos[0],
                  "pad_token_id": tok.pad_token_id, **fam.sampling}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return folder
