"""A lock holder's last progress: recorded in the lock files this process holds, judged by others.

A run holding a backup directory's lock rewrites the lock file's `progress` time as its work
advances (bytes on a server link, a step of its progress), at most every `EVERY` seconds. A
run the lock refuses (cron's `--skip-if-locked`), `cron show` and `checklist` read it: a live
holder with no progress for longer than the stall limit is reported as stuck, instead of being
waited for in silence at every cron run.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any, Callable

from ckptsync import osdeps

EVERY = 5.0  # seconds between two rewrites of a lock file: cheap, and far inside any stall limit


class Recorder:
    """This process's lock files and the progress time written into them; `clock` is injectable."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.lock = threading.Lock()
        self.held: dict[int, dict[str, Any]] = {}   # fd -> the holder info written there
        self.sizes: dict[int, int] = {}
        self.written = 0.0

    def hold(self, fd: int, info: dict[str, Any]) -> None:
        """Write the holder info into a lock file just taken, and keep its progress time current."""
        with self.lock:
            self.held[fd] = info
            os.ftruncate(fd, 0)
            self.sizes[fd] = 0
            self._write(fd)
            self.written = self.clock()

    def drop(self, fd: int) -> None:
        with self.lock:
            self.held.pop(fd, None)
            self.sizes.pop(fd, None)

    def note(self) -> None:
        """Work advanced: record the time in every held lock file, unless that was done lately."""
        now = self.clock()
        if now - self.written < EVERY:
            return
        with self.lock:
            if now - self.written < EVERY:
                return
            self.written = now
            for fd, info in self.held.items():
                info["progress"] = now
                try:
                    self._write(fd)
                except OSError:
                    pass  # the lock still holds; readers see an older time

    def _write(self, fd: int) -> None:
        # One write at offset 0, padded to the longest text so far (JSON allows trailing blanks):
        # a reader never finds the file empty between two versions.
        text = json.dumps(self.held[fd]).encode()
        self.sizes[fd] = size = max(self.sizes.get(fd, 0), len(text))
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, text.ljust(size))


RECORDER = Recorder()


def note() -> None:
    RECORDER.note()


def read_holder(path: os.PathLike | str) -> dict[str, Any] | None:
    """The holder info of a lock file; None when it holds none (released, or never taken)."""
    try:
        with open(path, encoding="utf-8") as f:
            info = json.loads(f.read() or "null")
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def live(info: dict[str, Any], alive: Callable[[int], bool] = osdeps.pid_running) -> bool:
    """Is the holder running? Only a holder on this machine can be looked at; one elsewhere counts as live."""
    if info.get("host") != socket.gethostname():
        return True
    pid = info.get("pid")
    return isinstance(pid, int) and alive(pid)


def idle_for(info: dict[str, Any], now: float) -> float | None:
    """Seconds since the holder last made progress (since it took the lock, when it never said); None
    for a holder that records no progress (an older version)."""
    last = info.get("progress")
    if not isinstance(last, (int, float)) or isinstance(last, bool):
        return None
    return max(0.0, now - last)


def stuck(info: dict[str, Any] | None, now: float, limit: float,
          alive: Callable[[int], bool] = osdeps.pid_running) -> float | None:
    """Seconds without progress of a live holder idle for longer than `limit`; None otherwise."""
    if not info:
        return None
    idle = idle_for(info, now)
    if idle is None or idle <= limit or not live(info, alive):
        return None
    return idle


def ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def stuck_text(info: dict[str, Any], idle: float, limit: float) -> str:
    """One line for a stuck holder."""
    return (f"the run holding the lock ({holder_text(info)}) has made no progress for {ago(idle)}, longer "
            f"than the stall limit ({limit:g} s): it may be stopped or hung")


def stuck_hint(info: dict[str, Any]) -> str:
    pid, host = info.get("pid"), info.get("host")
    return (f"look at process {pid} on {host}: a stopped one continues with kill -CONT {pid}; "
            f"a hung one can be ended (kill {pid}), and the next run takes over")


def who(info: dict[str, Any]) -> str:
    """pid 123 on host, since 2026-12-08 10:00:00"""
    parts = [f"pid {info['pid']} on {info.get('host', '?')}"] if "pid" in info else []
    try:
        parts.append("since " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["since"]))))
    except (KeyError, TypeError, ValueError, OverflowError):
        pass
    return ", ".join(parts) or "no details recorded"


def writer_text(info: dict[str, Any], root: str) -> str:
    """'another restore into ROOT', from the command a server directory's lock holder wrote."""
    command = str(info.get("command") or "ckptsync run")
    return f"another {command.removeprefix('ckptsync ')} into {root}"


def holder_text(info: dict[str, Any] | None) -> str:
    """'ckptsync backup' (pid 123 on host, since 2026-12-08 10:00:00)"""
    if not info:
        return "another ckptsync run"
    try:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["since"])))
        return f"'{info['command']}' (pid {info['pid']} on {info['host']}, since {since})"
    except (KeyError, TypeError, ValueError, OverflowError):
        return "another ckptsync run"
