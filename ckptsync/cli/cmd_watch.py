"""ckptsync watch"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ckptsync.cli import options as o
from ckptsync.cli.context import output, settings
from ckptsync.errors import CkptsyncError, UsageError
from ckptsync.output import Output, printable
from ckptsync.progress import Reporter

if TYPE_CHECKING:
    from ckptsync.watch import Event, Status

# Events said as warnings (stderr) rather than as what happened.
WARNED = ("lost", "skipped", "warning")


def watch_cmd(
    instance: o.Instances = None, all_instances: o.AllInstances = False, host: o.Host = None,
    remote_dir: o.RemoteDir = None,
    local_dir: o.LocalDir = None, config: o.Config = None, accept_new_host_key: o.AcceptNew = False,
    interval: Annotated[float, typer.Option("--interval", min=0.1, max=300, metavar="SECONDS", help="Where the server has no inotify, look for changes this often; also how often the processes are checked for the end of training.")] = 2.0,
    hold_max: Annotated[Optional[int], typer.Option("--hold-max", min=0, metavar="N", help="Hold at most N complete checkpoints on the server against the trainer's rotation until they are backed up (hard links, no copy). Default: hold_max in the config, else 3.", show_default=False)] = None,
    no_hold: Annotated[bool, typer.Option("--no-hold", help="Hold nothing on the server: a checkpoint the trainer rotates away before it is copied is lost (and named).")] = False,
    until_done: Annotated[bool, typer.Option("--until-done", help="Exit once training has finished and every checkpoint is backed up: 0 when the checklist says SAFE, else 3.")] = False,
    max_checkpoints: Annotated[int, typer.Option("--max-checkpoints", "-k", min=1, metavar="N", help="A first backup takes the N newest complete checkpoints (as backup does); every later one is taken.")] = 2,
    compress: o.Compress = "auto", bwlimit: o.BwLimit = None, parallel: o.Parallel = None,
    print_service: Annotated[Optional[str], typer.Option("--print-service", metavar="systemd|launchd", help="Print a systemd user unit or a launchd agent that runs this watch, with how to install it, and exit.", show_default=False)] = None,
) -> int:
    """Back up each checkpoint the moment it is complete, over one connection.

    Waits for changes under remote_dir (inotify on Linux, else a look every
    --interval), and backs up each new complete checkpoint as backup does
    (verified, committed whole, status.json updated). A complete checkpoint
    not yet backed up is held on the server with hard links, so the
    trainer's rotation cannot delete it before it is copied. A dropped link
    is reconnected (1 s doubling to 60 s); a changed host key, a refused
    login or a missing remote_dir end the watch. Says when training has
    finished, with the checklist. Ctrl+C releases the holds (exit 130).
    One watch per backup directory; `backup --skip-if-locked` exits 0 while
    it runs. Several instances (-i 0 -i 1, --all-instances) are watched at
    once, each over its own connection; the exit code is the worst of theirs.
    """
    from ckptsync.multi import Labelled
    from ckptsync.stores import ability, open_store
    from ckptsync.watch import Watch, WatchOptions

    if print_service is not None and print_service not in ("systemd", "launchd"):
        raise UsageError(f"--print-service {print_service!r}: expected systemd or launchd")
    ts = o.targets(config, instance, all_instances, host, remote_dir, local_dir, accept_new_host_key)
    if not all(ability(open_store(t), "files_here") for t in ts):   # holds and commits are this machine's
        raise UsageError("watch backs up into a directory: give a local_dir that is not a bucket",
                         hint="ckptsync backup works with a bucket store (s3://...)")
    ts = o.with_parallel(o.with_bwlimits(ts, bwlimit), parallel)

    def options(t) -> WatchOptions:
        return WatchOptions(interval=interval, hold=not no_hold, hold_max=t.policy.hold_max if hold_max is None else hold_max,
                            until_done=until_done, compress=o.parse_compress(compress),
                            max_checkpoints=max_checkpoints)

    out = output()
    if print_service is not None:
        if len(ts) > 1:
            raise UsageError("--print-service writes one service: give one --instance")
        return _print_service(out, print_service, ts[0], options(ts[0]), hold_max, bwlimit, parallel, compress)
    show = Shown(out, ts[0].label, several=len(ts) > 1)
    lock = threading.Lock()
    watches = [Watch(t, options(t), Labelled(show.reporter(), t.label, lock) if len(ts) > 1 else show.reporter(),
                     on_event=show.event) for t in ts]
    for w in watches:
        w.on_status = show.status
    try:
        if len(watches) == 1:
            return watches[0].run().exit_code
        return _several(out, show, watches)
    except CkptsyncError as exc:
        show.error(exc)
        raise
    finally:
        show.clear()


def _several(out: Output, show: "Shown", watches) -> int:
    """Every watch on a thread of its own (multi.run_many); Ctrl+C stops each, releasing its holds."""
    from ckptsync.errors import Interrupted
    from ckptsync.multi import run_many

    by_label = {w.target.label: w for w in watches}
    try:
        many = run_many("watch", [w.target for w in watches], lambda t, rep: by_label[t.label].run())
    except Interrupted:
        said = [f"{w.target.label}: {w.stop()}" for w in watches]
        raise Interrupted("interrupted; " + "; ".join(said)) from None
    for outcome in many.outcomes:
        if outcome.error:
            if out.json_mode:
                show.event_error(CkptsyncError(outcome.error, hint=outcome.hint), outcome.target, outcome.kind,
                                 outcome.exit_code)
            else:
                out.error(f"{outcome.target}: {outcome.error}", outcome.hint)
    return many.exit_code


class Shown:
    """A watch's events as the run's output asks: one JSON object a line, timestamped lines off a
    terminal, or lines above one status line on a terminal."""

    def __init__(self, out: Output, label: str, several: bool = False) -> None:
        self.out = out
        self.label = label
        self.several = several   # several targets: each line names its own, and no status line
        self.lock = threading.Lock()
        self.line = ""
        self.activity = ""
        self.tty = out.interactive and not several
        self.last: Status | None = None

    def reporter(self) -> Reporter:
        return ShownReporter(self)

    def event(self, e: Event) -> None:
        with self.lock:
            if self.out.json_mode:
                self.out.emitted = True
                self.out.stdout.write(json.dumps(e.to_dict(), sort_keys=True) + "\n")
                self.out.stdout.flush()
                return
            self._erase()
            message = f"{e.target}: {e.message}" if self.several else e.message
            if e.event in WARNED:
                self.out.warn(message)
            elif self.tty:
                self.out.result(f"{time.strftime('%H:%M:%S', time.localtime(e.time))} {message}")
            elif not self.out.quiet or e.event in ("finished", "lost"):
                self.out.result(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(e.time))} {message}")
            self._draw()

    def error(self, exc: CkptsyncError) -> None:
        if self.out.json_mode:
            self.event_error(exc, "" if self.several else self.label, type(exc).kind, exc.exit_code)

    def event_error(self, exc: CkptsyncError, target: str, kind: str, exit_code: int) -> None:
        data = {"event": "error", "time": time.time(), "target": target, "message": exc.message, "hint": exc.hint,
                "kind": kind, "exit_code": exit_code}
        with self.lock:
            self.out.emitted = True
            self.out.stdout.write(json.dumps(data, sort_keys=True) + "\n")
            self.out.stdout.flush()

    def status(self, s: Status) -> None:
        self.last = s
        with self.lock:
            self._draw()

    def activity_is(self, text: str) -> None:
        self.activity = text
        with self.lock:
            self._draw()

    def _draw(self) -> None:
        if not self.tty or self.last is None:
            return
        from ckptsync.policy import span

        s = self.last
        parts = [f"last backed up: {s.last} ({span(time.time() - s.last_at)} ago)" if s.last else "nothing backed up yet"]
        if s.pending:
            parts.append(f"pending: {', '.join(s.pending)}" + (f" (held: {', '.join(s.held)})" if s.held else ""))
        if s.rate:
            parts.append(f"link {s.rate}")
        if self.activity:
            parts.append(self.activity)
        line = printable("; ".join(parts))
        width = self.out.width or 120
        self.line = line[: max(width - 1, 10)]
        self.out.stderr.write("\r\x1b[2K" + self.line)
        self.out.stderr.flush()

    def _erase(self) -> None:
        if self.tty and self.line:
            self.out.stderr.write("\r\x1b[2K")
            self.out.stderr.flush()
            self.line = ""

    def clear(self) -> None:
        with self.lock:
            self._erase()


class ShownReporter(Reporter):
    """What a cycle's backup reports: on a terminal, into the status line; off one, as lines."""

    def __init__(self, shown: Shown) -> None:
        self.shown = shown
        self.label, self.total, self.done = "", 0, 0

    def info(self, message: str) -> None:
        if self.shown.tty:
            self.shown.activity_is(message)
        else:
            self.shown.out.info(message)

    def start(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, total, 0

    def advance(self, nbytes: int) -> None:
        from ckptsync.policy import human

        self.done += nbytes
        if self.shown.tty:
            self.shown.activity_is(f"{self.label}: {human(self.done)} of {human(self.total)}")

    def finish(self) -> None:
        if self.shown.tty:
            self.shown.activity_is("")


def _print_service(out: Output, kind: str, t, opts, hold_max, bwlimit, parallel, compress) -> int:
    """The unit (or agent) that runs this watch: this Python, this package, the same target and options."""
    from ckptsync.service import service

    words = ["watch", *t.printed.args]
    if opts.interval != 2.0:
        words += ["--interval", f"{opts.interval:g}"]
    if not opts.hold:
        words.append("--no-hold")
    elif hold_max is not None:
        words += ["--hold-max", str(hold_max)]
    if opts.until_done:
        words.append("--until-done")
    if opts.max_checkpoints != 2:
        words += ["--max-checkpoints", str(opts.max_checkpoints)]
    for option, value in (("--compress", None if compress == "auto" else compress), ("--bwlimit", bwlimit),
                          ("--parallel", None if parallel is None else str(parallel))):
        if value is not None:
            words += [option, value]
    if settings().ssh:
        words += ["--ssh", settings().ssh]
    env = {k: os.environ[k] for k in ("CKPTSYNC_CONFIG", "PYTHONPATH", "CKPTSYNC_SSH") if os.environ.get(k)}
    s = service(kind, [sys.executable, "-m", "ckptsync", *words], t.label, os.getcwd(), env,
                os.path.expanduser("~"))
    if out.json_mode:
        return out.render(s, lambda out, r: None)
    out.stdout.write(s.text)
    out.stdout.flush()
    out.stderr.write("\n".join(["save it, then:", *(f"  {step}" for step in s.steps)]) + "\n")
    return 0
