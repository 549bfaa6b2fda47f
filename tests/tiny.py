"""Tiny models, tokenizers and a toy task, built from scratch for the tests (no downloads).

The toy task is sentiment of short made-up reviews: a sentence built from a positive or a
negative opinion word inside varied filler, labelled " positive" / " negative". A 4-layer,
256-wide Llama learns it in a few seconds on the CPU, so accuracies mean something.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

POSITIVE = ["great", "wonderful", "excellent", "lovely", "superb", "fantastic", "delightful", "perfect"]
NEGATIVE = ["awful", "terrible", "horrible", "dreadful", "poor", "broken", "disappointing", "useless"]
SUBJECTS = ["the phone", "this blender", "the hotel room", "our dinner", "the service", "my new shoes",
            "the movie", "that laptop", "the coffee", "this book", "the delivery", "the concert"]
FILLERS = ["honestly", "to be fair", "as expected", "once again", "this week", "overall",
           "in the end", "for the price", "", "", "really", "quite"]
CHOICES = [" positive", " negative"]

# Text the tokenizer must agree on across runtimes: accents, CJK, emoji, code, whitespace.
PARITY_SUITE = [
    "the phone was great",
    "Ünïcödé façade naïve café",
    "日本語のテキスト and 中文",
    "emoji 🙂🚀 mixed in",
    "tabs\tand\nnewlines\n\nhere",
    "  leading and  double  spaces ",
    "code: def f(x): return x ** 2  # comment",
    "numbers 1234567890 3.14159 -42",
    "<s> and </s> typed as text",
    "MiXeD CaSe WORDS",
    "punctuation!?;:'\"()[]{}",
    "a",
]


def review(rng: random.Random, label: str) -> str:
    word = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
    subject = rng.choice(SUBJECTS)
    filler = rng.choice(FILLERS)
    shapes = [
        f"{subject} was {word}",
        f"{filler} {subject} was {word}".strip(),
        f"I found {subject} {word} {filler}".strip(),
        f"{word}, {subject} {filler}".strip(),
    ]
    return rng.choice(shapes)


def toy_examples(n: int, seed: int, choices: bool = True) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        ex = {"prompt": f"Review: {review(rng, label)}\nSentiment:", "completion": f" {label}"}
        if choices:
            ex["choices"] = list(CHOICES)
        out.append(ex)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def build_tokenizer(folder: Path, corpus: list[str], vocab_size: int = 512):
    """A SentencePiece-style BPE (Llama 2 / Gemma family): '▁' for spaces, byte fallback,
    BOS added. Saved as tokenizer.json, which llama.cpp's converter reads (LlamaHfVocab)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    # Train the merges first, then lay the vocabulary out as Llama 2 does: specials,
    # then the 256 byte tokens as ordinary entries (not added tokens), then the pieces.
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # Split on '▁' only while training, so that no merge crosses a word boundary (as
    # SentencePiece does); llama.cpp's SPM tokenizer has no such split at run time.
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    alphabet = sorted(set("".join(corpus).replace(" ", "▁")) | set("▁"))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False,
    )
    trainer_tok.train_from_iterator(corpus, trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    pieces = [t for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]) if t not in specials]
    vocab = {t: i for i, t in enumerate(specials + byte_tokens + [p for p in pieces if p not in byte_tokens])}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = trainer_tok.normalizer
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    hf.save_pretrained(folder)
    return hf


def build_llama(folder: Path, tokenizer, layers: int = 4, hidden: int = 256, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def train_lm(model, tokenizer, rows: list[dict], steps: int, seed: int = 0, lr: float = 1e-3) -> None:
    """Plain next-token training on prompt+completion+EOS, to make a teacher that knows the task."""
    rng = random.Random(seed)
    texts = [r["prompt"] + r["completion"] for r in rows]
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        batch = rng.sample(texts, 16)
        enc = [tokenizer(t).input_ids + [tokenizer.eos_token_id] for t in batch]
        width = max(map(len, enc))
        ids = torch.tensor([e + [tokenizer.pad_token_id] * (width - len(e)) for e in enc])
        mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc])
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def make_teacher(folder: Path, train_rows: list[dict], steps: int = 200, layers: int = 4) -> Path:
    """A trained tiny teacher saved as a Hugging Face folder (config, safetensors, tokenizer)."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus = [r["prompt"] + r["completion"] for r in train_rows] + PARITY_SUITE
    tokenizer = build_tokenizer(folder, corpus)
    model = build_llama(folder, tokenizer, layers=layers)
    train_lm(model, tokenizer, train_rows, steps=steps)
    model.save_pretrained(folder)
    return folder


def build_qwen2(folder: Path, tokenizer, layers: int = 2, hidden: int = 128, seed: int = 0):
    """A tiny Qwen2: biases on q/k/v and a tied embedding, as the small Qwen2 models."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config)


def build_gemma3(folder: Path, tokenizer, layers: int = 2, hidden: int = 128, seed: int = 0,
                 sliding_window: int = 16):
    """A tiny Gemma 3 text model: sliding-window layers then one global layer (each with its
    own RoPE base), a tied embedding, and a window short enough for tests to go past it."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
        query_pre_attn_scalar=32, sliding_window=sliding_window,
        layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
        max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return Gemma3ForCausalLM(config)


def corrupted_copy(model_dir: Path, dst: Path) -> Path:
    """A copy of a Hugging Face folder with one weight corrupted (layer 1's MLP down
    projection scaled by -3): the planted mismatch every export's parity check must catch."""
    import shutil

    from shrink.hf import load_causal_lm

    shutil.copytree(model_dir, dst)
    model = load_causal_lm(dst)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(-3.0)
    model.save_pretrained(dst)
    return dst
