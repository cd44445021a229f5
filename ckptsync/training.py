"""Has training stopped? The server's processes and files, judged without I/O.

Where the server shows its processes, they decide: training has stopped when no process of
this run looks like training or uses a GPU (what makes a process this run's: agent/procs.py),
nothing is open for writing under remote_dir and no file there changed within settle_seconds.
A save left unfinished then is reported, not waited for. Where the processes could not be seen
or told apart, the save cadence stands in for them: a checkpoint due within DUE_MARGIN save
intervals, or a save still unfinished, means training may still run. `--training-stopped`
(`stated`) sets the heuristics aside; a file being written now still counts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

from ckptsync.settle import abandon_after, save_interval, written_recently
from ckptsync.policy import span
from ckptsync.scan import ServerView
from ckptsync.server import FileStat, Process, Procs

# A save is "due" until this many intervals have passed without one: a trainer that is late
# by less than that may still be running (saving a checkpoint takes time too).
DUE_MARGIN = 1.5
SHOWN = 60  # characters of a command line in a sentence

# What a save in progress leaves under remote_dir before its final name exists: the Trainer's
# staging directory (renamed to checkpoint-N when the save is done), and the temporary files
# of single-file savers (latest.pt.tmp, tempfile's tmpXXXXXXXX, .tmp*, *.part, *.incomplete).
STAGING_DIR = re.compile(r"tmp-checkpoint-\d+")
TEMP_FILE = re.compile(r"\.tmp.*|tmp[a-z0-9_]{8}(\..*)?")
TEMP_SUFFIXES = {"tmp", "temp", "part", "partial", "incomplete"}


def temporary_save(path: str) -> str | None:
    """The save in progress `path` belongs to (its staging directory or itself), or None. Pure."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    for i, part in enumerate(parts[:-1]):
        if STAGING_DIR.fullmatch(part):
            return "/".join(parts[: i + 1]) + "/"
    if parts and (TEMP_FILE.fullmatch(parts[-1]) or TEMP_SUFFIXES & set(parts[-1].lower().split(".")[1:])):
        return "/".join(parts)
    return None


def temporary_saves(files: Iterable[FileStat]) -> dict[str, float]:
    """Saves in progress (see temporary_save) -> the newest mtime of their files. Pure."""
    out: dict[str, float] = {}
    for f in files:
        name = temporary_save(f.path)
        if name is not None:
            out[name] = max(out.get(name, f.mtime), f.mtime)
    return out


@dataclass
class Verdict:
    writing: list[str] = field(default_factory=list)   # something is being written now
    running: list[str] = field(default_factory=list)   # training looks alive (--training-stopped overrides)
    unseen: list[str] = field(default_factory=list)    # what could not be seen or told apart
    notes: list[str] = field(default_factory=list)     # other training on the server: information
    stale: list[str] = field(default_factory=list)     # saves left unfinished that nothing writes
    set_aside: list[str] = field(default_factory=list)  # what --training-stopped did not count
    checked: str = ""                                  # what was checked, when nothing runs

    @property
    def stopped(self) -> bool:
        return not self.writing and not self.running

    @property
    def detail(self) -> str:
        if self.stopped:
            text = self.checked
            if self.set_aside:
                text += "; not counted: " + "; ".join(self.set_aside)
        else:
            text = "; ".join(self.writing + self.running)
        if self.unseen:
            text += "; could not see: " + "; ".join(self.unseen)
        return text


