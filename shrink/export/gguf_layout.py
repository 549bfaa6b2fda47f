"""What llama.cpp's converter would write for a model, without writing it: the GGUF's
tensor names and shapes, and the bytes of its header and key-values (the vocabulary
above all). shrink.quantize.gguf_size turns these into the size of the quantized file;
the size budget of `shrink distill --max-size-mb` uses both before any student exists.

- Tensors: each weight of a Hugging Face model (a model on the meta device will do:
  only names and shapes are read) under the name the converter's tensor map gives it
  (blk.N.attn_q.weight, token_embd.weight, ...), its shape unchanged (the dense families
  shrink distills are written that way); a head tied to the embeddings is not written.
  Tensors the converter generates from the config alone (Llama 3's rope_freqs, a few
  hundred bytes) are not listed.
- Key-values: the converter's own, computed for a model folder and measured by writing
  them (the model's parameters, its vocabulary, the layer pattern and stop ids shrink
  adds). For a vocabulary pruned to `kept` ids, the tokenizer arrays (tokens, scores,
  token types) keep those ids, and BPE merges the ones whose parts and result are kept,
  as shrink.distill.prune_vocab keeps them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from shrink.errors import ModelError
from shrink.export.gguf_convert import _guard_vocabulary, _model_class, _write_layer_pattern, write_stop_ids
from shrink.quiet import quiet_converter


def tensor_shapes(model, arch_dir: Path) -> list[tuple[str, tuple[int, ...]]]:
    """(GGUF name, shape) of every tensor the converter would write for `model`, an
    instance of the architecture of `arch_dir`'s config.json."""
    from shrink.gguf_owner import import_gguf

    gguf = import_gguf()
    arch, model_class = _model_class(Path(arch_dir))
    if model_class is None:
        raise ModelError(f"llama.cpp's converter does not support the {arch} architecture")
    blocks = model.config.get_text_config().num_hidden_layers
    names = gguf.get_tensor_name_map(model_class.model_arch, blocks)
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    out = []
    for key, tensor in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelError(f"llama.cpp's converter has no GGUF name for {key} ({arch})")
        out.append((name, tuple(tensor.shape)))
    return out


def metadata_bytes(model_dir: Path, kept: list[int] | None = None, tokenizer_pre: str | None = None) -> int:
    """The bytes before the tensor infos of a GGUF of `model_dir` (header and key-values),
    its vocabulary cut to the token ids `kept` when given."""
    from shrink.gguf_owner import import_gguf

    gguf = import_gguf()
    model_dir = Path(model_dir)
    _, model_class = _model_class(model_dir)
    with quiet_converter(), tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "metadata.gguf"
        model = model_class(model_dir, gguf.LlamaFileType.MOSTLY_F16, out, eager=False)
        _guard_vocabulary(model, tokenizer_pre)
        model.prepare_metadata(vocab_only=True)
        _write_layer_pattern(model)
        write_stop_ids(model, model_dir)
        if kept is not None:
            _keep_tokens(model.gguf_writer.kv_data[0], kept, gguf.Keys.Tokenizer)
        writer = model.gguf_writer
        writer.write_header_to_file(path=out)
        writer.write_kv_data_to_file()
        writer.close()
        return out.stat().st_size


def _keep_tokens(kv: dict, kept: list[int], keys) -> None:
    """The tokenizer arrays of the key-values `kv`, cut to the token ids `kept`."""
    tokens = kv[keys.LIST].value
    kept = [i for i in kept if i < len(tokens)]
    for key in (keys.LIST, keys.SCORES, keys.TOKEN_TYPE):
        if key in kv:
            values = kv[key].value
            kv[key].value = [values[i] for i in kept]
    if keys.MERGES in kv:
        text = {(t if isinstance(t, str) else t.decode("utf-8", "replace")) for t in kv[keys.LIST].value}
        merges = []
        for merge in kv[keys.MERGES].value:
            a, _, b = (merge if isinstance(merge, str) else merge.decode("utf-8", "replace")).partition(" ")
            if a in text and b in text and a + b in text:
                merges.append(merge)
        kv[keys.MERGES].value = merges
