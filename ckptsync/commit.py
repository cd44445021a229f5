"""Fetched checkpoints committed one at a time, each as soon as every one of its files is copied.

A file counts as copied when it arrived whole, its hash matches the server's hash of the bytes
sent, and the server's open file still had the listing's stamp (size, mtime, inode, ctime) at the
end of the read (`Server.send` with `listed`; files placed from the store were hashed the same
way, `Server.hash` with `listed`). Those bytes are the listed file's whatever the server does
next, so a checkpoint whose files all count is committed even when a rotation deletes it the
moment after; a file that changed or could not be opened keeps its checkpoint out.

`Pending` does this for the checkpoints of one transfer; the staging bookkeeping it reads
(`progress`: entry -> member -> verified record, and the manifest as listed, saved before the
transfer) also lets a later run commit what a run left staged for a checkpoint the server no
longer has (`staged_copy`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping

from ckptsync.agent import hash_file
from ckptsync.layout import Checkpoint, resume_files
from ckptsync.policy import human
from ckptsync.server import FileStat, Server
from ckptsync.stores.directory import DirectoryStore
from ckptsync.stores.manifest import FileRecord, Manifest, Verified

# What `backup` says of a checkpoint it committed and then found deleted on the server.
DELETED_AFTER_COPY = "deleted on the server after it was copied: the backup is now the only copy"


@dataclass
class Pending:
    """Checkpoints fetched together. `arrived` is told of every verified file; a checkpoint whose
    files are all in `progress` is committed at once, the newest first when several are.

    `twins`: (entry, member) -> the (entry, member) of this set with the same bytes, fetched once;
    `place(entry, member, origin, origin_member)` puts such a copy in staging when its origin arrives,
    and records it in `progress`. `commit(checkpoints)` stores checkpoints together, in that order.
    `group`: while the transfer goes on, ready checkpoints wait until this many are, so that
    their commits share the fsyncs (see Store.commit_all).
    """

    order: list[Checkpoint]                          # newest first
    listed: Mapping[str, Mapping[str, FileStat]]      # entry -> its files as listed
    progress: dict[str, dict[str, Verified]]
    twins: dict[tuple[str, str], tuple[str, str]]
    place: Callable[[str, str, str, str], None]
    commit: Callable[[list[Checkpoint]], None]
    group: int = 1
    committed: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.waiting = {c.name for c in self.order}
        self.rank = {c.name: i for i, c in enumerate(self.order)}
        self.whole: list[Checkpoint] = []   # ready, not yet committed: waiting for their group
        self.copies: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
        for twin, origin in self.twins.items():
            self.copies[origin].append(twin)

    def ready(self, name: str) -> bool:
        return all(p in self.progress[name] for p in self.listed[name])

    def arrived(self, name: str, member: str) -> None:
        """`member` of `name` is verified and recorded in `progress`."""
        touched = {name}
        for twin_name, twin in self.copies.pop((name, member), []):
            self.place(twin_name, twin, name, member)
            touched.add(twin_name)
        self.commit_ready(touched, flush=False)

    def commit_ready(self, names: set[str] | None = None, flush: bool = True) -> None:
        """Commit the checkpoints (of `names`, when given) whose files are all copied, in the order
        they became whole, the newest first among those at once: with `flush` all of them, else once
        `group` are whole. An interruption leaves the others staged, every file verified."""
        # Only the checkpoints named are looked at: a file arrives for each of thousands of them.
        looked = self.order if names is None else [self.order[i] for i in sorted(self.rank[n] for n in names)]
        held = {w.name for w in self.whole}
        for c in looked:
            if c.name in self.waiting and c.name not in held and self.ready(c.name):
                self.whole.append(c)
        if not self.whole or (len(self.whole) < self.group and not flush):
            return
        batch, self.whole = self.whole, []
        for c in batch:
            self.waiting.discard(c.name)
        self.commit(batch)
        self.committed += [c.name for c in batch]

    def unplaced(self) -> dict[str, str]:
        """Copies whose origin never arrived: member -> entry, to be fetched themselves."""
        left = {member: name for copies in self.copies.values() for name, member in copies}
        self.copies.clear()
        return left


GONE = ("not_found", "No such file", "not sent by the server", "deleted while being read")


def failed_text(c: Checkpoint, copied: int, changed: dict[str, str], unreadable: dict[str, str]) -> str:
    """Why a checkpoint of a transfer was not committed; `copied`: how many of its files were."""
    mine = {p: why for p, why in unreadable.items() if p.startswith(c.name + "/") or p == c.name}
    if mine:
        what = "; ".join(f"{p}: {why}" for p, why in sorted(mine.items())[:3])
        return f"could not be read on the server ({what}); not recorded"
    mine = {p: why for p, why in changed.items() if p.startswith(c.name + "/") or p == c.name}
    if mine and all(any(g in why for g in GONE) for why in mine.values()):
        if copied or any("while being read" in why for why in mine.values()):
            return ("deleted on the server while it was read, before every file was copied (e.g. by the "
                    "trainer's checkpoint rotation); not backed up")
        return ("vanished from the server after the listing (deleted, e.g. by the trainer's checkpoint "
                "rotation); not backed up")
    if mine:
        what = "; ".join(f"{p}: {why}" for p, why in sorted(mine.items())[:3])
        return f"changed on the server while it was read ({what}); not recorded"
    return "not every file of it arrived; not recorded"


def planned_manifest(c: Checkpoint, files: Mapping[str, FileStat], source: dict) -> Manifest:
    """The manifest of `c` as listed, before any byte is fetched: hashes empty."""
    return Manifest(
        name=c.name, layout=c.layout, kind=c.kind, step=c.step,
        files=[FileRecord(path=p, size=s.size, mode=s.mode, mtime_ns=s.mtime_ns, xxh3_128="",
                          ctime_ns=s.ctime_ns, inode=s.inode) for p, s in sorted(files.items())],
        resume_files=list(resume_files(c)), resumable=c.resumable, content=c.content,
        missing=list(c.missing), is_best=c.is_best, state=dict(c.state), source=source,
    )


def finished_manifest(planned: Manifest, progress: Mapping[str, Verified], now: float | None = None) -> Manifest:
    """The planned manifest with each file's verified record (hash, and the stamps it arrived with)."""
    now = time.time() if now is None else now
    files = [progress[f.path].as_file(f) for f in planned.files]
    return replace(planned, files=files, backed_up_at=now, verified_at=now)


