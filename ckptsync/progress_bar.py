"""The progress bar of an interactive run: bytes, rate and ETA, drawn by rich.

A module of its own so that rich.progress, and the rich.table it loads, are imported only when
a bar can be drawn: Output.reporter() imports this module when stderr is a terminal.
"""

from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from ckptsync.output import LineReporter, Output, escape, printable
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


class TerminalReporter(LineReporter):
    """A rich progress bar with bytes, rate and ETA."""

    def __init__(self, out: Output) -> None:
        super().__init__(out)
        self.progress: Progress | None = None
        self.task = None

    def start(self, label: str, total: int) -> None:
        super().start(label, total)
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), BytesColumn(), SpeedColumn(),
            TimeRemainingColumn(), console=self.out.err, transient=True,
        )
        self.progress.start()
        self.task = self.progress.add_task(escape(printable(label)), total=total or None)

    def advance(self, nbytes: int) -> None:
        super().advance(nbytes)
        if self.progress is not None:
            self.progress.advance(self.task, nbytes)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        super().finish()
