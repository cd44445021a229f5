"""A bucket store's data path (BucketStore.data_path): the server moves the bytes to and from
the bucket itself, through presigned URLs this machine signs; with --via-laptop a backup relays
them through here (s3/backup.py). restore_direct.py runs a restore through it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator

from ckptsync.errors import AgentError, IntegrityError
from ckptsync.progress import QUIET, Reporter
from ckptsync.s3.backup import BATCH_ITEMS, endpoint_errors, run_bucket_backup

if TYPE_CHECKING:
    from ckptsync.backup_plan import BackupResult
    from ckptsync.config import Target
    from ckptsync.selection import BackupOptions
    from ckptsync.server import Server
    from ckptsync.stores.bucket import BucketStore, Entry
    from ckptsync.stores.manifest import FileRecord


class BucketPath:
    """The sink of a backup and the source of a restore, for one bucket store."""

    def __init__(self, store: BucketStore, via_laptop: bool = False) -> None:
        self.store = store
        self.via_laptop = via_laptop

    def backup(self, target: Target, opts: BackupOptions, rep: Reporter = QUIET,
               connect: Callable[[], Server] | None = None) -> BackupResult:
        return run_bucket_backup(target, opts, self.store, rep, via_laptop=self.via_laptop, connect=connect)

    def entry(self, name: str) -> Entry:
        """The current version of `name` (a generation comes from store.generations)."""
        return self.store.entries()[name]

    def fetch(self, server: Server, root: str, entry: Entry) -> Iterator[FileRecord]:
        """The server downloads the entry's files into its staging for `entry.name` under `root`
        (presigned GETs, a batch at a time) and checks each one's size and hash there; yields each
        file once it is there. A file that fails stops the restore, its staging kept."""
        m = entry.manifest
        bucket = self.store.bucket
        files = list(m.files)
        for i in range(0, len(files), BATCH_ITEMS):
            batch = files[i:i + BATCH_ITEMS]
            items = [{"member": f.path, "url": bucket.url_get(self.store.object_key(entry, f.path)), "size": f.size,
                      "mode": f.mode, "mtime_ns": f.mtime_ns, "hash": f.xxh3_128} for f in batch]
            with endpoint_errors("set s3.server_endpoint_url to an address the server can reach"):
                moved = server.get_urls(root, m.name, items, entry.alg, bucket.settings.workers)
            for f, got in zip(batch, moved):
                if got.error:
                    cls = IntegrityError if got.error == "integrity" else AgentError
                    raise cls(f"restoring {f.path}: {got.message or got.error}; the entry stays in "
                              f"{server.staging_path(root, m.name)}, not in place")
                yield f