def record(size: int, mode: int, mtime_ns: int, digest: str, listed: FileStat, placed: str = "",
           hashes: Mapping[str, str] | None = None) -> Verified:
    """One verified file in `progress`: its stamps as received, its hash, and the listing's inode and
    ctime it was checked against (so a later run reuses it only for that same file)."""
    return Verified(size, mode, mtime_ns, digest, listed.inode, listed.ctime_ns, placed, dict(hashes or {}))


def usable_staged(store: DirectoryStore, name: str, listed: Mapping[str, FileStat | FileRecord],
                  check_hash: bool) -> dict[str, Verified]:
    """Files a run verified and left in staging that are still the listed files."""
    keep = {}
    root = store.staging(name)
    for path, rec in store.load_progress(name).items():
        s = listed.get(path)
        if s is None or (s.size, s.mtime_ns, s.mode) != (rec.size, rec.mtime_ns, rec.mode):
            continue
        if any(getattr(rec, k) and getattr(s, k) and getattr(rec, k) != getattr(s, k) for k in ("inode", "ctime_ns")):
            continue
        local = root / path
        try:
            if local.stat().st_size != rec.size:
                continue
        except OSError:
            continue
        if check_hash and hash_file(local) != rec.xxh3_128:
            continue
        keep[path] = rec
    return keep


def staged_copy(store: DirectoryStore, name: str) -> Manifest | None:
    """What a run left staged of `name`, as a manifest to commit, when every listed file of it was
    copied and is still intact here; else None (nothing to commit: too little was copied, or it
    was staged before the listing was recorded)."""
    planned = store.load_pending(name)
    if planned is None or not planned.files:
        return None
    progress = usable_staged(store, name, {f.path: f for f in planned.files}, check_hash=True)
    if len(progress) != len(planned.files):
        return None
    return finished_manifest(planned, progress)


def gone(server: Server, root: str, listed: Mapping[str, Mapping[str, FileStat]]) -> list[str]:
    """The entries of which the server no longer has every file (one stat request)."""
    paths = sorted(p for files in listed.values() for p in files)
    if not paths:
        return []
    now = server.stat(root, paths)
    return [name for name, files in listed.items() if any(now.get(p) is None for p in files)]


def staging_note(store: DirectoryStore, discard_command: str) -> tuple[list[str], int, str]:
    """What staging holds (entry names, bytes) and one sentence saying so, with the command that
    clears it; ([], 0, "") when it holds nothing."""
    names = store.staged_names()
    if not names:
        return [], 0, ""
    held = store.staged_bytes()
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    return names, held, (f"staging holds {human(held)} left by unfinished backups ({shown}): the next backup "
                         "resumes them, and commits or drops those the server no longer has; to delete it now: "
                         f"{discard_command}")
