"""A bucket store seen as a backup directory, for the commands that only read one.

show, compare, checklist and cron show read manifests, status and a few small state
files. `bucket_index` writes those into a temp directory laid out like a backup
directory (every entry an empty stand-in, as `archive_index` does for an archive), so
the same code serves a directory, an archive and a bucket.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from ckptsync.policy import STATUS_KINDS, status_file
from ckptsync.stores.bucket import BucketStore
from ckptsync.stores.directory import META, DirectoryStore

MAX_FETCHED = 16 << 20  # a state file larger than this is left out, as show leaves it out on disk


@contextlib.contextmanager
def bucket_index(store: BucketStore, wanted: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """The temp directory; `wanted(path)` picks the files whose bytes are fetched (through this machine)."""
    tmp = Path(tempfile.mkdtemp(prefix=".ckptsync-index-"))
    try:
        local = DirectoryStore(tmp)
        for name, entry in sorted(store.entries().items()):
            m = entry.manifest
            stand_in = local.entry(name)
            if [f.path for f in m.files] == [name]:
                stand_in.parent.mkdir(parents=True, exist_ok=True)
                stand_in.touch()   # a single-file entry
            else:
                stand_in.mkdir(parents=True, exist_ok=True)
            local.write_manifest(m)
            for f in m.files:
                if wanted is None or not wanted(f.path) or f.size > MAX_FETCHED or f.path == name:
                    continue
                got = store.bucket.get(store.key(f.path))
                if got is not None:
                    (tmp / f.path).parent.mkdir(parents=True, exist_ok=True)
                    (tmp / f.path).write_bytes(got[0])
        for kind in ("", *STATUS_KINDS):
            status = store.status(kind)
            if status is not None:
                (tmp / META).mkdir(exist_ok=True)
                (tmp / META / status_file(kind)).write_text(json.dumps(status), encoding="utf-8")
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
