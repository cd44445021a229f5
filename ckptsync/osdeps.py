"""What differs between the systems a laptop runs (Linux, macOS, Windows), in one place.

Every platform-specific call of the client lives here, each with a fallback for a system that
lacks it: the rest of the package never imports fcntl, pwd, msvcrt or ctypes, never calls
os.getuid, and never reads /proc or /run/user. The agent (`ckptsync/agent/`) is not a user of
this module: it is stdlib-only, runs on the server and imports nothing of the package.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
try:
    import msvcrt
except ImportError:  # everything but Windows
    msvcrt = None  # type: ignore[assignment]
try:
    import pwd
except ImportError:  # Windows
    pwd = None  # type: ignore[assignment]

POSIX = os.name == "posix"
PROC_ENV = "CKPTSYNC_PROC"   # a directory laid out like /proc, read in its place (tests)

# -------------------------------------------------- the user


def user_name() -> str:
    """This user's login name ("" when the system cannot tell)."""
    import getpass

    try:
        return getpass.getuser()
    except (ImportError, KeyError, OSError):  # no $USER and no passwd entry (or no pwd at all)
        return ""


def passwd_home() -> str | None:
    """The home directory the user database gives this user, which OpenSSH takes for ~ whatever
    $HOME says; None where there is no such database (Windows) or no entry."""
    if pwd is None or not hasattr(os, "getuid"):
        return None
    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        return None


def state_home() -> Path:
    """Where this user's programs keep state between runs ($XDG_STATE_HOME, else ~/.local/state)."""
    return Path(os.environ.get("XDG_STATE_HOME") or "~/.local/state").expanduser()


def ssh_home() -> str:
    """Where ssh finds ~: the passwd entry's home, else the usual home (%USERPROFILE% on Windows)."""
    return passwd_home() or os.path.expanduser("~")


# -------------------------------------------------- the CPU


def cpu_has_aes(proc: str | None = None) -> bool:
    """Whether this machine's CPU has AES instructions (AES-GCM then runs at several GB/s).
    Linux: /proc/cpuinfo ($CKPTSYNC_PROC, or `proc`, replaces /proc); macOS: the CPU's feature
    list (every Apple arm64 has AES); Windows: x86_64 and arm64 CPUs have had it for a decade.
    False where it cannot be told."""
    import platform

    machine = platform.machine().lower()
    if sys.platform.startswith("linux"):
        from ckptsync.agent.cpu import cpu_aes

        return bool(cpu_aes(os.path.join(proc or os.environ.get(PROC_ENV) or "/proc", "cpuinfo")))
    if sys.platform == "darwin":
        if machine == "arm64":
            return True
        try:
            found = subprocess.run(["sysctl", "-n", "machdep.cpu.features"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return "AES" in found.stdout.decode("ascii", "replace").upper().split()
    if os.name == "nt":
        return machine in ("amd64", "x86_64", "arm64", "aarch64")
    return False


# -------------------------------------------------- private runtime files

# sun_path holds 108 bytes on Linux, 104 on macOS and the BSDs.
SOCKET_PATH_MAX = 108 if sys.platform.startswith("linux") else 104
# Unix sockets for ssh's shared connections: the Windows port of OpenSSH has no ControlMaster.
SHARED_SSH = POSIX


def runtime_dir(name: str) -> str:
    """Where this user's private runtime files (sockets, generated configs) of `name` go:
    under $XDG_RUNTIME_DIR when it exists, else a per-user directory in the temp directory."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, name)
    if hasattr(os, "getuid"):
        return f"/tmp/{name}-{os.getuid()}"
    import tempfile

    # Windows: the temp directory is already the user's own (%LOCALAPPDATA%\Temp).
    return os.path.join(tempfile.gettempdir(), f"{name}-{user_name() or 'user'}")


def is_private_dir(st: os.stat_result) -> bool:
    """A directory only this user can enter. Where modes and owners are not POSIX (Windows
    gives every file the same st_uid), only that it is a directory."""
    if not stat.S_ISDIR(st.st_mode):
        return False
    if not hasattr(os, "getuid"):
        return True
    return st.st_uid == os.getuid() and not st.st_mode & 0o077


def session_bus() -> str | None:
    """The user's D-Bus session bus socket where the system keeps it at a fixed place (Linux
    with systemd); cron gives its jobs no DBUS_SESSION_BUS_ADDRESS."""
    if not hasattr(os, "getuid"):
        return None
    bus = Path(f"/run/user/{os.getuid()}/bus")
    return str(bus) if bus.exists() else None


# -------------------------------------------------- processes

# Popen arguments that keep a child out of the terminal's Ctrl+C: the CLI handles it and then
# ends the child itself.
if POSIX:
    DETACHED: dict = {"start_new_session": True}
else:
    DETACHED = {"creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}


PIPE_SIZE = 1 << 20   # Linux's default limit for an unprivileged pipe (/proc/sys/fs/pipe-max-size)
F_SETPIPE_SZ = 1031   # fcntl.F_SETPIPE_SZ, named there from Python 3.10


def widen_pipe(fd: int, size: int = PIPE_SIZE) -> None:
    """Give a pipe to a child `size` bytes of buffer instead of 64 KiB, where Linux allows it: a
    transfer's frames (1 MiB) then cross in one or two reads instead of sixteen, each a wake-up
    of both ends. Elsewhere, or over the limit, the pipe stays as it is."""
    if fcntl is None or not sys.platform.startswith("linux"):
        return
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, size)
    except OSError:
        pass


def process_running(names: set[str] | frozenset[str], proc: str | None = None) -> bool | None:
    """Whether a process with one of these names runs here; None when this cannot be told.
    /proc where there is one ($CKPTSYNC_PROC, or `proc`, replaces it), else pgrep."""
    root = Path(proc or os.environ.get(PROC_ENV) or "/proc")
    if root.is_dir():
        for comm in root.glob("[0-9]*/comm"):
            try:
                if comm.read_text(errors="replace").strip() in names:
                    return True
            except OSError:
                continue
        return False
    if shutil.which("pgrep") is None:
        return None
    try:
        found = subprocess.run(["pgrep", "-x", "|".join(sorted(names))], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return found.returncode == 0


def pid_running(pid: int) -> bool:
    """Whether process `pid` of this machine still runs (on Windows it is taken to run)."""
    if not POSIX:
        return True  # os.kill would end it on Windows: count it as running
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs, as another user
        return True
    return True


# -------------------------------------------------- file locks

# Windows locks are mandatory: the lock covers one byte far past the holder's text, so others
# can still read who holds it.
_LOCK_BYTE = 1 << 30
_MARKER = ".held"
_RETRY = 0.5


def lock_file(fd: int, path: str | os.PathLike[str], wait: bool) -> bool:
    """Take the exclusive lock of the open file `path` (fd); with `wait`, block until it is
    free, else give False when another holds it. The system releases it when the holder ends:
    flock on POSIX, msvcrt.locking on Windows. Where neither exists, a marker file
    (`<path>.held`, created exclusively) stands in; one left by a process that no longer runs
    on this host is taken over."""
    while True:
        if _try_lock(fd, os.fspath(path)):
            return True
        if not wait:
            return False
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return True
        time.sleep(_RETRY)


def unlock_file(fd: int, path: str | os.PathLike[str]) -> None:
    """Give the lock back (closing fd does too, except for the marker file)."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
    elif msvcrt is not None:
        os.lseek(fd, _LOCK_BYTE, os.SEEK_SET)
        with contextlib.suppress(OSError):
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.fspath(path) + _MARKER)


