#!/usr/bin/env python3
"""Where a first backup's time goes: each phase's wall time, one line per run.

    python3 bench/phases.py SOURCE [--host ALIAS] [--reps N] [--drop-caches]

SOURCE is a run directory on the server (by default this machine, over the local transport;
with --host, over SSH). Each repetition backs it up into a new temporary directory, with
`--all`, and prints when each phase began and how long it took: the connection (login and
the agent's start), the scan, the placement of content the backup already holds or sends once
(`Placement.known`: the server hashes the candidates), the transfer with its commits, and the
whole run. --drop-caches (root) writes out and drops the page cache before each run, as
bench/run.py does, so the server reads from the disk.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ckptsync import backup, placement  # noqa: E402
from ckptsync.server import agent_server  # noqa: E402

PHASES = [  # (object, attribute, label)
    (agent_server.AgentServer, "open", "connect"),
    (backup, "scan_server", "scan"),   # the name Backup calls
    (placement.Placement, "known", "known"),
    (backup.Backup, "_download", "transfer"),
    (backup.Backup, "run", "run"),
]


def timed(log: list, label: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        began = time.monotonic()
        try:
            return fn(*args, **kwargs)
        finally:
            log.append((label, began, time.monotonic() - began))
    return wrapper


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source")
    p.add_argument("--host")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--drop-caches", action="store_true")
    a = p.parse_args()
    log: list = []
    for obj, name, label in PHASES:
        setattr(obj, name, timed(log, label, getattr(obj, name)))
    from ckptsync.backup import BackupOptions, run_backup
    from ckptsync.config import Config, resolve_target

    for rep in range(a.reps):
        dest = Path(tempfile.mkdtemp(prefix="ckptsync-phases-"))
        try:
            if a.drop_caches:
                drop_caches()
            log.clear()
            start = time.monotonic()
            target = resolve_target(Config(), host=a.host, remote_dir=a.source, local_dir=str(dest))
            res = run_backup(target, BackupOptions(all=True))
            total = time.monotonic() - start
            parts = [f"{label} {began - start:.3f}+{took:.3f}" for label, began, took in sorted(log, key=lambda x: x[1])]
            print(f"rep {rep + 1}: exit {res.exit_code}, {total:.3f} s; " + ", ".join(parts), flush=True)
        finally:
            shutil.rmtree(dest, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
