"""`ckptsync backup`: fetch complete checkpoints into the backup directory, verified and atomic."""

from __future__ import annotations

import contextlib
from collections import Counter
import os
import posixpath
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ckptsync import notify
from ckptsync.agent import hash_file
from ckptsync.config import Target
from ckptsync.errors import (
    CkptsyncError, ConfigError, ConnectError, DiskFull, Interrupted, IntegrityError, Locked, NotFound, PARTIAL, OK,
    UsageError,
)
from ckptsync.layout import Checkpoint, resume_files
from ckptsync.freshness import Judgement, judge
from ckptsync.policy import CHECK, PROGRESS_BYTES, SPACE_MARGIN, batches, fits, human, run_status
from ckptsync.progress import QUIET, Reporter
from ckptsync.runs import RunState, find_runs, run_target, survey
from ckptsync.scan import ServerView, empty_remote_dir, scan_server
from ckptsync.server import FileStat, Server, open_server
from ckptsync.store import (
    COPY, EXTRA, LINK, REFLINK, FileRecord, Manifest, Store, free_bytes, io_error, pick_source, place_copy,
    share_copy,
)
from ckptsync.ratelimit import RateLimiter
from ckptsync.server.parallel import Channels, fetch
from ckptsync.server.transfer import Received, kept_prefixes


@dataclass
class BackupOptions:
    max_checkpoints: int = 2
    names: list[str] = field(default_factory=list)
    all: bool = False
    include_best: bool = False
    compress: str = "auto"
    dry_run: bool = False
    wait: bool = False
    extra_files: bool = True


@dataclass
class PlanItem:
    name: str
    action: str          # fetch, up-to-date, restamp (same bytes, new timestamps), skip
    size: int = 0        # bytes the checkpoint holds
    fetch_bytes: int = 0
    files: int = 0
    reason: str = ""
    step: int | None = None


@dataclass
class BackupResult:
    target: str
    server: str
    dest: str
    dry_run: bool
    plan: list[PlanItem] = field(default_factory=list)
    fetched: list[str] = field(default_factory=list)
    restamped: list[str] = field(default_factory=list)   # same bytes on the server, new stamps recorded
    generations: list[str] = field(default_factory=list)  # "NAME@ID": earlier versions kept
    dropped_generations: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)      # NAME.replaced-* entries turned into generations
    runs: list["BackupResult"] = field(default_factory=list)   # followed runs, each into its own directory
    unfollowed: list[RunState] = field(default_factory=list)  # newer runs whose newest checkpoint is not saved
    follow_hint: str = ""     # the command that backs them up
    failed: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    raw_bytes: int = 0        # file bytes that crossed the link
    resumed_bytes: int = 0    # kept bytes of files an interrupted run had partly fetched: not sent again
    wire_bytes: int = 0       # after compression
    disk_bytes: int = 0       # newly stored bytes (hard links and reflinks excluded, local copies included)
    linked_files: int = 0     # hard links to stored files with the same content, mode and mtime
    linked_bytes: int = 0
    reflinked_files: int = 0  # clones sharing a stored file's blocks, with their own mode and mtime
    reflinked_bytes: int = 0
    copied_files: int = 0     # copied from a stored file instead of fetched: no disk saved, no transfer
    copied_bytes: int = 0
    channels: int = 1         # the most connections one transfer of this run used at once (--parallel)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return PARTIAL if self.failed or any(r.exit_code for r in self.runs) else OK

    @property
    def to_fetch(self) -> list[PlanItem]:
        return [p for p in self.plan if p.action == "fetch"]

    @property
    def current(self) -> list[str]:
        """Names the backup already held, including those whose stamps were brought up to date."""
        return [p.name for p in self.plan if p.action in ("up-to-date", "restamp")]

    @property
    def fetch_bytes(self) -> int:
        """What the plan fetches (or, in a dry run, would)."""
        return sum(p.fetch_bytes for p in self.to_fetch)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["exit_code"] = self.exit_code
        out["runs"] = [r.to_dict() for r in self.runs]
        return out


