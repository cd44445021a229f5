"""`ckptsync prune`: delete the checkpoints a retention policy does not keep, in the backup
directory (default) or on the server (`--remote`).

The decisions come from `retention.plan`. The backups are any store (stores.Store: a
directory or a bucket). Before a prune of the backups deletes anything, the newest complete
backup is checked against its manifest (re-read, or in a bucket its objects' sizes and ETags);
one that fails is not counted as the verified copy, the next older one is tried, and a store
where none verifies loses nothing. Deleting one backup is `Store.remove_entry`: in a directory
one rename into `.ckptsync/trash/` (it disappears whole), then its manifest goes, then the
files; an interrupted run leaves trash and possibly a manifest whose entry is gone, both
cleaned under the lock at the start of the next run (`clean_leftovers`). In a bucket the
manifest goes first; then the objects no kept manifest names are swept and unfinished uploads
aborted (`sweep`). On
the server the agent's `remove` does the same with a hidden name. A server
checkpoint is deleted only if its files are still as they were when the plan
was made.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

from ckptsync.config import Target
from ckptsync.errors import INTEGRITY, OK, PARTIAL, AgentError, Interrupted, NotFound, UsageError
from ckptsync.layout import Checkpoint
from ckptsync.policy import newest_first
from ckptsync.progress import QUIET, Reporter
from ckptsync.digests import LocalDigests
from ckptsync.freshness import judge_view
from ckptsync.result import Result
from ckptsync.retention import EMPTY_POLICY_MESSAGE, Decision, Item, Policy, PolicyError, plan
from ckptsync.scan import ServerView, scan_server
from ckptsync.server import Server, open_server
from ckptsync.disk import io_error
from ckptsync.stores import Kept, ability, open_store, refuse
from ckptsync.stores.directory import WAIT_HINT, DirectoryStore
from ckptsync.stores.manifest import EXTRA, Manifest
from ckptsync.verify import Problem, check_files


@dataclass
class PruneOptions:
    policy: Policy
    remote: bool = False
    dry_run: bool = False
    force: bool = False
    keep_best: bool = True     # the best checkpoint stays unless the user says --no-keep-best
    keep_generations: int | None = None   # earlier versions kept per name (None: leave them as they are)
    wait: bool = False         # wait for another run's lock instead of exiting 11


@dataclass
class PruneEntry:
    name: str
    step: int | None
    kind: str
    mtime: float
    size: int
    keep: bool
    reasons: list[str]
    complete: bool = True
    verified: bool = True
    removed: bool = False


@dataclass
class PruneResult(Result):
    target: str
    side: str                  # "backups" or "server"
    where: str                 # the backup directory, or server:remote_dir
    dry_run: bool
    force: bool
    policy: dict
    entries: list[PruneEntry] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    generations: list[str] = field(default_factory=list)   # NAME@ID removed (or, dry run, to remove)
    freed_bytes: int = 0       # freed, or with --dry-run what would be
    failed: dict[str, str] = field(default_factory=dict)
    damaged: dict[str, str] = field(default_factory=dict)   # backups that failed verification, damaged manifests
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # A store that sweeps (a bucket): objects no kept manifest names, and unfinished uploads.
    deleted_objects: int = 0
    deleted_bytes: int = 0
    aborted_uploads: int = 0

    @property
    def kept(self) -> list[str]:
        return [e.name for e in self.entries if e.keep]

    def to_dict(self) -> dict:
        return {**super().to_dict(), "kept": self.kept}

    @property
    def policy_empty(self) -> bool:
        return not any(self.policy.values())

    @property
    def doomed(self) -> list[PruneEntry]:
        return [e for e in self.entries if not e.keep]

    @property
    def exit_code(self) -> int:
        return INTEGRITY if self.damaged else PARTIAL if self.failed else OK



def run_prune(target: Target, opts: PruneOptions, rep: Reporter = QUIET,
              connect: Callable[[], Server] | None = None) -> PruneResult:
    """`connect`: gives the server of a --remote prune (see open_server)."""
    if opts.policy.is_empty and opts.keep_generations is None:
        raise PolicyError(EMPTY_POLICY_MESSAGE)
    if opts.remote and opts.keep_generations is not None:
        raise UsageError("--keep-generations applies to the backups; the server keeps no generations")
    # keep_best adds to the rules given; with none (only --keep-generations) no entry is planned at all.
    if opts.keep_best and not opts.policy.keep_best and not opts.policy.is_empty:
        opts = replace(opts, policy=replace(opts.policy, keep_best=True))
    started = time.monotonic()
    job = RemotePrune(target, opts, rep, connect) if opts.remote else StorePrune(target, opts, rep)
    try:
        return job.run()
    except OSError as exc:  # a laptop-side write (lock, trash, manifests): one line, exit 5
        raise io_error(exc, f"pruning in {job.store.location}") from None
    finally:
        job.result.seconds = time.monotonic() - started


def _entries(decisions: list[Decision], sizes: dict[str, int]) -> list[PruneEntry]:
    return [PruneEntry(name=d.item.name, step=d.item.step, kind=d.item.kind, mtime=d.item.mtime,
                       size=sizes.get(d.item.name, 0), keep=d.keep, reasons=list(d.reasons),
                       complete=d.item.complete, verified=d.item.verified) for d in decisions]


def _interrupted(done: list[str], current: str | None, state: str) -> Interrupted:
    parts = [f"removed {', '.join(done)}" if done else "nothing removed"]
    if current is not None:
        parts.append(f"{current} {state}")
    return Interrupted("prune interrupted: " + "; ".join(parts))


# ------------------------------------------------------------------ local


class StorePrune:
    """The backups, in whichever store they are."""

    def __init__(self, target: Target, opts: PruneOptions, rep: Reporter) -> None:
        self.target = target
        self.opts = opts
        self.rep = rep
        self.store = open_store(target)
        self.result = PruneResult(target=target.label, side="backups", where=self.store.location,
                                  dry_run=opts.dry_run, force=opts.force, policy=asdict(opts.policy))

    def run(self) -> PruneResult:
        refuse(self.store, "prune", True, needs="remove_entry")   # an archive is read-only
        if not self.store.exists():
            raise NotFound(f"no backups in {self.store.location}", hint="check --local-dir or --instance")
        if self.opts.dry_run:
            self._plan()
            self._sweep()
            return self.result
        with self.store.lock("ckptsync prune", wait=self.opts.wait, hint=WAIT_HINT, stall_limit=self.target.link.stall_timeout,
                             on_wait=lambda holder: self.rep.info(f"waiting for {holder}"), on_takeover=self.rep.info):
            clean = ability(self.store, "clean_leftovers")
            if clean is not None:
                clean()
            self._plan()
            self._delete()
            self._sweep()
        return self.result

    def _sweep(self) -> None:
        """Objects no manifest names (an entry being removed takes its own along, counted in
        freed_bytes): what an interrupted backup or removal left."""
        sweep = ability(self.store, "sweep")
        if sweep is not None:
            r = self.result
            r.deleted_objects, r.deleted_bytes, r.aborted_uploads = sweep(list(self.store.manifests()), r.dry_run)

    def _plan(self) -> None:
        manifests = {n: m for n, m in self.store.manifests().items() if n != EXTRA}
        for name, (path, why) in self.store.damaged().items():
            self.result.damaged[name] = f"its manifest {path} is damaged: {why}"
            self.result.warnings.append(f"{name}: left alone, its manifest {path} is damaged ({why})")
        if not self.opts.policy.is_empty:
            items = [Item(name=m.name, step=m.step, mtime=m.mtime, is_best=m.is_best, complete=True,
                          verified=True, kind=m.kind) for m in manifests.values()]
            decisions = plan(items, self.opts.policy, time.time(), remote=False, force=self.opts.force)
            if any(not d.keep for d in decisions):
                bad = self._verify_newest(items, manifests)
                if bad:
                    items = [replace(i, verified=i.name not in bad) for i in items]
                    decisions = plan(items, self.opts.policy, time.time(), remote=False, force=self.opts.force)
            self.result.entries = _entries(decisions, {n: m.size for n, m in manifests.items()})
            _note_best(self.result)
        self._old = self._old_generations()
        self.result.generations = [f"{g.name}@{g.id}" for g in self._old]
        self.result.freed_bytes = self.store.freed_bytes([e.name for e in self.result.doomed], self._old)
        unmanaged = self.store.unmanaged()
        if unmanaged:
            self.result.warnings.append(f"not made by ckptsync, left alone: {', '.join(unmanaged)}")

    def _verify_newest(self, items: list[Item], manifests: dict[str, Manifest]) -> set[str]:
        """Re-read the newest backups, newest first, until one matches its manifest: that one is
        the copy a prune keeps whatever the rules say. Returns the names that failed."""
        bad: dict[str, str] = {}
        good = None
        for item in newest_first(items):
            m = manifests[item.name]
            self.rep.info(f"{m.name}: verifying, before anything older is removed")
            self.rep.start(f"verify {m.name}", m.size)
            try:
                problems = self._check(m)
            finally:
                self.rep.finish()
            if not problems:
                good = m.name
                break
            shown = "; ".join(f"{p.path}: {p.kind}" + (f" ({p.detail})" if p.detail else "") for p in problems[:3])
            bad[m.name] = shown + (f" and {len(problems) - 3} more" if len(problems) > 3 else "")
        for name, why in bad.items():
            self.result.damaged[name] = f"fails verification: {why}"
            self.result.warnings.append(f"{name} fails verification ({why}); to fetch the damaged files again "
                                        f"while the server has them: {self.target.printed.command('verify', '--repair', name)}")
        if bad:
            self.result.warnings.append(f"kept {good}: the newest backup that verifies, whatever the rules say"
                                        if good else "no backup verifies: nothing is removed")
        return set(bad)

    def _check(self, m: Manifest) -> list[Problem]:
        """A store that checks its own objects does (sizes and ETags); a directory's files are re-read."""
        objects = ability(self.store, "check_objects")
        if objects is None:
            return check_files(self.store.root, m.files, self.rep)
        return [Problem(*found) for label, _m, problems in objects([m.name], False) if label == m.name
                for found in problems]

    def _old_generations(self) -> list[Kept]:
        """Generations beyond --keep-generations, and every generation of an entry being removed."""
        doomed = {e.name for e in self.result.doomed}
        keep = self.opts.keep_generations
        out = []
        for name, gens in self.store.generations().items():
            if name in doomed:
                out += gens
            elif keep is not None:
                out += gens[keep:]
        return out

    def _delete(self) -> None:
        for g in self._old:
            try:
                self.store.drop_generation(g)
            except OSError as exc:
                self.result.failed[f"{g.name}@{g.id}"] = f"could not remove: {exc.strerror or exc}"
        current = None
        try:
            for entry in reversed(self.result.doomed):        # oldest first
                current = entry.name
                try:
                    self.store.remove_entry(entry.name)
                except OSError as exc:
                    if isinstance(exc.__context__, KeyboardInterrupt):
                        # Ctrl+C inside the deletion's own cleanup (a second close of a directory
                        # fd gives EBADF): the signal, not this error, is what happened.
                        raise KeyboardInterrupt from None
                    self.result.failed[entry.name] = f"could not remove: {exc.strerror or exc}"
                    continue
                entry.removed = True
                self.result.removed.append(entry.name)
                current = None
                self.rep.info(f"removed {entry.name}")
        except KeyboardInterrupt:
            there = current is not None and current in self.store.manifests()
            state = ("is still complete" if there
                     else "was removed (what is left of it is cleaned by the next run)")
            raise _interrupted(self.result.removed, current, state) from None


