"""The local backup directory: checkpoints under their own names, bookkeeping under .ckptsync/.

    <dest>/checkpoint-500/...          files exactly as on the server
    <dest>/latest.pt                   a single-file checkpoint
    <dest>/extra-files/...             the configured extra files
    <dest>/.ckptsync/manifests/N.json  one manifest per entry
    <dest>/.ckptsync/staging/N/        files of an unfinished transfer, kept for the next run
    <dest>/.ckptsync/lock, status.json, history.jsonl

A manifest is written before its entry is renamed into place, so every
visible entry has one; a manifest without its entry is ignored.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import stat
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ckptsync.agent import fsync_dir
from ckptsync.errors import CkptsyncError, DiskFull, IOFailure, Locked

META = ".ckptsync"
EXTRA = "extra-files"
FORMAT = 1


@dataclass
class FileRecord:
    path: str          # relative to the backup directory, e.g. "checkpoint-8/optimizer.pt"
    size: int
    mode: int
    mtime_ns: int
    xxh3_128: str
    source: str = ""   # for extra files: the path as configured, relative to remote_dir


@dataclass
class Manifest:
    name: str
    layout: str
    kind: str
    step: int | None
    files: list[FileRecord]
    resume_files: list[str] = field(default_factory=list)
    resumable: bool = False
    content: str = "unknown"
    missing: list[str] = field(default_factory=list)
    is_best: bool = False
    state: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    backed_up_at: float = 0.0
    verified_at: float = 0.0
    format: int = FORMAT

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def mtime(self) -> float:
        return max((f.mtime_ns for f in self.files), default=0) / 1e9

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        files = [FileRecord(**f) for f in data.pop("files")]
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(files=files, **known)


def sync_tree(path: Path) -> None:
    """fsync every file and directory of a staged entry: nothing is renamed into place unsynced."""
    paths = [path] if path.is_file() else sorted(path.rglob("*")) + [path]
    for p in paths:
        if p.is_symlink():
            continue
        if p.is_dir():
            fsync_dir(p)
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(path.parent)


def atomic_write(path: Path, data: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def io_error(exc: OSError, what: str) -> CkptsyncError:
    """A laptop-side OSError as one line naming what was being done (and the path, when known)."""
    where = f" ({exc.filename})" if getattr(exc, "filename", None) and str(exc.filename) not in what else ""
    if exc.errno == errno.ENOSPC:
        return DiskFull(f"no space left on the device while {what}{where}")
    if exc.errno == errno.EDQUOT:
        return DiskFull(f"disk quota exceeded while {what}{where}")
    if exc.errno == errno.EROFS:
        return IOFailure(f"{what}: read-only file system{where}", hint="choose a writable --local-dir")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return IOFailure(f"{what}: permission denied{where}", hint="check the directory's owner and mode")
    return IOFailure(f"{what}: {exc.strerror or exc}{where}")


class Store:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.meta = self.root / META

    # -------------------------------------------------- manifests

    def manifest_path(self, name: str) -> Path:
        return self.meta / "manifests" / f"{name}.json"

    def entry(self, name: str) -> Path:
        return self.root / name

    def load(self, name: str) -> Manifest | None:
        """The manifest of a visible entry, or None (missing, unreadable, or entry absent)."""
        path = self.manifest_path(name)
        if not self.entry(name).exists():
            return None
        try:
            return Manifest.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def manifests(self) -> dict[str, Manifest]:
        out: dict[str, Manifest] = {}
        folder = self.meta / "manifests"
        if not folder.is_dir():
            return out
        for path in sorted(folder.glob("*.json")):
            m = self.load(path.stem)
            if m is not None:
                out[m.name] = m
        return out

    def unmanaged(self) -> list[str]:
        """Entries in the backup directory that have no manifest (copied by hand, or left by other tools)."""
        if not self.root.is_dir():
            return []
        known = set(self.manifests())
        return sorted(p.name for p in self.root.iterdir() if not p.name.startswith(".") and p.name not in known)

    def write_manifest(self, m: Manifest) -> None:
        atomic_write(self.manifest_path(m.name), m.to_json())

    def drop_manifest(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.manifest_path(name).unlink()

    # -------------------------------------------------- staging

    def staging(self, name: str) -> Path:
        return self.meta / "staging" / name

    def progress_path(self, name: str) -> Path:
        return self.meta / "staging" / f"{name}.progress.json"

    def load_progress(self, name: str) -> dict[str, dict]:
        try:
            data = json.loads(self.progress_path(name).read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def save_progress(self, name: str, progress: dict[str, dict]) -> None:
        atomic_write(self.progress_path(name), json.dumps(progress))

    def staged_bytes(self) -> int:
        """Bytes that interrupted transfers keep in staging."""
        total = 0
        for dirpath, _dirs, files in os.walk(self.meta / "staging"):
            for f in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, f)).st_size
        return total

    def discard_staging(self, name: str) -> None:
        shutil.rmtree(self.staging(name), ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self.progress_path(name).unlink()

    def commit(self, m: Manifest, replace: bool) -> Path | None:
        """Move a staged entry into place. Returns where a replaced older copy went, if kept."""
        staged = self.staging(m.name) / m.name
        final = self.entry(m.name)
        kept = None
        sync_tree(staged)
        self.write_manifest(m)
        if final.exists() or final.is_symlink():
            aside = self.meta / "trash" / f"{m.name}.{time.time_ns()}"
            aside.parent.mkdir(parents=True, exist_ok=True)
            os.rename(final, aside)
            if replace:
                os.rename(staged, final)
                remove_tree(aside)
            else:
                kept = self.root / f"{m.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
                os.rename(staged, final)
                os.rename(aside, kept)
        else:
            os.rename(staged, final)
        fsync_dir(self.root)
        self.discard_staging(m.name)
        return kept

    def clean_trash(self) -> None:
        shutil.rmtree(self.meta / "trash", ignore_errors=True)

    # -------------------------------------------------- dedup index

    def content_sources(self) -> dict[tuple[str, int, int], list[Path]]:
        """(xxh3, size, mode) -> every stored file with that content, in manifest order."""
        sources: dict[tuple[str, int, int], list[Path]] = {}
        for m in self.manifests().values():
            for f in m.files:
                sources.setdefault((f.xxh3_128, f.size, f.mode), []).append(self.root / f.path)
        return sources

    # -------------------------------------------------- status

    def record_status(self, status: dict[str, Any]) -> None:
        self.meta.mkdir(parents=True, exist_ok=True)
        atomic_write(self.meta / "status.json", json.dumps(status, indent=1, sort_keys=True))
        with open(self.meta / "history.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(status, sort_keys=True) + "\n")

    def status(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.meta / "status.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    # -------------------------------------------------- lock

    @contextlib.contextmanager
    def lock(self, command: str, wait: bool = False, on_wait=None) -> Iterator[None]:
        """One run per backup directory. flock is released by the kernel when a holder dies."""
        path = self.meta / "lock"
        try:
            self.meta.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise io_error(exc, f"taking the lock in {self.root}") from None
        held = False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = read_holder(path)
                if not wait:
                    raise Locked(f"{self.root} is in use by {holder}", hint="use --wait to wait for it") from None
                if on_wait is not None:
                    on_wait(holder)
                fcntl.flock(fd, fcntl.LOCK_EX)
            held = True
            info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "since": time.time()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            yield
        finally:
            if held:  # a refused run must not erase the holder's info
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
            os.close(fd)


def read_holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"'{info['command']}' (pid {info['pid']} on {info['host']}, since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another ckptsync run"


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


# -------------------------------------------------- placing known content

DEDUP_POLICIES = ("reflink", "link")
REFLINK, LINK, COPY = "reflink", "link", "copy"
FICLONE = 0x40049409  # Linux _IOW(0x94, 9, int)


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


def _reflink(src: Path, tmp: Path) -> bool:
    """Clone src's extents into a new file tmp; False where the filesystem cannot."""
    if sys.platform == "darwin":
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        clonefile = getattr(libc, "clonefile", None)
        if clonefile is None:
            return False
        clonefile.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint32)
        return clonefile(os.fsencode(src), os.fsencode(tmp), 0) == 0
    if not sys.platform.startswith("linux"):
        return False
    try:
        sfd = os.open(src, os.O_RDONLY)
    except OSError:
        return False
    try:
        try:
            dfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            return False
        try:
            fcntl.ioctl(dfd, FICLONE, sfd)
            return True
        except OSError:  # EOPNOTSUPP, EXDEV, EINVAL...: no reflinks here
            return False
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


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
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    if policy == LINK:
        os.link(existing, tmp)
        how = LINK
    else:
        try:
            if _reflink(existing, tmp):
                _set_stamp(tmp, mtime_ns, mode)
                os.replace(tmp, dest)
                return REFLINK
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if not _same_stamp(os.stat(existing), mtime_ns, mode):
            return None
        try:
            os.link(existing, tmp)
        except OSError:  # EXDEV, EMLINK: place_copy copies instead
            return None
        how = LINK
    _swap_in(tmp, dest, lambda: None)
    return how


def _swap_in(tmp: Path, dest: Path, prepare) -> None:
    """Run prepare() (which fills tmp), then rename tmp over dest; tmp never outlives a failure."""
    try:
        prepare()
        os.replace(tmp, dest)
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