def select(checkpoints: list[Checkpoint], opts: BackupOptions) -> tuple[list[Checkpoint], list[PlanItem]]:
    """Which checkpoints to back up (newest first), and which to report as skipped. Pure."""
    complete = [c for c in checkpoints if c.complete]
    # Weights that restore --adapter-only put there come from a backup: skipped only when named.
    skipped = [PlanItem(c.name, "skip", c.size, step=c.step, reason=_skip_reason(c))
               for c in checkpoints if not c.complete and (not c.restored or c.name in opts.names)]
    if opts.names:
        by_name = {c.name: c for c in checkpoints}
        missing = [n for n in opts.names if n not in by_name]
        if missing:
            have = ", ".join(c.name for c in checkpoints) or "none"
            raise NotFound(f"not on the server: {', '.join(missing)} (checkpoints there: {have})")
        chosen = [c for c in complete if c.name in opts.names]
        skipped = [s for s in skipped if s.name in opts.names]
    elif opts.all:
        chosen = list(complete)
    else:
        chosen = complete[: max(opts.max_checkpoints, 0)]
    if opts.include_best:
        best = next((c for c in complete if c.is_best), None)
        if best is not None and best not in chosen:
            chosen.append(best)
    return chosen, skipped


def plan_checkpoint(store: Store, view: ServerView, c: Checkpoint, judged: Judgement) -> PlanItem:
    server = view.files_of(c)
    if judged.current:
        return PlanItem(c.name, "restamp" if judged.restamp else "up-to-date", c.size,
                        files=len(judged.restamp), step=c.step)
    staged = _usable_staged(store, c.name, server, check_hash=False)
    need = [p for p in server if p not in staged]
    return PlanItem(c.name, "fetch", c.size, sum(server[p].size for p in need), len(need), step=c.step)


def _usable_staged(store: Store, name: str, server: dict[str, FileStat], check_hash: bool) -> dict[str, dict]:
    """Files an interrupted run verified and left in staging, still current on the server."""
    keep = {}
    root = store.staging(name)
    for path, rec in store.load_progress(name).items():
        s = server.get(path)
        if s is None or (s.size, s.mtime_ns, s.mode) != (rec.get("size"), rec.get("mtime_ns"), rec.get("mode")):
            continue
        local = root / path
        try:
            if local.stat().st_size != rec["size"]:
                continue
        except OSError:
            continue
        if check_hash and hash_file(local) != rec.get("xxh3_128"):
            continue
        keep[path] = rec
    return keep


