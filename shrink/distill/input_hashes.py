"""The files a run reads, identified by their bytes (sha256), not their paths or sizes.

A resumed run (--resume) must read the same bytes as the run it continues, and a teacher
cache (--teacher-cache) must come from the same teacher and data as the run that reads
it. Each input is one entry {"role", "path", "sha256"}, the role being one of "data",
"eval", "teacher-prefix", "vocab-data" and "teacher-weights": every *.safetensors file of
the teacher's folder, or the GGUF file itself.
"""

from __future__ import annotations

from pathlib import Path

from shrink import artifact
from shrink.errors import ShrinkError


# The teacher's weight files and their sha256 live in shrink.artifact (shrink label reads them too).
teacher_weight_files, weights_sha256 = artifact.teacher_weight_files, artifact.weights_sha256


def distill_inputs(cfg) -> list[dict[str, str]]:
    """Every file a distill run (a DistillConfig) reads, by sha256: the training data,
    --eval, --teacher-prefix, each --vocab-data file and the teacher's weights (big files
    show a progress bar while they are hashed)."""
    files = [("data", cfg.data), ("eval", cfg.eval_data), ("teacher-prefix", cfg.teacher_prefix)]
    files += [("vocab-data", path) for path in cfg.vocab_data]
    files += [("teacher-weights", path) for path in teacher_weight_files(cfg.teacher)]
    return [{"role": role, "path": str(path), "sha256": artifact.sha256_file(Path(path))}
            for role, path in files if path is not None]


def of_roles(entries: list[dict[str, str]], *roles: str) -> list[dict[str, str]]:
    """The entries of these roles, in the run's order."""
    return [e for e in entries if e["role"] in roles]


def sha256_of(entries: list[dict[str, str]], role: str) -> str | None:
    """The sha256 of the (first) input with this role; None when the run has none."""
    return next((e["sha256"] for e in of_roles(entries, role)), None)


def check_unchanged(before: list[dict[str, str]], now: list[dict[str, str]]) -> None:
    """--resume: refuse when any input's bytes differ from the interrupted run's."""
    old = {(e["role"], e["path"]): e["sha256"] for e in before}
    new = {(e["role"], e["path"]): e["sha256"] for e in now}
    for key in [*new, *(k for k in old if k not in new)]:  # a teacher weight file may come or go
        if key not in old:
            why = "it is new"
        elif key not in new:
            why = "it is gone"
        elif old[key] != new[key]:
            why = "sha256 differs"
        else:
            continue
        raise ShrinkError(f"--resume: {key[1]} changed since the interrupted run ({why}); "
                          "use the same inputs or --force to start over")
