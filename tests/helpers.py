"""Small helpers shared by the tests (no pytest import)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Callable, Mapping

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tests" / "fixtures"
# Root may mount a tmpfs; Windows has neither root nor os.geteuid.
ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

Digest = dict[str, tuple[int, int, int, str]]

# A stand-in for `crontab` (as $CKPTSYNC_CRONTAB): `-l` prints {table}, `-` replaces it.
FAKE_CRONTAB = """#!/bin/sh
case "$1" in
  -l) [ -f {table} ] || {{ echo "no crontab for $(id -un)" >&2; exit 1; }}; exec cat {table} ;;
  -) exec cat > {table} ;;
esac
exit 2
"""


def set_mtime(path: str | os.PathLike[str], when: float) -> None:
    """Set atime and mtime of one path (symlinks themselves, not their targets, where the
    system can: Windows cannot, and sets the target's)."""
    ns = int(round(when * 1_000_000_000))
    own_times = os.utime in os.supports_follow_symlinks
    os.utime(path, ns=(ns, ns), follow_symlinks=not own_times)


def set_tree_mtime(path: str | os.PathLike[str], when: float) -> None:
    """Set atime/mtime of ``path`` and everything under it to ``when`` (epoch s).

    Directories are done after their contents, deepest first.
    """
    root = Path(path)
    if root.is_dir() and not root.is_symlink():
        for dirpath, dirnames, filenames in os.walk(root, topdown=False):
            for name in filenames + [d for d in dirnames
                                     if os.path.islink(os.path.join(dirpath, d))]:
                set_mtime(os.path.join(dirpath, name), when)
            set_mtime(dirpath, when)
    else:
        set_mtime(root, when)


def file_sha256(path: str | os.PathLike[str], bufsize: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(bufsize)
            if not chunk:
                break
            digest.update(chunk)
    return digest.hexdigest()


def tree_digest(path: str | os.PathLike[str]) -> Digest:
    """``{relpath: (size, mode, mtime_ns, sha256)}`` for every file under ``path``.

    ``relpath`` uses ``/``; ``mode`` is the permission bits only.  Directories
    are not listed; a symlink is listed with the sha256 of ``"symlink:" + target``.
    Two trees are identical (bytes, modes, mtimes) when their digests are equal.
    """
    root = Path(path)
    result: Digest = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        names = sorted(filenames) + sorted(
            d for d in dirnames if os.path.islink(os.path.join(dirpath, d))
        )
        for name in names:
            full = os.path.join(dirpath, name)
            rel = Path(os.path.relpath(full, root)).as_posix()
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(full)
                sha = hashlib.sha256(("symlink:" + target).encode()).hexdigest()
            elif stat.S_ISREG(st.st_mode):
                sha = file_sha256(full)
            else:
                continue
            result[rel] = (st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime_ns, sha)
    return result


def digest_diff(a: Digest, b: Digest) -> list[str]:
    """Readable differences between two tree digests (empty when equal)."""
    lines = []
    for rel in sorted(set(a) | set(b)):
        if rel not in b:
            lines.append(f"only in first: {rel}")
        elif rel not in a:
            lines.append(f"only in second: {rel}")
        elif a[rel] != b[rel]:
            (s1, m1, t1, h1), (s2, m2, t2, h2) = a[rel], b[rel]
            parts = []
            if s1 != s2:
                parts.append(f"size {s1} != {s2}")
            if m1 != m2:
                parts.append(f"mode {m1:o} != {m2:o}")
            if t1 != t2:
                parts.append(f"mtime_ns {t1} != {t2}")
            if h1 != h2:
                parts.append("content differs")
            lines.append(f"{rel}: " + ", ".join(parts))
    return lines


def cli_env(env: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """The current environment plus ``env`` (a value of None removes a variable),
    with the repository root on PYTHONPATH so ``-m ckptsync`` works from any cwd."""
    merged = dict(os.environ)
    # The output's width is what a test sets, not what the terminal (or pytest-xdist) running it has.
    for key in ("COLUMNS", "LINES"):
        merged.pop(key, None)
    for key, value in (env or {}).items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    paths = [p for p in merged.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO_ROOT) not in paths:
        paths.insert(0, str(REPO_ROOT))
    merged["PYTHONPATH"] = os.pathsep.join(paths)
    return merged


def run_cli(*args: str | os.PathLike[str], env: Mapping[str, str | None] | None = None,
            input: str | None = None, timeout: float = 120,
            cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m ckptsync ARGS`` and capture text stdout/stderr."""
    return subprocess.run(
        [sys.executable, "-m", "ckptsync", *map(str, args)],
        env=cli_env(env),
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def name_best(run_dir: Path, best: str, newest: str = "checkpoint-12") -> None:
    """Make `newest`'s trainer_state.json name `best` as best_model_checkpoint, keeping its mtime."""
    state = run_dir / newest / "trainer_state.json"
    data = json.loads(state.read_text())
    data["best_model_checkpoint"] = str(run_dir / best)
    st = state.stat()
    state.write_text(json.dumps(data))
    os.utime(state, ns=(st.st_atime_ns, st.st_mtime_ns))


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A tmpfs mounted at path for the block (root only), unmounted after."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        raise RuntimeError(f"could not mount a tmpfs: {mounted.stderr!r}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


# -------------------------------------------------- faults at a known point, without a clock

HANG = 120  # seconds: only bounds a hang; no result depends on it


def wait_fifo(path: str | os.PathLike[str], timeout: float = HANG) -> str:
    """What a process writes into the FIFO at `path` (made with os.mkfifo) up to its closing it:
    the process has reached the point where it writes there."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO no writer has opened yet is not readable
    try:
        data = b""
        while True:
            ready, _w, _x = select.select([fd], [], [], timeout)
            assert ready, f"nothing came through {path} in {timeout} s"
            chunk = os.read(fd, 4096)
            if not chunk:
                return data.decode()
            data += chunk
    finally:
        os.close(fd)


def release_fifo(path: str | os.PathLike[str]) -> None:
    """Let a process that opens the FIFO at `path` to read it go on (it reads an end of file)."""
    os.close(os.open(path, os.O_WRONLY))


class Gate:
    """A known point a process is held at (see paused_agent.py, paused_cli.py): there it writes a line
    into the FIFO DIR/reached, then waits for the lock on DIR/gate, which the test holds until
    release(). A signal sent meanwhile lands in that wait, or, if it came just before, right after it."""

    def __init__(self, where: Path) -> None:
        import fcntl  # POSIX only, like the processes a gate holds: helpers stays importable anywhere

        self.dir = where
        where.mkdir(parents=True)
        os.mkfifo(where / "reached")
        self.lock = open(where / "gate", "w")
        fcntl.flock(self.lock, fcntl.LOCK_EX)

    def reached(self, timeout: float = HANG) -> str:
        """What the process wrote there: it is held at the point."""
        return wait_fifo(self.dir / "reached", timeout)

    def release(self) -> None:
        if not self.lock.closed:
            self.lock.close()


class Lines:
    """Everything a process writes to one pipe, read on a thread, so that a test can wait for the
    line that says the process got somewhere."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self.ended = False
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.ended = True
            self.changed.notify_all()

    def wait_for(self, needle: str, timeout: float = HANG) -> str:
        """The first line containing `needle`; fails if the pipe closes (the process ended) without one."""
        def seen() -> str | None:
            return next((line for line in self.lines if needle in line), None)
        with self.changed:
            self.changed.wait_for(lambda: seen() is not None or self.ended, timeout)
            line = seen()
        assert line is not None, f"no line with {needle!r}; got:\n{self.text(0)}"
        return line

    def text(self, timeout: float = HANG) -> str:
        """All of it, once the pipe has closed."""
        self.thread.join(timeout)
        with self.changed:
            return "".join(self.lines)


@contextlib.contextmanager
def open_for_writing(path: str | os.PathLike[str]):
    """A process of its own holds `path` open for writing (appending nothing) until the block ends:
    a writer the server can see (this test process is an ancestor of the agent, which skips it)."""
    code = ("import sys; f = open(sys.argv[1], 'ab'); sys.stdout.write('open\\n'); sys.stdout.flush(); "
            "sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"open\n"
        yield proc.pid
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=60)


def until(what: str, ready: Callable[[], bool]) -> None:
    """Wait for a state of another process that the kernel shows only in /proc and that is sure to
    come (a stop, a blocked write, an exec): there is nothing to wait on. HANG only bounds a hang."""
    deadline = time.monotonic() + HANG
    while not ready():
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} after {HANG} s")
        time.sleep(0.001)


def exec_done(pid: int) -> None:
    """Wait until process `pid` has a command line. Popen returns when the exec has closed the
    child's close-on-exec descriptors, before the kernel has set up its new arguments: until
    then /proc/PID/cmdline is empty."""
    def has_command_line() -> bool:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return bool(f.read())
        except FileNotFoundError:
            return True   # it has already exited: nothing more to wait for
    until(f"process {pid} has no command line", has_command_line)


def login_probe(modules: set[str]) -> str:
    """A `python -c` program that runs the CLI on its arguments and prints, at exit, which of
    `modules` were loaded each time ssh started (OpenSSH): "loaded when ssh started: [[...], ...]"."""
    return f"""
import sys
from ckptsync.transport import openssh
seen = []
real = openssh.OpenSshTransport.start
def start(self):
    seen.append(sorted(m for m in sys.modules if m in {sorted(modules)!r}))
    return real(self)
openssh.OpenSshTransport.start = start
from ckptsync.cli.app import main
sys.argv = ["ckptsync", *sys.argv[1:]]
try:
    main()
except SystemExit:
    print("loaded when ssh started:", seen, file=sys.stderr)
    raise
"""
