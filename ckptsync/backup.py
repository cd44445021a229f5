"""`ckptsync backup`: fetch complete checkpoints into the backup directory, verified and atomic."""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace

from typing import Callable

from ckptsync.backup_plan import BackupResult, check_space, name_unsaved, plan_checkpoint, stat_extras
from ckptsync.backup_status import record_run, run_job
from ckptsync.committer import Committer
from ckptsync.commit import (
    Pending, failed_text, finished_manifest, gone, planned_manifest, record, staged_copy, usable_staged,
)
from ckptsync.config import Target
from ckptsync.errors import CkptsyncError, ConnectError, Interrupted, IntegrityError, Locked, NotFound
from ckptsync.digests import LocalDigests
from ckptsync.doctor import fallback_line
from ckptsync.layout import Checkpoint
from ckptsync.freshness import Judgement, judge
from ckptsync.policy import BATCH_BYTES, CHECK, COMMIT_GROUP, PROGRESS_BYTES, batches, human
from ckptsync.progress import QUIET, Reporter
from ckptsync.runs import find_runs, run_target, runs_calls, survey
from ckptsync.scan import ServerView, empty_remote_dir, scan_calls, scan_server
from ckptsync.server import FileStat, Server, open_server
from ckptsync.dedup import LINK
from ckptsync.disk import io_error
from ckptsync.stores.directory import WAIT_HINT, DirectoryStore as Store
from ckptsync.stores.manifest import EXTRA, FileRecord, Manifest, Verified
from ckptsync.placement import Placement, restamp_file
from ckptsync.ratelimit import RateLimiter
from ckptsync.selection import BackupOptions, PlanItem, resolve_names, select, unseen_failures
from ckptsync.server.parallel import Channels, fetch
from ckptsync.server.transfer import Received, kept_prefixes


