"""`ckptsync verify --repair`: fetch again the files of a backup that fail their manifest.

A damaged file is fetched from the server only when the server still has it with the
manifest's size; what arrives goes through staging, must match the server's checksum in
transit and then the manifest's xxh3-128, and only then replaces the damaged copy (one
rename). Anything that cannot be repaired that way is said, and the run exits 30.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ckptsync.config import Target
from ckptsync.errors import INTEGRITY, OK
from ckptsync.progress import QUIET, Reporter
from ckptsync.result import Result
from ckptsync.server import Server, open_server
from ckptsync.server.transfer import receive
from ckptsync.disk import fsync_file, io_error, remove_tree
from ckptsync.stores.directory import DirectoryStore
from ckptsync.stores.manifest import EXTRA, FileRecord
from ckptsync.verify import CORRUPT, MISSING, VerifyResult, run_verify


@dataclass
class RepairResult(Result):
    target: str
    dest: str
    server: str
    repaired: dict[str, list[str]] = field(default_factory=dict)   # entry -> files fetched again
    unrepaired: dict[str, str] = field(default_factory=dict)       # file -> why not
    after: VerifyResult | None = None                               # the verification that followed

    @property
    def exit_code(self) -> int:
        return INTEGRITY if self.unrepaired or (self.after is not None and self.after.failed) else OK



def run_repair(target: Target, names: list[str], rep: Reporter = QUIET,
               connect: Callable[[], Server] | None = None) -> RepairResult:
    """Verify, fetch the damaged files again from the server, verify again. `connect`: gives the
    server (see open_server)."""
    store = DirectoryStore(target.local_dir)
    result = RepairResult(target.label, str(target.local_dir), target.describe())
    before = run_verify(target, names, rep=rep)
    damaged: dict[str, list[FileRecord]] = {}
    manifests = store.manifests()
    for check in before.failed:
        m = manifests.get(check.name)
        records = {f.path: f for f in (m.files if m else [])}
        for p in check.problems:
            if p.kind in (CORRUPT, MISSING) and p.path in records:
                damaged.setdefault(check.name, []).append(records[p.path])
            else:
                result.unrepaired[p.path] = f"{p.kind}{': ' + p.detail if p.detail else ''} (not fixable by fetching)"
    if damaged:
        try:
            with store.lock("ckptsync verify --repair", stall_limit=target.link.stall_timeout), \
                    open_server(target, connect) as server:
                for name, files in damaged.items():
                    _repair(store, server, target, name, files, result, rep)
        except OSError as exc:
            raise io_error(exc, f"repairing in {store.root}") from None
    result.after = run_verify(target, names, rep=rep) if damaged or before.failed else before
    return result


def _repair(store: DirectoryStore, server, target: Target, name: str, files: list[FileRecord], result: RepairResult,
            rep: Reporter) -> None:
    where = {f.path: (f.source if name == EXTRA and f.source else f.path) for f in files}
    listed = server.stat(target.remote_dir, list(where.values()))
    todo = []
    for f in files:
        st = listed.get(where[f.path])
        if st is None or st.is_dir:
            result.unrepaired[f.path] = "no longer on the server: it cannot be fetched again"
        elif st.size != f.size:
            result.unrepaired[f.path] = f"the server's copy has {st.size} bytes, the backup had {f.size}"
        else:
            todo.append(f)
    if not todo:
        return
    staging = store.meta / "repair" / name
    remove_tree(staging)
    targets = {f.path: staging / f.path for f in todo}
    dl = server.send(target.remote_dir, [(where[f.path], f.path) for f in todo])
    rep.start(f"repair {name}", sum(f.size for f in todo))
    try:
        outcome, _wire = receive(dl, targets, rep, lambda _rec: None)
    finally:
        rep.finish()
    want = {f.path: f for f in todo}
    for path, why in outcome.changed.items():
        result.unrepaired[path] = f"changed on the server while read: {why}"
    for path, why in outcome.unreadable.items():
        result.unrepaired[path] = f"cannot be read on the server: {why}"
    for rec in outcome.received:
        f = want[rec.member]
        got = targets[rec.member]
        if rec.xxh3_128 != f.xxh3_128:
            result.unrepaired[f.path] = "the server's copy differs from the backup (it changed after the backup)"
            got.unlink(missing_ok=True)
            continue
        os.chmod(got, f.mode)
        os.utime(got, ns=(f.mtime_ns, f.mtime_ns))
        fsync_file(got)
        final = store.root / f.path
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(got, final)  # a hard-linked damaged copy elsewhere keeps its own inode
        result.repaired.setdefault(name, []).append(f.path)
    remove_tree(staging)
    _prune_empty(store.meta / "repair")


def _prune_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


