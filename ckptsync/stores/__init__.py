"""The stores a backup lives in, behind one interface.

    directory.py  a backup directory on this machine (DirectoryStore)
    bucket.py     a backup directory kept in an S3-compatible bucket (BucketStore)
    archive.py    a .tar.zst made by `ckptsync archive`, read-only (ArchiveStore)
    manifest.py   what a store keeps per entry: its Manifest, and the rule for trusting one

`open_store` picks the store of a target (or of a location: a path, an archive, or
`s3://BUCKET/PREFIX`). Every store reads (`Store`); what only some stores can do is an
ability, asked for with `getattr(store, NAME, None)` (see `ability`), never by checking the
store's class. Writing is such an ability (a directory and a bucket have it, an archive not):

    commit / write_entry     puts an entry in place (backup)
    remove_entry(name)       takes an entry out of sight whole, then deletes its bytes (prune)
    drop_generation(g), trim_generations(name, keep)   remove earlier versions (prune, backup)
    lock(command)            one run at a time per store (errors.Locked, exit 11)
    record_status(status)    records a run as the last one, and as the last of its kind

and the others:

    files_here = True   its bytes are on this machine: restore sends them from here, list
                        compares them with the server's
    data_path(via_laptop)    how backup and restore move its bytes (an object with backup,
                        restore, restore_all), when not through this machine as a directory's
    check_objects(names, read_data, on_block)
        checks entries against the store's own listing (a bucket: sizes and ETags; with
        read_data, the bytes too; an archive: every byte, read once), instead of re-reading
        every file as a directory is checked
    reads_data = True        check_objects reads every byte whatever read_data says (an archive)
    local_copy(rep)          a context: the store extracted as a directory store whose
                             messages name the store (an archive, for restore)
    sweep(keep, dry_run)     deletes what no manifest names (prune)
    unfinished_uploads()     counts uploads begun and not completed (list)
    clean_leftovers()        removes what an interrupted removal left (prune, under the lock)
    staged_names()           entries an unfinished backup left in staging here (list, checklist)
    stuck_holder(now, limit) a live holder of the lock that has stopped progressing (checklist)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, Union

from ckptsync.errors import UsageError

# Kinds of problem a check finds in a stored entry (verify.Problem.kind).
CORRUPT = "corrupt"
MISSING = "missing"
UNEXPECTED = "unexpected"

# What an archive's name ends with (`ckptsync archive` writes one; `open_store` opens one).
SUFFIXES = (".tar.zst", ".tzst")

if TYPE_CHECKING:
    from ckptsync.config import Target
    from ckptsync.stores.manifest import Manifest


class Kept(Protocol):
    """An earlier version of an entry, kept when a newer one replaced it under the same name."""

    name: str
    id: str
    manifest: Manifest


class Store(Protocol):
    """What every store does. `location` is what messages and results name (a path or a URL);
    `kind` names the kind of store in a sentence ("a bucket store")."""

    @property
    def location(self) -> str: ...

    kind: str

    def manifests(self) -> dict[str, Manifest]:
        """Every entry that has a trusted manifest: name -> manifest."""

    def damaged(self) -> dict[str, tuple[Any, str]]:
        """Entries (NAME@ID for a kept version) whose manifest is there but cannot be trusted:
        name -> (where the manifest is, why)."""

    def generations(self, name: str | None = None) -> dict[str, list[Kept]]:
        """Name -> its earlier versions, newest first."""

    def read_file(self, path: str, limit: int) -> bytes | None:
        """The bytes of a stored file (`path` as in its entry's manifest), None when larger than
        `limit`; OSError when it is missing or unreadable. For small files (a trainer's state)."""

    def status(self, kind: str = "") -> dict[str, Any] | None:
        """The last recorded run (of one kind, "scheduled" or "manual", when given)."""


def open_store(where: Union[Target, str, Path], clock: Callable[[], float] = time.time) -> Store:
    """The store of a target (its local_dir, an archive, or the bucket of its store_url), or of a location.
    `clock`: what a bucket's lease lock reads the time from."""
    if isinstance(where, (str, Path)):
        url, root, s3, config = (str(where) if str(where).startswith("s3://") else None), Path(where), {}, None
    else:
        url, root, s3, config = where.store_url, where.local_dir, where.s3, where.printed.config_path
    if url:
        from ckptsync.stores.bucket import open_bucket_store

        return open_bucket_store(url, s3, str(config or "the config"), clock)
    if is_archive(root):
        from ckptsync.stores.archive import ArchiveStore

        return ArchiveStore(root)
    from ckptsync.stores.directory import DirectoryStore

    return DirectoryStore(root)


def is_archive(path: Union[str, Path]) -> bool:
    return str(path).endswith(SUFFIXES)


def ability(store: Store, name: str):
    """The store's optional ability `name` (a method), or None when this store has none."""
    return getattr(store, name, None)


def refuse(store: Store, flag: str, given: bool, needs: str) -> None:
    """A flag whose work needs an ability the store lacks: one line, exit 2."""
    if given and not getattr(store, needs, None):
        raise UsageError(f"{flag} does not work on {store.kind}")
