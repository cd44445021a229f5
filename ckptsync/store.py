"""The local backup directory: checkpoints under their own names, bookkeeping under .ckptsync/.

    <dest>/checkpoint-500/...          files exactly as on the server
    <dest>/latest.pt                   a single-file checkpoint
    <dest>/extra-files/...             the configured extra files
    <dest>/.ckptsync/manifests/N.json  one manifest per entry
    <dest>/.ckptsync/staging/N/        files of an unfinished transfer, kept for the next run
    <dest>/.ckptsync/generations/N/ID.json and ID/N
                                       earlier versions of entry N, each with its manifest
    <dest>/<run-dir>/                  a followed run: a store of its own (its own .ckptsync/)
    <dest>/.ckptsync/lock, status.json (and status-scheduled/-manual.json), history.jsonl

A manifest is written before its entry is renamed into place, so every
visible entry has one; a manifest without its entry is ignored. The same
holds for generations: ID.json is written before the entry moves to ID/.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import stat
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ckptsync import liveness
from ckptsync.agent import fsync_dir, hash_file
from ckptsync.errors import CkptsyncError, DiskFull, IOFailure, Locked

META = ".ckptsync"
EXTRA = "extra-files"
FORMAT = 1
GENERATIONS = "generations"
# What versions before generations left beside an entry that changed on the server.
REPLACED = re.compile(r"^(?P<name>.+)\.replaced-(?P<ts>\d{8}-\d{6})$")


@dataclass
class FileRecord:
    path: str          # relative to the backup directory, e.g. "checkpoint-8/optimizer.pt"
    size: int
    mode: int
    mtime_ns: int
    xxh3_128: str
    source: str = ""   # for extra files: the path as configured, relative to remote_dir
    ctime_ns: int = 0  # the server file's ctime and inode when backed up (0: not recorded)
    inode: int = 0


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


@dataclass
class Generation:
    """An earlier version of an entry, kept when a newer one replaced it under the same name."""

    name: str          # the entry's name, e.g. latest.pt
    id: str            # when that version was backed up, e.g. 20261201-101500
    root: Path         # holds the entry under its own name, so manifest paths resolve as in the store
    manifest: Manifest

    @property
    def entry(self) -> Path:
        return self.root / self.name


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
        # A directory with its own .ckptsync/ is a followed run's store, not a stray entry.
        return sorted(p.name for p in self.root.iterdir() if not p.name.startswith(".") and p.name not in known
                      and not (p / META).is_dir())

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

    def commit(self, m: Manifest) -> Generation | None:
        """Move a staged entry into place. An entry it replaces becomes a generation, returned.

        Order: the old entry leaves its name (its manifest copied to the generation first), then
        the new manifest is written, then the new entry is renamed in. A crash at any point leaves
        either no entry under the name (the next run fetches it) or a matching pair.
        """
        staged = self.staging(m.name) / m.name
        final = self.entry(m.name)
        sync_tree(staged)
        kept = None
        if final.exists() or final.is_symlink():
            old = self.load(m.name) or self.manifest_from_bytes(final, m.name, template=m, backed_up_at=0.0)
            kept = self.keep_generation(old, final)
        self.write_manifest(m)
        os.rename(staged, final)
        fsync_dir(self.root)
        self.discard_staging(m.name)
        return kept

    # -------------------------------------------------- generations

    def generation_dir(self, name: str) -> Path:
        return self.meta / GENERATIONS / name

    def generations(self, name: str | None = None) -> dict[str, list[Generation]]:
        """Entry name -> its kept generations, newest first. A generation counts only when both
        its manifest and its entry are there."""
        top = self.meta / GENERATIONS
        names = [name] if name is not None else (sorted(p.name for p in top.iterdir() if p.is_dir())
                                                 if top.is_dir() else [])
        out: dict[str, list[Generation]] = {}
        for n in names:
            found = []
            for path in sorted(self.generation_dir(n).glob("*.json")):
                root = path.with_suffix("")
                if not (root / n).exists():
                    continue
                try:
                    m = Manifest.from_dict(json.loads(path.read_text(encoding="utf-8")))
                except (OSError, ValueError, TypeError, KeyError):
                    continue
                found.append(Generation(n, root.name, root, m))
            if found:
                out[n] = sorted(found, key=lambda g: (g.manifest.backed_up_at, g.id), reverse=True)
        return out

    def keep_generation(self, old: Manifest, entry: Path) -> Generation:
        """Move `entry` (whose manifest is `old`) into the generations of old.name."""
        folder = self.generation_dir(old.name)
        folder.mkdir(parents=True, exist_ok=True)
        base = time.strftime("%Y%m%d-%H%M%S", time.gmtime(old.backed_up_at)) if old.backed_up_at else "unknown"
        gid, n = base, 1
        while (folder / gid).exists() or (folder / f"{gid}.json").exists():
            n += 1
            gid = f"{base}-{n}"
        g = Generation(old.name, gid, folder / gid, old)
        self.write_generation(g)
        (folder / gid).mkdir()
        os.rename(entry, folder / gid / old.name)
        fsync_dir(folder / gid)
        return g

    def write_generation(self, g: Generation) -> None:
        atomic_write(g.root.parent / f"{g.id}.json", g.manifest.to_json())

    def drop_generation(self, g: Generation) -> None:
        """Manifest first, so a half-removed generation is never listed."""
        with contextlib.suppress(FileNotFoundError):
            (g.root.parent / f"{g.id}.json").unlink()
        aside = self.meta / "trash" / f"{g.name}.{g.id}.{time.time_ns()}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.rename(g.root, aside)
        remove_tree(aside)

    def trim_generations(self, name: str, keep: int) -> list[Generation]:
        """Drop all but the `keep` newest generations of `name`; returns the dropped ones."""
        dropped = self.generations(name).get(name, [])[max(keep, 0):]
        for g in dropped:
            self.drop_generation(g)
        return dropped

    def manifest_from_bytes(self, entry: Path, name: str, template: Manifest, backed_up_at: float) -> Manifest:
        """A manifest for an entry that has none, read from its bytes (layout and kind from `template`)."""
        paths = [entry] if not entry.is_dir() else sorted(p for p in entry.rglob("*") if p.is_file()
                                                           and not p.is_symlink())
        files = []
        for p in paths:
            st = p.stat()
            rel = name if p == entry else f"{name}/{p.relative_to(entry).as_posix()}"
            files.append(FileRecord(path=rel, size=st.st_size, mode=stat.S_IMODE(st.st_mode),
                                    mtime_ns=st.st_mtime_ns, xxh3_128=hash_file(p)))
        return Manifest(name=name, layout=template.layout, kind=template.kind, step=None, files=files,
                        content=template.content, source=dict(template.source),
                        backed_up_at=backed_up_at, verified_at=time.time())

    def adopt_replaced(self) -> list[str]:
        """Turn `NAME.replaced-YYYYMMDD-HHMMSS` entries left by earlier versions into generations
        of NAME, each with a manifest built from its bytes. Returns the adopted entry names."""
        if not self.root.is_dir():
            return []
        current = self.manifests()
        adopted = []
        for p in sorted(self.root.iterdir()):
            m = REPLACED.match(p.name)
            if not m or p.name in current or m["name"] not in current:
                continue
            when = time.mktime(time.strptime(m["ts"], "%Y%m%d-%H%M%S"))  # written in local time
            old = self.manifest_from_bytes(p, m["name"], template=current[m["name"]], backed_up_at=when)
            self.keep_generation(old, p)
            adopted.append(p.name)
        if adopted:
            fsync_dir(self.root)
        return adopted

    def clean_trash(self) -> None:
        shutil.rmtree(self.meta / "trash", ignore_errors=True)

    # -------------------------------------------------- dedup index

    def content_sources(self) -> dict[tuple[str, int, int], list[Path]]:
        """(xxh3, size, mode) -> every stored file with that content, in manifest order."""
        sources: dict[tuple[str, int, int], list[Path]] = {}
        for m in self.manifests().values():
            for f in m.files:
                sources.setdefault((f.xxh3_128, f.size, f.mode), []).append(self.root / f.path)
        for gens in self.generations().values():
            for g in gens:
                for f in g.manifest.files:
                    sources.setdefault((f.xxh3_128, f.size, f.mode), []).append(g.root / f.path)
        return sources

    # -------------------------------------------------- status

    def record_status(self, status: dict[str, Any]) -> None:
        self.meta.mkdir(parents=True, exist_ok=True)
        text = json.dumps(status, indent=1, sort_keys=True)
        atomic_write(self.meta / "status.json", text)
        # The last run of each kind too: a manual run must not hide how the last cron run went.
        atomic_write(self.meta / f"status-{'scheduled' if status.get('scheduled') else 'manual'}.json", text)
        with open(self.meta / "history.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(status, sort_keys=True) + "\n")

    def status(self, kind: str = "") -> dict[str, Any] | None:
        """The last recorded run; of one kind ("scheduled" or "manual") when given."""
        try:
            return json.loads((self.meta / (f"status-{kind}.json" if kind else "status.json")).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    # -------------------------------------------------- lock

    @contextlib.contextmanager
    def lock(self, command: str, wait: bool = False, on_wait=None,
             stall_limit: float | None = None) -> Iterator[None]:
        """One run per backup directory. flock is released by the kernel when a holder dies.

        The holder's info (and, as its work advances, its progress time) is in the lock file; with
        `stall_limit`, a refusal says when that holder lives but has not progressed for longer.
        """
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
                info = liveness.read_holder(path)
                idle = liveness.stuck(info, time.time(), stall_limit) if stall_limit else None
                if idle is not None:
                    raise Locked(f"{self.root} is locked: {liveness.stuck_text(info, idle, stall_limit)}",
                                 hint=liveness.stuck_hint(info), stuck=True) from None
                holder = liveness.holder_text(info)
                if not wait:
                    raise Locked(f"{self.root} is in use by {holder}", hint="use --wait to wait for it") from None
                if on_wait is not None:
                    on_wait(holder)
                fcntl.flock(fd, fcntl.LOCK_EX)
            held = True
            now = time.time()
            liveness.RECORDER.hold(fd, {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                                        "since": now, "progress": now})
            yield
        finally:
            if held:  # a refused run must not erase the holder's info
                liveness.RECORDER.drop(fd)
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
            os.close(fd)

    def holder(self) -> dict[str, Any] | None:
        """Who holds the lock, as its file says (a holder killed with SIGKILL leaves its info behind)."""
        return liveness.read_holder(self.meta / "lock")

    def stuck_holder(self, now: float, limit: float) -> str:
        """A warning when a live run holds the lock and has made no progress for longer than `limit`."""
        info = self.holder()
        idle = liveness.stuck(info, now, limit)
        return "" if idle is None else f"{liveness.stuck_text(info, idle, limit)}; {liveness.stuck_hint(info)}"


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


# (source device, destination device) pairs where FICLONE was refused: not tried again, since
# each try creates and removes a file, which costs more than the link or copy that follows.
_NO_CLONE: set[tuple[int, int]] = set()
_CLONE_REFUSED = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS}


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
            devices = (os.fstat(sfd).st_dev, os.stat(tmp.parent).st_dev)
        except OSError:
            return False
        if devices in _NO_CLONE:
            return False
        try:
            dfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            return False
        try:
            fcntl.ioctl(dfd, FICLONE, sfd)
            return True
        except OSError as exc:  # EOPNOTSUPP, EXDEV, EINVAL...: no reflinks here
            if exc.errno in _CLONE_REFUSED:
                _NO_CLONE.add(devices)
        finally:
            os.close(dfd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return False
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
