"""A backup archive (`ckptsync archive`'s .tar.zst) as a read-only store.

The archive holds `<dir>/.ckptsync/manifests/`, the status files and history first, then the
entries (archive.py). Its entries, manifests and status come from that head of the stream,
read once; a stored file is read by streaming up to its member; a check (`check_objects`)
reads the whole archive once, hashing every member. Nothing is extracted for these. Restore
reads an extracted copy (`local_copy`, in a private temporary directory removed afterwards),
whose messages name the archive.

An archive cannot change: it has none of the write abilities (commit, remove_entry, lock,
drop_generation, trim_generations, record_status); a command that needs one refuses in one
line (stores.refuse). It holds no earlier versions (archive.py leaves them out).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

from ckptsync.policy import STATUS_FILES, RunStatus, status_file
from ckptsync.stores import CORRUPT, MISSING, UNEXPECTED
from ckptsync.stores.directory import META
from ckptsync.stores.manifest import DamagedManifest, Manifest, parse_manifest

MANIFESTS = f"{META}/manifests/"


class ArchiveStore:
    """A stores.Store over an archive; read-only."""

    kind = "an archive"
    files_here = True   # its bytes are on this machine: restore sends them from here
    reads_data = True   # check_objects reads every byte

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser()
        self._head: dict[str, bytes] | None = None
        self._read: tuple | None = None   # the archive's identity when the head was read

    @property
    def location(self) -> str:
        return str(self.path)

    def exists(self) -> bool:
        return self.path.is_file()

    def unmanaged(self) -> list[str]:
        return []   # archive.py writes the entries with manifests; anything else it keeps is not listed

    # -------------------------------------------------- the head: manifests and status

    def _bookkeeping(self) -> dict[str, bytes]:
        """The manifests and status files (`.ckptsync/...` path -> bytes), read from the head of
        the archive (again if the file changed)."""
        from ckptsync.archive_read import members

        try:
            st = self.path.stat()
            identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            identity = None
        if self._head is not None and identity == self._read:
            return self._head
        head: dict[str, bytes] = {}
        for rel, member, tar in members(self.path):
            if rel and rel != META and not rel.startswith(META + "/"):
                break   # the entries begin: the bookkeeping is all before them
            if member.isreg() and (rel.startswith(MANIFESTS) or rel[len(META) + 1:] in STATUS_FILES):
                head[rel] = tar.extractfile(member).read()
        self._head, self._read = head, identity
        return head

    def _parsed(self) -> tuple[dict[str, Manifest], dict[str, tuple[str, str]]]:
        good: dict[str, Manifest] = {}
        bad: dict[str, tuple[str, str]] = {}
        for rel, raw in sorted(self._bookkeeping().items()):
            if not (rel.startswith(MANIFESTS) and rel.endswith(".json")):
                continue
            name = rel[len(MANIFESTS):-len(".json")]
            try:
                good[name] = parse_manifest(raw.decode("utf-8"), name)
            except (DamagedManifest, UnicodeDecodeError) as exc:
                bad[name] = (f"{self.path}/{rel}", str(exc))
        return good, bad

    def manifests(self) -> dict[str, Manifest]:
        return self._parsed()[0]

    def damaged(self) -> dict[str, tuple[str, str]]:
        return self._parsed()[1]

    def generations(self, name: str | None = None) -> dict[str, list[Any]]:
        return {}

    def status(self, kind: str = "") -> RunStatus | None:
        return RunStatus.from_json(self._bookkeeping().get(f"{META}/{status_file(kind)}"))

    # -------------------------------------------------- members

    def read_file(self, path: str, limit: int) -> bytes | None:
        """A stored file, read from its member (a hard link: from the member it links to)."""
        from ckptsync.archive_read import members
        from ckptsync.errors import CkptsyncError

        link = ""
        try:
            stream = members(self.path)
            for rel, member, tar in stream:
                if rel != path:
                    continue
                if member.islnk():
                    link = member.linkname
                elif member.isreg():
                    data = None if member.size > limit else tar.extractfile(member).read()
                    stream.close()
                    return data
                break
            stream.close()
        except CkptsyncError as exc:
            raise OSError(errno.EIO, exc.message) from None
        if link:
            return self.read_file(link, limit)
        raise FileNotFoundError(errno.ENOENT, "not in the archive", f"{self.path}/{path}")

    def check_objects(self, names: list[str], read_data: bool,
                      on_block: Callable[[int], None] = lambda n: None) -> Iterator[tuple[str, Manifest, list]]:
        """Each entry of `names` (every entry when empty): (name, manifest, [(path, kind, detail)]).
        The whole archive is read once and every member hashed, whatever `read_data` says: an
        archive has no listing to trust without its bytes. IntegrityError when it is damaged."""
        from ckptsync.archive_read import read_back

        manifests = self.manifests()
        found = read_back(self.path, on_block=on_block).files
        for name in names or sorted(manifests):
            m = manifests[name]
            yield name, m, list(_problems(m, found))

    def local_copy(self, rep=None) -> ContextManager:
        """The archive extracted to a private temporary directory, as a directory store whose
        messages name the archive; removed afterwards (restore reads it)."""
        from ckptsync.archive_read import open_archive_as_store
        from ckptsync.progress import QUIET

        return open_archive_as_store(self.path, rep or QUIET)


def _problems(m: Manifest, found: dict[str, tuple[int, str]]) -> Iterator[tuple[str, str, str]]:
    """What differs between an entry's manifest and the archive's members (path -> size, xxh3-128)."""
    listed = {f.path for f in m.files}
    for f in m.files:
        got = found.get(f.path)
        if got is None:
            yield f.path, MISSING, "needed to resume" if f.path in m.resume_files else ""
        elif got[0] != f.size:
            what = "truncated" if got[0] < f.size else "grown"
            yield f.path, CORRUPT, f"{what}: {got[0]} bytes, the backup had {f.size}"
        elif got[1] != f.xxh3_128:
            yield f.path, CORRUPT, "content differs from the backup's checksum"
    for path in sorted(set(m.resume_files) - listed):
        yield path, MISSING, "needed to resume, not in the manifest"
    for path in sorted(p for p in found if p.startswith(f"{m.name}/") and p not in listed):
        if not any(part.startswith(META) for part in path.split("/")[1:]):
            yield path, UNEXPECTED, "not in the manifest"