class Backup:
    def __init__(self, target: Target, opts: BackupOptions, rep: Reporter = QUIET,
                 look_for_runs: bool = True, channels: Channels | None = None,
                 scan: Callable[[Server], ServerView] | None = None, command: str = "backup",
                 connect: Callable[[], Server] | None = None) -> None:
        """`scan`: how the server is listed (a watch lists with its holds in place); `command`:
        what the lock and status.json name ("watch" for a watch's cycles); `connect`: gives each
        connection (see open_server)."""
        if target.link.parallel != 1 and target.link.bwlimit and target.link.limiter is None:
            target = target.with_link(limiter=RateLimiter(target.link.bwlimit))  # one rate for all channels
        self.target = target
        self.connect = connect
        self.channels = channels  # a followed run fetches over its parent's
        self.look_for_runs = look_for_runs
        self._judge_memo: dict[str, tuple] = {}   # name -> (manifest files, server files, Judgement)
        self.opts = opts
        self.rep = rep
        self.command = command
        self.record_idle = True   # record a run that did nothing in status.json (a watch's cycles mostly do not)
        self.record_each_commit = False   # status.json after every commit, not only at the end (a watch)
        self.on_commit: Callable[[str], None] = lambda name: None   # told of each checkpoint as it is committed
        self.between: Callable[[], None] = lambda: None   # run between two transfers (a watch holds what is new)
        self.batch_bytes = BATCH_BYTES   # small checkpoints fetched together up to this; 0: one per transfer
        self.commit_group = COMMIT_GROUP   # checkpoints of one transfer committed together, sharing fsyncs
        self.committer = Committer()   # a transfer's commits, on their own thread
        self.before_commit: Callable[[list[str]], None] = lambda names: None   # on that thread (tests hold it)
        self.warn_unsaved = True  # warn about the complete checkpoints it leaves out (a watch does once)
        self.scan = scan or (lambda server: scan_server(server, self.target.remote_dir, self.target.policy.settle_seconds,
                                                        writers=True, holds=True,
                                                        pattern=self.target.policy.train_process or ""))
        # What a run asks the server first, sent with its start (Server.expect): the listing, then
        # the look for newer runs beside it. A scan of its own (a watch's) is its own business.
        self.first_calls = [] if scan is not None else scan_calls(
            target.remote_dir, writers=True, holds=True, pattern=target.policy.train_process or "") + (
            runs_calls(target.remote_dir, target.policy.runs) if look_for_runs else [])
        self.touched = False   # the lock was taken: from here on the run is a backup result
        self.store = Store(target.local_dir)
        self.result = BackupResult(target=target.label, server=target.describe(), dest=str(target.local_dir),
                                   dry_run=opts.dry_run)
        self.digests = LocalDigests(self.store)   # the backup's bytes in the server's algorithm
        self.placement = Placement(self.store, target.policy.dedup, self.result, self.digests, rep)

    def open_server(self) -> Server:
        """A new connection to the target's server, not yet opened."""
        return open_server(self.target, self.connect)

    def run(self, server: Server | None = None) -> BackupResult:
        """Back up remote_dir (and, with follow_runs, the newer runs beside it), over `server`
        when given, else over a connection of its own."""
        started = time.monotonic()
        try:
            if self.command == "backup" and self.look_for_runs and not self.opts.dry_run:
                self._refuse_beside_watch()
            given = server is not None
            server = server if given else self.open_server()
            server.expect(self.first_calls)   # before open: with the agent's start
            with (contextlib.nullcontext(server) if given else server) as server:
                self.server = server
                if self.look_for_runs and not (self.store.meta / "manifests").is_dir():
                    # A new target: say once when the server falls back to a slower hash or codec.
                    line = fallback_line(server.hello, self.target.describe(), self.target.printed.command("doctor"))
                    if line:
                        self.rep.info(line)
                own = self.channels is None
                if own:
                    self.channels = Channels(server, self.open_server, self.target.link.parallel)
                ended = False   # without an error: the first channel closes beside the others
                try:
                    view = self.scan(server)
                    self._check_found(view)
                    self._backup(view)
                    self._name_unsaved()
                    if self.command == "backup" and not self.opts.dry_run:
                        self._release_left_holds(view)
                    if self.look_for_runs:
                        self._runs(view)
                    ended = True
                finally:
                    self.result.channels = self.channels.most
                    if own:
                        if self.channels.warning:
                            self.result.warnings.append(self.channels.warning)
                        self.channels.close(first=ended and not given)
            return self.result
        finally:
            self.result.seconds = time.monotonic() - started

    def _backup(self, view: ServerView) -> None:
        chosen, todo = self._plan(view)
        orphans = self._orphans(view)
        if self.opts.dry_run or not (todo or orphans):
            if not self.opts.dry_run:
                self.digests.save()
            return
        # Before the lock: a refused run leaves nothing on disk.
        check_space(self.store, todo, self.target.printed.command("backup", "--discard-staged"))
        waited = []

        def on_wait(holder: str) -> None:
            waited.append(holder)
            self.rep.info(f"waiting for {holder}")

        with self.store.lock(f"ckptsync {self.command}", wait=self.opts.wait, on_wait=on_wait, hint=WAIT_HINT,
                             stall_limit=self.target.link.stall_timeout):
            self.touched = True
            self.digests.held = True
            try:
                self._locked(view, bool(waited))
            finally:
                self.digests.save()
                self.digests.held = False

    def _locked(self, view: ServerView, waited: bool) -> None:
        """The backup's work under the lock."""
        # Plan again under the lock: the run we waited for may have stored these already.
        if waited:
            view = self.scan(self.server)
        self.result.warnings.clear()
        self.result.failed.clear()
        chosen, todo = self._plan(view)
        self._settle_orphans(self._orphans(view))
        if not todo:
            return
        check_space(self.store, todo, self.target.printed.command("backup", "--discard-staged"))
        self.store.clean_trash()
        self.result.adopted = self.store.adopt_replaced()
        self.placement.add(None)
        by_name = {c.name: c for c in chosen}
        fetches = [(p.name, p.fetch_bytes) for p in todo if p.action == "fetch" and p.name in by_name]
        batch_of = {names[0]: names for names in batches(fetches, self.batch_bytes)}
        for item in todo:
            if item.action == "restamp":
                self._restamp(item.name, self._judged[item.name])
            elif item.name == EXTRA and item.name not in by_name:
                self._fetch_extras(view)
            elif item.name in batch_of:
                self._fetch(view, [by_name[n] for n in batch_of[item.name]])
                self.between()

    def _check_found(self, view: ServerView) -> None:
        """No checkpoint in remote_dir, and none ever backed up from it: a wrong remote_dir (exit 10,
        saying where they are), unless the directory is new and the run has not saved yet."""
        if view.checkpoints or not self.look_for_runs or any(n != EXTRA for n in self.store.manifests()):
            return
        empty = empty_remote_dir(self.server, view, self.target, "backup")
        if not empty.young:
            raise NotFound(empty.message, hint=empty.hint)
        self.result.warnings.append(empty.young_text)

    def _runs(self, view: ServerView) -> None:
        """Newer run directories beside remote_dir: backed up with follow_runs, else named."""
        if not self.target.policy.follow_runs:
            self.result.unfollowed = [r for r in survey(self.server, view.root, self.target) if not r.covered]
            if self.result.unfollowed:
                self.result.follow_hint = self.target.printed.command("backup", "--follow-runs")
            return
        opts = replace(self.opts, names=[], extra_files=False)
        for run in find_runs(self.server, view.root, self.target.policy.runs):
            self.rep.info(f"run {run.name}: backing up {run.path}")
            job = Backup(run_target(self.target, run), opts, self.rep, look_for_runs=False, channels=self.channels)
            try:
                sub = run_job(job, self.server)
            except Locked as exc:  # another run is saving this one right now
                self.result.warnings.append(f"run {run.name} skipped: {exc.message}")
                continue
            except CkptsyncError as exc:
                self.result.failed[run.name] = exc.message
                continue
            self.result.runs.append(sub)

    def _judge(self, view: ServerView, c: Checkpoint) -> Judgement:
        """judge(), once per run for the same manifest and listing: the plan is made again under
        the lock, and files it doubts would otherwise be hashed on the server twice."""
        m = self.store.load(c.name)
        stored, files = (m.files if m else None), view.files_of(c)
        seen = self._judge_memo.get(c.name)
        if seen is not None and seen[0] == stored and seen[1] == files:
            return seen[2]
        judged = judge(self.server, view.root, stored, files, CHECK, local=self.digests)
        self._judge_memo[c.name] = (stored, files, judged)
        return judged

    def _plan(self, view: ServerView) -> tuple[list[Checkpoint], list[PlanItem]]:
        self.result.warnings.extend(view.errors + ([view.clock] if view.clock else []))
        self._view = view
        stored = self.store.manifests()
        self._first_run = not set(stored) - {EXTRA}
        self.opts = resolve_names(self.opts, view.checkpoints)
        # A held checkpoint was complete when it was held: it is taken whatever its age.
        opts = replace(self.opts, also=[*self.opts.also, *sorted(view.held)])
        chosen, skipped = select(view.checkpoints, opts, stored.values())
        self._judged = {c.name: self._judge(view, c) for c in chosen}
        plan = [plan_checkpoint(self.store, view, c, self._judged[c.name]) for c in chosen]
        extras = self._plan_extras(view) if self.opts.extra_files else None
        self.result.plan = plan + ([extras] if extras else []) + skipped
        for s in skipped:
            if s.name in self.opts.names:  # asked for by name: not getting it is a failure
                self.result.failed[s.name] = s.reason
        self.result.failed.update(unseen_failures(view, self.opts.names))
        todo = [p for p in plan if p.action in ("fetch", "restamp")]
        if extras is not None and extras.action in ("fetch", "restamp"):
            todo.append(extras)
        return chosen, todo

    # -------------------------------------------------- checkpoints


    def _fetch(self, view: ServerView, batch: list[Checkpoint]) -> None:
        """Fetch checkpoints over one transfer, committing each (manifest, then rename) as soon as
        every one of its files is copied, the newest first."""
        listed = {c.name: view.files_of(c) for c in batch}
        progress: dict[str, dict[str, Verified]] = {}
        todo: dict[str, list[str]] = {}
        source = {"target": self.target.label, "server": self.target.describe(), "remote_dir": view.root}
        planned = {c.name: planned_manifest(c, listed[c.name], source) for c in batch}
        for c in batch:
            progress[c.name] = usable_staged(self.store, c.name, listed[c.name], check_hash=True)
            todo[c.name] = [p for p in listed[c.name] if p not in progress[c.name]]
            self._write(lambda m=planned[c.name]: self.store.save_pending(m), f"recording the files of {c.name}")
        kept = sum(len(progress[c.name]) for c in batch)
        twins = self.placement.known(self.server, view.root, todo, listed, progress, view.source)
        placed = sum(len(progress[c.name]) for c in batch) - kept
        pending = Pending(batch, listed, progress, twins, lambda *a: self.placement.twin(listed, progress, *a),
                          lambda cs: self._store_fetched([(planned[c.name], progress[c.name], set(todo[c.name]))
                                                          for c in cs]), group=self.commit_group)
        try:
            self._transfer(view, batch, listed, progress, todo, twins, kept, placed, pending)
        finally:
            self.committer.wait()   # an error on the way: the commits queued before it still complete
        self._note_deleted(view, {n: listed[n] for n in pending.committed})

    def _transfer(self, view: ServerView, batch: list[Checkpoint], listed: dict[str, dict[str, FileStat]],
                  progress: dict[str, dict[str, Verified]], todo: dict[str, list[str]],
                  twins: dict[tuple[str, str], tuple[str, str]], kept: int, placed: int, pending: Pending) -> None:
        """The transfer of `_fetch`, committing as checkpoints arrive whole; every commit completed at its end."""
        pending.commit_ready()   # whole already: kept from an interrupted run, or placed from the store
        owner = {p: name for name, paths in todo.items() for p in paths
                 if p not in progress[name] and (name, p) not in twins}
        label = batch[0].name if len(batch) == 1 else f"{len(batch)} checkpoints ({batch[0].name} ... {batch[-1].name})"
        self.rep.info(f"{label}: fetching {len(owner)} files, {human(sum(listed[n][p].size for p, n in owner.items()))}"
                      + _not_fetched_text(kept, placed))
        changed, unreadable = self._download(view.root, [(view.source(p), p) for p in owner], owner, listed, label,
                                             progress, pending) if owner else ({}, {})
        left = pending.unplaced()
        if left:  # copies whose origin did not arrive: fetched themselves
            more = self._download(view.root, [(view.source(p), p) for p in left], left, listed, label, progress,
                                  pending)
            changed.update(more[0])
            unreadable.update(more[1])
        pending.commit_ready()
        self.committer.finish()
        for c in batch:
            if c.name not in pending.waiting:
                continue
            self.result.failed[c.name] = failed_text(c, len(progress[c.name]), changed, unreadable)
            if progress[c.name]:  # its verified files stay staged for the next run
                self._write(lambda n=c.name: self.store.save_progress(n, progress[n]),
                            f"recording what was fetched of {c.name}")

    def _write(self, step: Callable[[], None], what: str) -> None:
        try:
            step()
        except OSError as exc:
            raise io_error(exc, what) from None

    def _store_fetched(self, entries: list[tuple[Manifest, dict[str, Verified], set[str]]]) -> None:
        """Commit fetched checkpoints together: (planned manifest, progress, members fetched) each."""
        ms = []
        for planned, progress, fetched in entries:
            stage_root = self.store.staging(planned.name)
            for p, r in progress.items():  # a prefix kept by an interrupted run whose file was then placed locally
                if r.placed:
                    (stage_root / (p + ".part")).unlink(missing_ok=True)
            m = finished_manifest(planned, progress)
            # Recorded first: should the commit not finish (a crash), the next run commits it from staging.
            self._write(lambda n=m.name, p=progress: self.store.save_progress(n, p),
                        f"recording what was fetched of {m.name}")
            placed = {p for p, r in progress.items() if r.placed}
            self.placement.dedup(m.name, m.files, fetched=fetched - placed, placed=placed)
            ms.append(m)
        what = f"moving {', '.join(m.name for m in ms)} into place"

        def durable() -> list:
            self.before_commit([m.name for m in ms])
            return self._durable(ms, what)

        def then(kept: list) -> None:
            self._committed(ms, kept, what)
            for m in ms:
                self.result.fetched.append(m.name)
                if self.record_each_commit:
                    record_run(self, self.result.exit_code, "", final=False)
                self.on_commit(m.name)

        self.committer.submit(durable, then)

    def _note_deleted(self, view: ServerView, committed: dict[str, dict[str, FileStat]]) -> None:
        """Say which checkpoints just committed the server has deleted since (a rotation)."""
        self.result.deleted_on_server += gone(self.server, view.root, committed)

    def _orphans(self, view: ServerView) -> list[str]:
        """Staged entries of checkpoints the server no longer has, and the bookkeeping a commit
        that moved the files in place did not get to delete."""
        on_server = {c.name for c in view.checkpoints}
        return [n for n in self.store.staged_names() if n != EXTRA and (n not in on_server or self._finished(n))]

    def _finished(self, name: str) -> bool:
        return not any(p.is_file() for p in self.store.staging(name).rglob("*")) and self.store.load(name) is not None

    def _settle_orphans(self, names: list[str]) -> None:
        """Commit what a run staged of a checkpoint the server has deleted since, when every file of
        it was copied; drop it otherwise (it can never be completed)."""
        for name in names:
            if self._finished(name):
                self._write(lambda n=name: self.store.discard_staging(n), f"deleting the staging of {name}")
                continue
            m = staged_copy(self.store, name)
            if m is None:
                self._write(lambda n=name: self.store.discard_staging(n), f"deleting the staging of {name}")
                self.result.warnings.append(f"dropped what was staged of {name}: the server no longer has it "
                                            "and not every file of it had been copied")
                continue
            self._commit(m, f"moving {name} into place")
            self.result.fetched.append(name)
            self.result.deleted_on_server.append(name)

    def _refuse_beside_watch(self) -> None:
        """A watch backs up each checkpoint as it is saved: a backup beside it has nothing to add."""
        holder = self.store.watcher() if self.store.meta.is_dir() else ""
        if holder:
            raise Locked(f"a watch is running on {self.store.root}: {holder}; it backs up each checkpoint as soon "
                         "as it is complete", hint="from cron, --skip-if-locked exits 0 while it runs")

    def _release_left_holds(self, view: ServerView) -> None:
        """Holds a watch left when it stopped (a running watch refuses this backup): released once
        what they keep is backed up, or the trainer's own copy is still there."""
        done = set(self.result.fetched) | set(self.result.current)
        keep = {n for n in view.gone if n not in done}
        names = sorted((set(view.held) | view.stale) - keep)
        if not names:
            return
        released = self.server.release(view.root, names)
        if released:
            self.result.warnings.append(f"released what a watch that stopped held on the server: {', '.join(released)}")

    def _name_unsaved(self) -> None:
        """Every complete checkpoint that is not backed up after this run, and why: never silently."""
        view = getattr(self, "_view", None)
        if view is None:
            return
        stored = set(self.store.manifests()) if self.store.meta.is_dir() else set()
        warning = name_unsaved(self.result, view.checkpoints, stored, self._first_run, self.opts,
                               self.target.printed.command("backup", "--all"))
        if warning and self.warn_unsaved:
            self.result.warnings.append(warning)

    def _commit(self, ms: Manifest | list[Manifest], what: str) -> None:
        """Move staged entries into place (Store.commit_all); the version one replaces is kept as a
        generation, and generations beyond keep_generations are dropped."""
        ms = ms if isinstance(ms, list) else [ms]
        self._committed(ms, self._durable(ms, what), what)

    def _durable(self, ms: list[Manifest], what: str) -> list:
        """Store.commit_all: each entry under its final name once it is durable."""
        try:
            return self.store.commit_all(ms)
        except OSError as exc:
            raise io_error(exc, what) from None

    def _committed(self, ms: list[Manifest], kept: list, what: str) -> None:
        """After a commit: the new files join the dedup index; generations beyond the limit go."""
        try:
            for m, old in zip(ms, kept):
                self.placement.add(m if old is None else None)
                if old is not None:
                    self.result.generations.append(f"{m.name}@{old.id}")
                    dropped = self.store.trim_generations(m.name, self.target.policy.keep_generations)
                    self.result.dropped_generations.extend(f"{g.name}@{g.id}" for g in dropped)
        except OSError as exc:
            raise io_error(exc, what) from None

    def _restamp(self, name: str, judged: Judgement) -> None:
        """The server's files have the backup's bytes under new stamps (a touch, a chmod, a copy):
        give the local files and the manifest the server's stamps. Nothing is sent."""
        m = self.store.load(name)
        if m is None:
            return
        try:
            for f in m.files:
                s = judged.restamp.get(f.source or f.path)
                if s is None:
                    continue
                local = self.store.root / f.path
                if (f.mtime_ns, f.mode) != (s.mtime_ns, s.mode):
                    restamp_file(local, s.mtime_ns, s.mode, keep_links=self.target.policy.dedup == LINK)
                f.mtime_ns, f.mode, f.ctime_ns, f.inode = s.mtime_ns, s.mode, s.ctime_ns, s.inode
            self.store.write_manifest(m)
        except OSError as exc:
            raise io_error(exc, f"updating the timestamps of {name}") from None
        finally:
            self.placement.add(None)  # modes may have changed
        self.result.restamped.append(name)

    def _download(self, root: str, pairs: list[tuple[str, str]], owner: dict[str, str],
                  listed: dict[str, dict[str, FileStat]], label: str, progress: dict[str, dict[str, Verified]],
                  pending: Pending | None = None) -> tuple[dict[str, str], dict[str, str]]:
        """Fetch each (source, member) into the staging of the entry `owner` names, each checked
        against its listing, recording what was copied in `progress` (entry -> member -> record) and
        telling `pending`. Returns (member -> what changed on the server, member -> why unreadable)."""
        waiting = pending.waiting if pending is not None else set(owner.values())
        targets = {member: self.store.staging(name) / member for member, name in owner.items()}
        sizes = {member: listed[name][member].size for member, name in owner.items()}
        done = [self.store.staging(name) / p for name, recs in progress.items() for p in recs]
        prefixes = kept_prefixes(targets, self.server.best_hash, done=done)
        unsaved: dict[str, int] = {}

        def save(name: str) -> None:
            self.store.save_progress(name, progress[name])
            unsaved.pop(name, None)

        def on_file(rec: Received) -> None:
            name = owner[rec.member]
            progress[name][rec.member] = record(rec.size, rec.mode, rec.mtime_ns, rec.xxh3_128,
                                                listed[name][rec.member], hashes=dict(rec.hashes))
            unsaved[name] = unsaved.get(name, 0) + rec.size - rec.skipped
            if pending is not None:
                pending.arrived(name, rec.member)
                self.committer.collect()   # commits done meanwhile are told now; a failed one ends the transfer
            if name not in waiting:
                unsaved.pop(name, None)   # committed: its staging is gone
            elif unsaved[name] >= PROGRESS_BYTES:
                save(name)

        self.rep.start(label, sum(sizes.values()))
        verified = lambda: sum(len(progress[name]) for name in set(owner.values()) if name in waiting)  # noqa: E731
        stamps = {member: listed[name][member] for member, name in owner.items()}
        try:
            try:
                outcome, wire_bytes = fetch(self.channels, root, pairs, sizes, targets, prefixes,
                                            self.rep, on_file, self.opts.compress, listed=stamps)
            except BaseException:
                with contextlib.suppress(OSError):  # for the next run; unrecorded files are fetched again
                    for name in sorted(waiting):
                        if name in unsaved or progress[name]:   # copies placed in it count too
                            save(name)
                self.committer.finish()   # what was whole is committed before the run says so
                raise
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted during {label}: {self._kept(verified(), pending)}; "
                              "the next run fetches only the rest") from None
        except (ConnectError, IntegrityError) as exc:
            raise type(exc)(f"{exc.message} ({label}: {self._kept(verified(), pending)}; rerun to resume)",
                            hint=exc.hint) from exc
        finally:
            self.rep.finish()
        self.result.raw_bytes += sum(r.size - r.skipped for r in outcome.received)
        self.result.resumed_bytes += sum(r.skipped for r in outcome.received)
        self.result.wire_bytes += wire_bytes
        self.result.disk_bytes += sum(r.size for r in outcome.received)
        return outcome.changed, outcome.unreadable

    @staticmethod
    def _kept(verified: int, pending: Pending | None) -> str:
        done = f"committed {', '.join(pending.committed)}; " if pending is not None and pending.committed else ""
        return f"{done}{verified} verified files kept"

    # -------------------------------------------------- extra files

    def _plan_extras(self, view: ServerView) -> PlanItem | None:
        self._extras = stat_extras(self.server, view.root, self.target.policy.extra_files, self.result.warnings,
                                   self.result.failed)
        server = {member: st for member, (_src, st) in self._extras.items()}
        if not server:
            return None
        stored = self.store.load(EXTRA)
        where = {member: src for member, (src, _st) in self._extras.items()}
        judged = judge(self.server, view.root, stored.files if stored else None, server, CHECK, where, self.digests)
        if judged.current:
            # restamp looks files up by their configured path (FileRecord.source)
            self._judged[EXTRA] = Judgement(True, {where[k]: v for k, v in judged.restamp.items()})
            return PlanItem(EXTRA, "restamp" if judged.restamp else "up-to-date",
                            sum(v.size for v in server.values()), files=len(server))
        total = sum(v.size for v in server.values())
        return PlanItem(EXTRA, "fetch", total, total, len(server))

    def _fetch_extras(self, view: ServerView) -> None:
        self.store.discard_staging(EXTRA)
        books: dict[str, dict[str, Verified]] = {EXTRA: {}}
        progress = books[EXTRA]
        pairs = [(src, member) for member, (src, _st) in self._extras.items()]
        listed = {EXTRA: {member: st for member, (_src, st) in self._extras.items()}}
        changed, unreadable = self._download(view.root, pairs, {member: EXTRA for _src, member in pairs}, listed,
                                             EXTRA, books)
        if unreadable:
            what = "; ".join(f"{p}: {why}" for p, why in sorted(unreadable.items())[:3])
            self.result.failed[EXTRA] = f"extra files could not be read on the server ({what}); not recorded"
            return
        if changed:
            self.result.failed[EXTRA] = "extra files changed on the server while read; not recorded"
            return
        files = [r.as_file(FileRecord(path=p, size=0, mode=0, mtime_ns=0, xxh3_128="", source=self._extras[p][0],
                                      ctime_ns=self._extras[p][1].ctime_ns, inode=self._extras[p][1].inode))
                 for p, r in sorted(progress.items())]
        # The server's home: a restore to the same remote_dir relative to another server's home
        # puts the files back at the same place relative to it.
        m = Manifest(name=EXTRA, layout="extra", kind="extra", step=None, files=files,
                     source={"target": self.target.label, "server": self.target.describe(), "remote_dir": view.root,
                             "home": self.server.hello.home},
                     backed_up_at=time.time(), verified_at=time.time())
        self._commit(m, "moving extra files into place")
        self.result.fetched.append(EXTRA)


def run_backup(target: Target, opts: BackupOptions, rep: Reporter = QUIET,
               connect: Callable[[], Server] | None = None) -> BackupResult:
    """Run one backup and, unless it is a dry run, record how it went for `list`, `cron show` and `checklist`."""
    return run_job(Backup(target, opts, rep, connect=connect))


def discard_staging(target: Target, dry_run: bool = False, wait: bool = False) -> int:
    """Delete what interrupted backups left in staging (under the lock); returns the bytes it held."""
    store = Store(target.local_dir)
    held = store.staged_bytes() if store.meta.is_dir() else 0
    if dry_run or not (store.meta / "staging").is_dir():
        return held
    try:
        with store.lock("ckptsync backup --discard-staged", wait=wait, hint=WAIT_HINT,
                        stall_limit=target.link.stall_timeout):
            for name in store.staged_names():
                store.discard_staging(name)
    except OSError as exc:
        raise io_error(exc, f"deleting staging in {store.meta}") from None
    return held


def _not_fetched_text(kept: int, placed: int) -> str:
    parts = ([f"{kept} kept from an interrupted run"] if kept else []) + (
        [f"{placed} placed from the backup"] if placed else [])
    return f" ({', '.join(parts)})" if parts else ""


