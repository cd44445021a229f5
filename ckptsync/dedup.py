"""Placing content the backup directory already holds: a reflink, a hard link or a local copy.

Backup uses these for files whose bytes are stored already (the same xxh3-128, size and mode):
before a transfer when the server can hash in xxh3, else after it. See `share_copy`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path

from ckptsync import osdeps


DEDUP_POLICIES = ("reflink", "link")
REFLINK, LINK, COPY = "reflink", "link", "copy"


def _same_stamp(st: os.stat_result, mtime_ns: int, mode: int) -> bool:
    return st.st_mtime_ns == mtime_ns and stat.S_IMODE(st.st_mode) == mode


def pick_source(paths: list[Path], mtime_ns: int, mode: int) -> Path | None:
    """Of stored files with the wanted content, one already showing this mtime and mode
    (so it can be hard-linked), else the first that is still there."""
    first = None
    for p in paths:
        try:
            st = os.lstat(p)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        if _same_stamp(st, mtime_ns, mode):
            return p
        if first is None:
            first = p
    return first


def _set_stamp(path: Path, mtime_ns: int, mode: int) -> None:
    os.chmod(path, mode)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def _place_tmp(dest: Path) -> Path:
    # A dot name that verify ignores, should a killed run leave it behind.
    return dest.with_name(f".ckptsync-place-{dest.name}")


def share_copy(existing: Path, dest: Path, mtime_ns: int, mode: int, policy: str = REFLINK) -> str | None:
    """Make dest share existing's bytes without writing them: "reflink" or "link", or None.

    A reflink is its own inode, so it gets this file's mode and mtime. A hard link shares
    the inode, so (unless policy is "link") it is made only when that inode already shows
    this mode and mtime. dest is replaced atomically if it exists; failures raise OSError.
    """
    tmp = _place_tmp(dest)
    if policy != LINK:
        _drop(tmp)
        try:
            if osdeps.clone_file(existing, tmp):
                _set_stamp(tmp, mtime_ns, mode)
                os.replace(tmp, dest)
                return REFLINK
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        if not _same_stamp(os.stat(existing), mtime_ns, mode):
            return None
    try:
        os.link(existing, dest)   # nothing at dest yet (the usual case): one call, and atomic
        return LINK
    except FileExistsError:
        pass
    except OSError:   # EXDEV, EMLINK: place_copy copies instead
        if policy == LINK:
            raise
        return None
    _drop(tmp)
    try:
        os.link(existing, tmp)
    except OSError:
        if policy == LINK:
            raise
        return None
    _swap_in(tmp, dest, lambda: None)
    return LINK


def _drop(path: Path) -> None:
    """Remove what a killed run may have left at a temporary name."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _swap_in(tmp: Path, dest: Path, prepare) -> None:
    """Run prepare() (which fills tmp), then rename tmp over dest; tmp never outlives a failure."""
    try:
        prepare()
        os.replace(tmp, dest)
        # rename() does nothing when both names already link one inode (a staged copy placed
        # as a link to the stored file it is placed from again): tmp is then left, dest is right
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def place_copy(existing: Path, dest: Path, mtime_ns: int, mode: int, policy: str = REFLINK) -> str:
    """Put existing's content at dest as this file: "reflink", "link" or "copy" (see share_copy).

    A copy writes the bytes again (no disk saved, but no transfer either) and gets its own mode
    and mtime. dest is replaced atomically if it exists; failures raise OSError.
    """
    how = share_copy(existing, dest, mtime_ns, mode, policy)
    if how is not None:
        return how
    tmp = _place_tmp(dest)

    def fill() -> None:
        shutil.copyfile(existing, tmp)
        _set_stamp(tmp, mtime_ns, mode)
    _swap_in(tmp, dest, fill)
    return COPY
