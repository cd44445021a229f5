"""`ckptsync archive`: pack a finished run's backup directory into one .tar.zst, read it back, and
only then (with --remove) remove the originals. Also opens such an archive as a Store for
`verify` and `restore`.

The archive holds `<dir-name>/` with every entry, `.ckptsync/manifests/`, the status files and
history.jsonl; modes and nanosecond mtimes are kept (pax headers). Files that share an inode
in the store (identical content, hard-linked by backup) are stored once, as tar hard links,
so the archive is no larger than the store; extracting it gives every path its full content.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import stat
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import zstandard

from ckptsync import osdeps
from ckptsync.agent import safe_member
from ckptsync.errors import DiskFull, IntegrityError, NotFound, UsageError
from ckptsync.progress import QUIET, Reporter
from ckptsync.policy import STATUS_FILES, fits, human
from ckptsync.result import Result
from ckptsync.disk import free_bytes, fsync_dir, fsync_file, io_error, new_hasher
from ckptsync.stores.directory import META, WAIT_HINT, DirectoryStore as Store
from ckptsync.stores.manifest import Manifest

SUFFIXES = (".tar.zst", ".tzst")
LEVEL = 3
CHUNK = 1 << 20
TAR_END = 1024          # two zero blocks close every tar stream
BOOKKEEPING = (*STATUS_FILES, "history.jsonl")


@dataclass
class ArchiveOptions:
    output: Path | None = None
    remove: bool = False
    wait: bool = False


@dataclass
class ArchiveResult(Result):
    source: str
    archive: str
    reused: bool = False             # the archive existed already; it was read back, not rewritten
    entries: list[str] = field(default_factory=list)
    unmanaged: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0                   # file bytes in the archive, hard links counted once
    linked: int = 0                  # paths stored as hard links to an earlier member
    archive_bytes: int = 0
    verified: bool = False
    removed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0



@dataclass
class Content:
    """What reading an archive back found: paths relative to its top directory."""

    prefix: str = ""
    files: dict[str, tuple[int, str]] = field(default_factory=dict)   # path -> (size, xxh3-128)
    linked: int = 0
    bytes: int = 0                     # of regular members (hard links add none)


def is_archive(path: str | os.PathLike) -> bool:
    return str(path).endswith(SUFFIXES)


def default_output(root: Path) -> Path:
    root = root.resolve()
    return root.parent / f"{root.name}-{time.strftime('%Y%m%d')}.tar.zst"


# ---------------------------------------------------------------- the command


def run_archive(root: Path, opts: ArchiveOptions, rep: Reporter = QUIET) -> ArchiveResult:
    try:
        return _run_archive(root, opts, rep)
    except OSError as exc:  # every local write failure is one line with exit 5
        raise io_error(exc, f"archiving {root}") from None


def _run_archive(root: Path, opts: ArchiveOptions, rep: Reporter = QUIET) -> ArchiveResult:
    started = time.monotonic()
    store = Store(Path(root))
    if not store.root.is_dir() or not store.manifests():
        raise NotFound(f"no backups in {store.root}", hint="nothing to archive")
    output = Path(opts.output).expanduser() if opts.output else default_output(store.root)
    _check_output(store.root, output)
    result = ArchiveResult(source=str(store.root), archive=str(output))
    with store.lock("ckptsync archive", wait=opts.wait, on_wait=lambda h: rep.info(f"waiting for {h}"), hint=WAIT_HINT):
        manifests = store.manifests()
        result.entries = sorted(manifests)
        damaged = {n: why for n, why in store.damaged().items() if "@" not in n}
        result.unmanaged = store.unmanaged() + sorted(damaged)   # archived as found, never removed
        result.warnings.extend(f"{n}: archived as it is but not verified, its manifest {path} is damaged ({why})"
                               for n, (path, why) in damaged.items())
        result.warnings.extend(_leftovers(store))
        if output.exists():
            result.reused = True
            rep.info(f"{output} exists: reading it back against {store.root}")
            try:
                content = read_back(output, rep)
                _require(output, content, manifests, None, reused=True)
            except IntegrityError as exc:
                exc.message += "; the archive was left as it is and nothing was removed"
                raise
        else:
            _check_complete(store, manifests)
            content = _write(store, output, manifests, result, rep)
        result.verified = True
        result.files = len(content.files)
        result.linked = content.linked
        result.bytes = content.bytes
        result.archive_bytes = output.stat().st_size
        if opts.remove:
            for name in result.entries:
                try:
                    store.remove_entry(name)
                except OSError as exc:
                    raise io_error(exc, f"removing {store.entry(name)}") from None
                result.removed.append(name)
            if result.unmanaged:
                result.warnings.append(f"kept (no manifest, archived but not removed): {', '.join(result.unmanaged)}")
    result.seconds = time.monotonic() - started
    return result


def _check_output(root: Path, output: Path) -> None:
    if not is_archive(output):
        raise UsageError(f"--output {output}: the name must end with .tar.zst (verify and restore "
                         "recognise an archive by it)")
    out, root = output.resolve(), root.resolve()
    if out == root or root in out.parents:
        raise UsageError(f"--output {output} is inside the backup directory {root}")


def _leftovers(store: Store) -> list[str]:
    staging = store.meta / "staging"
    out = []
    if staging.is_dir() and any(staging.iterdir()):
        out.append(f"an unfinished transfer in {staging} is not archived")
    gens = sum(len(g) for g in store.generations().values())
    if gens:
        out.append(f"{gens} earlier version(s) in {store.meta / 'generations'} are not archived (they stay there)")
    return out


def _check_complete(store: Store, manifests: dict[str, Manifest]) -> None:
    for m in manifests.values():
        for f in m.files:
            if not (store.root / f.path).is_file():
                raise IntegrityError(f"{f.path} is listed in its manifest but missing from {store.root}; "
                                     "nothing was archived", hint="run 'ckptsync verify' first")


def _write(store: Store, output: Path, manifests: dict[str, Manifest], result: ArchiveResult,
           rep: Reporter) -> Content:
    members = list(_members(store, result))
    need = _unique_bytes(members)
    free = free_bytes(output.parent)
    if not fits(need, free):
        raise DiskFull(f"not enough space for {output}: up to {human(need)} needed, {human(free)} free "
                       "(checkpoints hardly compress); nothing was written")
    part = output.with_name(output.name + ".part")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        packed = _pack(store, part, members, manifests, result, rep)
        try:
            content = read_back(part, rep)
            _require(part, content, manifests, packed, reused=False)
        except IntegrityError as exc:
            exc.message += "; the archive was deleted and nothing was removed"
            raise
        if output.exists():
            raise UsageError(f"{output} appeared while the archive was written; not replaced")
        os.rename(part, output)
        fsync_dir(output.parent)
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise io_error(exc, f"writing {part}") from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return content


def _members(store: Store, result: ArchiveResult) -> Iterator[tuple[str, Path]]:
    """(path relative to the backup directory, path on disk) in archive order: bookkeeping first."""
    root = store.root
    yield "", root
    yield META, store.meta
    yield f"{META}/manifests", store.meta / "manifests"
    for name in result.entries:
        yield f"{META}/manifests/{name}.json", store.manifest_path(name)
    for name in BOOKKEEPING:
        if (store.meta / name).is_file():
            yield f"{META}/{name}", store.meta / name
    for name in sorted(result.entries + result.unmanaged):
        top = root / name
        yield name, top
        if top.is_dir() and not top.is_symlink():
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames.sort()
                base = Path(dirpath)
                for child in sorted(dirnames) + sorted(filenames):
                    yield (base / child).relative_to(root).as_posix(), base / child


def _unique_bytes(members: list[tuple[str, Path]]) -> int:
    seen, total = set(), 0
    for _rel, path in members:
        with contextlib.suppress(OSError):
            st = path.lstat()
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


class _Hashing:
    def __init__(self, f, rep: Reporter) -> None:
        self.f, self.rep, self.h = f, rep, new_hasher()

    def read(self, n: int = -1) -> bytes:
        block = self.f.read(n)
        self.h.update(block)
        self.rep.advance(len(block))
        return block


def _pack(store: Store, part: Path, members: list[tuple[str, Path]], manifests: dict[str, Manifest],
          result: ArchiveResult, rep: Reporter) -> dict[str, tuple[int, str]]:
    """Write the archive; returns path -> (size, xxh3-128) of every file as it was read."""
    prefix = store.root.resolve().name
    expected = {f.path: (f.size, f.xxh3_128) for m in manifests.values() for f in m.files}
    packed: dict[str, tuple[int, str]] = {}
    first_path: dict[tuple[int, int], str] = {}
    rep.start(f"archive {prefix}", _unique_bytes(members))
    try:
        with open(part, "wb") as raw:
            cctx = zstandard.ZstdCompressor(level=LEVEL, threads=-1, write_checksum=True)
            with cctx.stream_writer(raw, closefd=False) as zw, \
                    tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT, bufsize=CHUNK, copybufsize=CHUNK) as tar:
                for rel, path in members:
                    st = path.lstat()
                    info = _tarinfo(f"{prefix}/{rel}" if rel else prefix, st)
                    if stat.S_ISDIR(st.st_mode):
                        info.type = tarfile.DIRTYPE
                        tar.addfile(info)
                    elif not stat.S_ISREG(st.st_mode):
                        result.warnings.append(f"not archived (not a regular file): {rel}")
                    elif st.st_nlink > 1 and (st.st_dev, st.st_ino) in first_path:
                        info.type, info.linkname = tarfile.LNKTYPE, f"{prefix}/{first_path[(st.st_dev, st.st_ino)]}"
                        tar.addfile(info)
                        packed[rel] = packed[first_path[(st.st_dev, st.st_ino)]]
                    else:
                        info.size = st.st_size
                        with open(path, "rb") as f:
                            reader = _Hashing(f, rep)
                            tar.addfile(info, reader)
                        packed[rel] = (st.st_size, reader.h.hexdigest())
                        first_path[(st.st_dev, st.st_ino)] = rel
                    if rel in expected and packed.get(rel) != expected[rel]:
                        raise IntegrityError(f"{store.root / rel} does not match its manifest (changed or "
                                             "damaged on this disk); nothing was archived",
                                             hint="run 'ckptsync verify' on the backup directory")
            raw.flush()
            fsync_file(part)
            # Drop the cached pages so the read-back comes from the disk, not from memory.
            osdeps.drop_cached(raw.fileno())
    finally:
        rep.finish()
    return packed


def _tarinfo(name: str, st: os.stat_result) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname = info.gname = ""
    info.mtime = st.st_mtime_ns // 1_000_000_000
    sec, ns = divmod(st.st_mtime_ns, 1_000_000_000)
    info.pax_headers = {"mtime": f"{sec}.{ns:09d}"}   # GNU tar and our reader keep nanoseconds
    return info


def _require(path: Path, content: Content, manifests: dict[str, Manifest],
             packed: dict[str, tuple[int, str]] | None, reused: bool) -> None:
    """Raise unless the archive read back holds every manifest and every file they list, unchanged."""
    absent = [n for n in sorted(manifests) if f"{META}/manifests/{n}.json" not in content.files]
    if absent and reused:
        raise UsageError(f"{path} exists but does not hold {', '.join(absent)} (made before they were "
                         "backed up?); it was left as it is", hint="give another --output")
    problems = [f"manifest of {n} missing" for n in absent]
    listed = {f.path: (f.size, f.xxh3_128) for m in manifests.values() for f in m.files}
    for rel, want in {**(packed or {}), **listed}.items():
        got = content.files.get(rel)
        if got != want:
            problems.append(f"{rel} {'missing' if got is None else 'differs'}")
    if problems:
        more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
        what = "does not match the backup directory" if reused else "failed the read-back check"
        raise IntegrityError(f"{path} {what}: {'; '.join(problems[:5])}{more}")


# ---------------------------------------------------------------- reading an archive


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


def read_back(path: Path, rep: Reporter = QUIET, extract_to: Path | None = None) -> Content:
    """Decompress and walk the whole archive, hashing every file; with extract_to, also write it there.

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
                        _take(tar, member, content, writer)
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


