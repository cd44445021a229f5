"""`ckptsync archive`: pack a finished run's backup directory into one .tar.zst, read it back, and
only then (with --remove) remove the originals. Reading an archive is archive_read.py.

The archive holds `<dir-name>/` with every entry, `.ckptsync/manifests/`, the status files and
history.jsonl; modes and nanosecond mtimes are kept (pax headers). Files that share an inode
in the store (identical content, hard-linked by backup) are stored once, as tar hard links,
so the archive is no larger than the store; extracting it gives every path its full content.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import zstandard

from ckptsync import osdeps
from ckptsync.errors import DiskFull, IntegrityError, NotFound, UsageError
from ckptsync.progress import QUIET, Reporter
from ckptsync.policy import STATUS_FILES, fits, human
from ckptsync.result import Result
from ckptsync.disk import free_bytes, fsync_dir, fsync_file, io_error, new_hasher
from ckptsync.stores.directory import META, WAIT_HINT, DirectoryStore as Store
from ckptsync.stores.manifest import Manifest
from ckptsync.archive_read import CHUNK, Content, read_back
from ckptsync.stores import is_archive

LEVEL = 3
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
            content = _read_back_checked(output, manifests, None, rep, reused=True)
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
        content = _read_back_checked(part, manifests, packed, rep, reused=False)
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


def _read_back_checked(path: Path, manifests: dict[str, Manifest], packed: dict[str, tuple[int, str]] | None,
                       rep: Reporter, reused: bool) -> Content:
    """Read the archive back and require it to match; a mismatch also says what became of it."""
    try:
        content = read_back(path, rep)
        _require(path, content, manifests, packed, reused=reused)
    except IntegrityError as exc:
        exc.message += ("; the archive was left as it is" if reused else "; the archive was deleted") \
            + " and nothing was removed"
        raise
    return content


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


