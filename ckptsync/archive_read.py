"""Reading a .tar.zst backup archive: its read-back check, its extraction, and its members as a
stream (what stores/archive.py reads an archive's entries through)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import zstandard

from ckptsync.agent import safe_member
from ckptsync.errors import IntegrityError, NotFound, UsageError
from ckptsync.progress import QUIET, Reporter
from ckptsync.disk import io_error, new_hasher
from ckptsync.stores.directory import DirectoryStore as Store

CHUNK = 1 << 20
TAR_END = 1024          # two zero blocks close every tar stream


@dataclass
class Content:
    """What reading an archive back found: paths relative to its top directory."""

    prefix: str = ""
    files: dict[str, tuple[int, str]] = field(default_factory=dict)   # path -> (size, xxh3-128)
    linked: int = 0
    bytes: int = 0                     # of regular members (hard links add none)


class _Counting:
    """The decompressed stream, remembering where its last non-zero byte was (to see the tar end)."""

    def __init__(self, f) -> None:
        self.f = f
        self.total = 0
        self.last_data = 0

    def read(self, n: int = -1) -> bytes:
        block = self.f.read(n)
        data = len(block.rstrip(b"\0"))
        if data:
            self.last_data = self.total + data
        self.total += len(block)
        return block


class _Progress:
    def __init__(self, f, rep: Reporter) -> None:
        self.f, self.rep = f, rep

    def read(self, n: int = -1) -> bytes:
        block = self.f.read(n)
        self.rep.advance(len(block))
        return block


def read_back(path: Path, rep: Reporter = QUIET, extract_to: Path | None = None, on_block=None) -> Content:
    """Decompress and walk the whole archive, hashing every file; with extract_to, also write it there.

    `on_block(n)`: called with the size of each block of file content hashed.
    Raises IntegrityError for anything that is not a complete, intact ckptsync archive.
    """
    content = Content()
    rep.start(f"read back {path.name}", path.stat().st_size)
    try:
        with open(path, "rb") as raw:
            dctx = zstandard.ZstdDecompressor()
            with dctx.stream_reader(_Progress(raw, rep), read_across_frames=True, closefd=False) as zr:
                stream = _Counting(zr)
                with tarfile.open(fileobj=stream, mode="r|", bufsize=CHUNK) as tar:
                    writer = _Extractor(extract_to) if extract_to is not None else None
                    for member in tar:
                        _take(tar, member, content, writer, on_block)
                    end = tar.offset
                    while stream.read(CHUNK):
                        pass
                    if writer is not None:
                        writer.finish()
        if stream.total - end < TAR_END or stream.last_data > end:
            raise IntegrityError(f"{path} is truncated: the tar stream has no end")
    except (zstandard.ZstdError, tarfile.TarError, EOFError) as exc:
        raise IntegrityError(f"{path} cannot be read back: {exc}") from None
    except OSError as exc:
        raise io_error(exc, f"reading {path}") from None
    finally:
        rep.finish()
    if not content.prefix:
        raise IntegrityError(f"{path} is an empty archive")
    return content


def _take(tar: tarfile.TarFile, member: tarfile.TarInfo, content: Content, writer: "_Extractor | None",
          on_block=None) -> None:
    rel = _relative(member.name, content)
    if writer is not None and writer.root is None:
        writer.root = writer.dest / content.prefix
    if member.isdir():
        if writer is not None:
            writer.directory(rel, member)
    elif member.islnk():
        target = _relative(member.linkname, content)
        if target not in content.files:
            raise IntegrityError(f"hard link {member.name} points to {member.linkname}, which is not an earlier file")
        content.files[rel] = content.files[target]
        content.linked += 1
        if writer is not None:
            writer.link(rel, target)
    elif member.isreg():
        if rel in content.files:
            raise IntegrityError(f"{member.name} appears twice")
        h = new_hasher()
        src = tar.extractfile(member)
        out = writer.open(rel) if writer is not None else None
        try:
            while True:
                block = src.read(CHUNK)
                if not block:
                    break
                h.update(block)
                if on_block is not None:
                    on_block(len(block))
                if out is not None:
                    out.write(block)
        finally:
            if out is not None:
                out.close()
        content.files[rel] = (member.size, h.hexdigest())
        content.bytes += member.size
        if writer is not None:
            writer.settle(rel, member)
    else:
        raise IntegrityError(f"{member.name}: unexpected member type in a ckptsync archive")


def _relative(name: str, content: Content) -> str:
    name = name.rstrip("/")
    top, _, rest = name.partition("/")
    if not content.prefix:
        content.prefix = top
    if top != content.prefix or not safe_member(name):
        raise IntegrityError(f"unexpected member {name!r}: not under {content.prefix}/")
    return rest


def _mtime_ns(member: tarfile.TarInfo) -> int:
    text = member.pax_headers.get("mtime")
    if text and text.replace(".", "", 1).isdigit():
        sec, _, frac = text.partition(".")
        return int(sec) * 1_000_000_000 + int((frac + "000000000")[:9])
    return int(member.mtime) * 1_000_000_000


class _Extractor:
    """Writes members under dest/<prefix>/; never follows or replaces anything already there."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.dirs: list[tuple[Path, int, int]] = []
        self.root: Path | None = None

    def _path(self, rel: str) -> Path:
        return self.root / rel if rel else self.root

    def directory(self, rel: str, member: tarfile.TarInfo) -> None:
        path = self._path(rel)
        path.mkdir(parents=True, exist_ok=True)
        self.dirs.append((path, member.mode & 0o7777, _mtime_ns(member)))

    def open(self, rel: str):
        path = self._path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "xb")

    def settle(self, rel: str, member: tarfile.TarInfo) -> None:
        path = self._path(rel)
        os.chmod(path, member.mode & 0o7777)
        ns = _mtime_ns(member)
        os.utime(path, ns=(ns, ns))

    def link(self, rel: str, target: str) -> None:
        path = self._path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.link(self._path(target), path)

    def finish(self) -> None:
        # Directory modes and mtimes last, deepest first: writing inside would change them.
        for path, mode, ns in sorted(self.dirs, key=lambda d: len(d[0].parts), reverse=True):
            os.chmod(path, mode)
            os.utime(path, ns=(ns, ns))


