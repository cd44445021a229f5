"""show, compare and checklist of a bucket store: the directory code over the bucket's index."""

from __future__ import annotations

import contextlib
from typing import Iterator

from ckptsync.backup import BackupOptions
from ckptsync.config import Target
from ckptsync.details import CompareResult, ShowResult, compare_stored, show_server, show_stored, state_file
from ckptsync.progress import Reporter
from ckptsync.s3.backup import run_bucket_backup
from ckptsync.stores import open_store
from ckptsync.s3.index import bucket_index
from ckptsync.stores.bucket import BucketStore
from ckptsync.stores.directory import DirectoryStore
from ckptsync.stores.manifest import EXTRA
from ckptsync.verify import run_verify


@contextlib.contextmanager
def renamed(index, store: BucketStore) -> Iterator[None]:
    """Messages raised inside name the bucket, not the temp directory standing in for it."""
    from ckptsync.archive import naming

    with naming(index, str(store.root)):
        yield


def show_bucket(store: BucketStore, name: str | None) -> ShowResult:
    with bucket_index(store, state_file) as index, renamed(index, store):
        result = show_stored(index, name)
    result.location = str(store.root)
    return result


def show_on_server(target: Target, store: BucketStore, name: str | None) -> ShowResult:
    with bucket_index(store) as index, renamed(index, store):
        return show_server(target, name, index)


def compare_bucket(store: BucketStore, a: str, b: str) -> CompareResult:
    with bucket_index(store, state_file) as index, renamed(index, store):
        result = compare_stored(index, a, b)
    result.location = str(store.root)
    return result


class BucketBackups:
    """checklist.Backups for a bucket: manifests from its index, sizes and ETags re-checked."""

    def __init__(self, target: Target, store: BucketStore | None = None) -> None:
        self.target = target
        self.bucket = store or open_store(target)
        self.dest = str(self.bucket.root)

    def backup(self, rep: Reporter) -> None:
        run_bucket_backup(self.target, BackupOptions(max_checkpoints=1, include_best=True), rep, self.bucket)

    @contextlib.contextmanager
    def reading(self) -> Iterator[DirectoryStore]:
        # The extra files' bytes come too: a server without xxh3-128 is compared by reading them.
        with bucket_index(self.bucket, lambda p: p.startswith(EXTRA + "/")) as index, renamed(index, self.bucket):
            yield DirectoryStore(index)

    def verify(self, name: str, rep: Reporter) -> tuple[bool, str, str]:
        problems = [f"{p.path}: {p.detail or p.kind}" for c in run_verify(self.target, [name], rep=rep).entries
                    for p in c.problems]
        if not problems:
            return True, f"{name}: every object's size and ETag match its manifest", ""
        return (False, f"{name}: " + "; ".join(problems[:3]),
                f"{self.target.command('verify', '--read-data', name)}   (reads every object back)")
