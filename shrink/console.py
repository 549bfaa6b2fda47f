"""One rich console on stderr (stdout stays clean for --json) and shrink's progress bars."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Completed units per second, e.g. '41.2 ex/s'."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.1f} {self.unit}/s", style="progress.data.speed")


def progress(unit: str, *fields: str) -> Progress:
    """A progress bar with count, rate in `unit`/s, elapsed and remaining time.
    `fields` are task fields shown after the bar (e.g. 'loss', 'tok_s')."""
    extra = [TextColumn(f"{{task.fields[{f}]}}") for f in fields]
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        *extra,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def spinner() -> Progress:
    """For steps with no count (a single C call): a spinner and the elapsed time."""
    return Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), TimeElapsedColumn(), console=console)


@contextlib.contextmanager
def progress_step(console: Console | None, text: str) -> Iterator[None]:
    """A spinner for one long call that reports no progress of its own, on `console`
    (default: shrink's stderr console)."""
    bar = spinner() if console is None else Progress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), TimeElapsedColumn(), console=console)
    with bar:
        bar.add_task(text, total=None)
        yield
