"""All terminal output: messages, tables, progress, JSON. The only module that uses rich."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import time
from typing import Any, Callable, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn,
)
from rich.table import Table

from ckptsync.policy import human  # re-exported: commands format sizes through output
from ckptsync.progress import Reporter



def when(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def ago(ts: float | None, now: float | None = None) -> str:
    if not ts:
        return "never"
    delta = max(0.0, (now or time.time()) - ts)
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if delta >= size:
            return f"{delta / size:.0f}{unit} ago"
    return f"{delta:.0f}s ago"


class GuardedStream:
    """A text stream that goes quiet, instead of raising, once its reader has gone (EPIPE).

    `ckptsync backup | head -1` must still finish the backup. When a write fails with EPIPE,
    the stream's file descriptor is pointed at /dev/null, so later writes (by rich, click, a
    child process) and the flush at interpreter exit succeed too.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self.stream.write(text)
            except OSError as exc:
                self._gone(exc)
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except OSError as exc:
                self._gone(exc)

    def _gone(self, exc: OSError) -> None:
        if exc.errno != errno.EPIPE:
            raise exc
        self.broken = True
        try:
            fd = self.stream.fileno()
        except (AttributeError, OSError, ValueError):
            return  # not a real file: nothing will flush it at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)
        with contextlib.suppress(OSError, ValueError):
            self.stream.flush()  # what the failed write left in the buffer goes to /dev/null now

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def guarded(stream: TextIO) -> GuardedStream:
    return stream if isinstance(stream, GuardedStream) else GuardedStream(stream)


def guard_std_streams() -> None:
    """Make sys.stdout and sys.stderr tolerate a closed reader, for every writer in the process."""
    sys.stdout = guarded(sys.stdout)
    sys.stderr = guarded(sys.stderr)


class Output:
    """Human, --json or --quiet output to stdout/stderr, optionally appended to a log file.

    Commands hand their result to `render`, which alone decides between JSON and text;
    `failure` reports the run's final error the same way.
    """

    def __init__(self, json_mode: bool = False, quiet: bool = False, log_file: str | None = None) -> None:
        self.json_mode = json_mode
        self.quiet = quiet
        self.emitted = False
        self.stdout = guarded(sys.stdout)
        self.stderr = guarded(sys.stderr)
        self.out = Console(file=self.stdout, highlight=False, soft_wrap=True)
        self.err = Console(file=self.stderr, highlight=False, soft_wrap=True)
        if not self.out.is_terminal:
            self.out.width = 200  # pipes and logs get whole cells, not ellipses
        self.interactive = self.err.is_terminal and not quiet and not json_mode
        self.log: TextIO | None = None
        if log_file:
            try:
                self.log = open(os.path.expanduser(log_file), "a", encoding="utf-8")
            except OSError as exc:
                from ckptsync.errors import UsageError

                raise UsageError(f"--log-file {log_file}: {exc.strerror or exc}") from None

    def _log(self, level: str, message: str) -> None:
        if self.log is not None:
            self.log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {level} {message}\n")
            self.log.flush()

    def info(self, message: str) -> None:
        """Progress-type information: stderr, hidden by --quiet and --json."""
        self._log("INFO", message)
        if self.quiet or self.json_mode:
            return
        if self.interactive:
            self.err.print(message, markup=False)
        else:
            self.stderr.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
            self.stderr.flush()

    def warn(self, message: str) -> None:
        self._log("WARN", message)
        self.err.print(f"[yellow]warning:[/] {escape(message)}")

    def error(self, message: str, hint: str = "") -> None:
        self._log("ERROR", message + (f" ({hint})" if hint else ""))
        self.err.print(f"[bold red]error:[/] {escape(message)}")
        if hint:
            self.err.print(f"  {escape(hint)}", style="dim")

    def failure(self, message: str, hint: str, *, exit_code: int, kind: str) -> None:
        """The error that ends the run: a line on stderr (and in the log); with --json also on stdout."""
        self.error(message, hint)
        if self.json_mode and not self.emitted:  # stdout carries one JSON document, never two
            self.emit({"error": {"message": message, "hint": hint, "exit_code": exit_code, "kind": kind},
                       "exit_code": exit_code})

    def result(self, text: str) -> None:
        """The command's answer on stdout (not shown with --json: render() emits the JSON instead)."""
        self._log("INFO", text)
        if not self.json_mode:
            self.out.print(text, markup=False)

    def rich(self, renderable: Any) -> None:
        if not self.json_mode:
            self.out.print(renderable)

    def lines(self, lines: list[str], styles: dict[str, str] | None = None) -> None:
        """Pre-drawn text (a chart): characters matching a regex in `styles` get that style on a terminal."""
        if self.json_mode:
            return
        from rich.text import Text

        for line in lines:
            text = Text(line, no_wrap=True, overflow="crop")
            for pattern, style in (styles or {}).items():
                text.highlight_regex(pattern, style)
            self.out.print(text)

    def emit(self, data: Any) -> None:
        self.emitted = True
        self.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
        self.stdout.flush()

    def render(self, result: Any, human: Callable[["Output", Any], None],
               to_json: Callable[[Any], Any] | None = None) -> int:
        """Show a command's result, as JSON (`to_json`, default `result.to_dict()`) or by `human`.

        Returns the result's exit code (0 when it has none).
        """
        if self.json_mode:
            self.emit(to_json(result) if to_json else result.to_dict())
        else:
            human(self, result)
        return getattr(result, "exit_code", 0)

    def text_to_stderr(self, text: str) -> None:
        """Unformatted text on stderr (a traceback under --debug)."""
        self.stderr.write(text)
        self.stderr.flush()

    def flush(self) -> None:
        """Before a child process writes to the same stdout."""
        self.stdout.flush()
        self.stderr.flush()

    def reporter(self) -> Reporter:
        return TerminalReporter(self) if self.interactive else LineReporter(self)


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


class LineReporter(Reporter):
    """Plain timestamped lines: for cron, pipes and log files."""

    def __init__(self, out: Output) -> None:
        self.out = out
        self.label = ""
        self.total = 0
        self.done = 0
        self.started = 0.0

    def info(self, message: str) -> None:
        self.out.info(message)

    def start(self, label: str, total: int) -> None:
        self.label, self.total, self.done, self.started = label, total, 0, time.monotonic()

    def advance(self, nbytes: int) -> None:
        self.done += nbytes

    def finish(self) -> None:
        spent = max(time.monotonic() - self.started, 1e-6)
        if self.done:
            self.out.info(f"{self.label}: {human(self.done)} in {spent:.1f}s ({human(self.done / spent)}/s)")


class TerminalReporter(LineReporter):
    """A rich progress bar with bytes, rate and ETA."""

    def __init__(self, out: Output) -> None:
        super().__init__(out)
        self.progress: Progress | None = None
        self.task = None

    def start(self, label: str, total: int) -> None:
        super().start(label, total)
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeRemainingColumn(), console=self.out.err, transient=True,
        )
        self.progress.start()
        self.task = self.progress.add_task(label, total=total or None)

    def advance(self, nbytes: int) -> None:
        super().advance(nbytes)
        if self.progress is not None:
            self.progress.advance(self.task, nbytes)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        super().finish()


def table(*columns: str, title: str | None = None) -> Table:
    t = Table(title=title, show_edge=False, pad_edge=False, box=None, header_style="bold")
    for c in columns:
        justify = "right" if c in ("step", "size", "files", "bytes") else "left"
        t.add_column(c, justify=justify, no_wrap=c in ("name", "size", "modified"))
    return t
