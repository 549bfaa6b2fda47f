"""The teacher's tokenizer files in the student folder.

A transformers 5 tokenizer's `save_pretrained` writes tokenizer.json, tokenizer_config.json
and the chat template, nothing else. The teacher's other files still apply to a student
that reads the same tokens: llama.cpp's converter reads the SentencePiece tokenizer.model
of Llama, Mistral, Gemma 3 and Phi-3 (Phi-3 cannot be converted without it; Gemma 3
without it is taken for a byte-level BPE), and generation_config.json holds the
end-of-generation tokens and sampling defaults (the student's own is made from its config).

With --prune-vocab the student's token ids are the kept teacher ids, renumbered
(shrink.distill.prune_vocab): every file that names ids or pieces is rewritten to match
or, where that cannot be done, left out with the reason recorded in the manifest
(settings.tokenizer_files).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from shrink.errors import ShrinkError

# The teacher's files a student keeps, and what a pruned vocabulary does to each.
TEACHER_FILES = {
    "tokenizer.model": "SentencePiece model: its pieces cut to the kept tokens, in order",
    "special_tokens_map.json": "token strings only: kept as it is",
    "generation_config.json": "token ids renumbered; ids of tokens not kept are removed",
    "added_tokens.json": "token ids renumbered; tokens not kept are removed",
    "vocab.json": "removed: another encoding of the full vocabulary (tokenizer.json holds the pruned one)",
    "merges.txt": "removed: another encoding of the full vocabulary (tokenizer.json holds the pruned one)",
}
# tokenizer_config.json is the student tokenizer's own; of the teacher's, one key is carried
# over: transformers 5 no longer writes added_tokens_decoder, from which llama.cpp's
# converter learns which added tokens are control tokens (never matched in plain text).
ADDED_TOKENS_KEY = "added_tokens_decoder"
SENTENCEPIECE_BPE = 2  # TrainerSpec.ModelType.BPE in sentencepiece_model.proto


def check_teacher_files(teacher_dir: Path, student_dir: Path | None, prune_vocab: bool) -> None:
    """Before training: refuse a teacher whose students llama.cpp's converter could not
    export (its family's architecture or vocabulary), and a --prune-vocab whose
    tokenizer.model could not be rewritten to the pruned vocabulary."""
    from shrink.export.gguf_convert import check_convertible

    check_convertible(Path(teacher_dir), Path(student_dir) if student_dir else None)
    model_file = Path(teacher_dir) / "tokenizer.model"
    if prune_vocab and model_file.is_file():
        proto = _sentencepiece(model_file)
        why = _not_rewritable(proto, Path(teacher_dir)) if proto is not None else None
        if why:
            raise ShrinkError(f"--prune-vocab: the teacher's tokenizer.model cannot follow a pruned vocabulary ({why}); "
                              "distill without --prune-vocab")


def keep_teacher_files(teacher_dir: Path, student_dir: Path, plan=None) -> dict[str, str]:
    """Copy the teacher's TEACHER_FILES into the student folder (rewritten for a pruned
    vocabulary `plan`); returns what happened to each file the teacher has, for the
    manifest. The chat template is the tokenizer's own (save_pretrained writes it)."""
    teacher_dir, student_dir = Path(teacher_dir), Path(student_dir)
    new_id = {old: new for new, old in enumerate(plan.kept)} if plan else None
    done: dict[str, str] = {}
    for name in TEACHER_FILES:
        src, dst = teacher_dir / name, student_dir / name
        if not src.is_file():
            continue
        if new_id is None or name == "special_tokens_map.json":
            shutil.copyfile(src, dst)
            done[name] = "kept"
        elif name == "tokenizer.model":
            done[name] = _prune_sentencepiece(src, dst, plan, teacher_dir)
        elif name in ("generation_config.json", "added_tokens.json"):
            done[name] = _renumber_json(src, dst, new_id)
        else:
            dst.unlink(missing_ok=True)
            done[name] = TEACHER_FILES[name]
    if ADDED_TOKENS_KEY in _read_json(teacher_dir / "tokenizer_config.json"):
        done[f"tokenizer_config.json {ADDED_TOKENS_KEY}"] = _carry_added_tokens(teacher_dir, student_dir, new_id)
    if _chat_template(teacher_dir):
        done["chat_template"] = "kept" if _chat_template(student_dir) else "removed: the tokenizer did not save it"
    return done


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    return bool(_read_json(folder / "tokenizer_config.json").get("chat_template"))


