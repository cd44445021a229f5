"""The stores a backup lives in, behind one interface.

    directory.py  a backup directory on this machine (DirectoryStore)
    bucket.py     a backup directory kept in an S3-compatible bucket (BucketStore)
    archive.py    a .tar.zst made by `ckptsync archive`, read-only (ArchiveStore)
    manifest.py   what a store keeps per entry: its Manifest, and the rule for trusting one

`open_store` picks the store of a target (or of a location: a path, an archive, or
`s3://BUCKET/PREFIX`); `describe` tells what that store is and can do without opening it (no
network, no boto3: for completion, refusing a command, keying a cron entry). Every store
reads (`Store`); what only some stores can do is an ability, asked for with
`getattr(store, NAME, None)` (see `ability`), never by checking the store's class. Writing is
such an ability (a directory and a bucket have it, an archive not):

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

import os
import time
from dataclasses import dataclass, field
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
    from ckptsync.policy import RunStatus
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

    def status(self, kind: str = "") -> RunStatus | None:
        """The last recorded run (of one kind, "scheduled" or "manual", when given)."""


def open_store(where: Union[Target, str, Path], clock: Callable[[], float] = time.time) -> Store:
    """The store of a target (its local_dir, an archive, or the bucket of its store_url), or of a location.
    `clock`: what a bucket's lease lock reads the time from."""
    url, root = _location(where)
    s3, config = ({}, None) if isinstance(where, (str, Path)) else (where.s3, where.printed.config_path)
    if url:
        from ckptsync.stores.bucket import open_bucket_store

        return open_bucket_store(url, s3, str(config or "the config"), clock)
    return store_class(where)(root)


def _location(where: Union[Target, str, Path]) -> tuple[str | None, Path]:
    """(the bucket URL or None, the path) of a target or a location."""
    if isinstance(where, (str, Path)):
        return (str(where) if str(where).startswith("s3://") else None), Path(where)
    return where.store_url, where.local_dir


def is_directory(where: Union[Target, str, Path]) -> bool:
    """Whether `open_store` would open a backup directory, told without importing its code."""
    url, root = _location(where)
    return not url and not is_archive(root)


def store_class(where: Union[Target, str, Path]) -> type:
    """The class of the store `open_store` would open, found from the location alone."""
    if is_directory(where):
        from ckptsync.stores.directory import DirectoryStore

        return DirectoryStore
    if _location(where)[0]:
        from ckptsync.stores.bucket import BucketStore

        return BucketStore
    from ckptsync.stores.archive import ArchiveStore

    return ArchiveStore


# The optional abilities (see the top of this module), as `Description.abilities` lists them.
ABILITIES = ("commit", "write_entry", "remove_entry", "drop_generation", "trim_generations", "lock",
             "record_status", "files_here", "data_path", "check_objects", "reads_data", "local_copy", "sweep",
             "unfinished_uploads", "clean_leftovers", "staged_names", "stuck_holder")


@dataclass(frozen=True)
class Description:
    """What a store is and can do, told from its location without opening it."""

    kind: str                       # as in a sentence: "a backup directory", "a bucket store"
    key: str                        # the bucket's URL, or the path made absolute: what a cron entry is kept under
    abilities: frozenset[str]       # the optional abilities its class has (ABILITIES)
    log_dir: Path                   # where logs of its scheduled runs are kept on this machine
    environment: tuple[str, ...] = ()   # variables its client reads, carried into a cron entry
    secrets: tuple[str, ...] = ()       # variables its client reads that a crontab must not hold (keys)
    # raises when the library its client needs is missing (a bucket: boto3)
    ready: Callable[[], None] = field(default=lambda: None, compare=False, repr=False)

    def can(self, ability: str) -> bool:
        return ability in self.abilities


def describe(where: Union[Target, str, Path]) -> Description:
    """The Description of the store of a target or a location; reads nothing, imports no client."""
    url, root = _location(where)
    cls = store_class(where)
    from ckptsync.stores.directory import META

    key = url if url else os.path.abspath(os.path.expanduser(str(root)))
    log_dir = getattr(cls, "log_dir", None)  # a store elsewhere keeps no log: it stays here
    return Description(kind=cls.kind, key=key, abilities=frozenset(n for n in ABILITIES if hasattr(cls, n)),
                       log_dir=log_dir(key) if log_dir else Path(key) / META,
                       environment=getattr(cls, "ENVIRONMENT", ()), secrets=getattr(cls, "SECRETS", ()),
                       ready=getattr(cls, "ready", lambda: None))


def is_archive(path: Union[str, Path]) -> bool:
    return str(path).endswith(SUFFIXES)


def ability(store: Store, name: str):
    """The store's optional ability `name` (a method), or None when this store has none."""
    return getattr(store, name, None)


def refuse(store: Store, flag: str, given: bool, needs: str) -> None:
    """A flag whose work needs an ability the store lacks: one line, exit 2."""
    if given and not getattr(store, needs, None):
        raise UsageError(f"{flag} does not work on {store.kind}")