def _take(tar: tarfile.TarFile, member: tarfile.TarInfo, content: Content, writer: "_Extractor | None") -> None:
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
    """Extract an archive into a temporary directory and yield a Store over it; removed afterwards.

    The directory goes next to the archive (same disk, usually the big one), else under $TMPDIR.
    """
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
            yield Store(tmp / content.prefix)
    finally:
        _remove_extracted(tmp)


def _remove_extracted(tmp: Path) -> None:
    for dirpath, _dirs, _files in os.walk(tmp):
        with contextlib.suppress(OSError):
            os.chmod(dirpath, 0o700)
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def local_source(target, rep: Reporter = QUIET):
    """The target itself, or, when its backup directory is an archive, the target over its extracted copy."""
    if not is_archive(target.local_dir):
        yield target
        return
    with open_archive_as_store(target.local_dir, rep) as store:
        yield dataclasses.replace(target, local_dir=store.root)


# ---------------------------------------------------------------- an archive's bookkeeping, for list, show and compare


@contextlib.contextmanager
def archive_index(path: str | os.PathLike, wanted=None) -> Iterator[Path]:
    """A temp directory laid out like the backup directory an archive holds, with only its
    bookkeeping (manifests, status, history) and the files `wanted(rel)` picks (small state
    files) written; every entry is an empty stand-in. Nothing else is extracted.

    Without `wanted` the reading stops where the checkpoints begin: bookkeeping comes first.
    The archive's integrity is verify's job; a damaged one is reported as far as it reads.
    Errors raised inside name the archive, not the temp directory.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise NotFound(f"{path}: no such archive")
    tmp = Path(tempfile.mkdtemp(prefix=".ckptsync-index-"))
    root = tmp
    try:
        root = _read_index(path, tmp, wanted)
        with naming(root, path):
            yield root
    finally:
        _remove_extracted(tmp)


def _read_index(path: Path, tmp: Path, wanted) -> Path:
    content = Content()
    extractor = _Extractor(tmp)
    try:
        with open(path, "rb") as raw:
            with zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=False) as zr:
                with tarfile.open(fileobj=zr, mode="r|", bufsize=CHUNK) as tar:
                    for member in tar:
                        rel = _relative(member.name, content)
                        if extractor.root is None:
                            extractor.root = tmp / content.prefix
                            extractor.root.mkdir()
                        bookkeeping = rel == META or rel.startswith(META + "/")
                        if not bookkeeping and rel and wanted is None:
                            break
                        if not (member.isreg() or member.islnk()) or not (bookkeeping or wanted(rel)):
                            continue
                        if member.isreg():
                            with extractor.open(rel) as out:
                                shutil.copyfileobj(tar.extractfile(member), out, CHUNK)
                        elif (extractor.root / _relative(member.linkname, content)).is_file():
                            extractor.link(rel, _relative(member.linkname, content))
    except (zstandard.ZstdError, tarfile.TarError, EOFError) as exc:
        raise IntegrityError(f"{path} cannot be read: {exc}", hint="check it with 'ckptsync verify'") from None
    except OSError as exc:
        raise io_error(exc, f"reading {path}") from None
    if extractor.root is None:
        raise IntegrityError(f"{path} is an empty archive")
    store = Store(extractor.root)
    for manifest in (store.meta / "manifests").glob("*.json"):
        entry = store.entry(manifest.stem)
        if not entry.exists():
            with contextlib.suppress(OSError):
                entry.mkdir(parents=True)
    return extractor.root


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


@contextlib.contextmanager
def archive_view(target, wanted=None):
    """The target itself, or, when its backup directory is an archive, the target over that
    archive's index (see archive_index)."""
    if not is_archive(target.local_dir):
        yield target
        return
    with archive_index(target.local_dir, wanted) as root:
        yield dataclasses.replace(target, local_dir=root)


