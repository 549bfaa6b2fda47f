"""Loading Hugging Face model folders: checked up front, safetensors only, quiet."""

from __future__ import annotations

import json
import os
from pathlib import Path

from shrink.errors import ModelError


def check_model_dir(path: str | Path, what: str = "model") -> Path:
    """Fail early, naming the folder, when it cannot hold a Hugging Face causal LM."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{what} folder {path} does not exist")
    if not path.is_dir():
        raise ModelError(f"{what} {path} is not a folder (expected a Hugging Face model folder)")
    if not (path / "config.json").is_file():
        raise ModelError(f"{what} folder {path} has no config.json")
    if not list(path.glob("*.safetensors")):
        has_pickle = list(path.glob("*.bin")) or list(path.glob("*.pt"))
        hint = " (only pickle weights found; shrink loads safetensors only)" if has_pickle else ""
        raise ModelError(f"{what} folder {path} has no .safetensors weights{hint}")
    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path / 'config.json'}: not valid JSON ({e})") from None
    return path


# Loggers of libraries imported along the way whose warnings are about their own
# internals (torchao registering enums with torch, tokenicer fixing a pad token).
NOISY_LOGGERS = ("torch.utils._pytree", "torch.utils.cpp_extension", "tokenicer", "tokenicer.tokenicer")


def quiet_transformers() -> None:
    """Keep transformers' (and its plug-ins') progress bars and warnings off the terminal
    (shrink shows its own)."""
    if os.environ.get("SHRINK_DEBUG") == "1":
        return
    import logging

    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    quiet_transformers()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    return tok


def quantization_method(path: Path) -> str | None:
    """The `quant_method` of a pre-quantized folder's config.json ("gptq", ...), else None."""
    config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    return (config.get("quantization_config") or {}).get("quant_method")


def load_causal_lm(path: Path, device: str = "cpu", dtype=None):
    """Load weights from safetensors (never pickle) onto `device`, in eval mode.
    A GPTQ folder is loaded through transformers' GPTQ integration (GPTQModel's kernels)."""
    import torch
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    check_model_dir(path)
    if quantization_method(path) == "gptq":
        from shrink.quantize.gptq import load_gptq

        return load_gptq(path, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or torch.float32, use_safetensors=True, local_files_only=True
        )
    except (ValueError, OSError, KeyError) as e:
        raise ModelError(f"cannot load {path} as a causal language model: {e}") from None
    return model.to(device).eval()


def resolve_device(device: str) -> str:
    """'auto' picks CUDA when there is one, else the CPU; an explicit 'cuda' must exist."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return device
