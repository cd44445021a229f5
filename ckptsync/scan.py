"""Ask the server what is in remote_dir and turn it into checkpoints; where there are none, say what is there."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ckptsync.hold import merge
from ckptsync.checkpoint_names import unseen_outside
from ckptsync.layout import Checkpoint, Listing, Writers, discover
from ckptsync.settle import dated_ahead
from ckptsync.policy import FIRST_SAVE_GRACE, span
from ckptsync.server import FileStat, Listing as ServerListing, Procs, Server

if TYPE_CHECKING:
    from ckptsync.config import Target


@dataclass
class ServerView:
    root: str                                  # remote_dir as the server resolved it
    checkpoints: list[Checkpoint]
    exact: dict[str, FileStat]                 # path -> size, mtime_ns, mode as listed
    now: float
    errors: list[str]
    meta: dict = field(default_factory=dict)   # path -> parsed trainer_state.json etc., as the agent read it
    clock: str = ""                            # files dated after the server's clock, when some are
    stopped: str = ""                          # why the listing is incomplete ("" when whole): the run is uncertain
    sources: dict[str, str] = field(default_factory=dict)   # path -> where the server reads it, when not at path
    held: dict[str, dict[str, FileStat]] = field(default_factory=dict)  # held checkpoints (hold.py): name -> files
    gone: set[str] = field(default_factory=set)    # held, and (partly) deleted by the trainer since
    stale: set[str] = field(default_factory=set)   # holds of an older version of the name: to release
    procs: Procs | None = None                 # the server's processes, when asked for (writers)

    def find(self, name: str) -> Checkpoint | None:
        return next((c for c in self.checkpoints if c.name == name), None)

    def files_of(self, c: Checkpoint) -> dict[str, FileStat]:
        return {f.path: self.exact[f.path] for f in c.files}

    def source(self, path: str) -> str:
        """Where the server reads `path`: the path itself, or its hold."""
        return self.sources.get(path, path)


def scan_server(server: Server, remote_dir: str, settle_seconds: float, writers: bool = False,
                holds: bool = False, pattern: str = "") -> ServerView:
    """The server's checkpoints. `writers`: ask who writes first (the processes, `pattern` as
    train_process), so that a checkpoint nobody writes is complete without waiting settle_seconds
    (layout.Writers); `holds`: with what is held."""
    server.expect(scan_calls(remote_dir, writers, holds, pattern))   # both in one round trip
    procs = server.procs(pattern, remote_dir) if writers else None
    return view_of(server.scan(remote_dir, holds=holds), settle_seconds, procs)


def scan_calls(remote_dir: str, writers: bool = False, holds: bool = False,
               pattern: str = "") -> list[tuple[str, dict]]:
    """The server calls scan_server makes, in order (for Server.expect)."""
    ask = [("procs", {"pattern": pattern, "root": remote_dir})] if writers else []
    return ask + [("scan", {"root": remote_dir, "holds": holds})]


def writers_seen(procs: Procs | None, links: list[str]) -> Writers | None:
    """What the server saw written, where it could see every writer: /proc readable, no process
    that looks like training hidden from this user, and the list of open files not cut short."""
    if procs is None or procs.blind or not procs.complete or not procs.now or not procs.root \
            or any(not p.seen for p in procs.processes):
        return None
    root = procs.root.rstrip("/") + "/"
    return Writers(frozenset(path[len(root):] for _pid, _cmd, path in procs.writing if path.startswith(root)),
                   procs.now, tuple(links))


def view_of(listing: ServerListing, settle_seconds: float, procs: Procs | None = None) -> ServerView:
    merged = merge(listing)
    files = tuple(FileStat(f.path, f.size, f.mtime_ns, f.mode) for f in merged.files)   # the stamps layout judges by
    unseen = tuple((u.path, u.why, u.mtime_ns / 1e9) for u in listing.unseen)
    found = discover(Listing(files=files, meta=merged.meta, now=listing.now, unseen=unseen), settle_seconds,
                     writers_seen(procs, listing.links))
    # What could not be read outside every checkpoint is named; nothing there would be backed up.
    outside = unseen_outside(unseen)
    if outside:
        more = f" and {len(outside) - 1} more" if len(outside) > 1 else ""
        outside = [f"could not read {outside[0][0]} on the server ({outside[0][1]}){more}; "
                   "not in any checkpoint, so not backed up"]
    ahead, most = dated_ahead((f.mtime for f in files), listing.now)
    clock = (f"{ahead} file(s) under {listing.root} are dated up to {span(most)} after the server's clock "
             "(copied with another machine's times, or a filesystem with its own clock): only their "
             "layout's completion markers say whether they are finished") if ahead else ""
    return ServerView(
        root=listing.root,
        checkpoints=found,
        exact={f.path: f for f in merged.files},
        now=listing.now,
        errors=list(listing.errors) + outside,
        meta=merged.meta,
        clock=clock,
        stopped=listing.stopped,
        sources=merged.sources,
        held=merged.held,
        gone=merged.gone,
        stale=merged.stale,
        procs=procs,
    )


CHECKPOINT_PART = re.compile(r"(checkpoint|global_step|step|epoch)[-_]?\d+")


@dataclass
class Empty:
    """A remote_dir without checkpoints: what it holds instead, said the same by list, backup,
    cron install and checklist."""

    root: str
    detail: str        # what is there instead
    command: str       # the same command for the directory the checkpoints are in, or ""
    young: bool        # changed within FIRST_SAVE_GRACE: a new run may not have saved yet
    age: float = 0.0   # seconds since the directory changed, by the server's clock

    @property
    def message(self) -> str:
        return f"no checkpoints in {self.root}"

    @property
    def hint(self) -> str:
        return f"{self.detail}: {self.command}" if self.command else self.detail

    @property
    def young_text(self) -> str:
        return (f"no checkpoints in {self.root} yet: it changed {self.age / 60:.0f} min ago on the server, "
                "so the run may not have saved its first one")


def empty_remote_dir(server: Server, view: ServerView, target: Target, verb: str) -> Empty:
    """What to say about a remote_dir without checkpoints; `verb`: the command to repeat."""
    detail, command = _elsewhere(view, target, verb)
    age = None
    if not command:  # checkpoints elsewhere mean a wrong directory, however new
        st = server.stat(view.root, ["."]).get(".")
        age = None if st is None else max(view.now - st.mtime_ns / 1e9, 0.0)
    young = age is not None and age < max(FIRST_SAVE_GRACE, target.policy.settle_seconds)
    return Empty(view.root, detail, command, young, age or 0.0)


def empty_hint(view: ServerView, target: Target) -> str:
    """What list says about a remote_dir without checkpoints: empty, or where deeper down they are."""
    detail, command = _elsewhere(view, target, "list")
    return f"{detail}: {command}" if command else detail


def _elsewhere(view: ServerView, target: Target, verb: str) -> tuple[str, str]:
    """(what remote_dir holds instead of checkpoints, the command for where they are or "")."""
    words = verb.split()
    if not view.exact:
        return f"{view.root} is empty on the server: is it the directory the trainer saves into?", ""
    deeper = set()
    for path in view.exact:
        parts = path.split("/")
        at = next((i for i, part in enumerate(parts[:-1]) if CHECKPOINT_PART.fullmatch(part)), 0)
        if at:
            deeper.add("/".join(parts[:at]))
    parent, name = view.root.rstrip("/").rsplit("/", 1) if "/" in view.root.strip("/") else ("", "")
    if not deeper and CHECKPOINT_PART.fullmatch(name):
        return (f"{view.root} looks like one checkpoint; the run is its parent",
                target.printed.command_with("--remote-dir", parent, *words))
    if not deeper:
        return (f"{view.root} holds {len(view.exact)} file(s) on the server, none of them in a "
                "checkpoint (checkpoint-N/, global_stepN/, *.pt): is it the run's output directory?"), ""
    first = min(deeper, key=lambda d: (d.count("/"), d))
    shown = ", ".join(sorted(deeper)[:3]) + (", ..." if len(deeper) > 3 else "")
    return (f"{view.root} has checkpoints further down ({shown})",
            target.printed.command_with("--remote-dir", f"{view.root.rstrip('/')}/{first}", *words))
