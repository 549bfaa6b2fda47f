"""Typed errors. The CLI turns these into one `Error: ...` line and an exit code."""


class ShrinkError(Exception):
    """A user error: bad input, a missing file, a refused overwrite. Exit code 2."""

    exit_code = 2


class TaskDataError(ShrinkError):
    """A task data file is malformed; the message names the file and line."""


class ModelError(ShrinkError):
    """A model folder or file cannot be used."""


class ArtifactError(ShrinkError):
    """An artifact folder or manifest is missing, corrupt or of another version."""


class MissingDependency(ShrinkError):
    """An optional dependency is not installed; the message says what to install."""


def requires(module: str, extra: str):
    """Import `module` or raise MissingDependency naming the pip command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependency(
            f"{module} is not installed ({e}); install it with: pip install 'shrink[{extra}]'"
        ) from None
