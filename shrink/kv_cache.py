"""The KV cache's name in a transformers forward pass: `past_key_values` until 5.2x, `cache`
since (the old name warns, and goes in 5.40). shrink supports transformers >= 5.17, so
it asks the model which name its forward takes, and reads the output by either name."""

from __future__ import annotations

import inspect
from typing import Any


def cache_kwargs(model, cache) -> dict[str, Any]:
    """{name: cache} for `model`'s forward: `cache` where the forward takes it, else
    `past_key_values`. A DDP wrapper (`.module`) is looked through."""
    return {cache_arg(model): cache}


def cache_arg(model) -> str:
    """The keyword `model`'s forward takes its KV cache by."""
    model = getattr(model, "module", model)
    try:
        params = inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):  # no inspectable forward: the name every 5.x release accepts
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def returned_cache(out):
    """The KV cache a forward pass returned, by its new name where the output class has it."""
    import dataclasses

    if dataclasses.is_dataclass(out) and "cache" in {f.name for f in dataclasses.fields(out)}:
        return out.cache
    return out.past_key_values