class ArchiveNames:
    """Names the archive where a message or a result would name its temporary extraction."""

    def __init__(self, target, source) -> None:
        self.inner, self.outer = str(source.local_dir), str(target.local_dir)

    def text(self, value: str) -> str:
        return value.replace(self.inner, self.outer) if self.inner != self.outer else value

    def reporter(self, rep: Reporter) -> Reporter:
        return rep if self.inner == self.outer else _RenamingReporter(rep, self.text)

    def result(self, value):
        """The result with every path in it renamed, in place (dataclasses) or as a copy."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Path):
            return Path(self.text(str(value)))
        if isinstance(value, list):
            return [self.result(v) for v in value]
        if isinstance(value, tuple):
            return tuple(self.result(v) for v in value)
        if isinstance(value, dict):
            return {k: self.result(v) for k, v in value.items()}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                object.__setattr__(value, f.name, self.result(getattr(value, f.name)))
        return value


class _RenamingReporter(Reporter):
    def __init__(self, rep: Reporter, text) -> None:
        self.rep, self.text = rep, text

    def info(self, message: str) -> None:
        self.rep.info(self.text(message))

    def start(self, label: str, total: int) -> None:
        self.rep.start(self.text(label), total)

    def advance(self, nbytes: int) -> None:
        self.rep.advance(nbytes)

    def finish(self) -> None:
        self.rep.finish()
