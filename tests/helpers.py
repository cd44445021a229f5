"""Small helpers shared by the tests (no pytest import)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Mapping

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
