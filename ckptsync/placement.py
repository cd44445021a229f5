"""Files whose bytes the backup directory already holds: placed instead of fetched, shared after.

Before a transfer, files the server hashes (each while it still has its listing's stamp) to
content the store holds are placed in staging: a reflink, a hard link when mode and mtime match
(any with dedup: link), else a local copy. Files of one transfer with the same bytes are fetched
once and the others placed from it when it arrives (`twin`). After a transfer, fetched files
identical to stored ones share their bytes (`dedup`). Every placed file counts in the result.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

from ckptsync.commit import record
from ckptsync.dedup import COPY, LINK, REFLINK, pick_source, place_copy, share_copy
from ckptsync.digests import XXH3, LocalDigests
from ckptsync.policy import human
from ckptsync.progress import Reporter
from ckptsync.server import FileStat, Server
from ckptsync.disk import io_error, new_hasher
from ckptsync.stores.directory import DirectoryStore
from ckptsync.stores.manifest import FileRecord, Manifest, Verified

Index = dict[tuple[str, int, int], list[tuple[Path, FileRecord]]]   # (hash, size, mode) -> stored files
SAMPLE = 1 << 20   # bytes of a large candidate compared first (Placement._hashes)

if TYPE_CHECKING:
    from ckptsync.backup_plan import BackupResult


class Placement:
    def __init__(self, store: DirectoryStore, policy: str, result: "BackupResult", digests: LocalDigests,
                 rep: Reporter) -> None:
        self.store = store
        self.policy = policy      # dedup: reflink (the default) or link
        self.result = result
        self.digests = digests    # the stored files' hashes in the server's algorithm
        self.rep = rep
        self._index: Index | None = None
        self._heads: dict[tuple[Path, str], str | None] = {}   # (stored path, alg) -> hash of its first SAMPLE bytes

    def known(self, server: Server, root: str, todo: dict[str, list[str]], listed: Mapping[str, Mapping[str, FileStat]],
              progress: dict[str, dict[str, Verified]],
              source: Callable[[str], str] = str) -> dict[tuple[str, str], tuple[str, str]]:
        """Place files whose content the store already holds (reflink, hard link or local copy)
        instead of transferring them; each placed file joins its entry's `progress`. Returns the
        twins: (entry, file) -> the earlier (entry, file) of this batch with the same content,
        fetched once and placed by `twin`."""
        if not any(todo.values()):
            return {}
        sources = self.sources()
        stored = {(k[1], k[2]) for k in sources}
        keys = [(listed[name][p].size, listed[name][p].mode) for name, paths in todo.items() for p in paths]
        repeated = {k for k, n in Counter(keys).items() if n > 1} if len(todo) > 1 else set()
        wanted = stored | repeated
        candidates = [(name, p) for name, paths in todo.items() for p in paths if listed[name][p].size > 0
                      and (listed[name][p].size, listed[name][p].mode) in wanted]
        if not candidates:
            return {}
        alg = server.best_hash
        hashes = self._hashes(server, root, candidates, listed, source, alg, sources)
        by_alg = sources if alg == XXH3 else self.sources_in(alg, {(listed[n][p].size, listed[n][p].mode)
                                                                  for n, p in candidates if source(p) in hashes})
        touched, first, twins = set(), {}, {}
        for name, p in candidates:
            size, mtime_ns, mode = listed[name][p].size, listed[name][p].mtime_ns, listed[name][p].mode
            digest = hashes.get(source(p))
            if not digest:
                continue  # unreadable, changed or gone on the server: the transfer reports it
            found = by_alg.get((digest, size, mode))
            existing = pick_source([q for q, _f in found], mtime_ns, mode) if found else None
            if existing is None:
                if (digest, size, mode) in first:
                    twins[(name, p)] = first[(digest, size, mode)]
                else:
                    first[(digest, size, mode)] = (name, p)
                continue
            dest = self.store.staging(name) / p
            try:
                how = self._place(existing, dest, mtime_ns, mode)
            except OSError:
                continue  # the transfer fetches it instead
            # "placed" tells dedup (also after a resume) not to place it again.
            stored = next(f for q, f in found if q == existing)
            progress[name][p] = record(size, mode, mtime_ns, stored.xxh3_128, listed[name][p], placed=how,
                                       hashes={} if alg == XXH3 else {alg: digest})
            touched.add(name)
            self.count(how, size, fetched=False)
        for name in sorted(touched):
            self.store.save_progress(name, progress[name])
        return twins

    def _hashes(self, server: Server, root: str, candidates: list[tuple[str, str]],
                listed: Mapping[str, Mapping[str, FileStat]], source: Callable[[str], str], alg: str,
                sources: Index) -> dict[str, str]:
        """The server's hashes of the candidates that can share content, by where they are read.

        A file larger than SAMPLE is read whole only when its first SAMPLE bytes are those of a
        stored file or of another candidate of its size and mode: training writes its tensors anew
        at each save, so a file that merely has a stored file's size (every optimizer state of a
        run does) is then not read twice, once here and once for the transfer."""
        stamps = {source(p): listed[name][p] for name, p in candidates}
        heads = server.hash(root, list(stamps), alg, listed=stamps, limit=SAMPLE)
        out = {path: digest for path, digest in heads.values.items() if stamps[path].size <= SAMPLE}
        big = [(path, st) for path, st in stamps.items() if st.size > SAMPLE and heads.get(path)]
        if not big:
            return out
        seen = Counter((heads.get(path), st.size, st.mode) for path, st in big)
        stored = self._stored_heads(alg, {(st.size, st.mode) for _path, st in big}, sources)
        again = [path for path, st in big if seen[(heads.get(path), st.size, st.mode)] > 1
                 or (heads.get(path), st.size, st.mode) in stored]
        if again:
            out.update(server.hash(root, again, alg, listed={p: stamps[p] for p in again}).values)
        return out

    def _stored_heads(self, alg: str, keys: set[tuple[int, int]], sources: Index) -> set[tuple[str, int, int]]:
        """(hash of the first SAMPLE bytes in `alg`, size, mode) of the stored files of these
        (size, mode), read from their stored copies (once per run)."""
        out = set()
        for (_x, size, mode), found in sources.items():
            if (size, mode) not in keys:
                continue
            for path, _f in found:
                key = (path, alg)
                if key not in self._heads:
                    self._heads[key] = head_hash(path, alg)
                if self._heads[key] is not None:
                    out.add((self._heads[key], size, mode))
                    break
        return out

    def twin(self, listed: Mapping[str, Mapping[str, FileStat]], progress: dict[str, dict[str, Verified]],
             name: str, p: str, origin: str, q: str) -> None:
        """Place file `p` of `name` from the same bytes of this batch (`q` of `origin`), just verified."""
        rec = progress[origin][q]
        st = listed[name][p]
        dest = self.store.staging(name) / p
        try:
            how = self._place(self.store.staging(origin) / q, dest, st.mtime_ns, st.mode)
        except OSError as exc:
            raise io_error(exc, f"placing {p}") from None
        progress[name][p] = record(st.size, st.mode, st.mtime_ns, rec.xxh3_128, st, placed=how, hashes=rec.hashes)
        self.count(how, st.size, fetched=False)

    def _place(self, existing: Path, dest: Path, mtime_ns: int, mode: int) -> str:
        """place_copy, making dest's folder when it is missing (tried first: mostly it is there)."""
        try:
            return place_copy(existing, dest, mtime_ns, mode, self.policy)
        except FileNotFoundError:
            if dest.parent.is_dir():
                raise
        dest.parent.mkdir(parents=True, exist_ok=True)
        return place_copy(existing, dest, mtime_ns, mode, self.policy)

    def sources(self) -> Index:
        """The store's dedup index, read once per run and kept current by `add`."""
        if self._index is None:
            self._index = self.store.content_sources()
        return self._index

    def sources_in(self, alg: str, sizes: set[tuple[int, int]]) -> Index:
        """The dedup index keyed by `alg` (the server's, when it cannot compute xxh3-128), for the
        stored files of these (size, mode): a value not recorded yet is hashed from the stored copy
        once (then recorded in its manifests)."""
        out: Index = {}
        before = self.digests.bytes_read
        for (_x, size, mode), found in self.sources().items():
            if (size, mode) not in sizes:
                continue
            digest = next(filter(None, (self.digests.get(f, alg, q) for q, f in found)), None)
            if digest is not None:
                out[(digest, size, mode)] = found
        read = self.digests.bytes_read - before
        if read:
            self.rep.info(f"read {human(read)} of the backup directory once to compare it in {alg}, the "
                          "server's hash (recorded in the manifests)")
        return out

    def add(self, m: Manifest | None) -> None:
        """A new entry's files join the index; None: the store changed otherwise, read it again."""
        if m is None or self._index is None:
            self._index = None
            return
        for f in m.files:
            self._index.setdefault((f.xxh3_128, f.size, f.mode), []).append((self.store.root / f.path, f))

    def dedup(self, name: str, files: list[FileRecord], fetched: set[str], placed: set[str]) -> None:
        """After a transfer, let files identical to stored ones share their bytes: a reflink,
        or a hard link when the stored inode shows the same mode and mtime (any with dedup: link).
        A copy would gain nothing here: the transferred file already is one."""
        sources = self.sources()
        for f in files:
            paths = [q for q, _r in sources.get((f.xxh3_128, f.size, f.mode), ())]
            if not paths or f.size == 0 or f.path in placed:
                continue
            staged = self.store.staging(name) / f.path
            try:
                st = os.stat(staged)
                if st.st_nlink > 1 and any(_same_inode(q, st) for q in paths):
                    continue
                existing = pick_source(paths, f.mtime_ns, f.mode)
                if existing is None:
                    continue
                how = share_copy(existing, staged, f.mtime_ns, f.mode, self.policy)
            except OSError:
                continue
            if how is not None:
                self.count(how, f.size, fetched=f.path in fetched)

    def count(self, how: str, size: int, fetched: bool) -> None:
        """Count one placed file; `fetched`: its bytes were transferred and counted in disk_bytes."""
        r = self.result
        if how == LINK:
            r.linked_files += 1
            r.linked_bytes += size
        elif how == REFLINK:
            r.reflinked_files += 1
            r.reflinked_bytes += size
        elif how == COPY:
            r.copied_files += 1
            r.copied_bytes += size
            r.disk_bytes += size
        if fetched and how in (LINK, REFLINK):
            r.disk_bytes -= size


def restamp_file(path: Path, mtime_ns: int, mode: int, keep_links: bool = False) -> None:
    """Give a stored file new stamps. A file hard-linked into other entries is first given an
    inode of its own (a reflink or a copy), so theirs keep the stamps their manifests record;
    with dedup: link (`keep_links`) it stays shared and only the manifest changes."""
    if os.lstat(path).st_nlink > 1:
        if not keep_links:
            place_copy(path, path, mtime_ns, mode, REFLINK)
        return
    os.chmod(path, mode)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def _same_inode(a: Path, b: os.stat_result) -> bool:
    try:
        return os.path.samestat(os.stat(a), b)
    except FileNotFoundError:
        return False


def head_hash(path: Path, alg: str) -> str | None:
    """The hash in `alg` of the first SAMPLE bytes of a stored file; None when it cannot be read
    (or this side has no such algorithm): the candidate is then not placed from it."""
    try:
        h = new_hasher(alg)
        with open(path, "rb") as f:
            h.update(f.read(SAMPLE))
    except (OSError, ValueError):
        return None
    return h.hexdigest()
