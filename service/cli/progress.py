"""Progress bars for long CLI commands: one bar per stage, fed by the library's callbacks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn


class StageCallback(Protocol):
    def __call__(self, stage: str, fraction: float, /) -> None: ...


@contextmanager
def stage_bars(console: Console) -> Iterator[StageCallback]:
    """Yields a ``(stage, fraction)`` callback that draws a bar per stage as stages appear."""
    columns = (
        TextColumn("{task.description:<10}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        tasks: dict[str, TaskID] = {}

        def update(stage: str, fraction: float) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=1.0)
            progress.update(tasks[stage], completed=min(1.0, max(0.0, fraction)))

        yield update
