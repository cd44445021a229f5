"""The progress bar of an interactive run: bytes, rate and ETA, drawn by rich.

A module of its own so that rich.progress, and the rich.table it loads, are imported only when
a bar can be drawn: output.TerminalReporter imports this module when it starts a bar.
"""

from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from ckptsync.policy import human


class BytesColumn(ProgressColumn):
    """Done and total in the units of every other size ckptsync prints (policy.human)."""

    def render(self, task) -> Any:
        done = human(task.completed)
        return Text(f"{done}/{human(task.total)}" if task.total else done, style="progress.download")


class SpeedColumn(ProgressColumn):
    def render(self, task) -> Any:
        speed = task.finished_speed or task.speed
        return Text("?" if speed is None else f"{human(speed)}/s", style="progress.data.speed")


def new_bar(console: Any, label: str, total: int) -> tuple[Progress, Any]:
    """A started bar of `total` bytes (0: unknown) under `label` (already escaped), and its task."""
    bar = Progress(TextColumn("{task.description}"), BarColumn(), BytesColumn(), SpeedColumn(),
                   TimeRemainingColumn(), console=console, transient=True)
    bar.start()
    return bar, bar.add_task(label, total=total or None)
