"""Where each CPU second of a timed row goes: a system-wide `perf record` around the row, its
samples counted by side (client, its ssh, the server's sshd, the agent) and by what ran (the
Python interpreter, xxhash, zstd, zlib, libcrypto (ssh's cipher and MAC), libc, the kernel).

Both ends share this machine's cores, so one profile sees them all. Processes are told apart by
their command line, read every 50 ms while the row runs (an agent or a client lives for the whole
transfer, so it is always seen).
"""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import threading

FREQ = 997  # samples per second per CPU; prime, so it does not beat with a periodic task


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def side(comm: str, cmdline: str) -> str:
    """The part a process plays in a row. Pure."""
    if comm == "ssh":
        return "client ssh"
    if comm.startswith("sshd"):
        return "server sshd"
    if "ckptsync" in cmdline and "-m ckptsync" in cmdline:
        return "client"
    if "CKPTSYNC-AGENT-READY" in cmdline:  # the agent's first stage (transport/base.py STAGE1)
        return "agent"
    if comm in ("rsync", "tar", "zstd", "scp", "sftp-server"):
        return comm
    if comm in ("swapper",):
        return "idle"
    return "other"


def what(dso: str) -> str:
    """The kind of work a sample's shared object does. Pure."""
    d = dso.lower()
    if "kernel" in d or d.startswith("[k"):
        return "kernel"
    if "crypto" in d:
        return "libcrypto"
    if "xxhash" in d:
        return "xxhash"
    if "zstd" in d or "zstandard" in d:
        return "zstd"
    if "libz." in d or "zlib" in d:
        return "zlib"
    if "python" in d:
        return "interpreter"
    if "libc." in d or "libc-" in d or "ld-linux" in d:
        return "libc"
    return "other"


class Profile:
    """`start()` before the row, `stop()` after; `seconds()` then gives CPU seconds by (side, what)."""

    def __init__(self, path: str):
        self.path = path
        self.names: dict[str, str] = {}
        self._stop = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._watch: threading.Thread | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(["perf", "record", "-a", "-F", str(FREQ), "-o", self.path, "-q"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._watch = threading.Thread(target=self._look, daemon=True)
        self._watch.start()

    def _look(self) -> None:
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    line = _cmdline(pid)  # read again: a shell becomes the agent by exec
                    if line:
                        self.names[pid] = line
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        if self._watch:
            self._watch.join()
        if self._proc:
            self._proc.send_signal(signal.SIGINT)
            self._proc.wait()

    def seconds(self) -> dict[str, dict[str, float]]:
        out = subprocess.run(["perf", "script", "-i", self.path, "-F", "comm,pid,ip,dso"],
                             capture_output=True, text=True, check=False).stdout
        count: collections.Counter = collections.Counter()
        for line in out.splitlines():
            parts = line.split()  # COMM... PID IP (DSO); a thread's name may hold spaces
            if len(parts) < 4:
                continue
            comm, pid, dso = " ".join(parts[:-3]), parts[-3], parts[-1].strip("()")
            count[(side(comm, self.names.get(pid, "")), what(dso))] += 1
        table: dict[str, dict[str, float]] = {}
        for (s, w), n in count.items():
            if s != "idle":
                table.setdefault(s, {})[w] = round(n / FREQ, 3)
        try:
            os.unlink(self.path)
        except OSError:
            pass
        return table


def per_gb(table: dict[str, dict[str, float]], nbytes: int) -> dict[str, dict[str, float]]:
    """CPU seconds per GB (1e9 bytes) moved. Pure."""
    scale = 1e9 / nbytes if nbytes else 0.0
    return {s: {w: round(v * scale, 3) for w, v in row.items()} for s, row in table.items()}


KINDS = ["interpreter", "xxhash", "zstd", "zlib", "libcrypto", "libc", "kernel", "other"]


def rows(results: list[dict]) -> list[str]:
    """A markdown table: median CPU seconds per GB for each (speed, op, command, server, side). Pure."""
    import statistics

    groups: dict[tuple, list[dict]] = {}
    for r in results:
        if r.get("cpu_s") and r.get("ok") and r.get("bytes"):
            key = (r["speed"], r["op"], r["label"], r.get("server") or "")
            groups.setdefault(key, []).append(r)
    lines = ["| link | op | command | server | side | " + " | ".join(KINDS) + " | total |",
             "|" + "---|" * (6 + len(KINDS))]
    for (speed, op, label, server), recs in groups.items():
        sides = sorted({s for r in recs for s in r["cpu_s"]})
        for s in sides:
            vals = [per_gb({s: r["cpu_s"].get(s, {})}, r["bytes"])[s] for r in recs]
            cells = [statistics.median(v.get(k, 0.0) for v in vals) for k in KINDS]
            total = statistics.median(sum(v.values()) for v in vals)
            if total < 0.05:
                continue
            lines.append(f"| {speed} | {op} | {label} | {server} | {s} | "
                         + " | ".join(f"{c:.2f}" if c else "" for c in cells) + f" | {total:.2f} |")
    return lines


if __name__ == "__main__":
    import json
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python3 bench/cpu.py bench/results/RESULTS.json  (a run made with --profile)")
    print("\n".join(rows(json.load(open(sys.argv[1]))["results"])))
