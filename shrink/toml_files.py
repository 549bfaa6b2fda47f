"""Reading a user's TOML file (targets.toml, a distill --config file): the file's own
errors as one line each; the schema is the caller's."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from shrink.errors import ShrinkError


def read_toml(path: Path, option: str, error: type[ShrinkError]) -> dict[str, Any]:
    """The file's top-level table; `error` naming `option` when there is no such file, or
    the file when it is not valid TOML."""
    if not path.is_file():
        raise error(f"{option}: no such file {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid TOML ({e})") from None
