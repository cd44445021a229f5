"""The stores a backup lives in, behind one interface.

    directory.py  a backup directory on this machine (DirectoryStore)
    bucket.py     a backup directory kept in an S3-compatible bucket (BucketStore)
    manifest.py   what a store keeps per entry: its Manifest, and the rule for trusting one

`open_store` picks the store of a target (or of a location: a path or `s3://BUCKET/PREFIX`).
The commands work on `Store`; what only some stores can do is an ability, asked for with
`getattr(store, NAME, None)` (see `ability`), never by checking the store's class:

    files_here = True   its files are on this machine: verify --remote compares them with the
                        server's, verify --repair fetches damaged ones again
    data_path(via_laptop)    how backup and restore move its bytes (an object with backup,
                        restore, restore_all), when not through this machine as a directory's
    check_objects(names, read_data, on_block)
        checks entries from the store's own listing (sizes and ETags; with read_data, the
        bytes too), instead of re-reading every file as a directory is checked
    sweep(keep, dry_run)     deletes what no manifest names (prune)
    unfinished_uploads()     counts uploads begun and not completed (list)
    clean_leftovers()        removes what an interrupted removal left (prune, under the lock)
    staged_names()           entries an unfinished backup left in staging here (list, checklist)
    stuck_holder(now, limit) a live holder of the lock that has stopped progressing (checklist)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Protocol, Union

from ckptsync.errors import UsageError

# Kinds of problem a check finds in a stored entry (verify.Problem.kind).
CORRUPT = "corrupt"
MISSING = "missing"

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

    def drop_generation(self, g: Any) -> None:
        """Remove one earlier version: its manifest first, so a half-removed one is never listed."""

    def trim_generations(self, name: str, keep: int) -> list[Kept]:
        """Drop all but the `keep` newest earlier versions of `name`; returns the dropped ones."""

    def read_file(self, path: str, limit: int) -> bytes | None:
        """The bytes of a stored file (`path` as in its entry's manifest), None when larger than
        `limit`; OSError when it is missing or unreadable. For small files (a trainer's state)."""

    def remove_entry(self, name: str) -> None:
        """Take an entry out of sight whole (its manifest no longer listed), then delete its bytes."""

    def lock(self, command: str) -> ContextManager[Any]:
        """One run at a time per store; a second one is refused (errors.Locked, exit 11)."""

    def status(self, kind: str = "") -> dict[str, Any] | None:
        """The last recorded run (of one kind, "scheduled" or "manual", when given)."""

    def record_status(self, status: dict[str, Any]) -> None:
        """Record a run as the last one, and as the last of its kind."""


def open_store(where: Union[Target, str, Path], clock: Callable[[], float] = time.time) -> Store:
    """The store of a target (its local_dir, or the bucket of its store_url), or of a location.
    `clock`: what a bucket's lease lock reads the time from."""
    if isinstance(where, (str, Path)):
        url, root, s3, config = (str(where) if str(where).startswith("s3://") else None), Path(where), {}, None
    else:
        url, root, s3, config = where.store_url, where.local_dir, where.s3, where.config_path
    if url:
        from ckptsync.stores.bucket import open_bucket_store

        return open_bucket_store(url, s3, str(config or "the config"), clock)
    from ckptsync.stores.directory import DirectoryStore

    return DirectoryStore(root)


def ability(store: Store, name: str):
    """The store's optional ability `name` (a method), or None when this store has none."""
    return getattr(store, name, None)


def refuse(store: Store, flag: str, given: bool, needs: str) -> None:
    """A flag whose work needs an ability the store lacks: one line, exit 2."""
    if given and not getattr(store, needs, None):
        raise UsageError(f"{flag} does not work on {store.kind}")
