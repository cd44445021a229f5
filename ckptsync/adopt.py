"""`ckptsync adopt`: manifests for checkpoints copied into a backup directory without ckptsync.

The scripts ckptsync replaces left plain `checkpoint-N/` directories and the config files beside
them. Adopting reads each complete checkpoint there (its layout, step and state, as discovery
reads a server) and hashes its files here; the manifests written make it a backup like any
other, so a later backup fetches only what differs. With a target, each adopted checkpoint the
server still has is compared with it, by the server's hash: a copy that differs is adopted as
what it holds and marked, and the next backup fetches the server's copy (keeping this one as an
earlier version).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from ckptsync.commit import planned_manifest
from ckptsync.config import Target
from ckptsync.digests import XXH3, hash_both
from ckptsync.errors import OK, PARTIAL, NotFound
from ckptsync.layout import Checkpoint
from ckptsync.progress import QUIET, Reporter
from ckptsync.result import Result
from ckptsync.scan import CHECKPOINT_PART, ServerView, scan_server
from ckptsync.selection import skip_reason
from ckptsync.server import Server, open_server
from ckptsync.server.types import FileStat
from ckptsync.agent import hash_file
from ckptsync.disk import fsync_dir
from ckptsync.stores.directory import DirectoryStore
from ckptsync.stores.manifest import EXTRA, FileRecord, Manifest

SAME = "same"
DIFFERS = "differs"
ABSENT = "not on the server"
UNCHECKED = "not checked"


def unadopted(store: DirectoryStore) -> list[str]:
    """Directories of the backup directory named like checkpoints that have no manifest."""
    return [n for n in store.unmanaged() if CHECKPOINT_PART.fullmatch(n) and (store.root / n).is_dir()]


def adopt_hint(root: Path, names: list[str]) -> str:
    """What list says of such directories."""
    n = len(names)
    return (f"{n} director{'y looks' if n == 1 else 'ies look'} like checkpoint{'s' if n > 1 else ''} made "
            f"without ckptsync ({', '.join(names[:3])}{', ...' if n > 3 else ''}): run ckptsync adopt {root}")


@dataclass
class Adopted:
    name: str
    step: int | None
    files: int
    size: int
    content: str
    server: str = UNCHECKED         # same, differs, not on the server, not checked
    differs: list[str] = field(default_factory=list)   # its files whose bytes or presence differ


@dataclass
class AdoptResult(Result):
    target: str
    dest: str
    server: str | None
    dry_run: bool
    adopted: list[Adopted] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)   # name -> why it was not adopted
    extra_files: list[str] = field(default_factory=list)    # configured extra files found here, as configured
    warnings: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return PARTIAL if any(a.server == DIFFERS for a in self.adopted) else OK


def run_adopt(target: Target, dry_run: bool = False, rep: Reporter = QUIET,
              connect: Callable[[], Server] | None = None) -> AdoptResult:
    """`connect`: gives the server the adopted files are compared with (see open_server)."""
    root = Path(target.local_dir)
    if not root.is_dir():
        raise NotFound(f"no directory {root}")
    store = DirectoryStore(root)
    result = AdoptResult(target=target.label, dest=str(root),
                         server=target.describe() if target.transport is not None else None, dry_run=dry_run)
    lock = contextlib.nullcontext() if dry_run else store.lock("ckptsync adopt")
    with lock:
        names = set(store.unmanaged())
        here = _local_view(target, root)
        found = [c for c in here.checkpoints if c.name in names]
        for c in found:
            if not c.complete:
                result.skipped[c.name] = skip_reason(c)
        complete = [c for c in found if c.complete]
        extras = _extras_here(target, root, names)
        if not complete and not extras:
            return result
        with (open_server(target, connect) if target.transport is not None or connect is not None
              else contextlib.nullcontext()) as server:
            there = scan_server(server, target.remote_dir, target.policy.settle_seconds) if server is not None else None
            alg = server.best_hash if server is not None else XXH3
            source = {"target": target.label, "server": target.describe() if server is not None else "",
                      "remote_dir": there.root if there is not None else (target.remote_dir or ""),
                      "adopted_at": time.time()}
            manifests = []
            for c in complete:
                rep.info(f"{c.name}: hashing {len(here.files_of(c))} files")
                m, item = _adopt_one(root, c, here, there, server, alg, source)
                manifests.append(m)
                result.adopted.append(item)
            if extras:
                if server is not None:
                    source["home"] = server.hello.home
                manifests.append(_extra_manifest(root, extras, server, there, alg, source, result))
        if not dry_run:
            _write(store, root, manifests, extras)
    return result


def _local_view(target: Target, root: Path) -> ServerView:
    """The backup directory read as a server is: the agent on this machine lists it and parses the
    checkpoints' state files, so discovery judges them by the same rules."""
    from ckptsync.transport.local import LocalTransport

    here = replace(target, transport=LocalTransport(), remote_dir=str(root))
    with open_server(here) as server:
        return scan_server(server, str(root), target.policy.settle_seconds)