def judge_training(view: ServerView, procs: Procs | None, settle_seconds: float, stated: bool = False) -> Verdict:
    """Whether training has stopped, by the server's clock (view.now). Pure."""
    v = Verdict()
    now = view.now
    files = [FileStat(p, f.size, f.mtime_ns, f.mode) for p, f in view.exact.items()]
    _processes(v, procs)
    guess = not v.unseen or stated   # files alone are judged only where processes were seen
    unfinished = []                  # (as a save in progress, as one that stopped) of saves not written now
    claimed = set()
    for c in view.checkpoints:
        if c.complete or c.abandoned or c.restored:
            continue
        claimed.update(f.path for f in c.files)
        if c.unreadable:
            v.writing.append(f"{c.name} {c.reason}")
        elif any(written_recently(f.mtime, now, settle_seconds) for f in c.files):
            v.writing.append(f"{c.name} is still being written ({c.reason})")
        else:
            unfinished.append((f"{c.name} is still being written ({c.reason})",
                               f"{c.name} is incomplete ({c.reason}) and nothing is writing it: training "
                               "stopped before it finished, so it cannot be backed up"))
    rest = [f for f in files if f.path not in claimed]
    limit = abandon_after(view.checkpoints)
    for name, mtime in sorted(temporary_saves(rest).items()):
        claimed.update(f.path for f in rest if f.path == name or f.path.startswith(name.rstrip("/") + "/"))
        age = span(now - mtime)
        if written_recently(mtime, now, settle_seconds):
            v.writing.append(f"{name} is a save in progress (modified {age} ago)")
        elif now - mtime <= limit:
            unfinished.append((f"{name} is a save in progress (modified {age} ago)",
                               f"{name} is left from a save that did not finish (untouched for {age})"))
    recent = [f for f in files if f.path not in claimed and written_recently(f.mtime, now, settle_seconds)]
    if recent:
        newest = max(recent, key=lambda f: f.mtime)
        more = f" (and {len(recent) - 1} more)" if len(recent) > 1 else ""
        v.writing.append(f"{newest.path} was modified {span(now - newest.mtime)} ago{more}")
    if not guess:
        v.running.extend(_cadence(view))
    alive = v.writing or v.running or not guess
    for in_progress, stopped in unfinished:
        (v.running if alive else v.stale).append(in_progress if alive else stopped)
    if stated:
        v.set_aside, v.running = v.running, []
        v.checked = f"stated with --training-stopped; nothing written in the last {span(settle_seconds)}"
    elif v.unseen:
        v.checked = "no save in progress and none due (the save cadence stands in for the processes)"
    else:
        v.checked = f"no process of this run, no GPU in use by one, nothing written in the last {span(settle_seconds)}"
    return v


def _processes(v: Verdict, procs: Procs | None) -> None:
    if procs is None:
        v.unseen.append("the server's processes were not asked for")
        return
    for pid, cmd, path in procs.writing[:1]:
        more = f" (and {len(procs.writing) - 1} more files)" if len(procs.writing) > 1 else ""
        v.writing.append(f"pid {pid} ({short(cmd)}) is writing {path}{more}")
    for p in procs.processes:
        if p.run and (p.trainer or p.gpu):
            v.running.append(f"pid {p.pid} ({short(p.cmd)}) is running; it {p.run}"
                             + (" and uses a GPU" if p.gpu else ""))
        elif p.run and p.python:
            v.unseen.append(f"pid {p.pid} ({short(p.cmd)}) {p.run} but does not look like training "
                            "(if it trains, set train_process in the config)")
        elif not p.run and not p.seen:
            v.unseen.append(f"pid {p.pid} ({short(p.cmd)}) looks like training; this user may not read "
                            "its open files, so whose run it is cannot be told")
        elif not p.run:
            v.notes.append(_other(p))
    v.unseen.extend(procs.blind)


def _other(p: Process) -> str:
    whose = "this user's" if p.mine else "another user's"
    what = "training" if p.trainer else "using a GPU"
    hint = " (if it is this run's, set train_process in the config)" if p.mine else ""
    return f"pid {p.pid} ({short(p.cmd)}), {whose}, is {what}; it is not this run's{hint}"


def _cadence(view: ServerView) -> list[str]:
    """The save cadence: a checkpoint due within DUE_MARGIN intervals means training may still run."""
    interval = save_interval(view.checkpoints)
    newest = next((c for c in view.checkpoints if c.complete), None)
    if not interval or newest is None or view.now - newest.mtime >= interval * DUE_MARGIN:
        return []
    due = interval - (view.now - newest.mtime)
    when = f"is due in ~{span(due)}" if due >= 1 else "is due now"
    return [f"a checkpoint is saved every ~{span(interval)}; the next one {when}"]


def short(cmd: str) -> str:
    return cmd if len(cmd) <= SHOWN else cmd[: SHOWN - 3] + "..."
