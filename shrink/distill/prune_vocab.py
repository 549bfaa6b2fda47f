"""Task-vocabulary pruning for BPE tokenizers (tokenizer.json).

A student cut from a large-vocabulary teacher is mostly embeddings (Gemma 3 270M:
262,144 x 640). A task needs few of those tokens. We keep:

- every token the teacher's tokenizer produces on the task texts,
- every intermediate token BPE builds on the way to those tokens (so the same merges
  still fire: a text made of kept tokens encodes to the same pieces as before),
- the special tokens, the added tokens the chat template writes, the few tokens
  llama.cpp looks up by name (LLAMA_CPP_NAMED), and the byte-fallback tokens (so any
  text still encodes, in smaller pieces).

Kept tokens keep their relative order, so merge priorities are unchanged. Merges whose
two parts and result are all kept stay, in their original order.

Why that is enough: on a task text, every merge the original tokenizer applies has its
parts and result among the kept tokens, so it is still in the list. It was the
lowest-ranked applicable merge among all merges, so it is also the lowest among the
kept ones, and the two tokenizers take the same steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from shrink.errors import ShrinkError

BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]  # SentencePiece-style byte fallback
# Tokens llama.cpp looks up by name when it loads a model whose name says Phi-3 (its
# per-token attributes, src/llama-vocab.cpp: token_to_id.at("</s>")): a vocabulary without
# them does not load. Kept whenever the teacher has them.
LLAMA_CPP_NAMED = ("<unk>", "<s>", "</s>", "<|endoftext|>")


@dataclass(frozen=True)
class VocabPruning:
    kept: list[int]  # teacher token ids kept, ascending; the student's id i is kept[i]
    teacher_vocab_size: int

    def id_map(self):
        """LongTensor: teacher id -> student id (-1 where the token was dropped)."""
        import torch

        m = torch.full((self.teacher_vocab_size,), -1, dtype=torch.long)
        m[torch.tensor(self.kept)] = torch.arange(len(self.kept))
        return m


def byte_level_alphabet() -> list[str]:
    """GPT-2's bytes_to_unicode: the 256 one-character tokens of byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _merge_pairs(merges: list) -> list[tuple[str, str]]:
    # tokenizer.json stores merges as ["a", "b"] lists (new) or "a b" strings (old).
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]


