"""Device targets: what a class of device can hold and run, read from targets.toml.

A target names the runtime that will serve the model, a ladder of formats and
quantizations to try (in order), and the constraints an artifact must meet on it. The
default file ships inside the package (shrink/targets.toml; the repository's root
targets.toml is the same file); `--targets FILE` reads a user's own.

Every schema error in a file is reported at once, each with the file and the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shrink.errors import ShrinkError
from shrink.toml_files import read_toml

DEFAULT_FILE = Path(__file__).with_name("targets.toml")

RUNTIMES = {"llama.cpp": "gguf", "onnxruntime": "onnx", "torch": "gptq", "executorch": "pte"}  # runtime -> its format
GPTQ_QUANTS = {"8bit": 8, "4bit": 4}

# Constraints, with what they measure. Limits are checked against measured figures.
CONSTRAINTS = {
    "max_size_mb": "artifact size (model files), MB",
    "max_ram_mb": "peak resident memory of the bundle's run.py serving the artifact "
                  "(with the target's context_length and threads), MB",
    "min_retention": "accuracy / the teacher's accuracy",
    "max_accuracy_drop": "the unquantized student's accuracy minus the artifact's (absolute)",
    "min_examples_per_s": "task examples per second through the runtime, with `threads`",
}
SETTINGS = {"threads", "context_length", "imatrix", "device", "embedding_type"}
REQUIRED = {"description", "runtime", "formats", "quants"}
KNOWN = REQUIRED | SETTINGS | set(CONSTRAINTS)


class TargetsError(ShrinkError):
    """targets.toml does not follow the schema; the message lists every problem."""


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    runtime: str  # llama.cpp | onnxruntime | torch | executorch
    formats: tuple[str, ...]  # gguf | onnx | gptq | pte
    quants: tuple[str, ...]  # tried in this order
    constraints: dict[str, float] = field(default_factory=dict)
    threads: int | None = None
    context_length: int | None = None  # tokens: llama.cpp's n_ctx (None: 2048), onnxruntime's longest sequence,
    # a .pte's KV cache (exported with it)
    imatrix: bool = False  # GGUF: quantize with a task-aware importance matrix
    device: str = "cpu"  # where torch-served (GPTQ) candidates run: cpu | cuda
    embedding_type: str | None = None  # GGUF: the token embedding's own type on every quantized rung

    def ladder(self) -> list[tuple[str, str]]:
        """(format, quant) candidates in the order they are tried."""
        return [(fmt, q) for fmt in self.formats for q in self.quants if quant_fits_format(fmt, q)]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "runtime": self.runtime,
                "formats": list(self.formats), "quants": list(self.quants), "constraints": dict(self.constraints),
                "threads": self.threads, "context_length": self.context_length, "imatrix": self.imatrix,
                "device": self.device, "embedding_type": self.embedding_type}


def quant_fits_format(fmt: str, quant: str) -> bool:
    from shrink.quantize.gguf_types import quant_type
    from shrink.quantize.onnx_quant import QUANTS as ONNX_QUANTS
    from shrink.quantize.torchao_quant import QUANTS as PTE_QUANTS

    if fmt == "onnx":
        return quant in ONNX_QUANTS
    if fmt == "pte":
        return quant in PTE_QUANTS
    if fmt == "gptq":
        return quant in GPTQ_QUANTS
    try:
        quant_type(quant)
        return True
    except ShrinkError:
        return False


def load_targets(path: Path | None = None) -> dict[str, Target]:
    """All targets of `path` (default: the shipped file), checked against the schema."""
    path = Path(path) if path is not None else DEFAULT_FILE
    data = read_toml(path, "--targets", TargetsError)
    problems: list[str] = []
    extra = sorted(set(data) - {"targets"})
    if extra:
        problems.append(f"unknown top-level key(s) {', '.join(extra)} (only [targets.NAME] tables)")
    tables = data.get("targets")
    if not isinstance(tables, dict) or not tables:
        problems.append("no [targets.NAME] tables")
        tables = {}
    targets = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            problems.append(f"targets.{name}: expected a table")
            continue
        target = _parse(name, table, problems)
        if target is not None:
            targets[name] = target
    if problems:
        raise TargetsError(f"{path}: {len(problems)} problem(s): " + "; ".join(problems))
    return targets


def get_target(name: str, path: Path | None = None) -> Target:
    targets = load_targets(path)
    if name not in targets:
        raise ShrinkError(f"--target {name}: no such target in {path or DEFAULT_FILE} "
                          f"(targets: {', '.join(targets)}; formats: gguf, onnx, gptq, executorch)")
    return targets[name]


def _parse(name: str, table: dict, problems: list[str]) -> Target | None:
    key = f"targets.{name}"
    start = len(problems)
    for k in sorted(set(table) - KNOWN):
        problems.append(f"{key}.{k}: unknown key (known: {', '.join(sorted(KNOWN))})")
    for k in sorted(REQUIRED - set(table)):
        problems.append(f"{key}.{k}: missing")

    def text(k):
        v = table.get(k)
        if k in table and not (isinstance(v, str) and v.strip()):
            problems.append(f"{key}.{k}: expected a non-empty string, got {v!r}")
        return v

    def strings(k):
        v = table.get(k)
        if k in table and not (isinstance(v, list) and v and all(isinstance(x, str) for x in v)):
            problems.append(f"{key}.{k}: expected a non-empty list of strings, got {v!r}")
            return []
        return v or []

    description, runtime = text("description"), text("runtime")
    if isinstance(runtime, str) and runtime not in RUNTIMES:
        problems.append(f"{key}.runtime: {runtime!r} is not one of {', '.join(RUNTIMES)}")
    formats, quants = strings("formats"), strings("quants")
    for fmt in formats:
        if fmt not in RUNTIMES.values():
            problems.append(f"{key}.formats: {fmt!r} is not one of {', '.join(RUNTIMES.values())}")
        elif runtime in RUNTIMES and RUNTIMES[runtime] != fmt:
            problems.append(f"{key}.formats: {fmt!r} is not served by runtime {runtime!r} "
                            f"(it serves {RUNTIMES[runtime]})")
    known_formats = [f for f in formats if f in RUNTIMES.values()]
    for q in quants:
        if known_formats and not any(quant_fits_format(f, q) for f in known_formats):
            problems.append(f"{key}.quants: {q!r} is not a quantization of {', '.join(known_formats)}")

    constraints = {}
    for k in CONSTRAINTS:
        if k not in table:
            continue
        v = table[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            problems.append(f"{key}.{k}: expected a non-negative number, got {v!r}")
        elif k in ("min_retention", "max_accuracy_drop") and v > 1:
            problems.append(f"{key}.{k}: a fraction between 0 and 1, got {v!r}")
        else:
            constraints[k] = float(v)
    for k in ("threads", "context_length"):
        v = table.get(k)
        if k in table and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            problems.append(f"{key}.{k}: expected a positive integer, got {v!r}")
    if "imatrix" in table and not isinstance(table["imatrix"], bool):
        problems.append(f"{key}.imatrix: expected true or false, got {table['imatrix']!r}")
    if "device" in table and table["device"] not in ("cpu", "cuda"):
        problems.append(f"{key}.device: expected 'cpu' or 'cuda', got {table['device']!r}")
    embedding = _embedding_type(key, table, formats, quants, problems)
    if len(problems) > start:
        return None
    return Target(name=name, description=description.strip(), runtime=runtime, formats=tuple(formats),
                  quants=tuple(quants), constraints=constraints, threads=table.get("threads"),
                  context_length=table.get("context_length"), imatrix=table.get("imatrix", False),
                  device=table.get("device", "cpu"), embedding_type=embedding)


def _embedding_type(key: str, table: dict, formats: list[str], quants: list[str], problems: list[str]) -> str | None:
    """The `embedding_type` key: a ggml type llama-quantize can give the token embedding
    (shrink export's --embedding-type), for a GGUF target; upper-cased."""
    if "embedding_type" not in table:
        return None
    from shrink.quantize.gguf_types import EMBEDDING_TYPES

    v = table["embedding_type"]
    name = v.strip().upper() if isinstance(v, str) else None
    if name not in EMBEDDING_TYPES:
        problems.append(f"{key}.embedding_type: expected one of {', '.join(EMBEDDING_TYPES)}, got {v!r}")
        return None
    if formats and "gguf" not in formats:
        problems.append(f"{key}.embedding_type: only for a gguf target (this one is {', '.join(formats)})")
        return None
    if quants and not any(quantized_gguf(q) for q in quants):
        problems.append(f"{key}.embedding_type: no rung of quants is a quantized GGUF type ({', '.join(quants)}), "
                        "so there is no embedding type to choose")
        return None
    return name


def quantized_gguf(quant: str) -> bool:
    """Whether `quant` is a GGUF type llama.cpp's quantizer writes (not F32/F16/BF16, which
    the converter writes with the embedding as it is)."""
    from shrink.quantize.gguf_size import UNQUANTIZED
    from shrink.quantize.gguf_types import quant_type

    try:
        return quant_type(quant).name not in UNQUANTIZED
    except ShrinkError:
        return False
