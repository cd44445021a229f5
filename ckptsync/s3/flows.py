"""restore of a bucket store (backup is in backup.py)."""

from __future__ import annotations

import contextlib
import posixpath
import time
from dataclasses import asdict, dataclass, field
from typing import ClassVar


from ckptsync.errors import OK, AgentError, DiskFull, IntegrityError, UsageError
from ckptsync.policy import SPACE_MARGIN, fits, human
from ckptsync.progress import QUIET, Reporter
from ckptsync.restore import RestoreOptions
from ckptsync.restore_choice import choose, newest_first, pick_generation, resume_hint
from ckptsync.restore_all import RestoreAll
from ckptsync.s3.backup import BATCH_ITEMS, endpoint_errors
from ckptsync.stores.bucket import BucketStore
from ckptsync.server import Server, open_server


# -------------------------------------------------- restore


@dataclass
class BucketRestore:
    store: str
    server: str
    name: str
    path: str
    target: str = ""
    files: int = 0
    bytes: int = 0
    notes: list[str] = field(default_factory=list)
    hint: str = ""
    generation: str = ""         # the id of the earlier version restored, if one was asked for
    seconds: float = 0.0
    exit_code: int = OK

    def to_dict(self) -> dict:
        return asdict(self)

    # As a RestoreResult reads, for restore --all's summary.
    warnings: ClassVar[list[str]] = []
    remote_dir: ClassVar[str] = ""

    @property
    def sent_bytes(self) -> int:
        return self.bytes   # from the bucket to the server; none through this machine

    @property
    def wire_bytes(self) -> int:
        return self.bytes

    @property
    def resume_hint(self) -> str:
        return self.hint


class BucketRestoreAll(RestoreAll):
    """restore --all from a bucket: every entry newest first, each a bucket restore."""

    def __init__(self, target, store: BucketStore, opts: RestoreOptions, rep: Reporter) -> None:
        super().__init__(target, opts, rep)
        self.store = store
        self.result.source = str(store.root)

    def manifests(self):
        return {n: e.manifest for n, e in self.store.entries().items()}

    def damaged(self) -> dict:
        return {}   # a bucket's unreadable manifests are the bucket store's to report

    def restore_one(self, server, name: str, extras: bool, names: frozenset[str]):
        return run_bucket_restore(self.target, self.store, name, self.opts.force, self.rep, server)


def run_bucket_restore_all(target, store: BucketStore, force: bool = False, rep: Reporter = QUIET):
    return BucketRestoreAll(target, store, RestoreOptions(force=force, extra_files=False), rep).run()


def run_bucket_restore(target, store: BucketStore, name: str | None, force: bool = False,
                       rep: Reporter = QUIET, server: Server | None = None,
                       generation: str | None = None) -> BucketRestore:
    """One entry (or, with `generation`, an earlier version of it) from the bucket onto the server:
    presigned GETs, the agent downloads into staging and checks every file's size and hash there,
    then the entry is renamed into place whole."""
    started = time.monotonic()
    entries = store.entries()
    m, notes = choose(newest_first({n: e.manifest for n, e in entries.items()}), name, adapter_only=False)
    entry = entries[m.name]
    if generation is not None:
        entry = pick_generation(store, m.name, generation)
        m = entry.manifest
    with (contextlib.nullcontext(server) if server is not None else open_server(target)) as server, \
            contextlib.ExitStack() as held:
        root = server.mkdir(target.remote_dir)
        held.enter_context(server.holding(root, "ckptsync restore"))  # one run at a time writes into it
        if entry.alg not in server.hashes:
            raise UsageError(f"{server.describe()} cannot compute {entry.alg}, the hash {m.name} was recorded with")
        free = server.df(root).free
        if not fits(m.size, free):
            raise DiskFull(f"not enough space on {server.describe()} in {root}: {m.name} needs {human(m.size)} "
                           f"plus a {human(SPACE_MARGIN)} margin, {human(free)} is free (nothing was written)")
        there = server.stat(root, [m.name]).get(m.name)
        if there is not None and not force:
            raise UsageError(f"{posixpath.join(root, m.name)} already exists on {server.describe()}",
                             hint="add --force to replace it, or restore into another --remote-dir")
        out = BucketRestore(store=str(store.root), server=server.describe(), name=m.name,
                            path=posixpath.join(root, m.name), notes=notes, generation=entry.gid,
                            target=target.label)
        rep.start(m.name, m.size)
        try:
            files = list(m.files)
            for i in range(0, len(files), BATCH_ITEMS):
                batch = files[i:i + BATCH_ITEMS]
                items = [{"member": f.path, "url": store.bucket.url_get(store.object_key(entry, f.path)), "size": f.size,
                          "mode": f.mode, "mtime_ns": f.mtime_ns, "hash": f.xxh3_128} for f in batch]
                moved = _get(server, root, m.name, items, entry.alg, store.bucket.settings.workers)
                for f, got in zip(batch, moved):
                    if got.error:
                        cls = IntegrityError if got.error == "integrity" else AgentError
                        raise cls(f"restoring {f.path}: {got.message or got.error}; the entry stays in "
                                  f"{server.staging_path(root, m.name)}, not in place")
                    out.files += 1
                    out.bytes += f.size
                    rep.advance(f.size)
        finally:
            rep.finish()
        done = server.commit(root, m.name, [(m.name, m.name)], force=force)
        if m.name in done.kept:
            raise UsageError(f"{m.name} appeared in {root} during the restore and was left as it is",
                             hint="add --force to replace it")
        server.discard(root, m.name)
        out.hint = resume_hint(m, root, out.path, exact=m.resumable)
    out.seconds = time.monotonic() - started
    return out


def _get(server: Server, root: str, name: str, items: list[dict], alg: str, workers: int):
    with endpoint_errors("set s3.server_endpoint_url to an address the server can reach"):
        return server.get_urls(root, name, items, alg, workers)
