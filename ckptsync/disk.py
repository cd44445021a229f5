"""Writing on this computer's disk safely, one way each: fsync a file or a directory, replace a
file atomically, remove a tree, refuse a symlink, the xxh3-128 hasher, and an OSError said in
one line.

The fsync helpers are the agent's (it writes on the server the same way); everything on this
side imports them, and xxhash, from here.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
from pathlib import Path

import xxhash

from ckptsync.agent import fsync_dir, fsync_file
from ckptsync.errors import CkptsyncError, DiskFull, IntegrityError, IOFailure

__all__ = ["XXH3", "atomic_write", "atomic_writes", "children", "free_bytes", "fsync_dir", "fsync_file", "io_error",
           "new_hasher", "refuse_link", "remove_tree", "sync_tree", "sync_trees"]

XXH3 = "xxh3_128"


def new_hasher(alg: str = XXH3):
    """A running hash: xxh3-128 (what manifests record), or one of hashlib's (what a server
    without xxhash uses)."""
    return xxhash.xxh3_128() if alg == XXH3 else hashlib.new(alg)


def sync_tree(path: Path) -> None:
    """fsync every file and directory of a staged entry: nothing is renamed into place unsynced."""
    sync_trees([path])
    fsync_dir(path.parent)


def sync_trees(paths: list[Path]) -> None:
    """fsync every file and directory of several staged entries, all written before the first
    fsync; a file hard-linked several times (a shared config, a placed copy) is flushed once."""
    files: list[str] = []
    dirs: list[str] = []
    done: set[tuple[int, int]] = set()
    for path in paths:
        if path.is_file():
            files.append(str(path))
            continue
        for top, subdirs, names in os.walk(path):
            dirs.append(top)
            for name in names:
                full = os.path.join(top, name)
                st = os.lstat(full)
                if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in done:
                    files.append(full)
                    done.add((st.st_dev, st.st_ino))
    fsync_many(files, dirs)


# fsyncs issued together share the filesystem's journal commits and the disk's cache flushes (ext4,
# xfs): 800 small files took 0.10 s on 8 threads against 0.21 s one after another (docs/performance.md).
FSYNC_THREADS = 8


def fsync_many(files: list[str], dirs: list[str] = ()) -> None:
    """fsync_file of each of `files` and fsync_dir of each of `dirs`, FSYNC_THREADS at a time; the
    first failure is raised once all have been tried."""
    work = [(fsync_file, f) for f in files] + [(fsync_dir, d) for d in dirs]
    if len(work) < 4:
        for call, path in work:
            call(path)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(FSYNC_THREADS, len(work)), thread_name_prefix="fsync") as pool:
        for future in [pool.submit(call, path) for call, path in work]:
            future.result()


def atomic_write(path: Path, data: str, durable: bool = True) -> None:
    """Replace `path` with `data` in one rename. `durable` False: no fsync, for bookkeeping that
    is checked when read (a power loss may lose it, never leave a mix of old and new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(data)
    if durable:
        fsync_file(tmp)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def atomic_writes(items: list[tuple[Path, str]]) -> None:
    """atomic_write of several files of one directory, durable, with one fsync of the directory."""
    tmps = []
    for path, data in items:   # all written before the first fsync: one journal commit covers them
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(data)
        tmps.append((tmp, path))
    fsync_many([str(tmp) for tmp, _path in tmps])
    for tmp, path in tmps:
        os.replace(tmp, path)
    for parent in sorted({path.parent for path, _data in items}):
        fsync_dir(parent)


def remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def free_bytes(path: Path) -> int:
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def io_error(exc: OSError, what: str) -> CkptsyncError:
    """A laptop-side OSError as one line naming what was being done (and the path, when known)."""
    where = f" ({exc.filename})" if getattr(exc, "filename", None) and str(exc.filename) not in what else ""
    if exc.errno == errno.ENOSPC:
        return DiskFull(f"no space left on the device while {what}{where}")
    if exc.errno == getattr(errno, "EDQUOT", None):  # not every system has quotas
        return DiskFull(f"disk quota exceeded while {what}{where}")
    if exc.errno == errno.EROFS:
        return IOFailure(f"{what}: read-only file system{where}", hint="choose a writable --local-dir")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return IOFailure(f"{what}: permission denied{where}", hint="check the directory's owner and mode")
    return IOFailure(f"{what}: {exc.strerror or exc}{where}")


def refuse_link(path: Path) -> None:
    if os.path.islink(path):
        try:
            where = f" (to {os.readlink(path)})"
        except OSError:
            where = ""
        raise IntegrityError(
            f"{path} is a symlink{where}: ckptsync keeps its own files inside the backup directory and "
            "never follows them out of it; nothing was changed",
            hint="if it points to ckptsync's own files moved elsewhere, move them back in its place; "
                 "otherwise remove the link; then run again")


def children(folder: Path) -> list[Path]:
    """The entries of a real directory (not a link to one); [] when there is none."""
    try:
        with os.scandir(folder) as it:
            return [Path(e.path) for e in it]
    except (FileNotFoundError, NotADirectoryError):
        return []
