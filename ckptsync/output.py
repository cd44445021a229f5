"""All terminal output: messages, tables, progress, JSON. With progress_bar.py, the only module that uses rich.

rich is imported where it is used, not here: `--help` and the command modules import this
module without paying for rich, and a run pays for rich.progress only when it shows a bar.

Every human-readable line passes through `printable`: names come from the server, and a file
name must not be able to recolour, retitle or rewrite the terminal. JSON keeps exact strings.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field as dc_field
from typing import Any, Callable, TextIO

from ckptsync.policy import human, rate  # re-exported: commands format sizes through output
from ckptsync.progress import Reporter


# What a terminal acts on instead of showing: C0 and C1 controls (ESC starts colour, cursor and
# title sequences), DEL, line and paragraph separators, bidirectional marks and overrides; and lone
# surrogates (a server's undecodable file name), which cannot be written to the terminal at all.
UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")


def printable(text: object) -> str:
    """`text` with each character in UNPRINTABLE shown as an escape (ESC as \\x1b, U+202E as \\u202e)."""
    return UNPRINTABLE.sub(_escaped, str(text))


def _escaped(m: re.Match) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


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


def same_file(stream: Any, other: TextIO) -> bool:
    """Whether `stream` writes into the file `other` is open on (2>>log with --log-file log)."""
    try:
        a, b = os.fstat(stream.fileno()), os.fstat(other.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _console(stream):
    from rich.console import Console

    return Console(file=stream, highlight=False, soft_wrap=True)


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
        self.log: TextIO | None = None
        if log_file:
            try:
                self.log = open(os.path.expanduser(log_file), "a", encoding="utf-8")
            except OSError as exc:
                from ckptsync.errors import UsageError

                raise UsageError(f"--log-file {log_file}: {exc.strerror or exc}") from None
        # Cron sends stderr into the same log (for what fails before it is open): what the log
        # gets as a line of its own then need not come again from stderr.
        self.stderr_is_log = self.log is not None and same_file(self.stderr, self.log)

    # The consoles are made when first written to: a --quiet run that prints nothing (a cron
    # backup with nothing new) never imports rich.
    @functools.cached_property
    def out(self):
        console = _console(self.stdout)
        if not console.is_terminal:
            console.width = 200  # pipes and logs get whole cells, not ellipses
        return console

    @functools.cached_property
    def err(self):
        return _console(self.stderr)

    @functools.cached_property
    def width(self) -> int | None:
        """The width tables are laid out for: $COLUMNS when set, else the terminal's; None off a
        terminal, where tables are plain rows of one word per cell."""
        return columns_env() or (self.out.size.width if self.out.is_terminal else None)

    @functools.cached_property
    def interactive(self) -> bool:
        return not self.quiet and not self.json_mode and self.err.is_terminal

    def _log(self, level: str, message: str) -> None:
        if self.log is not None:
            self.log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {level} {printable(message)}\n")
            self.log.flush()

    def info(self, message: str) -> None:
        """Progress-type information: stderr, hidden by --quiet and --json."""
        message = printable(message)
        self._log("INFO", message)
        if self.quiet or self.json_mode or self.stderr_is_log:
            return
        if self.interactive:
            self.err.print(message, markup=False)
        else:
            self.stderr.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
            self.stderr.flush()

    def warn(self, message: str) -> None:
        message = printable(message)
        self._log("WARN", message)
        if not self.stderr_is_log:
            self.err.print(f"[yellow]warning:[/] {escape(message)}")

    def error(self, message: str, hint: str = "") -> None:
        message, hint = printable(message), printable(hint)
        self._log("ERROR", message + (f" ({hint})" if hint else ""))
        if self.stderr_is_log:
            return
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
        text = printable(text)
        self._log("INFO", text)
        if not self.json_mode:
            self.out.print(text, markup=False)

    def lines(self, lines: list[str], styles: dict[str, str] | None = None) -> None:
        """Pre-drawn text (a chart): characters matching a regex in `styles` get that style on a terminal."""
        if self.json_mode:
            return
        from rich.text import Text

        for line in lines:
            text = Text(printable(line), no_wrap=True, overflow="crop")
            for pattern, style in (styles or {}).items():
                text.highlight_regex(pattern, style)
            self.out.print(text)

    def table(self, candidates: "list[TextTable]") -> "TextTable":
        """The first of `candidates` (widest layout first) that fits the width; plain rows off a
        terminal. Returns the one drawn, so that what it left out can follow as lines."""
        chosen = candidates[0] if self.width is None else \
            next((t for t in candidates if t.width() <= self.width), candidates[-1])
        if self.json_mode:
            return chosen
        from rich.text import Text

        for line, spans in chosen.render(self.width):
            self._log("INFO", line)
            text = Text(line, no_wrap=True)
            for start, end, style in spans:
                text.stylize(style, start, end)
            self.out.print(text, soft_wrap=True)
        return chosen

    def paragraph(self, text: str, indent: str = "", first: str = "") -> None:
        """Text wrapped at word boundaries to the width (whole words, never cut)."""
        for line in wrap(printable(text), self.width, indent, printable(first)):
            self.result(line)

    def to_paste(self, label: str, code: str, indent: str = "  ") -> None:
        """`label code`, where code is something to paste (a command, an option and its path): on one
        line when it fits, else on a line of its own below the label, never broken."""
        line = printable(f"{label} {code}")
        if self.width is None or len(line) <= self.width:
            self.result(line)
        else:
            self.result(printable(label))
            self.result(indent + printable(code))

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
        from ckptsync.liveness import note

        self.note = note
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
        self.note()  # a lock this run holds then says it still advances

    def finish(self) -> None:
        spent = max(time.monotonic() - self.started, 1e-6)
        if self.done:
            speed = rate(self.done, spent)
            self.out.info(f"{self.label}: {human(self.done)} in {spent:.1f}s" + (f" ({speed})" if speed else ""))


class TerminalReporter(LineReporter):
    """A progress bar with bytes, rate and ETA (progress_bar.py, loaded with the first bar)."""

    def __init__(self, out: Output) -> None:
        super().__init__(out)
        self.bar: Any = None
        self.task = None

    def start(self, label: str, total: int) -> None:
        from ckptsync.progress_bar import new_bar

        super().start(label, total)
        self.bar, self.task = new_bar(self.out.err, escape(printable(label)), total)

    def advance(self, nbytes: int) -> None:
        super().advance(nbytes)
        if self.bar is not None:
            self.bar.advance(self.task, nbytes)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        super().finish()


def columns_env() -> int | None:
    value = os.environ.get("COLUMNS", "").strip()
    return int(value) if value.isdigit() and int(value) >= 20 else None


def wrap(text: str, width: int | None, indent: str = "", first: str = "") -> list[str]:
    """`first + text` as lines no wider than width, continued with `indent`; words are never cut,
    so a single word longer than the width (a path) stands alone on its line."""
    if width is None:
        return [first + text]
    lines, line, empty = [], first.rstrip() if not text else first, True
    for word in text.split():
        if empty and (len(line) + len(word) <= width or not line.strip()):
            line += word
        elif empty:   # a label, then a word too long to follow it: the word goes below, whole
            lines.append(line.rstrip())
            line = indent + word
        elif len(line) + 1 + len(word) <= width:
            line += " " + word
        else:
            lines.append(line)
            line = indent + word
        empty = False
    return lines + [line]


def where_lines(label: str, server: str, path: str, width: int | None) -> list[str]:
    """`label server:path` on one line, or with the path whole on a line of its own when too wide."""
    line = f"{label}{server}:{path}"
    if width is None or len(line) <= width:
        return [line]
    return [f"{label}{server}", " " * len(label) + path]


def command_lines(command: str, width: int | None, first: str = "", indent: str = "") -> list[str]:
    """A shell command laid out for the width: whole words, continued with a backslash, so that
    pasting all its lines runs the same command."""
    import shlex

    try:
        words = [shlex.quote(w) for w in shlex.split(command)]
    except ValueError:
        return wrap(command, width, indent, first)
    if width is None:
        return [first + " ".join(words)]
    lines, line = [], first + words[0]
    for word in words[1:]:
        if len(line) + 1 + len(word) + 2 > width and line.strip():
            lines.append(line + " \\")
            # Less indent for a long word (a path) where that lets it fit.
            line = " " * max(2, min(len(indent), width - len(word) - 2)) + word
        else:
            line += " " + word
    return lines + [line]


def age(ts: float | None, now: float | None = None) -> str:
    """A short age: 45s, 19m, 5h, 3d."""
    return ago(ts, now).replace(" ago", "") if ts else "-"


def size_cell(n: int | None, plain: bool) -> str:
    """A size for a table cell: one word in plain rows (208.1KB), as in the text elsewhere (208.1 KB)."""
    text = human(n) if n is not None else "-"
    return text.replace(" ", "") if plain else text


def stamp(ts: float | None) -> str:
    """A local time as one word, for plain rows."""
    return time.strftime("%Y-%m-%dT%H:%M", time.localtime(ts)) if ts else "-"


@dataclass
class Column:
    header: str
    right: bool = False
    plain_header: str = ""        # off a terminal: one word, for a blank or several-word header


@dataclass
class TextTable:
    """Columns and rows of short cells, drawn for a width; cells are never cut or wrapped.

    A row that is still too wide (one very long name) gets its widest cell on a line of its
    own and the rest of the row below it. Off a terminal (width None) empty cells read `-`,
    so every row has the same number of words.
    """

    columns: list[Column]
    rows: list[tuple[list[str], dict[int, str]]] = dc_field(default_factory=list)
    gap: int = 2

    @classmethod
    def of(cls, *specs: str | Column) -> "TextTable":
        return cls([c if isinstance(c, Column) else Column(c, right=c in RIGHT) for c in specs])

    def add(self, *cells: Any, styles: dict[int, str] | None = None) -> None:
        self.rows.append(([printable(c) for c in cells], styles or {}))

    def widths(self) -> list[int]:
        return [max([len(c.header)] + [len(r[0][i]) for r in self.rows]) for i, c in enumerate(self.columns)]

    def width(self) -> int:
        w = self.widths()
        return sum(w) + self.gap * (len(w) - 1)

    def render(self, width: int | None) -> list[tuple[str, list[tuple[int, int, str]]]]:
        if width is None:
            return self._plain()
        widths = self.widths()
        over = self.width() - width
        wide = max(range(len(widths)), key=lambda i: widths[i])
        cap = widths[wide] - over if over > 0 else widths[wide]
        if over > 0 and cap >= len(self.columns[wide].header):
            widths[wide] = cap
        lines = [(self._line([c.header for c in self.columns], widths), [(0, -1, "bold")])]
        for cells, styles in self.rows:
            if len(cells[wide]) > widths[wide]:
                start = sum(widths[:wide]) + self.gap * wide
                lines.append((" " * start + cells[wide], []))
                cells = cells[:wide] + [""] + cells[wide + 1:]
            lines.append((self._line(cells, widths), self._spans(cells, widths, styles)))
        return [(line, [(s, len(line) if e < 0 else e, st) for s, e, st in spans]) for line, spans in lines]

    def _line(self, cells: list[str], widths: list[int]) -> str:
        parts = [c.rjust(w) if col.right else c.ljust(w) for c, w, col in zip(cells, widths, self.columns)]
        return (" " * self.gap).join(parts).rstrip()

    def _spans(self, cells: list[str], widths: list[int], styles: dict[int, str]) -> list[tuple[int, int, str]]:
        spans, pos = [], 0
        for i, (cell, w) in enumerate(zip(cells, widths)):
            if i in styles and cell:
                start = pos + (w - len(cell) if self.columns[i].right else 0)
                spans.append((start, start + len(cell), styles[i]))
            pos += w + self.gap
        return spans

    def _plain(self) -> list[tuple[str, list]]:
        header = [c.plain_header or c.header or "-" for c in self.columns]
        rows = [header] + [[c or "-" for c in cells] for cells, _ in self.rows]
        widths = [max(len(r[i]) for r in rows) for i in range(len(self.columns))]
        return [(self._line(r, widths), []) for r in rows]


RIGHT = ("step", "size", "files", "bytes", "age")