def _try_lock(fd: int, path: str) -> bool:
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    if msvcrt is not None:
        os.lseek(fd, _LOCK_BYTE, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EDEADLK):
                return False
            raise
        return True
    return _take_marker(path + _MARKER)


def _take_marker(marker: str) -> bool:
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            mfd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            if not _stale(marker, me["host"]):
                return False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(marker)
            continue
        try:
            os.write(mfd, json.dumps(me).encode())
        finally:
            os.close(mfd)
        return True
    return False


def _stale(marker: str, host: str) -> bool:
    try:
        with open(marker, encoding="utf-8") as f:
            held = json.loads(f.read())
        pid = int(held["pid"])
    except FileNotFoundError:
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False  # being written, or not ours to judge: count it as held
    return held.get("host") == host and not pid_running(pid)


# -------------------------------------------------- files and filesystems


def read_only_fs(path: str | os.PathLike[str]) -> bool:
    """Whether the filesystem holding path is mounted read-only (False where that cannot be asked)."""
    if not hasattr(os, "statvfs"):
        return False
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def drop_cached(fd: int) -> None:
    """Ask the kernel to drop fd's cached pages, so the next read comes from the disk (POSIX only)."""
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


# (source device, destination device) pairs where FICLONE was refused: not tried again, since
# each try creates and removes a file, which costs more than the link or copy that follows.
_NO_CLONE: set[tuple[int, int]] = set()
_CLONE_REFUSED = {getattr(errno, n) for n in ("EOPNOTSUPP", "ENOTTY", "EXDEV", "EINVAL", "ENOSYS") if hasattr(errno, n)}
FICLONE = 0x40049409  # Linux _IOW(0x94, 9, int)


def clone_file(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> bool:
    """Make dest (which must not exist) a copy-on-write clone of src: clonefile on macOS, the
    FICLONE ioctl on Linux. False where the system or the filesystem cannot."""
    if sys.platform == "darwin":
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        clonefile = getattr(libc, "clonefile", None)
        if clonefile is None:
            return False
        clonefile.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint32)
        return clonefile(os.fsencode(src), os.fsencode(dest), 0) == 0
    if not sys.platform.startswith("linux") or fcntl is None:
        return False
    try:   # looked up by name first: a refused pair costs two stats, not an open and a close
        devices = (os.stat(src).st_dev, os.stat(os.path.dirname(os.fspath(dest)) or ".").st_dev)
    except OSError:
        return False
    if devices in _NO_CLONE:
        return False
    try:
        sfd = os.open(src, os.O_RDONLY)
    except OSError:
        return False
    try:
        try:
            dfd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
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
            os.unlink(dest)
        return False
    finally:
        os.close(sfd)