def _adopt_one(root: Path, c: Checkpoint, here: ServerView, there: ServerView | None, server: Server | None,
               alg: str, source: dict) -> tuple[Manifest, Adopted]:
    # Stamps are this machine's: no inode or ctime, so a backup checks the bytes once, by hash.
    files = {p: replace(st, ctime_ns=0, inode=0) for p, st in here.files_of(c).items()}
    m = planned_manifest(c, files, dict(source))
    values = {}
    for f in m.files:
        f.xxh3_128, values[f.path] = _hashes(root / f.path, alg)
        if alg != XXH3:
            f.hashes[alg] = values[f.path]
    newest = max((f.mtime_ns for f in m.files), default=0) / 1e9
    m = replace(m, backed_up_at=newest or time.time(), verified_at=time.time())
    item = Adopted(c.name, c.step, len(m.files), m.size, c.content)
    if there is not None:
        theirs = there.find(c.name)
        if theirs is None:
            item.server = ABSENT
        else:
            item.differs = _differs(server, there.root, values, there.files_of(theirs), alg)
            item.server = DIFFERS if item.differs else SAME
        m.source["server_check"] = item.server
    return m, item


def _hashes(path: Path, alg: str) -> tuple[str, str]:
    """(xxh3-128, the value in `alg`) of one file, read once."""
    if alg == XXH3:
        value = hash_file(path)
        return value, value
    return hash_both(path, alg)


def _differs(server: Server, remote_root: str, mine: dict[str, str], theirs: dict[str, FileStat],
             alg: str, where: dict[str, str] | None = None) -> list[str]:
    """Paths whose bytes differ from the server's, or that only one side has (`where`: record
    path -> its path on the server, when they differ)."""
    where = where or {p: p for p in mine}
    both = [p for p in mine if where[p] in theirs]
    got = server.hash(remote_root, sorted(where[p] for p in both), alg) if both else None
    out = [p for p in both if got.get(where[p]) != mine[p]]
    out += [p for p in mine if where[p] not in theirs]
    out += [p for p in theirs if p not in where.values()]
    return sorted(out)


def _extras_here(target: Target, root: Path, names: set[str]) -> dict[str, str]:
    """Configured extra file -> its member, for those the old scripts left beside the checkpoints
    (under their own names) while the backup directory has no extra files of its own."""
    from ckptsync.backup_plan import extra_members

    if (root / EXTRA).exists():
        return {}
    members = extra_members(target.policy.extra_files)
    return {src: member for src, member in members.items()
            if member.split("/", 1)[1] in names and (root / member.split("/", 1)[1]).is_file()}


def _extra_manifest(root: Path, extras: dict[str, str], server: Server | None, there: ServerView | None,
                    alg: str, source: dict, result: AdoptResult) -> Manifest:
    files, values = [], {}
    for src, member in sorted(extras.items(), key=lambda kv: kv[1]):
        path = root / member.split("/", 1)[1]
        st = path.stat()
        xxh3, values[member] = _hashes(path, alg)
        files.append(FileRecord(path=member, size=st.st_size, mode=st.st_mode & 0o7777, mtime_ns=st.st_mtime_ns,
                                xxh3_128=xxh3, source=src,
                                hashes={alg: values[member]} if alg != XXH3 else {}))
        result.extra_files.append(src)
    if server is not None and there is not None:
        stats = server.stat(there.root, list(extras))
        theirs = {src: FileStat(src, s.size, s.mtime_ns, s.mode) for src, s in stats.items() if s is not None}
        differs = _differs(server, there.root, values, theirs, alg, where=dict(zip(extras.values(), extras)))
        for member in differs:
            result.warnings.append(f"extra file {member.split('/', 1)[1]} here differs from the server's "
                                   f"{dict(zip(extras.values(), extras))[member]}: the next backup fetches it")
    now = time.time()
    return Manifest(name=EXTRA, layout="extra", kind="extra", step=None, files=files, source=dict(source),
                    backed_up_at=max((f.mtime_ns for f in files), default=0) / 1e9 or now, verified_at=now)


def _write(store: DirectoryStore, root: Path, manifests: list[Manifest], extras: dict[str, str]) -> None:
    """The extra files move under extra-files/ first; each manifest is written last, once its entry is in place."""
    if extras:
        (root / EXTRA).mkdir(exist_ok=True)
        for member in extras.values():
            os.rename(root / member.split("/", 1)[1], root / member)
        fsync_dir(root / EXTRA)
        fsync_dir(root)
    for m in manifests:
        store.write_manifest(m)