@contextlib.contextmanager
def open_archive_as_store(path: str | os.PathLike, rep: Reporter = QUIET) -> Iterator[Store]:
    """Extract an archive into a temporary directory and yield a Store over it, located (in its
    messages) at the archive; removed afterwards. The directory goes next to the archive (same
    disk, usually the big one), else under $TMPDIR."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise NotFound(f"{path}: no such archive")
    tmp = None
    for parent in (path.parent, None):
        try:
            tmp = Path(tempfile.mkdtemp(prefix=".ckptsync-extract-", dir=parent))
            break
        except OSError:
            continue
    if tmp is None:
        raise UsageError(f"no writable place to extract {path} (tried {path.parent} and $TMPDIR)")
    try:
        content = read_back(path, rep, extract_to=tmp)
        with naming(tmp / content.prefix, path):
            yield Store(tmp / content.prefix, shown=str(path))
    finally:
        _remove_extracted(tmp)


def _remove_extracted(tmp: Path) -> None:
    for dirpath, _dirs, _files in os.walk(tmp):
        with contextlib.suppress(OSError):
            os.chmod(dirpath, 0o700)
    shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- members, for stores.archive


def members(path: Path) -> Iterator[tuple[str, tarfile.TarInfo, tarfile.TarFile]]:
    """(path relative to the top directory, member, the open tar) in archive order, read as a
    stream: nothing is extracted. A member's bytes: tar.extractfile(member), before the next.
    IntegrityError (naming the archive) when it cannot be read as far as the caller goes."""
    content = Content()
    try:
        with open(path, "rb") as raw:
            with zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=False) as zr:
                with tarfile.open(fileobj=zr, mode="r|", bufsize=CHUNK) as tar:
                    for member in tar:
                        rel = _relative(member.name, content)
                        link = _relative(member.linkname, content) if member.islnk() else ""
                        member.linkname = link
                        yield rel, member, tar
    except (zstandard.ZstdError, tarfile.TarError, EOFError) as exc:
        raise IntegrityError(f"{path} cannot be read: {exc}", hint="check it with 'ckptsync verify'") from None
    except FileNotFoundError:
        raise NotFound(f"{path}: no such archive") from None
    except OSError as exc:
        raise io_error(exc, f"reading {path}") from None


@contextlib.contextmanager
def naming(inner: Path, outer: Path) -> Iterator[None]:
    """Errors raised inside name `outer` (the archive) where they would name `inner` (its extracted copy)."""
    from ckptsync.errors import CkptsyncError

    try:
        yield
    except CkptsyncError as exc:
        exc.message = exc.message.replace(str(inner), str(outer))
        exc.hint = exc.hint.replace(str(inner), str(outer))
        raise
