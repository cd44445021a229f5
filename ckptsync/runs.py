"""Run directories beside remote_dir.

A trainer that protects a finished run starts the next one in a sibling directory
(`checkpoints/` -> `checkpoints_run_20261201_101500/`, seed 004's habit); `runs:` globs in the
config name other layouts. Backing up only remote_dir would then keep saving the old run while
the new one goes unsaved, so backup, list and checklist look for these and name them.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, replace

from ckptsync.config import Target
from ckptsync.digests import LocalDigests
from ckptsync.freshness import judge_view
from ckptsync.policy import CHECK
from ckptsync.scan import scan_server
from ckptsync.server import RemoteDirMissing, Server
from ckptsync.stores.directory import DirectoryStore

RUN_NAME = re.compile(r"^(?P<base>.+?)_run_(?P<stamp>\d{8}_\d{6})$")


@dataclass
class Run:
    name: str            # the directory's name, and the backup subdirectory's
    path: str            # absolute, on the server


@dataclass
class RunState:
    name: str
    path: str
    local_dir: str                   # where its backups go: <instance dir>/<name>
    checkpoints: int = 0             # complete checkpoints on the server
    newest: str | None = None        # the newest complete one
    newest_backed_up: bool = False   # ... and whether its backup is current
    unreadable: str = ""             # what of it the server could not list or read, and why

    @property
    def covered(self) -> bool:
        """Nothing to lose: all of it could be read, and it has no complete checkpoint yet or
        the newest one is backed up."""
        return not self.unreadable and (self.newest is None or self.newest_backed_up)

    @property
    def problem(self) -> str:
        """Why it is not covered, in a few words ("" when it is)."""
        if self.covered:
            return ""
        if self.newest is not None and not self.newest_backed_up:
            return f"newest checkpoint {self.newest} not backed up ({self.checkpoints} complete)"
        return f"not all of it could be read on the server: {self.unreadable}"


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def newer_runs(own: str, found: list[str], configured: list[str]) -> list[str]:
    """Of directory names found beside `own`, the runs to follow. Pure.

    A `<base>_run_YYYYMMDD_HHMMSS` sibling with the same base counts when it is newer than `own`
    (any, when `own` has no stamp: it is the first run). A name matched by a configured pattern
    always counts.
    """
    mine = RUN_NAME.match(own)
    base = mine["base"] if mine else own
    out = []
    for name in found:
        if name == own:
            continue
        m = RUN_NAME.match(posixpath.basename(name))
        if name in configured or (m and m["base"] == base and (mine is None or m["stamp"] > mine["stamp"])):
            out.append(name)
    return out


def _beside(root: str, patterns: tuple[str, ...]) -> tuple[str, str, list[list[str]]] | None:
    """(the parent of root, root's name, the pattern lists find_runs looks for there), None when
    root has no parent."""
    root = root.rstrip("/")
    parent, own = posixpath.dirname(root), posixpath.basename(root)
    if not own or not parent:
        return None
    mine = RUN_NAME.match(own)
    base = mine["base"] if mine else own
    return parent, own, ([list(patterns)] if patterns else []) + [[f"{_glob_escape(base)}_run_*"]]


def runs_calls(remote_dir: str, patterns: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """The server calls find_runs makes after a scan of remote_dir (for Server.expect), where
    they can be known before it: an absolute remote_dir is the server's name for it as it is."""
    beside = _beside(posixpath.normpath(remote_dir), patterns) if remote_dir.startswith("/") else None
    return [("dirs", {"root": beside[0], "patterns": asked}) for asked in beside[2]] if beside else []


def find_runs(server: Server, root: str, patterns: tuple[str, ...] = ()) -> list[Run]:
    """Run directories beside `root` (remote_dir as the server resolved it), oldest first."""
    beside = _beside(root, patterns)
    if beside is None:
        return []
    parent, own, asked = beside
    configured = server.dirs(parent, asked[0]) if patterns else []
    found = server.dirs(parent, asked[-1])
    names = newer_runs(own, found + [d for d in configured if d not in found], configured)
    return [Run(name.replace("/", "_"), posixpath.join(parent, name)) for name in names]


def run_target(target: Target, run: Run) -> Target:
    """The same server and options, aimed at one run: its own directory and its own backups."""
    args = list(target.printed.args)
    if "--remote-dir" in args:
        args[args.index("--remote-dir") + 1] = run.path
    else:
        args += ["--remote-dir", run.path]
    if "--local-dir" in args:
        args[args.index("--local-dir") + 1] = str(target.local_dir / run.name)
    else:
        args += ["--local-dir", str(target.local_dir / run.name)]
    aimed = replace(target, remote_dir=run.path, local_dir=target.local_dir / run.name)
    return aimed.with_policy(extra_files=[], follow_runs=False, runs=()).with_printed(args=tuple(args))


def survey(server: Server, root: str, target: Target) -> list[RunState]:
    """Every run to follow, with what is on the server and whether its newest checkpoint is saved."""
    states = []
    for run in find_runs(server, root, target.policy.runs):
        state = RunState(run.name, run.path, str(target.local_dir / run.name))
        try:
            view = scan_server(server, run.path, target.policy.settle_seconds)
        except RemoteDirMissing:
            continue  # removed since it was listed
        complete = [c for c in view.checkpoints if c.complete]
        state.unreadable = "; ".join([f"{c.name}: {c.reason}" for c in view.checkpoints if c.unreadable][:2]
                                     + ([view.stopped] if view.stopped else []))
        state.checkpoints = len(complete)
        if complete:
            state.newest = complete[0].name
            store = DirectoryStore(target.local_dir / run.name)
            current = judge_view(server, view, store.manifests(), CHECK, names=[complete[0].name],
                                 local=LocalDigests(store))
            state.newest_backed_up = current.get(complete[0].name, False)
        states.append(state)
    return states