# ------------------------------------------------------------------ remote


class RemotePrune:
    def __init__(self, target: Target, opts: PruneOptions, rep: Reporter,
                 connect: Callable[[], Server] | None = None) -> None:
        self.target = target
        self.connect = connect
        self.opts = opts
        self.rep = rep
        self.store = DirectoryStore(target.local_dir)
        self.result = PruneResult(target=target.label, side="server", where="", dry_run=opts.dry_run,
                                  force=opts.force, policy=asdict(opts.policy))

    def run(self) -> PruneResult:
        with open_server(self.target, self.connect) as server:
            self.server = server
            view = scan_server(server, self.target.remote_dir, self.target.policy.settle_seconds)
            self.result.where = f"{self.target.describe()}:{view.root}"
            self.result.warnings.extend(view.errors)
            if self.opts.dry_run or not self.store.root.is_dir():
                self._plan(view, held=False)
                if not self.opts.dry_run:
                    with server.holding(view.root, "ckptsync prune --remote"):
                        self._delete(view)
                return self.result
            # Held so that no backup reads a checkpoint while it is deleted, and the manifests stay put;
            # the server's lock, so that no restore puts a checkpoint back while it is deleted.
            with self.store.lock("ckptsync prune --remote", wait=self.opts.wait, hint=WAIT_HINT,
                                 on_wait=lambda holder: self.rep.info(f"waiting for {holder}"),
                                 stall_limit=self.target.link.stall_timeout), \
                    server.holding(view.root, "ckptsync prune --remote"):
                self._plan(view, held=True)
                self._delete(view)
        return self.result

    def _plan(self, view: ServerView, held: bool) -> None:
        current = judge_view(self.server, view, self.store.manifests(), local=LocalDigests(self.store, held))
        items = [Item(name=c.name, step=c.step, mtime=c.mtime, is_best=c.is_best, complete=c.complete,
                      verified=current.get(c.name, False), kind=c.kind)
                 for c in view.checkpoints]
        decisions = plan(items, self.opts.policy, view.now, remote=True, force=self.opts.force)
        self.result.entries = _entries(decisions, {c.name: c.size for c in view.checkpoints})
        _note_best(self.result)
        self.result.freed_bytes = sum(e.size for e in self.result.doomed)

    def _delete(self, view: ServerView) -> None:
        current = None
        try:
            for entry in reversed(self.result.doomed):
                current = entry.name
                c = view.find(entry.name)
                changed = self._changed(view, c)
                if changed:
                    self.result.failed[entry.name] = f"{changed} since the listing; kept"
                    continue
                try:
                    removed = self.server.remove(view.root, [entry.name])
                except AgentError as exc:
                    self.result.failed[entry.name] = exc.message
                    continue
                current = None
                if entry.name in removed:
                    entry.removed = True
                    self.result.removed.append(entry.name)
                    self.rep.info(f"removed {entry.name} on the server")
        except KeyboardInterrupt:
            raise _interrupted(self.result.removed, current, "is either still complete or moved aside "
                               "on the server (the next prune --remote deletes what is left)") from None
        self.result.freed_bytes = sum(e.size for e in self.result.entries if e.removed)

    def _changed(self, view: ServerView, c: Checkpoint) -> str:
        """Empty if every file is still as listed; else what happened."""
        paths = [f.path for f in c.files]
        now = self.server.stat(view.root, paths)
        for path in paths:
            st = now.get(path)
            if st is None:
                return f"{path} disappeared"
            if not st.same_content_stamp(view.exact[path].stat):
                return f"{path} changed"
        return ""


def _note_best(result: PruneResult) -> None:
    for e in result.entries:
        if e.keep and e.reasons == ["best"]:
            result.warnings.append(
                f"kept {e.name}: it is the best checkpoint (trainer_state.json's best_model_checkpoint, or "
                "best_model.pt), which a run with load_best_model_at_end needs to finish; --no-keep-best deletes it")