class Backup:
    def __init__(self, target: Target, opts: BackupOptions, rep: Reporter = QUIET,
                 look_for_runs: bool = True, channels: Channels | None = None) -> None:
        if target.parallel != 1 and target.bwlimit and target.limiter is None:
            target = replace(target, limiter=RateLimiter(target.bwlimit))  # one rate for all channels
        self.target = target
        self.channels = channels  # a followed run fetches over its parent's
        self.look_for_runs = look_for_runs
        self._judge_memo: dict[str, tuple] = {}   # name -> (manifest files, server files, Judgement)
        self._sources: dict[tuple[str, int, int], list[Path]] | None = None   # see _content_sources
        self.opts = opts
        self.rep = rep
        self.touched = False   # the lock was taken: from here on the run is a backup result
        self.store = Store(target.local_dir)
        self.result = BackupResult(target=target.label, server=target.describe(), dest=str(target.local_dir),
                                   dry_run=opts.dry_run)

    def run(self, server: Server | None = None) -> BackupResult:
        """Back up remote_dir (and, with follow_runs, the newer runs beside it), over `server`
        when given, else over a connection of its own."""
        started = time.monotonic()
        try:
            with (contextlib.nullcontext(server) if server is not None else open_server(self.target)) as server:
                self.server = server
                own = self.channels is None
                if own:
                    self.channels = Channels(server, lambda: open_server(self.target), self.target.parallel)
                try:
                    view = scan_server(server, self.target.remote_dir, self.target.settle_seconds)
                    self._check_found(view)
                    self._backup(view)
                    if self.look_for_runs:
                        self._runs(view)
                finally:
                    self.result.channels = self.channels.most
                    if own:
                        if self.channels.warning:
                            self.result.warnings.append(self.channels.warning)
                        self.channels.close()
            return self.result
        finally:
            self.result.seconds = time.monotonic() - started

    def _backup(self, view: ServerView) -> None:
        server = self.server
        chosen, todo = self._plan(view)
        if self.opts.dry_run or not todo:
            return
        self._check_space(todo)  # before the lock: a refused run leaves nothing on disk
        waited = []

        def on_wait(holder: str) -> None:
            waited.append(holder)
            self.rep.info(f"waiting for {holder}")

        with self.store.lock("ckptsync backup", wait=self.opts.wait, on_wait=on_wait):
            self.touched = True
            # Plan again under the lock: the run we waited for may have stored these already.
            if waited:
                view = scan_server(server, self.target.remote_dir, self.target.settle_seconds)
            self.result.warnings.clear()
            self.result.failed.clear()
            chosen, todo = self._plan(view)
            if not todo:
                return
            self._check_space(todo)
            self.store.clean_trash()
            self.result.adopted = self.store.adopt_replaced()
            self._add_sources(None)
            by_name = {c.name: c for c in chosen}
            fetches = [(p.name, p.fetch_bytes) for p in todo if p.action == "fetch" and p.name in by_name]
            batch_of = {names[0]: names for names in batches(fetches)}
            for item in todo:
                if item.action == "restamp":
                    self._restamp(item.name, self._judged[item.name])
                elif item.name == EXTRA and item.name not in by_name:
                    self._fetch_extras(view)
                elif item.name in batch_of:
                    self._fetch(view, [by_name[n] for n in batch_of[item.name]])

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
        if not self.target.follow_runs:
            self.result.unfollowed = [r for r in survey(self.server, view.root, self.target) if not r.covered]
            if self.result.unfollowed:
                self.result.follow_hint = self.target.command("backup", "--follow-runs")
            return
        opts = replace(self.opts, names=[], extra_files=False)
        for run in find_runs(self.server, view.root, self.target.runs):
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
        judged = judge(self.server, view.root, stored, files, CHECK)
        self._judge_memo[c.name] = (stored, files, judged)
        return judged

    def _plan(self, view: ServerView) -> tuple[list[Checkpoint], list[PlanItem]]:
        self.result.warnings.extend(view.errors)
        chosen, skipped = select(view.checkpoints, self.opts)
        self._judged = {c.name: self._judge(view, c) for c in chosen}
        plan = [plan_checkpoint(self.store, view, c, self._judged[c.name]) for c in chosen]
        extras = self._plan_extras(view) if self.opts.extra_files else None
        self.result.plan = plan + ([extras] if extras else []) + skipped
        unreadable = {c.name for c in view.checkpoints if c.unreadable}
        for s in skipped:
            # Asked for by name, or holding files we may not read: not getting it is a failure.
            if s.name in self.opts.names or s.name in unreadable:
                self.result.failed[s.name] = s.reason
        todo = [p for p in plan if p.action in ("fetch", "restamp")]
        if extras is not None and extras.action in ("fetch", "restamp"):
            todo.append(extras)
        return chosen, todo

    # -------------------------------------------------- checkpoints

    def _check_space(self, todo: list[PlanItem]) -> None:
        need = sum(p.fetch_bytes for p in todo)
        try:
            free = free_bytes(self.store.root)
        except OSError as exc:
            raise io_error(exc, f"measuring free space in {self.store.root}") from None
        if not fits(need, free):
            leftover = self.store.staged_bytes()
            extra = (f"; {human(leftover)} of it is held by an interrupted backup's staging in "
                     f"{self.store.meta / 'staging'} (kept to resume)"
                     if leftover else "")
            raise DiskFull(
                f"not enough space in {self.store.root}: this backup needs {human(need)} plus a "
                f"{human(SPACE_MARGIN)} margin, {human(free)} is free (nothing was written){extra}",
                hint="free some space, choose another --local-dir, or back up fewer checkpoints"
                     + (f"; drop the staging with: {self.target.command('backup', '--discard-staged')}"
                        if leftover else ""),
            )

    def _fetch(self, view: ServerView, batch: list[Checkpoint]) -> None:
        """Fetch checkpoints over one transfer, then commit each in turn (manifest, then rename)."""
        listed = {c.name: view.files_of(c) for c in batch}
        progress: dict[str, dict[str, dict]] = {}
        todo: dict[str, list[str]] = {}
        for c in batch:
            progress[c.name] = _usable_staged(self.store, c.name, listed[c.name], check_hash=True)
            todo[c.name] = [p for p in listed[c.name] if p not in progress[c.name]]
        kept = sum(len(progress[c.name]) for c in batch)
        twins = self._link_known(view, todo, listed, progress)
        placed = sum(len(progress[c.name]) for c in batch) - kept
        owner = {p: name for name, paths in todo.items() for p in paths
                 if p not in progress[name] and (name, p) not in twins}
        sizes = {p: listed[owner[p]][p].size for p in owner}
        label = batch[0].name if len(batch) == 1 else f"{len(batch)} checkpoints ({batch[0].name} ... {batch[-1].name})"
        self.rep.info(f"{label}: fetching {len(owner)} files, {human(sum(sizes.values()))}"
                      + _not_fetched_text(kept, placed))
        changed, unreadable = {}, {}
        if owner:
            changed, unreadable = self._download(view.root, [(p, p) for p in owner], owner, label, progress, sizes)
        orphans = {p: name for name, p in self._place_twins(twins, listed, progress)}
        if orphans:  # their twin did not arrive: fetch them after all
            more = self._download(view.root, [(p, p) for p in orphans], orphans, label, progress,
                                  {p: listed[name][p].size for p, name in orphans.items()})
            changed.update(more[0])
            unreadable.update(more[1])
        for c in batch:
            mine = {p: why for p, why in unreadable.items() if p in listed[c.name]}
            if mine:
                what = "; ".join(f"{p}: {why}" for p, why in sorted(mine.items())[:3])
                self.result.failed[c.name] = f"could not be read on the server ({what}); not recorded"
        clean = [c for c in batch if c.name not in self.result.failed
                 and not any(p in listed[c.name] for p in changed)]
        if clean:  # rotation may delete or rewrite a file after it was sent
            changed.update(self._recheck(view, {p: st for c in clean for p, st in listed[c.name].items()}))
        for c in batch:
            mine = {p: why for p, why in changed.items() if p in listed[c.name]}
            if mine and c.name not in self.result.failed:
                self.result.failed[c.name] = _changed_text(view, c, mine)
            if c.name in self.result.failed:
                if progress[c.name]:  # its verified files stay staged for the next run
                    self._save_progress(c.name, progress[c.name])
                continue
            self._store_fetched(view, c, listed[c.name], progress[c.name], set(todo[c.name]))

    def _save_progress(self, name: str, progress: dict[str, dict]) -> None:
        try:
            self.store.save_progress(name, progress)
        except OSError as exc:
            raise io_error(exc, f"recording what was fetched of {name}") from None

    def _store_fetched(self, view: ServerView, c: Checkpoint, server: dict[str, FileStat],
                       progress: dict[str, dict], fetched: set[str]) -> None:
        stage_root = self.store.staging(c.name)
        for p in server:  # a prefix kept by an interrupted run whose file was then placed locally
            (stage_root / (p + ".part")).unlink(missing_ok=True)
        files = [FileRecord(path=p, size=r["size"], mode=r["mode"], mtime_ns=r["mtime_ns"], xxh3_128=r["xxh3_128"],
                            ctime_ns=server[p].ctime_ns, inode=server[p].inode)
                 for p, r in sorted(progress.items())]
        placed = {p for p, r in progress.items() if r.get("placed")}
        self._dedup(c.name, files, fetched=fetched - placed, placed=placed)
        m = Manifest(
            name=c.name, layout=c.layout, kind=c.kind, step=c.step, files=files,
            resume_files=list(resume_files(c)), resumable=c.resumable, content=c.content,
            missing=list(c.missing), is_best=c.is_best, state=dict(c.state),
            source={"target": self.target.label, "server": self.target.describe(), "remote_dir": view.root},
            backed_up_at=time.time(), verified_at=time.time(),
        )
        self._commit(m, f"moving {c.name} into place")
        self.result.fetched.append(c.name)

    def _commit(self, m: Manifest, what: str) -> None:
        """Move a staged entry into place; the version it replaces is kept as a generation, and
        generations beyond keep_generations are dropped."""
        try:
            kept = self.store.commit(m)
            self._add_sources(m if kept is None else None)
            if kept is not None:
                self.result.generations.append(f"{m.name}@{kept.id}")
                dropped = self.store.trim_generations(m.name, self.target.keep_generations)
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
                    restamp_file(local, s.mtime_ns, s.mode, keep_links=self.target.dedup == LINK)
                f.mtime_ns, f.mode, f.ctime_ns, f.inode = s.mtime_ns, s.mode, s.ctime_ns, s.inode
            self.store.write_manifest(m)
        except OSError as exc:
            raise io_error(exc, f"updating the timestamps of {name}") from None
        finally:
            self._add_sources(None)  # modes may have changed
        self.result.restamped.append(name)

    def _download(self, root: str, pairs: list[tuple[str, str]], owner: dict[str, str], label: str,
                  progress: dict[str, dict[str, dict]], sizes: dict[str, int]) -> tuple[dict[str, str], dict[str, str]]:
        """Fetch each member into the staging of the entry `owner` names, recording what was
        verified in `progress` (entry -> member -> record). Returns (member -> what changed on
        the server, member -> why unreadable)."""
        targets = {member: self.store.staging(owner[member]) / member for _src, member in pairs}
        done = [self.store.staging(name) / p for name, recs in progress.items() for p in recs]
        prefixes = kept_prefixes(targets, self.server.best_hash, done=done)
        unsaved: dict[str, int] = {}

        def save(name: str) -> None:
            self.store.save_progress(name, progress[name])
            unsaved.pop(name, None)

        def on_file(rec: Received) -> None:
            name = owner[rec.member]
            progress[name][rec.member] = {"size": rec.size, "mode": rec.mode, "mtime_ns": rec.mtime_ns,
                                          "xxh3_128": rec.xxh3_128}
            unsaved[name] = unsaved.get(name, 0) + rec.size - rec.skipped
            if unsaved[name] >= PROGRESS_BYTES:
                save(name)

        self.rep.start(label, sum(sizes.values()))
        verified = lambda: sum(len(progress[name]) for name in set(owner.values()))  # noqa: E731
        try:
            try:
                outcome, wire_bytes = fetch(self.channels, root, pairs, sizes, targets, prefixes, self.rep, on_file,
                                            self.opts.compress)
            except BaseException:
                with contextlib.suppress(OSError):  # for the next run; unrecorded files are fetched again
                    for name in list(unsaved):
                        save(name)
                raise
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted during {label}: {verified()} verified files kept; "
                              "the next run fetches only the rest") from None
        except (ConnectError, IntegrityError) as exc:
            raise type(exc)(f"{exc.message} ({label}: {verified()} verified files kept; rerun to resume)",
                            hint=exc.hint) from exc
        finally:
            self.rep.finish()
        self.result.raw_bytes += sum(r.size - r.skipped for r in outcome.received)
        self.result.resumed_bytes += sum(r.skipped for r in outcome.received)
        self.result.wire_bytes += wire_bytes
        self.result.disk_bytes += sum(r.size for r in outcome.received)
        return outcome.changed, outcome.unreadable

    def _recheck(self, view: ServerView, server: dict[str, FileStat]) -> dict[str, str]:
        """After the transfer: is every file still there, unchanged? (Rotation may delete it mid-run.)"""
        now = self.server.stat(view.root, sorted(server))
        changed = {}
        for path, listed in server.items():
            st = now.get(path)
            if st is None:
                changed[path] = DELETED
            elif not st.same_content_stamp(listed.stat):
                changed[path] = "modified during the backup"
        return changed

    def _link_known(self, view: ServerView, todo: dict[str, list[str]], listed: dict[str, dict[str, FileStat]],
                    progress: dict[str, dict[str, dict]]) -> dict[tuple[str, str], tuple[str, str]]:
        """Place files whose content the store already holds (reflink, hard link or local copy)
        instead of transferring them; each placed file joins its entry's `progress`. Returns the
        twins: (entry, file) -> the earlier (entry, file) of this batch with the same content,
        fetched once and placed by _place_twins."""
        if "xxh3_128" not in self.server.hashes or not any(todo.values()):
            return {}
        sources = self._content_sources()
        stored = {(k[1], k[2]) for k in sources}
        keys = [(listed[name][p].size, listed[name][p].mode) for name, paths in todo.items() for p in paths]
        repeated = {k for k, n in Counter(keys).items() if n > 1} if len(todo) > 1 else set()
        wanted = stored | repeated
        candidates = [(name, p) for name, paths in todo.items() for p in paths if listed[name][p].size > 0
                      and (listed[name][p].size, listed[name][p].mode) in wanted]
        if not candidates:
            return {}
        hashes = self.server.hash(view.root, [p for _name, p in candidates], "xxh3_128")
        touched, first, twins = set(), {}, {}
        for name, p in candidates:
            size, mtime_ns, mode = listed[name][p].size, listed[name][p].mtime_ns, listed[name][p].mode
            digest = hashes.get(p)
            if not digest:
                continue  # unreadable or gone on the server: the transfer reports it
            paths = sources.get((digest, size, mode))
            existing = pick_source(paths, mtime_ns, mode) if paths else None
            if existing is None:
                if (digest, size, mode) in first:
                    twins[(name, p)] = first[(digest, size, mode)]
                else:
                    first[(digest, size, mode)] = (name, p)
                continue
            dest = self.store.staging(name) / p
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                how = place_copy(existing, dest, mtime_ns, mode, self.target.dedup)
            except OSError:
                continue  # the transfer fetches it instead
            # "placed" tells _dedup (also after a resume) not to place it again.
            progress[name][p] = {"size": size, "mode": mode, "mtime_ns": mtime_ns, "xxh3_128": digest,
                                 "placed": how}
            touched.add(name)
            self._count(how, size, fetched=False)
        for name in sorted(touched):
            self.store.save_progress(name, progress[name])
        return twins

    def _place_twins(self, twins: dict[tuple[str, str], tuple[str, str]], listed: dict[str, dict[str, FileStat]],
                     progress: dict[str, dict[str, dict]]) -> list[tuple[str, str]]:
        """Place each twin from the file of this batch it matched, once that arrived. Returns
        the twins whose original did not arrive."""
        missing = []
        for (name, p), (origin, q) in twins.items():
            rec = progress[origin].get(q)
            if rec is None:
                missing.append((name, p))
                continue
            st = listed[name][p]
            dest = self.store.staging(name) / p
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                how = place_copy(self.store.staging(origin) / q, dest, st.mtime_ns, st.mode, self.target.dedup)
            except OSError as exc:
                raise io_error(exc, f"placing {p}") from None
            progress[name][p] = {"size": st.size, "mode": st.mode, "mtime_ns": st.mtime_ns,
                                 "xxh3_128": rec["xxh3_128"], "placed": how}
            self._count(how, st.size, fetched=False)
        return missing

    def _content_sources(self) -> dict[tuple[str, int, int], list[Path]]:
        """The store's dedup index, read once per run and kept current by _add_sources."""
        if self._sources is None:
            self._sources = self.store.content_sources()
        return self._sources

    def _add_sources(self, m: Manifest | None) -> None:
        """A new entry's files join the index; None: the store changed otherwise, read it again."""
        if m is None or self._sources is None:
            self._sources = None
            return
        for f in m.files:
            self._sources.setdefault((f.xxh3_128, f.size, f.mode), []).append(self.store.root / f.path)

    def _dedup(self, name: str, files: list[FileRecord], fetched: set[str], placed: set[str]) -> None:
        """After a transfer, let files identical to stored ones share their bytes: a reflink,
        or a hard link when the stored inode shows the same mode and mtime (any with dedup: link).
        A copy would gain nothing here: the transferred file already is one."""
        sources = self._content_sources()
        for f in files:
            paths = sources.get((f.xxh3_128, f.size, f.mode))
            if not paths or f.size == 0 or f.path in placed:
                continue
            staged = self.store.staging(name) / f.path
            try:
                st = os.stat(staged)
                if st.st_nlink > 1 and any(_same_inode(q, st) for q in paths):
                    continue
                existing = pick_source(paths, f.mtime_ns, f.mode)
                if existing is None:
                    continue
                how = share_copy(existing, staged, f.mtime_ns, f.mode, self.target.dedup)
            except OSError:
                continue
            if how is not None:
                self._count(how, f.size, fetched=f.path in fetched)

    def _count(self, how: str, size: int, fetched: bool) -> None:
        """Count one placed file; `fetched`: its bytes were transferred and counted in disk_bytes."""
        r = self.result
        if how == LINK:
            r.linked_files += 1
            r.linked_bytes += size
        elif how == REFLINK:
            r.reflinked_files += 1
            r.reflinked_bytes += size
        elif how == COPY:
            r.copied_files += 1
            r.copied_bytes += size
            r.disk_bytes += size
        if fetched and how in (LINK, REFLINK):
            r.disk_bytes -= size

    # -------------------------------------------------- extra files

    def _plan_extras(self, view: ServerView) -> PlanItem | None:
        self._extras = stat_extras(self.server, view.root, self.target.extra_files, self.result.warnings)
        server = {member: st for member, (_src, st) in self._extras.items()}
        if not server:
            return None
        stored = self.store.load(EXTRA)
        where = {member: src for member, (src, _st) in self._extras.items()}
        judged = judge(self.server, view.root, stored.files if stored else None, server, CHECK, where)
        if judged.current:
            # restamp looks files up by their configured path (FileRecord.source)
            self._judged[EXTRA] = Judgement(True, {where[k]: v for k, v in judged.restamp.items()})
            return PlanItem(EXTRA, "restamp" if judged.restamp else "up-to-date",
                            sum(v.size for v in server.values()), files=len(server))
        total = sum(v.size for v in server.values())
        return PlanItem(EXTRA, "fetch", total, total, len(server))

    def _fetch_extras(self, view: ServerView) -> None:
        self.store.discard_staging(EXTRA)
        books: dict[str, dict[str, dict]] = {EXTRA: {}}
        progress = books[EXTRA]
        pairs = [(src, member) for member, (src, _st) in self._extras.items()]
        sizes = {member: st.size for member, (_src, st) in self._extras.items()}
        changed, unreadable = self._download(view.root, pairs, {member: EXTRA for _src, member in pairs}, EXTRA,
                                             books, sizes)
        if unreadable:
            what = "; ".join(f"{p}: {why}" for p, why in sorted(unreadable.items())[:3])
            self.result.failed[EXTRA] = f"extra files could not be read on the server ({what}); not recorded"
            return
        if changed:
            self.result.failed[EXTRA] = "extra files changed on the server while read; not recorded"
            return
        files = [FileRecord(path=p, size=r["size"], mode=r["mode"], mtime_ns=r["mtime_ns"], xxh3_128=r["xxh3_128"],
                            source=self._extras[p][0], ctime_ns=self._extras[p][1].ctime_ns,
                            inode=self._extras[p][1].inode)
                 for p, r in sorted(progress.items())]
        # The server's home: a restore to the same remote_dir relative to another server's home
        # puts the files back at the same place relative to it.
        m = Manifest(name=EXTRA, layout="extra", kind="extra", step=None, files=files,
                     source={"target": self.target.label, "server": self.target.describe(), "remote_dir": view.root,
                             "home": self.server.hello.home},
                     backed_up_at=time.time(), verified_at=time.time())
        self._commit(m, "moving extra files into place")
        self.result.fetched.append(EXTRA)


