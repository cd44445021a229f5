"""backup into a bucket: the server sends each file straight to presigned URLs, the laptop signs.

Per checkpoint: the server hashes its files (xxh3-128 where it can); files whose bytes the
bucket already holds under another entry are copied there server-side; the rest go up as
one PUT (small files) or as parts of a multipart upload, a batch of fresh URLs at a time;
an upload an earlier run left unfinished keeps the parts whose MD5 matches. The manifest,
naming every object's size, hash and ETag, is written last.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ckptsync.backup_plan import BackupResult, name_unsaved, stat_extras
from ckptsync.commit import gone
from ckptsync.selection import BackupOptions, PlanItem, resolve_names, select, unseen_failures
from ckptsync import notify
from ckptsync.errors import (AgentError, CkptsyncError, ConnectError, IntegrityError, Interrupted,
                             IOFailure, Locked)
from ckptsync.freshness import Judgement, judge
from ckptsync.layout import Checkpoint, resume_files
from ckptsync.policy import CHECK, human, run_status
from ckptsync.progress import QUIET, Reporter
from ckptsync.s3.bucket import Conflict, etag, part_size, plain_md5
from ckptsync.scan import ServerView, scan_server
from ckptsync.server import Server, open_server
from ckptsync.server.transfer import receive
from ckptsync.stores.manifest import EXTRA, FileRecord, Manifest

if TYPE_CHECKING:
    from ckptsync.stores.bucket import BucketStore, Entry

BATCH_ITEMS = 64          # URLs per request to the agent, signed just before it is sent
BATCH_PARTS = 16          # at most this many full parts (1 GiB at 64 MiB) per batch


@dataclass
class _Sending:
    """One file on its way into the bucket: its manifest record (the hash in the run's algorithm),
    where the server reads it, and how far its upload got."""

    file: FileRecord
    key: str
    source: str              # where the server reads it (relative to remote_dir, or absolute)
    etag: str = ""
    upload: str = ""                                       # multipart upload id
    parts: dict[int, str] = field(default_factory=dict)   # part number -> etag, once stored
    error: str = ""


@contextlib.contextmanager
def endpoint_errors(hint: str):
    """The agent's `unreachable` failure is the one-line connect error (exit 20) it stands for."""
    try:
        yield
    except AgentError as exc:
        if exc.agent_kind != "unreachable":
            raise
        raise ConnectError(f"{exc.message} (the bucket's endpoint as the server sees it)", hint=hint) from None


def run_bucket_backup(target, opts: BackupOptions, store: BucketStore, rep: Reporter = QUIET,
                      server: Server | None = None, via_laptop: bool = False,
                      connect: Callable[[], Server] | None = None) -> BackupResult:
    """`via_laptop`: for a server that cannot reach the bucket, the bytes come here over the
    agent's link (checked as a backup's are), wait in a temporary directory, and go up from here."""
    result = BackupResult(target=target.label, server=target.describe(), dest=store.location,
                          dry_run=opts.dry_run, direct=not via_laptop)
    started = time.monotonic()
    code, error = None, ""
    try:
        with (contextlib.nullcontext(server) if server is not None else open_server(target, connect)) as server:
            job = _Upload(target, store, server, rep, result, via_laptop)
            view = scan_server(server, target.remote_dir, target.policy.settle_seconds, writers=True,
                               pattern=target.policy.train_process or "")
            todo = job.plan(view, opts)
            extras = opts.extra_files and bool(target.policy.extra_files)
            if (todo or extras or job.stamps) and not opts.dry_run:
                with store.lock("ckptsync backup", on_takeover=rep.info) as lock:
                    todo = job.plan(view, opts)   # again under the lock: another run may have stored them
                    job.restamp()
                    for c in todo:
                        job.checkpoint(view, c)
                        if lock.lost:
                            raise Locked(lock.lost)
                    if extras:
                        job.extras(view)
            warning = name_unsaved(result, view.checkpoints, set(job.entries), job.first_run, opts,
                                   target.printed.command("backup", "--all"))
            if warning:
                result.warnings.append(warning)
        code, error = result.exit_code, "; ".join(f"{k}: {v}" for k, v in result.failed.items())
        return result
    except Locked:
        raise  # another run is doing the work: its result, not this refusal, is the last backup
    except CkptsyncError as exc:
        code, error = exc.exit_code, exc.message
        raise
    except KeyboardInterrupt:
        code, error = Interrupted.exit_code, "interrupted"
        raise
    finally:
        result.seconds = time.monotonic() - started
        if code is not None and not opts.dry_run:
            _record(store, result, code, error, rep)


def _record(store: BucketStore, r: BackupResult, code: int, error: str, rep: Reporter) -> None:
    status = run_status(time.time(), code, error, r.target, r.server, r.fetched, r.failed,
                        r.current, notify.scheduled(),
                        not_backed_up=r.not_backed_up, deleted_on_server=r.deleted_on_server,
                        store=r.dest, sent_bytes=r.sent_bytes, copied_bytes=r.copied_bytes,
                        seconds=round(r.seconds, 3))
    try:
        store.record_status(status)
    except CkptsyncError as exc:  # the bucket that just failed may refuse this too
        r.warnings.append(f"could not record this run in {r.dest}: {exc.message} "
                          "(cron show and checklist will not see it)")
    sent = notify.after_run(status)
    if sent:
        rep.info(sent)


class _Upload:
    def __init__(self, target, store: BucketStore, server: Server, rep: Reporter, result: BackupResult,
                 via_laptop: bool = False) -> None:
        self.target = target
        self.via_laptop = via_laptop
        self.store = store
        self.bucket = store.bucket
        self.settings = store.bucket.settings
        self.server = server
        self.rep = rep
        self.result = result
        self.alg = "xxh3_128" if "xxh3_128" in server.hashes else server.best_hash
        self.first_run: bool | None = None   # no checkpoint in the bucket before this run

    def plan(self, view: ServerView, opts: BackupOptions) -> list[Checkpoint]:
        r = self.result
        r.plan.clear()
        r.failed.clear()
        r.warnings[:] = list(view.errors)
        self.entries = self.store.entries()   # the first request: a bad key or bucket stops here
        if self.first_run is None:   # as the bucket was before this run (the plan is made twice)
            self.first_run = not set(self.entries) - {EXTRA}
        self.kept = [g for gens in self.store.generations().values() for g in gens]
        opts = resolve_names(opts, view.checkpoints)
        chosen, skipped = select(view.checkpoints, opts, [e.manifest for e in self.entries.values()])
        todo = []
        r.plan.extend(skipped)
        for s in skipped:
            if s.name in opts.names:
                r.failed[s.name] = s.reason
        r.failed.update(unseen_failures(view, opts.names))
        self.stamps: dict[str, Judgement] = {}
        for c in chosen:
            entry = self.entries.get(c.name)
            judged = None if entry is None else judge(self.server, view.root, entry.manifest.files,
                                                      view.files_of(c), CHECK)
            files = len(view.files_of(c))
            if judged is not None and judged.current:
                r.plan.append(PlanItem(c.name, "restamp" if judged.restamp else "up-to-date", c.size,
                                       files=len(judged.restamp) if judged.restamp else files, step=c.step))
                if judged.restamp:
                    self.stamps[c.name] = judged
            else:   # new, or changed on the server: the stored version becomes a generation
                r.plan.append(PlanItem(c.name, "fetch", c.size, fetch_bytes=c.size, files=files, step=c.step))
                todo.append(c)
        return todo

    def restamp(self) -> None:
        """The server's files have the stored bytes under new stamps (a touch, a chmod, a copy): the
        manifest takes the server's stamps, as a directory's does, so that a restore puts those
        back and the next run's quick check needs no hashing. Nothing is sent."""
        for name, judged in self.stamps.items():
            entry = self.entries[name]
            for f in entry.manifest.files:
                s = judged.restamp.get(f.source or f.path)
                if s is not None:
                    f.mtime_ns, f.mode, f.ctime_ns, f.inode = s.mtime_ns, s.mode, s.ctime_ns, s.inode
            self.store.write_entry(entry, replace=True)
            self.result.restamped.append(name)

    # -------------------------------------------------- one checkpoint

    def checkpoint(self, view: ServerView, c: Checkpoint) -> None:
        listed = view.files_of(c)
        self._entry(view.root, c.name, listed, {}, lambda files: self._manifest(view, c, files))
        if self.result.fetched[-1:] == [c.name]:   # recorded: is the server's copy still there (a rotation)?
            self.result.deleted_on_server += gone(self.server, view.root, {c.name: listed})

    def extras(self, view: ServerView) -> None:
        """The configured extra files, as the entry extra-files/ (one version, and generations, as on disk)."""
        found = stat_extras(self.server, view.root, self.target.policy.extra_files, self.result.warnings, self.result.failed)
        if not found:
            return
        listed = {member: st for member, (_src, st) in found.items()}
        sources = {member: src for member, (src, _st) in found.items()}
        entry = self.entries.get(EXTRA)
        if entry is not None and judge(self.server, view.root, entry.manifest.files, listed, CHECK, sources).current:
            self.result.plan.append(PlanItem(EXTRA, "up-to-date", sum(st.size for st in listed.values()), files=len(listed)))
            return
        size = sum(st.size for st in listed.values())
        self.result.plan.append(PlanItem(EXTRA, "fetch", size, fetch_bytes=size, files=len(listed)))

        def manifest(files: list[FileRecord]) -> Manifest:
            records = [replace(f, source=sources[f.path]) for f in files]
            return Manifest(name=EXTRA, layout="extra", kind="extra", step=None, files=records,
                            source={"target": self.target.label, "server": self.target.describe(),
                                    "remote_dir": view.root}, backed_up_at=time.time(), verified_at=time.time())

        self._entry(view.root, EXTRA, listed, sources, manifest)

    def _entry(self, root: str, name: str, listed: dict, sources: dict[str, str], manifest) -> None:
        """Upload one entry's files (members of `listed`, read on the server at `sources`, or at
        their own path) and write its manifest, `manifest(files)`, last."""
        paths = sorted(listed)
        read = {p: sources.get(p, p) for p in paths}
        hashes = self.server.hash(root, sorted(set(read.values())), self.alg)
        if hashes.errors:
            what = "; ".join(f"{p}: {why}" for p, why in sorted(hashes.errors.items())[:3])
            self.result.failed[name] = f"could not be read on the server ({what}); not recorded"
            return
        files = [_Sending(FileRecord(path=p, size=listed[p].size, mode=listed[p].mode, mtime_ns=listed[p].mtime_ns,
                                     xxh3_128=hashes.values[read[p]], ctime_ns=listed[p].ctime_ns,
                                     inode=listed[p].inode), self.store.key(p), read[p]) for p in paths]
        known = self._known()
        old = self.entries.get(name)
        if old is not None:
            self._set_aside(old)
        send, twins, first = [], [], {}
        for f in files:
            content = (f.file.xxh3_128, f.file.size)
            have = known.get(content)
            if have is not None and have[0] == f.key:
                f.etag = have[1]
            elif have is not None:
                f.etag = self.bucket.copy(have[0], f.key, f.file.size)
                self._copied(f.file.size)
            elif content in first:   # the same bytes twice in this checkpoint: sent once
                twins.append((f, first[content]))
            else:
                first[content] = f
                send.append(f)
        total = sum(f.file.size for f in send)
        self.rep.info(f"{name}: sending {len(send)} files, {human(total)} from the server to the bucket"
                      + (f" ({len(files) - len(send)} copied inside the bucket)" if len(send) < len(files) else ""))
        self.rep.start(name, total)
        try:
            (self._relay if self.via_laptop else self._send)(root, send)
        finally:
            self.rep.finish()
        for f, src in twins:
            if src.error:
                f.error = src.error
            else:
                f.etag = self.bucket.copy(src.key, f.key, f.file.size)
                self._copied(f.file.size)
        bad = {f.file.path: f.error for f in files if f.error}
        if not bad:
            bad = self._recheck(root, listed, read)
        if bad:
            what = "; ".join(f"{p}: {why}" for p, why in sorted(bad.items())[:3])
            self.result.failed[name] = f"not recorded ({what})"
            return
        entry = self.store.new_entry(manifest([f.file for f in files]), {f.file.path: f.etag for f in files}, self.alg)
        try:
            self.store.write_entry(entry)
        except Conflict:
            self.result.failed[name] = "another run recorded it meanwhile; its manifest was kept"
            return
        self.entries[name] = entry
        self.result.fetched.append(name)
        if old is not None:
            dropped = self.store.trim_generations(name, self.target.policy.keep_generations)
            self.result.dropped_generations.extend(g.label for g in dropped)
            gone = {g.label for g in dropped}
            self.kept = [g for g in self.kept if g.label not in gone]   # no longer a source of copies

    def _copied(self, size: int) -> None:
        self.result.copied_files += 1
        self.result.copied_bytes += size

    def _set_aside(self, old: Entry) -> None:
        """Before a changed entry's objects are overwritten: its version is copied to a generation,
        then its manifest goes. Until the new manifest is written the name has no entry (the next
        run uploads it); the earlier bytes are in the generation from the first step on."""
        kept = self.store.keep_generation(old)
        self.kept.append(kept)
        self.result.generations.append(kept.label)
        self.store.drop_entry(old.name)
        del self.entries[old.name]

    def _known(self) -> dict[tuple[str, int], tuple[str, str]]:
        """(hash, size) -> (key, etag) of the objects the bucket's entries and generations hold
        (an entry's own first: the rotated latest_backup.pt is then a copy of the old latest.pt)."""
        out = {}
        for e in [*self.kept, *self.entries.values()]:
            if e.alg == self.alg:
                for f in e.manifest.files:
                    if f.path in e.etags:
                        out[(f.xxh3_128, f.size)] = (self.store.object_key(e, f.path), e.etags[f.path])
        return out

    def _recheck(self, root: str, listed, read: dict[str, str]) -> dict[str, str]:
        now = self.server.stat(root, sorted(set(read.values())))
        gone = {p: now.get(read[p]) for p in listed}
        return {p: "deleted during the backup" if gone[p] is None else "modified during the backup"
                for p, st in listed.items() if gone[p] is None or not gone[p].same_content_stamp(st.stat)}

    def _manifest(self, view: ServerView, c: Checkpoint, files: list[FileRecord]) -> Manifest:
        return Manifest(name=c.name, layout=c.layout, kind=c.kind, step=c.step, files=files,
                        resume_files=list(resume_files(c)), resumable=c.resumable, content=c.content,
                        missing=list(c.missing), is_best=c.is_best, state=dict(c.state),
                        source={"target": self.target.label, "server": self.target.describe(), "remote_dir": view.root},
                        backed_up_at=time.time(), verified_at=time.time())

    # -------------------------------------------------- the bytes

    def _send(self, root: str, files: list[_Sending]) -> None:
        """Every file's bytes: small ones as one PUT, large ones in parts (resuming an earlier upload)."""
        ps_wanted = self.settings.part_size
        jobs = []   # (file, part number or 0, offset, length)
        for f in files:
            size = f.file.size
            if size < ps_wanted:
                jobs.append((f, 0, 0, size))
                continue
            ps = part_size(size, ps_wanted)
            ranges = [(n, off, min(ps, size - off)) for n, off in enumerate(range(0, size, ps), 1)]
            kept = self._resume(root, f, ranges)
            jobs.extend((f, n, off, length) for n, off, length in ranges if n not in kept)
        for batch in _batches(jobs, ps_wanted):
            self._batch(root, batch)
        for f in files:
            if f.upload and not f.error:
                f.etag = self.bucket.complete_multipart(f.key, f.upload, sorted(f.parts.items()))

    def _relay(self, root: str, files: list[_Sending]) -> None:
        if not files:
            return
        with tempfile.TemporaryDirectory(prefix="ckptsync-relay-") as tmp:
            targets = {f.file.path: Path(tmp) / f.file.path for f in files}
            dl = self.server.send(root, [(f.source, f.file.path) for f in files])
            outcome, wire = receive(dl, targets, self.rep, lambda _rec: None)
            self.result.wire_bytes += wire
            got = {r.member: r for r in outcome.received}
            for f in files:
                path, size = f.file.path, f.file.size
                why = outcome.changed.get(path) or outcome.unreadable.get(path)
                rec = got.get(path)
                if why or rec is None:
                    f.error = why or "not received"
                elif self.alg == "xxh3_128" and rec.xxh3_128 != f.file.xxh3_128:
                    f.error = "modified during the backup"
                else:
                    f.etag = self.bucket.upload_file(f.key, targets[path], size)
                    self.result.raw_bytes += size
                    self.result.sent_bytes += size

    def _resume(self, root: str, f: _Sending, ranges: list[tuple[int, int, int]]) -> set[int]:
        """Start the file's multipart upload, or continue the newest one left for its key, keeping
        each listed part whose size and MD5 match the server's bytes there."""
        left = [u for u in self.bucket.uploads(f.key) if u[0] == f.key]
        if not left:
            f.upload = self.bucket.start_multipart(f.key)
            return set()
        f.upload = left[-1][1]
        listed = self.bucket.parts(f.key, f.upload)
        candidates = [(n, off, length) for n, off, length in ranges
                      if n in listed and listed[n][0] == length and plain_md5(listed[n][1])]
        sums = self.server.range_hashes(root, [(f.source, off, length) for _n, off, length in candidates])
        kept = set()
        for (n, _off, length), md5 in zip(candidates, sums):
            if md5 is not None and md5 == plain_md5(listed[n][1]):
                f.parts[n] = listed[n][1]
                kept.add(n)
                self.result.resumed_bytes += length
        return kept

    def _batch(self, root: str, batch: list[tuple[_Sending, int, int, int]]) -> None:
        items = []
        for f, n, off, length in batch:
            url = self.bucket.url_part(f.key, f.upload, n) if n else self.bucket.url_put(f.key)
            items.append({"path": f.source, "offset": off, "length": length, "url": url})
        with endpoint_errors("back up with --via-laptop to relay through this machine, or set "
                             "s3.server_endpoint_url to an address the server can reach"):
            moved = self.server.put_urls(root, items, alg="", workers=self.settings.workers)
        for (f, n, _off, length), m in zip(batch, moved):
            if m.error:
                f.error = f.error or m.message or m.error
                continue
            expected = plain_md5(m.etag)
            if expected is not None and expected != m.md5:
                f.error = f.error or f"the bucket stored other bytes than were sent (ETag {m.etag}, MD5 {m.md5})"
                continue
            if n:
                f.parts[n] = m.etag
            else:
                f.etag = etag(m.etag)
            self.result.sent_bytes += length
            self.rep.advance(length)
        failed = next((f for f, *_ in batch if f.error), None)
        if failed is not None and all(f.error for f, *_ in batch):
            raise IntegrityError(f"{failed.file.path}: {failed.error}") if "other bytes" in failed.error else \
                IOFailure(f"sending to the bucket failed: {failed.file.path}: {failed.error}")


def _batches(jobs, part: int):
    """Groups of jobs, each small enough that its URLs are used well within their lifetime."""
    batch, weight = [], 0
    for job in jobs:
        size = job[3]
        if batch and (len(batch) >= BATCH_ITEMS or weight + size > BATCH_PARTS * part):
            yield batch
            batch, weight = [], 0
        batch.append(job)
        weight += size
    if batch:
        yield batch
