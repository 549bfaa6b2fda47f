"""Loading Hugging Face model folders (GPTQ checkpoints too): checked up front, safetensors only, quiet."""

from __future__ import annotations

import json
import os
from pathlib import Path

from shrink.errors import ModelError, requires
from shrink.quiet import gptqmodel_output, quiet_transformers


def check_model_dir(path: str | Path, what: str = "model") -> Path:
    """Fail early, naming the folder or file, when it cannot hold a Hugging Face causal LM:
    no config, no safetensors weights, a truncated or corrupt weight file, or a config
    that needs custom code."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{what} folder {path} does not exist")
    if not path.is_dir():
        raise ModelError(f"{what} {path} is not a folder (expected a Hugging Face model folder)")
    if not (path / "config.json").is_file():
        raise ModelError(f"{what} folder {path} has no config.json")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        has_pickle = list(path.glob("*.bin")) or list(path.glob("*.pt"))
        hint = " (only pickle weights found; shrink loads safetensors only)" if has_pickle else ""
        raise ModelError(f"{what} folder {path} has no .safetensors weights{hint}")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path / 'config.json'}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path / 'config.json'}: not a JSON object")
    check_no_custom_code(config, path / "config.json")
    for file in weights:
        check_safetensors(file)
    return path


def check_no_custom_code(config: dict, where: Path) -> None:
    """Refuse a config whose architecture exists only as code shipped with the model
    (`auto_map`): shrink never runs code from a model folder. An `auto_map` beside a
    model_type transformers has built in is harmless: the built-in class is used."""
    if not config.get("auto_map"):
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        names = ", ".join(sorted(config["auto_map"])) if isinstance(config["auto_map"], dict) else "auto_map"
        raise ModelError(f"{where}: model_type {model_type!r} is not built into transformers; it needs the custom "
                         f"code its auto_map names ({names}), and shrink does not run code from model folders")


SAFETENSORS_HEADER_LIMIT = 100 << 20  # bytes; the safetensors library refuses larger headers too


def check_safetensors(file: Path) -> None:
    """Refuse a truncated or corrupt safetensors file before a library reads it: the
    8-byte header length, the JSON header, and the file size its tensors' offsets imply."""
    size = file.stat().st_size

    def bad(why: str) -> ModelError:
        return ModelError(f"{file}: not a valid safetensors file ({why}); copy or download it again")

    if size < 8:
        raise bad(f"{size} bytes, shorter than its header")
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > min(size - 8, SAFETENSORS_HEADER_LIMIT):
            raise bad(f"a header of {n:,} bytes in a file of {size:,}")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise bad("its header is not JSON") from None
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, TypeError, KeyError, IndexError, ValueError):
        raise bad("its header does not describe tensors") from None
    expected = 8 + n + end
    if size != expected:
        state = "truncated: " if size < expected else ""
        raise bad(f"{state}{size:,} bytes, where its header describes {expected:,}")


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - tokenizers and transformers raise many types for bad files
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{path}: cannot load its tokenizer ({detail})") from None
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
        return load_gptq(path, device)
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or torch.float32, use_safetensors=True, local_files_only=True, trust_remote_code=False
        )
    except (ValueError, OSError, KeyError, RuntimeError, SafetensorError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load {path} as a causal language model: {detail}") from None
    return model.to(device).eval()


# GPTQModel's CPU pool needs at least 2 workers ("Virtual pool 'model_loader:cpu'
# requests 2 workers but parent 'cpu' only has 1" on a 2-core machine otherwise).
MIN_CPU_WORKERS = 2


def prepare_environment() -> None:
    """Settings GPTQModel reads at import: enough CPU workers for its pools."""
    if "GPTQMODEL_CPU_WORKERS" not in os.environ:
        os.environ["GPTQMODEL_CPU_WORKERS"] = str(max(MIN_CPU_WORKERS, (os.cpu_count() or 1) // 2))


def import_gptqmodel():
    """GPTQModel, imported quietly; MissingDependency when it is not installed."""
    prepare_environment()
    quiet_transformers()
    with gptqmodel_output():
        return requires("gptqmodel", "gptq")


# On the CPU, GPTQModel's plain-torch kernel: its AVX-512 kernel is faster but compiles a
# C++ extension on first use (about 90 s on 2 cores), which a one-off eval never recovers.
CPU_BACKEND = "gptq_torch"


def load_gptq(path: Path, device: str):
    """A GPTQ checkpoint through transformers (which hands the layers to GPTQModel)."""
    import warnings

    import torch
    from transformers import AutoModelForCausalLM, GPTQConfig

    import_gptqmodel()
    requires("optimum", "gptq")
    qc = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    backend = CPU_BACKEND if device == "cpu" else "auto"
    with gptqmodel_output(), warnings.catch_warnings():
        # transformers warns that the folder's own quantization_config wins over the one
        # passed, which only carries the backend (the point of passing it).
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, device_map=device, use_safetensors=True, local_files_only=True,
                dtype=torch.float32 if device == "cpu" else torch.float16,
                quantization_config=GPTQConfig(bits=qc["bits"], backend=backend),
            )
        except (ValueError, OSError, KeyError, RuntimeError) as e:
            raise ModelError(f"cannot load the GPTQ checkpoint {path}: {e}") from None
    return model.eval()


def resolve_device(device: str) -> str:
    """'auto' picks CUDA when there is one, else the CPU; an explicit 'cuda' must exist."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return device
