"""The backup's bytes in the server's hash algorithm, for a server that cannot compute xxh3-128.

A manifest records every file's xxh3-128, computed here. A server whose python3 lacks the
xxhash module hashes with sha1 (agent/hashing.py), and a value of one algorithm is never
compared with a value of another. So the stored copy is read once and hashed in both: the
second value is kept only when the first matches the manifest (it then describes the bytes
that were backed up, not a copy that rotted since), and it is recorded next to xxh3-128 in
every manifest holding those bytes (`FileRecord.hashes`). The next comparison reads nothing
here. Values learnt for free (the hashes a transfer or a restore computes anyway) go the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ckptsync.disk import XXH3, new_hasher
from ckptsync.errors import CkptsyncError
from ckptsync.stores.directory import DirectoryStore
from ckptsync.stores.manifest import FileRecord

BLOCK = 1 << 20


def recorded(f: FileRecord, alg: str) -> str | None:
    """The record's own value in `alg`, if it has one."""
    return f.xxh3_128 if alg == XXH3 else f.hashes.get(alg)


def hash_both(path: Path, alg: str, on_block: Callable[[int], None] | None = None) -> tuple[str, str]:
    """(xxh3-128, alg) of one file, read once; `alg` is one of hashlib's (what servers fall back to)."""
    hx, other = new_hasher(), new_hasher(alg)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            hx.update(block)
            other.update(block)
            if on_block is not None:
                on_block(len(block))
    return hx.hexdigest(), other.hexdigest()


class LocalDigests:
    """Digests of stored content in other algorithms: recorded, learnt this run, or hashed once.

    `held`: the caller holds the store's lock (backup, restore, prune), so `save` writes at once;
    otherwise `save` takes the lock itself, and skips recording when another run holds it.
    """

    def __init__(self, store: DirectoryStore | None, held: bool = False,
                 on_block: Callable[[int], None] | None = None) -> None:
        # a directory's copy, or none (asked as stores.ability asks; importing stores here would loop)
        self.store = store if getattr(store, "write_manifest", None) else None
        self.held = held
        self.on_block = on_block
        self.found: dict[tuple[str, int], dict[str, str]] = {}   # (xxh3, size) -> {alg: value}
        self.bytes_read = 0        # bytes hashed here
        self.damaged: set[str] = set()   # stored copies that no longer match their manifest
        self.errors: dict[str, str] = {}  # stored copies that could not be read -> why

    def learn(self, xxh3: str, size: int, alg: str, value: str) -> None:
        """A value computed elsewhere over bytes whose xxh3-128 is known (a transfer, an upload)."""
        if alg != XXH3 and value:
            self.found.setdefault((xxh3, size), {})[alg] = value

    def known(self, f: FileRecord, alg: str) -> str | None:
        """The value without reading anything."""
        return recorded(f, alg) or self.found.get((f.xxh3_128, f.size), {}).get(alg)

    def get(self, f: FileRecord, alg: str, path: Path | None = None) -> str | None:
        """`f`'s bytes in `alg`. Unknown ones are hashed from the stored copy (`path`, by default
        where the store keeps it); None when that copy cannot be read or no longer matches the
        manifest. Raises nothing: the caller treats None as "cannot tell"."""
        value = self.known(f, alg)
        if value is not None:
            return value
        if path is None:
            if self.store is None:
                return None
            path = self.store.root / f.path
        try:
            mine, value = hash_both(path, alg, self.on_block)
        except OSError as exc:
            self.errors[f.path] = exc.strerror or str(exc)
            return None
        except ValueError:  # an algorithm hashlib does not know here
            return None
        self.bytes_read += f.size
        if mine != f.xxh3_128:
            self.damaged.add(f.path)
            return None
        self.learn(f.xxh3_128, f.size, alg, value)
        return value

    def save(self) -> int:
        """Record what was learnt in every manifest (entries and generations) holding the same
        bytes; returns how many manifests changed. A store another run holds, or one this user
        cannot write (an archive's index, a read-only disk), keeps them unrecorded."""
        if not self.found or self.store is None or not self.store.meta.is_dir():
            return 0
        if self.held:
            return self._write()
        try:
            with self.store.lock("ckptsync (recording hashes)"):
                return self._write()
        except (CkptsyncError, OSError):
            return 0

    def _write(self) -> int:
        store, changed = self.store, 0
        try:
            for m in store.manifests().values():
                if self._fill(m.files):
                    store.write_manifest(m)
                    changed += 1
            for gens in store.generations().values():
                for g in gens:
                    if self._fill(g.manifest.files):
                        store.write_generation(g)
                        changed += 1
        except OSError:
            pass  # a cache: the values are computed again next time
        return changed

    def _fill(self, files: list[FileRecord]) -> bool:
        changed = False
        for f in files:
            for alg, value in self.found.get((f.xxh3_128, f.size), {}).items():
                if f.hashes.get(alg) != value:
                    f.hashes[alg] = value
                    changed = True
        return changed