def extra_members(extra_files: list[str]) -> dict[str, str]:
    """Configured path -> member name under extra-files/ (basenames made unique)."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for src in extra_files:
        base = posixpath.basename(src.rstrip("/")) or "file"
        name, n = base, 1
        while name in used:
            n += 1
            name = f"{n}-{base}"
        used.add(name)
        out[src] = f"{EXTRA}/{name}"
    return out


def stat_extras(server: Server, root: str, extra_files: list[str], warnings: list[str]) -> dict[str, tuple[str, FileStat]]:
    """member -> (configured path, its FileStat as the member) of the extra files the server has;
    a missing one is a warning, not an error (it may not exist yet)."""
    members = extra_members(extra_files)
    if not members:
        return {}
    st = server.stat(root, list(members))
    out = {}
    for src, member in members.items():
        info = st.get(src)
        if info is None or info.is_dir:
            warnings.append(f"extra file {src} not found on the server")
            continue
        out[member] = (src, FileStat(member, info.size, info.mtime_ns, info.mode, info.ctime_ns, info.inode))
    return out


def run_backup(target: Target, opts: BackupOptions, rep: Reporter = QUIET) -> BackupResult:
    """Run one backup and, unless it is a dry run, record how it went for `list`, `cron show` and `checklist`."""
    return run_job(Backup(target, opts, rep))


def run_job(job: "Backup", server: Server | None = None) -> BackupResult:
    opts = job.opts
    try:
        try:
            result = job.run(server)
        except OSError as exc:  # every laptop-side write failure is one line with exit 5
            raise io_error(exc, f"writing in {job.store.root}") from None
    except Locked:
        raise  # another run is doing the work; its result, not this refusal, is the last backup
    except CkptsyncError as exc:
        if not opts.dry_run and (job.touched or not _refusal(exc)):
            _record(job, exc.exit_code, exc.message)
        raise
    except KeyboardInterrupt:
        if not opts.dry_run:
            _record(job, Interrupted.exit_code, "interrupted")
        raise
    if not opts.dry_run:
        _record(job, result.exit_code, "; ".join(f"{k}: {v}" for k, v in result.failed.items()))
    return result


def discard_staging(target: Target, dry_run: bool = False) -> int:
    """Delete what interrupted backups left in staging (under the lock); returns the bytes it held."""
    store = Store(target.local_dir)
    held = store.staged_bytes() if store.meta.is_dir() else 0
    if dry_run or not (store.meta / "staging").is_dir():
        return held
    try:
        with store.lock("ckptsync backup --discard-staged"):
            for entry in sorted((store.meta / "staging").iterdir()):
                if entry.name.endswith(".progress.json"):
                    continue
                store.discard_staging(entry.name)
    except OSError as exc:
        raise io_error(exc, f"deleting staging in {store.meta}") from None
    return held


def _refusal(exc: CkptsyncError) -> bool:
    """A manual run refused before it took the lock (a usage error, nothing found, a config error) is
    not a backup result: the last real one stays. A scheduled run is always recorded, so that
    cron show and checklist see an entry that keeps failing."""
    return isinstance(exc, (UsageError, NotFound, ConfigError)) and not notify.scheduled()


def _not_fetched_text(kept: int, placed: int) -> str:
    parts = ([f"{kept} kept from an interrupted run"] if kept else []) + (
        [f"{placed} placed from the backup"] if placed else [])
    return f" ({', '.join(parts)})" if parts else ""


def _record(job: Backup, code: int, error: str) -> None:
    if not job.store.root.exists():
        return  # a run that never got to write leaves no trace (it may have been refused for space)
    r = job.result
    status = run_status(time.time(), code, error, r.target, r.server, r.fetched, r.failed, r.current,
                        notify.scheduled(), restamped=r.restamped, generations=r.generations,
                        skipped={p.name: p.reason for p in r.plan if p.action == "skip"},
                        raw_bytes=r.raw_bytes, wire_bytes=r.wire_bytes, seconds=round(r.seconds, 3))
    try:
        job.store.record_status(status)
    except OSError as exc:
        r.warnings.append(f"could not record this run in {job.store.meta}: {exc.strerror or exc} "
                          "(list, cron show and checklist will not see it)")
    sent = notify.after_run(status)
    if sent:
        job.rep.info(sent)



DELETED = "deleted during the backup"


def restamp_file(path: Path, mtime_ns: int, mode: int, keep_links: bool = False) -> None:
    """Give a stored file new stamps. A file hard-linked into other entries is first given an
    inode of its own (a reflink or a copy), so theirs keep the stamps their manifests record;
    with dedup: link (`keep_links`) it stays shared and only the manifest changes."""
    if os.lstat(path).st_nlink > 1:
        if not keep_links:
            place_copy(path, path, mtime_ns, mode, REFLINK)
        return
    os.chmod(path, mode)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def _same_inode(a: Path, b: os.stat_result) -> bool:
    try:
        return os.path.samestat(os.stat(a), b)
    except FileNotFoundError:
        return False


def _changed_text(view: ServerView, c: Checkpoint, changed: dict[str, str]) -> str:
    if len(changed) == len(c.files) and all(why in (DELETED, "not sent by the server") or "not_found" in why
                                            or "No such file" in why for why in changed.values()):
        return ("vanished from the server after the listing (deleted, e.g. by the trainer's checkpoint "
                "rotation); not backed up")
    what = "; ".join(f"{p}: {why}" for p, why in sorted(changed.items())[:3])
    return f"changed on the server while it was read ({what}); not recorded"


def _skip_reason(c: Checkpoint) -> str:
    if c.restored:
        return f"{c.reason} from a backup; not backed up again"
    if c.unreadable:
        return f"{c.reason}; not recorded"
    return f"{'abandoned (incomplete)' if c.abandoned else 'in progress'}: {c.reason}"
