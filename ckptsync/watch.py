"""`ckptsync watch`: one connection, and each checkpoint backed up the moment it is complete.

A cycle is a backup (`backup.Backup`, the same planning, fetch, commit and status.json) over the
watch's one connection, of a listing made with the holds in place: the complete checkpoints not
backed up yet are first hard-linked on the server (hold.py), so the trainer's rotation cannot take
them before they are copied, and released once committed. Between cycles the agent waits for a
change under remote_dir (inotify, else a walk every `interval`). A dropped link is reconnected
with backoff; a changed host key, a refused login or a missing remote_dir end the watch.

Everything that happens is an `Event`, handed to `on_event`; core never prints. Tests drive one
cycle at a time (`start`, `cycle`, `wait`) with their own clock and sleep.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from ckptsync.backup import Backup, BackupOptions
from ckptsync.backup_plan import BackupResult
from ckptsync.backup_status import run_job
from ckptsync.commit import DELETED_AFTER_COPY
from ckptsync.config import Target
from ckptsync.errors import (
    PARTIAL, CkptsyncError, ConnectError, HostKeyError, Interrupted, LoginRefused, OK,
)
from ckptsync.hold import Candidate, plan, source_of
from ckptsync.checkpoint_names import checkpoint_of
from ckptsync.layout import Checkpoint
from ckptsync.policy import HOLD_MAX, rate, span
from ckptsync.progress import QUIET, Reporter
from ckptsync.result import Result
from ckptsync.scan import ServerView, scan_server
from ckptsync.selection import new_since
from ckptsync.server import FileStat, Server, open_server
from ckptsync.server.parallel import Channels
from ckptsync.stores.directory import WATCH_LOCK, DirectoryStore
from ckptsync.stores.manifest import EXTRA
from ckptsync.training import judge_training

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
INTERVAL = 2.0


@dataclass
class WatchOptions:
    interval: float = INTERVAL       # seconds between polls where inotify is missing, and between process checks
    hold: bool = True
    hold_max: int = HOLD_MAX
    until_done: bool = False         # end once training has finished and everything is backed up
    compress: str = "auto"
    max_checkpoints: int = 2         # what the first cycle takes, as backup's default does


@dataclass
class Event:
    """One thing a watch did or saw; `data` holds the keys of its kind (docs/json.md)."""

    event: str
    time: float
    target: str
    message: str
    checkpoint: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {"event": self.event, "time": self.time, "target": self.target, "message": self.message}
        if self.checkpoint:
            out["checkpoint"] = self.checkpoint
        return {**out, **self.data}


@dataclass
class Status:
    """What a watch is at, between cycles (a terminal's one status line)."""

    last: str              # the last checkpoint backed up
    last_at: float         # when (this computer's clock)
    pending: list[str]     # complete, not backed up yet
    held: list[str]
    rate: str              # the last transfer's rate
    how: str               # inotify or poll


@dataclass
class WatchResult(Result):
    target: str
    dest: str
    committed: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    outages: int = 0
    finished: bool = False
    safe: bool = False
    exit_code: int = OK


def permanent(exc: CkptsyncError) -> bool:
    """An error that waiting will not cure ends the watch: anything but a lost or refused link
    (a changed host key and a refused login among those are permanent too)."""
    return not isinstance(exc, ConnectError) or isinstance(exc, (HostKeyError, LoginRefused))


class Watch:
    def __init__(self, target: Target, opts: WatchOptions, rep: Reporter = QUIET,
                 on_event: Callable[[Event], None] | None = None, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep, connect: Callable[[], Server] | None = None) -> None:
        self.target = target
        self.opts = opts
        self.rep = rep
        self.on_event = on_event or (lambda e: None)
        self.clock = clock
        self.sleep = sleep
        self.connect = connect or (lambda: open_server(target))
        self.store = DirectoryStore(target.local_dir)
        self.result = WatchResult(target.label, str(target.local_dir))
        self.server: Server | None = None
        self.channels: Channels | None = None
        self.view: ServerView | None = None
        self.cycles = 0
        self.left_out: set[str] = set()     # complete but older than what the first cycle took: named once
        self.pending: dict[str, Checkpoint] = {}   # seen complete, not backed up yet
        self.appeared: set[str] = set()     # checkpoints changed on the server since they were last listed
        self.emitted: set[str] = set()      # committed events sent in this cycle
        self.held_then: set[str] = set()    # of those, the ones held when committed
        self.held: set[str] = set()         # what this watch holds on the server
        self.unheld: dict[str, str] = {}    # pending and not held: why
        self.said: set = set()              # warnings and failures already told
        self.finished_said = False
        self.last_ok = True                 # the last status.json recorded says ok
        self.last_failed: dict[str, str] = {}
        self.how = self.why = ""
        self.due = True
        self.on_status: Callable[[Status], None] = lambda s: None
        self.stopping = False               # stop() was called (from another thread): no new hold, no reconnect
        self.last_commit, self.last_commit_at, self.rate = "", 0.0, ""

    # -------------------------------------------------- events

    def emit(self, kind: str, message: str, checkpoint: str = "", **data: Any) -> None:
        self.on_event(Event(kind, self.clock(), self.target.label, message, checkpoint, data))

    # -------------------------------------------------- the loop

    def run(self) -> WatchResult:
        """Watch until Ctrl+C, a permanent error or, with until_done, the end of training."""
        with self.store.lock("ckptsync watch", name=WATCH_LOCK,
                             hint="one watch per backup directory: stop the other one first"):
            try:
                self.start()
                due = True
                while True:
                    if due and self.guarded(self.cycle) and self.result.finished and self.opts.until_done:
                        return self.result
                    self.status()
                    due = not self.guarded(self.wait) or self.due
            except (KeyboardInterrupt, Interrupted):
                raise Interrupted(f"interrupted; {self.release_all()}") from None
            finally:
                self.close()

    def guarded(self, step: Callable[[], Any]) -> bool:
        """step(); a lost link is reconnected (and False returned), anything permanent raised."""
        try:
            step()
            return True
        except CkptsyncError as exc:
            if self.stopping:
                raise Interrupted("stopped") from None
            if permanent(exc):
                raise
            self.reconnect(exc)
            return False

    def start(self) -> None:
        self.guarded(self.open)   # a server not reachable yet is waited for, as a lost one is
        self.emit("started", f"watching {self.target.describe()}:{self.target.remote_dir} -> {self.target.local_dir} "
                             f"({self.watching_how()})",
                  remote_dir=str(self.target.remote_dir), dest=str(self.target.local_dir), how=self.how,
                  hold=self.opts.hold, hold_max=self.opts.hold_max if self.opts.hold else 0)

    def watching_how(self) -> str:
        hold = (f"holding up to {self.opts.hold_max} checkpoints against rotation" if self.opts.hold
                else "no holds")
        return f"{'inotify' if self.how == 'inotify' else f'polling every {self.opts.interval:g}s ({self.why})'}; {hold}"

    def open(self) -> None:
        server = self.connect()
        server.open()
        try:
            changes = server.wait(self.target.remote_dir, 0, self.opts.interval)   # starts watching
        except BaseException:
            with contextlib.suppress(Exception):
                server.close(polite=False)
            raise
        self.server = server
        self.how, self.why = changes.how, changes.why
        self.channels = Channels(server, self.connect, self.target.link.parallel)

    def close(self) -> None:
        if self.channels is not None:
            self.channels.close()
            self.channels = None
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.server.close(polite=False)
            self.server = None

    def reconnect(self, lost: CkptsyncError) -> None:
        """Connect again, waiting 1 s, 2 s, 4 s ... up to 60 s between tries; one event when it works."""
        began = self.clock()
        self.close()
        self.rep.info(f"connection lost ({lost.message}); reconnecting")
        delay, tries = BACKOFF_FIRST, 0
        while True:
            self.sleep(delay)
            if self.stopping:
                raise Interrupted("stopped")
            tries += 1
            try:
                self.open()
                break
            except CkptsyncError as exc:
                if permanent(exc):
                    raise
                delay = min(delay * 2, BACKOFF_MAX)
        self.result.outages += 1
        outage = self.clock() - began
        self.emit("reconnected", f"connection lost for {span(outage)} ({lost.message}); reconnected after "
                                 f"{tries} {'try' if tries == 1 else 'tries'}", seconds=round(outage, 1), error=lost.message, tries=tries)

    def wait(self) -> None:
        """Until something changes under remote_dir, or `interval` passes; then `due` says whether
        a cycle is: something changed, a save is in progress (it may settle without an event),
        something is still to back up, or the processes say training has just stopped or resumed."""
        assert self.server is not None
        changes = self.server.wait(self.target.remote_dir, self.opts.interval, self.opts.interval)
        self.appeared.update(n for n in map(checkpoint_of, changes.changed) if n)
        if changes.how and changes.how != self.how:
            self.how, self.why = changes.how, changes.why
            self.rep.info(f"now {self.watching_how()}")
        view = self.view
        if changes.changed or view is None or self.pending:
            self.due = True
            return
        if any(not c.complete and not c.abandoned for c in view.checkpoints):
            self.due = True
            return
        procs = self.server.procs(self.target.policy.train_process or "", view.root)
        stopped = judge_training(replace(view, now=procs.now or view.now), procs, self.target.policy.settle_seconds).stopped
        self.due = stopped != self.result.finished

    def status(self) -> None:
        """What a terminal's status line shows."""
        self.on_status(Status(self.last_commit, self.last_commit_at, sorted(self.pending), sorted(self.held),
                              self.rate, self.how))

    # -------------------------------------------------- one cycle

    def cycle(self) -> None:
        """List (with the holds), hold what is complete and not backed up, back it up, release it."""
        assert self.server is not None
        server = self.server
        view = self.scan(server)
        listed_at = self.clock()
        self.cycles += 1
        manifests = self.store.manifests() if self.store.meta.is_dir() else {}
        stored = set(manifests)
        self.adopt(view, manifests)
        self.name_lost(view, stored)
        if self.opts.hold:
            view = self.hold(server, view, stored)
        opts = BackupOptions(max_checkpoints=self.opts.max_checkpoints, compress=self.opts.compress, wait=True,
                             also=sorted(self.pending))
        job = Backup(self.target, opts, self.rep, look_for_runs=False, channels=self.channels,
                     scan=self.rescan(view), command="watch")
        job.record_idle = self.cycles == 1 or not self.last_ok
        job.record_each_commit = True
        self.emitted, self.held_then = set(), set()
        job.on_commit = lambda name: self.committed(name, view, listed_at)
        job.between = lambda: self.hold_new(server)
        if self.opts.hold:   # one checkpoint per transfer: what completes meanwhile is held between two
            job.batch_bytes = 0
        job.warn_unsaved = self.cycles == 1   # what the first cycle leaves out is named once
        try:
            result = run_job(job, server)
        except CkptsyncError:
            self.last_ok = False
            raise
        self.last_ok = result.exit_code == OK
        self.after(server, view, result)
        self.view = view
        if not result.failed or result.failed == self.last_failed:   # a failure may pass: try once more
            self.finish(view)
        self.last_failed = dict(result.failed)

    def scan(self, server: Server) -> ServerView:
        return scan_server(server, self.target.remote_dir, self.target.policy.settle_seconds, writers=True,
                           holds=True, pattern=self.target.policy.train_process or "")

    def rescan(self, view: ServerView) -> Callable[[Server], ServerView]:
        """The cycle's own listing first; a fresh one when the backup plans again (after waiting for the lock)."""
        first = [view]
        return lambda server: first.pop() if first else self.scan(server)

    def adopt(self, view: ServerView, manifests: dict) -> None:
        """The first cycle: what the first backup leaves out is named once and not taken later;
        holds a watch that stopped left are taken over."""
        complete = [c for c in view.checkpoints if c.complete]
        stored = set(manifests)
        if self.cycles == 1:
            newest = {c.name for c in complete[: self.opts.max_checkpoints]}
            taken = newest | {c.name for c in new_since(complete, manifests.values())} | set(view.held)
            self.left_out = {c.name for c in complete if c.name not in stored and c.name not in taken}
            if view.held:
                self.held = set(view.held)
                self.emit("adopted", f"holds left by a watch that stopped: {', '.join(sorted(view.held))}",
                          checkpoints=sorted(view.held))
        for c in complete:
            if c.name not in stored and c.name not in self.left_out:
                self.pending[c.name] = c
        for name in [n for n in self.pending if n in stored]:
            del self.pending[name]

    def name_lost(self, view: ServerView, stored: set[str]) -> None:
        """A checkpoint seen complete, not backed up, and no longer on the server (nor held): lost."""
        present = {c.name for c in view.checkpoints}
        for name in [n for n in self.pending if n not in present and n not in stored]:
            why = self.unheld.pop(name, "" if self.opts.hold else "not held (--no-hold)")
            del self.pending[name]
            self.held.discard(name)
            self.lose(name, why)
        # Saved and deleted between two listings (a rotation while a longer copy ran): never listed.
        for name in sorted(self.appeared - present):
            if name not in stored and name not in self.left_out and name not in self.result.lost:
                self.lose(name, "saved and deleted on the server between two listings, while a copy ran")
        self.appeared &= present

    def lose(self, name: str, why: str) -> None:
        self.result.lost.append(name)
        self.emit("lost", f"{name} was deleted on the server before it was backed up"
                          + (f" ({why})" if why else ""), name, reason=why)

    def hold(self, server: Server, view: ServerView, stored: set[str]) -> ServerView:
        """Hold the newest pending checkpoints (hold.plan's limits); release what no longer needs it."""
        root = view.root
        candidates = [Candidate(c.name, c.size, c.name in view.held, c.name in view.gone)
                      for c in view.checkpoints if c.name in self.pending]
        space = server.df(root)
        newest = next((c.size for c in view.checkpoints if c.complete), 0)
        todo = plan(candidates, space.free, space.total, newest, self.opts.hold_max)
        done = {n for n in view.held if n not in self.pending}   # backed up since, or no longer complete
        release = sorted(set(todo.release) | done | view.stale)
        if release:
            gone = server.release(root, release)
            self.held -= set(gone)
            reasons = sorted({todo.unheld[n] for n in gone if n in todo.unheld})
            if set(gone) - done - view.stale or reasons:
                self.emit("released", f"released {', '.join(gone)}" + (f": {'; '.join(reasons)}" if reasons else ""),
                          checkpoints=gone, reason="; ".join(reasons))
            # List again: a checkpoint whose only copy was the hold is gone, and removing a link
            # moved the ctime of the files the trainer still has.
            view = self.scan(server)
        for name, why in todo.unheld.items():
            if name not in self.unheld and name not in self.held:
                self.rep.info(f"{name} is not held: {why}")
        self.unheld.update(todo.unheld)
        if not todo.make or self.stopping:
            return view
        by_name = {c.name: c for c in view.checkpoints}
        made = server.hold(root, {n: [view.exact[f.path] for f in by_name[n].files] for n in todo.make})
        for name, why in made.refused.items():
            self.unheld[name] = f"could not be held: {why}"
        if made.held:
            self.held |= set(made.held)
            for name in made.held:
                self.unheld.pop(name, None)
            self.emit("held", f"held {', '.join(made.held)} against rotation until "
                              + ("it is" if len(made.held) == 1 else "they are") + " backed up",
                      checkpoints=sorted(made.held))
        return with_holds(view, made.held)

    def hold_new(self, server: Server) -> None:
        """Between two transfers of a long cycle: hold what became complete since the listing, so
        that a rotation during the rest of the copy cannot take it; what was committed is released."""
        if not self.opts.hold or self.stopping:
            return
        view = self.scan(server)
        stored = set(self.store.manifests())
        for c in view.checkpoints:
            if c.complete and c.name not in stored and c.name not in self.left_out:
                self.pending.setdefault(c.name, c)
        self.hold(server, view, stored)

    def after(self, server: Server, view: ServerView, r: BackupResult) -> None:
        """Events for what the cycle did; holds of what it committed are released."""
        for w in r.warnings:
            if w not in self.said:
                self.said.add(w)
                self.emit("warning", w)
        for name in r.fetched:
            if name != EXTRA and name not in self.emitted:
                self.committed(name, view, None)
        for name in r.deleted_on_server:
            held = name in view.gone or name in self.held or name in self.held_then
            self.emit("deleted_on_server", f"{name}: " + (
                "deleted on the server before it was copied; the hold kept it: the backup is now the only copy"
                if held else DELETED_AFTER_COPY), name, held=held)
        for name, why in r.failed.items():
            if (name, why) not in self.said:
                self.said.add((name, why))
                self.emit("skipped", f"{name}: {why}", name, reason=why)
        if r.raw_bytes:
            self.rate = rate(r.raw_bytes, r.seconds) or self.rate
        taken = (set(r.fetched) | set(r.current)) & self.held
        if taken:
            self.held -= set(server.release(view.root, sorted(taken)))

    def committed(self, name: str, view: ServerView, listed_at: float | None) -> None:
        """A checkpoint is committed: said at once, with how long ago its save ended (by the
        server's clock at the listing, plus the time since)."""
        if name == EXTRA or name in self.emitted:
            return
        self.emitted.add(name)
        if name in self.held:
            self.held_then.add(name)
        m = self.store.load(name)
        saved = next((c.mtime for c in view.checkpoints if c.name == name), None)
        since = self.clock() - listed_at if listed_at is not None else 0.0
        ago = view.now - saved + max(since, 0.0) if saved is not None else None
        self.result.committed.append(name)
        self.pending.pop(name, None)
        self.appeared.discard(name)
        self.last_commit, self.last_commit_at = name, self.clock()
        self.emit("committed", f"backed up {name}" + (f", saved {span(ago)} ago" if ago is not None else ""),
                  name, size=m.size if m else 0, saved_seconds_ago=round(ago, 1) if ago is not None else None,
                  held=name in self.held)

    # -------------------------------------------------- end of training

    def finish(self, view: ServerView) -> None:
        """When no process of this run is left and nothing is written: say so, with the checklist."""
        verdict = judge_training(view, view.procs, self.target.policy.settle_seconds)
        if not verdict.stopped:
            self.finished_said = self.result.finished = False
            return
        if self.finished_said:
            return
        from ckptsync.checklist import run_checklist

        checks = run_checklist(self.target, rep=self.rep, connect=self.connect)
        unsaved = [c.name for c in view.checkpoints if c.complete and self.store.load(c.name) is None]
        lost = sorted(set(self.result.lost))
        newest = max((f.mtime_ns for f in view.exact.values()), default=0) / 1e9
        assert self.server is not None
        at = time.strftime("%H:%M", time.localtime(newest - self.server.hello.offset)) if newest else "?"
        every = "every checkpoint on the server is backed up" if lost else "every checkpoint is backed up"
        saved = (every if not unsaved else f"not backed up: {', '.join(unsaved)}") + (
            f"; lost (deleted on the server before they were backed up): {', '.join(lost)}" if lost else "")
        failed = [c for c in checks.checks if not c.ok]
        verdict_text = "SAFE" if checks.safe else "NOT SAFE (" + "; ".join(f"{c.name}: {c.detail}" for c in failed) + ")"
        self.finished_said = self.result.finished = True
        self.result.safe = checks.safe
        # Checkpoints lost along the way make the watch's result partial, whatever the server holds now.
        self.result.exit_code = max(checks.exit_code, PARTIAL if lost else OK)
        self.emit("finished", f"training finished at {at}; {saved}; checklist: {verdict_text}",
                  finished_at=at, not_backed_up=unsaved, lost=lost, safe=checks.safe)

    # -------------------------------------------------- stopping

    def stop(self) -> str:
        """From another thread (Ctrl+C with several targets): end this watch, releasing its holds."""
        self.stopping = True
        return self.release_all()

    def release_all(self) -> str:
        """On Ctrl+C: release this watch's holds over a new connection (the current one may be
        mid-transfer); a sentence saying what became of them."""
        if not self.held:
            return "nothing was held"
        self.close()
        names = sorted(self.held)
        try:
            with self.connect() as server:
                gone = server.release(self.target.remote_dir, names)
        except CkptsyncError as exc:
            return (f"the holds of {', '.join(names)} are left on the server ({exc.message}); the next watch or "
                    "backup releases them")
        self.held -= set(gone)
        return f"released the holds of {', '.join(gone)}"


def with_holds(view: ServerView, held: dict[str, list[FileStat]]) -> ServerView:
    """The view with checkpoints just held read from their holds, compared with the links' stamps
    (linking moves a file's ctime, which the read check compares)."""
    if not held:
        return view
    exact, sources, holds = dict(view.exact), dict(view.sources), dict(view.held)
    for name, files in held.items():
        holds[name] = {f.path: f for f in files}
        for f in files:
            exact[f.path] = f
            sources[f.path] = source_of(name, f.path)
    return replace(view, exact=exact, sources=sources, held=holds)


def run_watch(target: Target, opts: WatchOptions, rep: Reporter = QUIET,
              on_event: Callable[[Event], None] | None = None) -> WatchResult:
    return Watch(target, opts, rep, on_event).run()

