"""Ask the server what is in remote_dir and turn it into checkpoints; where there are none, say what is there."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ckptsync.layout import Checkpoint, FileEntry, Listing, dated_ahead, discover, unseen_outside
from ckptsync.policy import FIRST_SAVE_GRACE, span
from ckptsync.server import FileStat, Server

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

    def find(self, name: str) -> Checkpoint | None:
        return next((c for c in self.checkpoints if c.name == name), None)

    def files_of(self, c: Checkpoint) -> dict[str, FileStat]:
        return {f.path: self.exact[f.path] for f in c.files}


def scan_server(server: Server, remote_dir: str, settle_seconds: float) -> ServerView:
    listing = server.scan(remote_dir)
    files = tuple(FileEntry(path=f.path, size=f.size, mtime=f.mtime_ns / 1e9, mode=f.mode) for f in listing.files)
    unseen = tuple((u.path, u.why, u.mtime_ns / 1e9) for u in listing.unseen)
    found = discover(Listing(files=files, meta=listing.meta, now=listing.now, unseen=unseen), settle_seconds)
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
        exact={f.path: f for f in listing.files},
        now=listing.now,
        errors=list(listing.errors) + outside,
        meta=listing.meta,
        clock=clock,
        stopped=listing.stopped,
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
    young = age is not None and age < max(FIRST_SAVE_GRACE, target.settle_seconds)
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
                target.command_with("--remote-dir", parent, *words))
    if not deeper:
        return (f"{view.root} holds {len(view.exact)} file(s) on the server, none of them in a "
                "checkpoint (checkpoint-N/, global_stepN/, *.pt): is it the run's output directory?"), ""
    first = min(deeper, key=lambda d: (d.count("/"), d))
    shown = ", ".join(sorted(deeper)[:3]) + (", ..." if len(deeper) > 3 else "")
    return (f"{view.root} has checkpoints further down ({shown})",
            target.command_with("--remote-dir", f"{view.root.rstrip('/')}/{first}", *words))