def bpe_steps(token: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """The tokens BPE creates when it encodes `token` alone, from its characters up.
    A token that ends a word in context is built by exactly these merges there too."""
    symbols = list(token)
    created = list(symbols)
    while len(symbols) > 1:
        best, at = None, -1
        for i in range(len(symbols) - 1):
            r = ranks.get((symbols[i], symbols[i + 1]))
            if r is not None and (best is None or r < best):
                best, at = r, i
        if best is None:
            break
        symbols[at : at + 2] = [symbols[at] + symbols[at + 1]]
        created.append(symbols[at])
    return created


def plan_pruning(tokenizer, texts: list[str], eos_token_id: int | list[int] | None = None,
                 top: int = 0) -> VocabPruning:
    """Choose the kept tokens for `texts` (prompts + completions as the model sees them).
    `eos_token_id`: the generation config's (one id or a list); every id that ends a
    generation is kept, special token or not. `top`: the first `top` ids are kept too (a
    BPE vocabulary lists its pieces by merge rank, so these are its most frequent ones:
    general words the training text lacks keep tokens of their own)."""
    from shrink.runtime.base import end_of_generation

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ShrinkError(f"--prune-vocab supports BPE tokenizers; this tokenizer is {model.get('type')}")
    vocab: dict[str, int] = model["vocab"]
    ranks = {pair: r for r, pair in enumerate(_merge_pairs(model["merges"]))}
    id_to_token = {i: t for t, i in vocab.items()}
    for added in spec.get("added_tokens", []):
        id_to_token[added["id"]] = added["content"]
    added_ids = {a["id"] for a in spec.get("added_tokens", [])}

    used: set[int] = set()
    for text in texts:
        used.update(tokenizer(text, split_special_tokens=True, add_special_tokens=True).input_ids)
    used.update(i for i in range(min(top, max(id_to_token) + 1)) if i in id_to_token and i not in added_ids)
    kept = set(used) | end_of_generation(eos_token_id, tokenizer)
    for token_id in used:
        if token_id in added_ids:
            continue
        for piece in bpe_steps(id_to_token[token_id], ranks):
            if piece in vocab:
                kept.add(vocab[piece])
    kept.update(i for i in tokenizer.all_special_ids if i is not None)
    kept.update(added_in_chat_template(tokenizer, spec))
    kept.update(i for i, t in id_to_token.items() if t in LLAMA_CPP_NAMED)
    fallback = BYTE_TOKENS if model.get("byte_fallback") else byte_level_alphabet()
    kept.update(vocab[t] for t in fallback if t in vocab)
    size = max(len(tokenizer), max(id_to_token) + 1)
    return VocabPruning(kept=sorted(kept), teacher_vocab_size=size)


def added_in_chat_template(tokenizer, spec: dict) -> set[int]:
    """The added tokens the chat template writes (<start_of_turn>, <|im_end|>, ...): kept so
    that the template still applies and its end-of-turn tokens still end generation."""
    templates = tokenizer.chat_template or ""
    text = templates if isinstance(templates, str) else "\n".join(templates.values())
    return {a["id"] for a in spec.get("added_tokens", []) if a["content"] and a["content"] in text}


def pruned_tokenizer_json(tokenizer, plan: VocabPruning) -> str:
    """The teacher's tokenizer.json with only the kept tokens, renumbered, and the merges
    among them."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    new_id = {old: new for new, old in enumerate(plan.kept)}
    model = spec["model"]
    model["vocab"] = {t: new_id[i] for t, i in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if i in new_id}
    kept_tokens = set(model["vocab"])
    for added in spec.get("added_tokens", []):
        if added["id"] in new_id:
            kept_tokens.add(added["content"])
    pairs = _merge_pairs(model["merges"])
    model["merges"] = [[a, b] for a, b in pairs if a in kept_tokens and b in kept_tokens and a + b in kept_tokens]
    spec["added_tokens"] = [
        {**a, "id": new_id[a["id"]]} for a in spec.get("added_tokens", []) if a["id"] in new_id
    ]
    _remap_post_processor(spec.get("post_processor"), new_id)
    return json.dumps(spec, ensure_ascii=False)


def _remap_post_processor(pp: dict | None, new_id: dict[int, int]) -> None:
    """TemplateProcessing stores special-token ids; renumber them (recursively for Sequence)."""
    if not pp:
        return
    for sub in pp.get("processors", []) or []:
        _remap_post_processor(sub, new_id)
    for entry in (pp.get("special_tokens") or {}).values():
        if "ids" in entry:
            entry["ids"] = [new_id[i] for i in entry["ids"]]


def save_pruned_tokenizer(tokenizer, plan: VocabPruning, folder: Path):
    """Write the pruned tokenizer into `folder` with the teacher's tokenizer settings, and
    return it loaded back as a transformers tokenizer."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(folder)  # tokenizer_config.json, special tokens map, ...
    Tokenizer.from_str(pruned_tokenizer_json(tokenizer, plan)).save(str(Path(folder) / "tokenizer.json"))
    for stale in ("tokenizer.model", "vocab.json", "merges.txt"):  # other encodings of the full vocab
        (Path(folder) / stale).unlink(missing_ok=True)
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def prune_model(model, plan: VocabPruning) -> None:
    """Keep only the kept rows of the input embeddings and the output head, in place, and
    renumber the special token ids in the config."""
    import torch

    rows = torch.tensor(plan.kept)
    emb = model.get_input_embeddings()
    new_emb = torch.nn.Embedding(len(plan.kept), emb.weight.shape[1], dtype=emb.weight.dtype)
    new_emb.weight.data.copy_(emb.weight.data[rows])
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is emb.weight
    head = model.get_output_embeddings()
    model.set_input_embeddings(_like(emb, new_emb))
    if head is not None and not tied:
        new_head = torch.nn.Linear(head.weight.shape[1], len(plan.kept), bias=head.bias is not None, dtype=head.weight.dtype)
        new_head.weight.data.copy_(head.weight.data[rows])
        if head.bias is not None:
            new_head.bias.data.copy_(head.bias.data[rows])
        model.set_output_embeddings(new_head)
    elif tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    new_id = {old: new for new, old in enumerate(plan.kept)}
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.vocab_size = len(plan.kept)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
            _remap_attr(config, key, new_id)
    if getattr(model, "generation_config", None) is not None:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            _remap_attr(model.generation_config, key, new_id)


def _like(old, new):
    """Keep the embedding's class (Gemma scales embeddings in a subclass) when possible."""
    if type(old) is type(new):
        return new
    old.weight = new.weight
    old.num_embeddings = new.num_embeddings
    return old


def _remap_attr(obj, key: str, new_id: dict[int, int]) -> None:
    value = getattr(obj, key, None)
    if value is None:
        return
    if isinstance(value, list):
        setattr(obj, key, [new_id[v] for v in value if v in new_id] or None)
    else:
        setattr(obj, key, new_id.get(value))
