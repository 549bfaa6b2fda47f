"""Training checkpoints: safetensors for tensors, JSON for the rest (no pickle anywhere).

A checkpoint folder holds `student.safetensors`, `optimizer.safetensors` and
`state.json`. It is written under a temporary name and renamed into place, so an
interrupted save leaves the previous checkpoint intact; a failed one (a full disk:
DiskFullError) leaves no temporary folder either.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from shrink.errors import ShrinkError

STATE = "state.json"


def save_checkpoint(folder: Path, model, optimizer, state: dict[str, Any]) -> None:
    from safetensors.torch import save_file, save_model

    from shrink.atomic import removed_on_failure

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with removed_on_failure(tmp, f"the checkpoint {folder}"):
        tmp.mkdir(parents=True)
        save_model(model, str(tmp / "student.safetensors"))
        tensors, scalars = _flatten_optimizer(optimizer)
        if tensors:
            save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / STATE).write_text(json.dumps({**state, "optimizer_scalars": scalars}, indent=2))
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def read_state(folder: Path) -> dict[str, Any]:
    path = Path(folder) / STATE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ShrinkError(f"checkpoint {folder} is unreadable ({e}); remove it or use --force") from None


def load_checkpoint(folder: Path, model, optimizer) -> dict[str, Any]:
    from safetensors.torch import load_file, load_model

    folder = Path(folder)
    state = read_state(folder)
    load_model(model, str(folder / "student.safetensors"))
    opt_file = folder / "optimizer.safetensors"
    tensors = load_file(str(opt_file)) if opt_file.exists() else {}
    _restore_optimizer(optimizer, tensors, state.get("optimizer_scalars", {}))
    return state


def _flatten_optimizer(optimizer) -> tuple[dict, dict]:
    """AdamW state as flat names: '{param_index}.{field}' -> tensor; non-tensor values apart."""
    import torch

    tensors, scalars = {}, {}
    for index, value in optimizer.state_dict()["state"].items():
        for field, v in value.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{index}.{field}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{field}"] = v
    return tensors, scalars


def _restore_optimizer(optimizer, tensors: dict, scalars: dict) -> None:
    sd = optimizer.state_dict()
    state: dict[int, dict] = {}
    for name, v in list(tensors.items()) + list(scalars.items()):
        index, field = name.split(".", 1)
        state.setdefault(int(index), {})[field] = v
    sd["state"] = state
    optimizer.load_state_dict(sd)