def _carry_added_tokens(teacher_dir: Path, student_dir: Path, new_id: dict[int, int] | None) -> str:
    """The teacher's added_tokens_decoder in the student's tokenizer_config.json (ids
    renumbered for a pruned vocabulary)."""
    entries = _read_json(teacher_dir / "tokenizer_config.json")[ADDED_TOKENS_KEY]
    config_file = student_dir / "tokenizer_config.json"
    config = _read_json(config_file)
    dropped = []
    if new_id is not None:
        dropped = [e["content"] for i, e in entries.items() if int(i) not in new_id]
        entries = {str(new_id[int(i)]): e for i, e in entries.items() if int(i) in new_id}
    config[ADDED_TOKENS_KEY] = entries
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return "kept" if new_id is None else _renumbered(dropped)


def _renumbered(dropped: list[str]) -> str:
    """What a rewrite for the pruned vocabulary did, naming a few of what it removed."""
    if not dropped:
        return "rewritten: ids renumbered"
    named = ", ".join(dropped) if len(dropped) <= 5 else f"{len(dropped):,} tokens"
    return f"rewritten: ids renumbered; not in the pruned vocabulary, removed: {named}"


def _sentencepiece(path: Path):
    """The ModelProto in `path`, or None when it is not a SentencePiece model (tiktoken's
    tokenizer.model is a text file)."""
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except DecodeError:
        return None
    return proto if len(proto.pieces) else None


def _not_rewritable(proto, teacher_dir: Path) -> str | None:
    """Why this SentencePiece model cannot be cut to a pruned vocabulary, or None. Pruning
    keeps every piece BPE builds on the way to a kept token, so BPE encodes kept text as
    before; a unigram model segments by probabilities over all pieces instead. The cut
    model's piece i must be the student's token i, so the model's pieces must be
    tokenizer.json's first tokens, in the same order."""
    if proto.trainer_spec.model_type != SENTENCEPIECE_BPE:
        return "it is not a BPE model"
    spec = _read_json(teacher_dir / "tokenizer.json")
    if "model" not in spec:
        return "there is no readable tokenizer.json beside it"
    tokens = {i: t for t, i in spec["model"].get("vocab", {}).items()}
    tokens.update({a["id"]: a["content"] for a in spec.get("added_tokens", [])})
    for i, piece in enumerate(proto.pieces):
        if tokens.get(i) != piece.piece:
            return f"its piece {i} is {piece.piece!r}, tokenizer.json's token {i} is {tokens.get(i)!r}"
    return None


def _prune_sentencepiece(src: Path, dst: Path, plan, teacher_dir: Path) -> str:
    """Write the teacher's SentencePiece model cut to the kept pieces (scores and types
    unchanged, so merges keep their order), or say why it is left out."""
    import sentencepiece as spm

    proto = _sentencepiece(src)
    if proto is None:
        return "removed: not a SentencePiece model, so it cannot be cut to the pruned vocabulary"
    why = _not_rewritable(proto, teacher_dir)
    if why:
        return f"removed: {why}"
    count = len(proto.pieces)
    kept = [i for i in plan.kept if i < count]  # ids past the pieces are added tokens (Phi-3's <|end|>)
    pieces = [proto.pieces[i] for i in kept]
    new_id = {old: new for new, old in enumerate(kept)}
    spec = proto.trainer_spec
    for field in ("unk_id", "bos_id", "eos_id", "pad_id"):
        if getattr(spec, field) >= 0:
            setattr(spec, field, new_id.get(getattr(spec, field), -1))
    spec.vocab_size = len(pieces)
    del proto.pieces[:]
    proto.pieces.extend(pieces)
    # The only field this sentencepiece_model_pb2 does not know is self_test_data: sample
    # texts with their pieces in the full vocabulary, which sentencepiece checks at load.
    proto.DiscardUnknownFields()
    data = proto.SerializeToString()
    try:
        spm.SentencePieceProcessor(model_proto=data)
    except RuntimeError as e:  # sentencepiece checks its own invariants (byte pieces, unk)
        return f"removed: the cut model does not load in sentencepiece ({e})"
    dst.write_bytes(data)
    return f"rewritten: {len(pieces):,} of {count:,} pieces"


def _renumber_json(src: Path, dst: Path, new_id: dict[int, int]) -> str:
    """generation_config.json (keys *_token_id: an id or a list) or added_tokens.json
    (token -> id) with the student's ids; names what had to go."""
    data = _read_json(src)
    dropped = []
    if src.name == "added_tokens.json":
        dropped = [t for t, i in data.items() if i not in new_id]
        data = {t: new_id[i] for t, i in data.items() if i in new_id}
    else:
        for key, value in list(data.items()):
            if not key.endswith("token_id") or value is None:
                continue
            ids = value if isinstance(value, list) else [value]
            dropped += [f"{key} {i}" for i in ids if i not in new_id]
            kept = [new_id[i] for i in ids if i in new_id]
            data[key] = kept if isinstance(value, list) else (kept[0] if kept else None)
    dst.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return _renumbered(dropped)
