"""Rules that several commands apply, each defined once: freshness, order, sizes, space."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Mapping, Protocol, TypeVar

from ckptsync.errors import LOCKED, PARTIAL, ConfigError

MAX_PARALLEL = 16   # channels of one transfer (--parallel, parallel: in the config)
HOLD_MAX = 3        # complete checkpoints a watch holds on the server against rotation, at most (hold.py)
# Without --parallel or parallel:, a transfer takes as many channels as the link's
# bandwidth-delay product needs: one SSH channel carries at most its window (2 MiB with OpenSSH
# and paramiko) per round trip, about 21 MB/s at 100 ms. The rate is --bwlimit when one is set;
# otherwise ASSUMED_RATE. A rate measured by an earlier run is no guide: it was capped by that
# run's own channels, and would only ever lower the next choice. HEADROOM covers the time a
# channel's window is not in flight (a range or file starting, the agent between reads).
ASSUMED_RATE = 125_000_000   # bytes/s, 1 Gbit/s: what a rented GPU server's link usually has
HEADROOM = 1.5
# Channels share a TCP connection (one congestion window, one kernel buffer of 4 to 6 MiB by
# Linux's defaults, one ssh process for the cipher) up to this many; more open another.
CHANNELS_PER_CONNECTION = 4
# A channel chosen here (not asked for) is opened only for a share of at least this many bytes:
# opening one costs a few round trips, in which a channel already open moves a few windows.
SHARE_MIN = 8 << 20


# The choice made here stays within two connections. Measured at 1 Gbit/s and 100 ms (bench/run.py
# 1gbit-100ms, client and server on the same 2 cores, channels opened together), a backup of
# 906 MB took 11.2-12.1 s over eight channels on two connections, 13.8-14.5 s over four on one and
# 12.6-12.9 s over twelve on three: each connection is another ssh process ciphering on the same
# cores. --parallel N asks for more where the cores allow.
AUTO_MAX = 2 * CHANNELS_PER_CONNECTION
# A restore stays on one connection: on the same bench, eight channels restored 302 MB in 6.71 and
# 7.75 s (two runs) where four took 6.47 and 7.27 s (the server's agents write, hash and fsync),
# and twelve took the client to 157 MB.
AUTO_MAX_UPLOAD = CHANNELS_PER_CONNECTION


def auto_channels(round_trip: float, rate: float | None, window: int) -> int:
    """How many channels a transfer uses when none were asked for: enough windows of `window`
    bytes to keep `rate` (bytes/s; None: ASSUMED_RATE) in flight over `round_trip` seconds,
    1 to AUTO_MAX. Pure."""
    in_flight = HEADROOM * (ASSUMED_RATE if rate is None else rate) * max(round_trip, 0.0)
    return max(1, min(math.ceil(in_flight / window), AUTO_MAX))


def connections(channels: int) -> int:
    """How many TCP connections `channels` are spread over, where the transport can open more. Pure."""
    return max(1, math.ceil(channels / CHANNELS_PER_CONNECTION))


# Checkpoints smaller than BATCH_BYTES travel together, up to BATCH_BYTES per transfer, and
# are committed as they arrive whole (COMMIT_GROUP): a run that kept hundreds of small adapters
# would otherwise pay a transfer's set-up and the server's round trips for each. An interruption
# costs at most one batch's commits (its verified files stay staged for the next run).
BATCH_BYTES = 64 << 20
# A transfer records what it verified (for a resume) once this much is unrecorded, and at its end.
PROGRESS_BYTES = 8 << 20
# The checkpoints of one transfer that arrive whole are committed in groups of this many (and
# what is whole at its end): their files, manifests and renames then share the fsyncs, of which
# each costs a journal commit or a disk cache flush. An interruption leaves fewer than this many
# whole checkpoints staged, every file verified, for the next run to commit without a transfer.
COMMIT_GROUP = 16


def batches(sizes: list[tuple[str, int]], limit: int = BATCH_BYTES) -> list[list[str]]:
    """Consecutive names grouped so that each group's bytes stay within `limit`; a name
    as large as `limit` goes alone. Order is kept. Pure."""
    out: list[list[str]] = []
    total = 0
    for name, size in sizes:
        if out and size < limit and total + size <= limit:
            out[-1].append(name)
            total += size
        else:
            out.append([name])
            total = size
    return out


# A remote_dir without checkpoints that changed this recently (by the server's clock) belongs to
# a run that may not have saved its first checkpoint yet: a warning, not a wrong remote_dir.
FIRST_SAVE_GRACE = 30 * 60

# Kept free on top of what a transfer needs, on either side: filesystems misbehave when full.
SPACE_MARGIN = 64 << 20


class _Stamped(Protocol):
    size: int
    mtime_ns: int
    mode: int
    ctime_ns: int
    inode: int


class _Ordered(Protocol):
    name: str
    step: int | None
    mtime: float


T = TypeVar("T", bound=_Ordered)


CURRENT, CHANGED, CHECK = "current", "changed", "check"


def same_identity(a, b) -> bool:
    """Same inode and ctime, where both are known: a rename or a rewrite changes one of them."""
    if a.inode and b.inode and a.inode != b.inode:
        return False
    return not (a.ctime_ns and b.ctime_ns and a.ctime_ns != b.ctime_ns)


def quick_check(stored: Iterable[_Stamped] | None, server: Mapping[str, _Stamped],
                legacy: str = CURRENT) -> tuple[str, list[str]]:
    """Compare a backup's file records with the server's files without reading bytes. Pure.

    (CURRENT, []): same paths, sizes, mtimes and modes, and the same inode and ctime wherever the
    record has them. (CHANGED, []): no backup, or a path or a size differs. (CHECK, paths): sizes
    match but a stamp does not (a touch, a chmod, a rename over the file, a rewrite that kept size
    and mtime): those files must be hashed to tell. A record made before inodes were recorded
    counts as `legacy` (CURRENT: trust size and mtime; CHECK: hash it once).
    """
    if stored is None:
        return CHANGED, []
    mine = {f.path: f for f in stored}  # type: ignore[attr-defined]
    if set(mine) != set(server) or any(mine[p].size != s.size for p, s in server.items()):
        return CHANGED, []
    check = []
    for p, s in server.items():
        f = mine[p]
        if (f.mtime_ns, f.mode) != (s.mtime_ns, s.mode) or not same_identity(f, s):
            check.append(p)
        elif legacy == CHECK and not getattr(f, "inode", 0) and getattr(s, "inode", 0):
            check.append(p)
    return (CHECK, sorted(check)) if check else (CURRENT, [])


def newest_first(items: Iterable[T]) -> list[T]:
    """Newest first, for every list of checkpoints or backups.

    When every item has a step: by step, then mtime, then name (steps survive copies that rewrite
    mtimes). When any lacks one (latest.pt beside rolling_step_N.pt): by mtime, then name, since a
    step-less item may well be the newest.
    """
    items = list(items)
    if all(i.step is not None for i in items):
        return sorted(items, key=lambda i: (i.step, i.mtime, i.name), reverse=True)
    return sorted(items, key=lambda i: (i.mtime, i.name), reverse=True)


class _Kept(Protocol):
    id: str           # when that version was backed up, e.g. 20261201-101500 (-2 for a second one then)

    @property
    def manifest(self) -> "_Backed": ...


class _Backed(Protocol):
    backed_up_at: float


G = TypeVar("G", bound=_Kept)


def newest_generations(gens: Iterable[G]) -> list[G]:
    """An entry's earlier versions, newest first: by backup time, then id (two in one second). Pure."""
    return sorted(gens, key=lambda g: (g.manifest.backed_up_at, g.id), reverse=True)


def human(n: float | None) -> str:
    """Decimal units, as disks and links are sold: 1.5 GB is 1.5e9 bytes."""
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def span(seconds: float) -> str:
    """A length of time in the unit that reads best: 40 s, 22 min, 3.0 h, 2.5 days."""
    seconds = abs(seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


# Below this, a run's time is mostly connecting and listing: a rate would mislead (1.4 KB/s).
RATE_MIN_BYTES = 1_000_000


def rate(nbytes: int, seconds: float) -> str:
    """`12.3 MB/s`, or "" when too little moved for a rate to mean anything."""
    if nbytes < RATE_MIN_BYTES or seconds <= 0:
        return ""
    return f"{human(nbytes / seconds)}/s"


def fits(need: int, free: int) -> bool:
    """Whether a transfer of `need` bytes fits in `free`, leaving SPACE_MARGIN over."""
    return need + SPACE_MARGIN <= free


# Where a store (a directory's .ckptsync/, a bucket's) records the last backup run, and the last
# run of each kind: a manual run must not hide how the last scheduled one went.
STATUS_KINDS = ("scheduled", "manual")


def status_file(kind: str = "") -> str:
    """status.json, or the last run of one kind: status-scheduled.json, status-manual.json."""
    return f"status-{kind}.json" if kind else "status.json"


STATUS_FILES = (status_file(), *(status_file(k) for k in STATUS_KINDS))


# What a status file's fields hold, as every version wrote them. A record whose known field holds
# anything else is damaged, and reads as no record at all.
def _number(v: Any) -> bool:
    return type(v) in (int, float)


def _names(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(n, str) for n in v)


def _reasons(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(r, str) for r in v.values())


_KINDS = {"time": _number, "seconds": _number, "exit_code": lambda v: type(v) is int, "ok": lambda v: type(v) is bool,
          "scheduled": lambda v: type(v) is bool, "text": lambda v: isinstance(v, str), "count": lambda v: type(v) is int,
          "names": _names, "reasons": _reasons}


def _held(value: Any) -> Any:
    """A field's value as a RunStatus holds it: a list as a tuple, a mapping copied."""
    return tuple(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else value


@dataclass(frozen=True)
class RunStatus:
    """A backup run's record in a store's status.json (and status-scheduled/-manual.json, history.jsonl).

    `time`, `exit_code` and `ok` every version wrote; every other field is None where the record does
    not have it (an older version's, or a bucket's, which counts bytes its own way). `extra` keeps the
    keys this version does not know, written back as they were read."""

    time: float
    exit_code: int
    ok: bool
    command: str | None = field(default=None, metadata={"kind": "text"})      # backup, watch
    error: str | None = field(default=None, metadata={"kind": "text"})
    target: str | None = field(default=None, metadata={"kind": "text"})
    server: str | None = field(default=None, metadata={"kind": "text"})
    store: str | None = field(default=None, metadata={"kind": "text"})        # a bucket's URL
    scheduled: bool | None = field(default=None, metadata={"kind": "scheduled"})
    fetched: tuple[str, ...] | None = field(default=None, metadata={"kind": "names"})
    up_to_date: tuple[str, ...] | None = field(default=None, metadata={"kind": "names"})
    not_backed_up: tuple[str, ...] | None = field(default=None, metadata={"kind": "names"})
    restamped: tuple[str, ...] | None = field(default=None, metadata={"kind": "names"})
    generations: tuple[str, ...] | None = field(default=None, metadata={"kind": "names"})
    deleted_on_server: tuple[str, ...] | None = field(default=None, metadata={"kind": "names"})
    failed: Mapping[str, str] | None = field(default=None, metadata={"kind": "reasons"})    # name -> why
    skipped: Mapping[str, str] | None = field(default=None, metadata={"kind": "reasons"})
    raw_bytes: int | None = field(default=None, metadata={"kind": "count"})
    wire_bytes: int | None = field(default=None, metadata={"kind": "count"})
    sent_bytes: int | None = field(default=None, metadata={"kind": "count"})
    copied_bytes: int | None = field(default=None, metadata={"kind": "count"})
    seconds: float | None = field(default=None, metadata={"kind": "seconds"})
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """Which kind of run this was: "scheduled" or "manual"."""
        return "scheduled" if self.scheduled else "manual"

    def to_dict(self) -> dict[str, Any]:
        """The record as its file holds it: the keys it has, lists as lists, `extra` beside them."""
        out: dict[str, Any] = dict(self.extra)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or value is None:
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else dict(value) if isinstance(value, Mapping) else value
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "RunStatus | None":
        """A record as any version wrote it; None when it is not one (not an object, a known field of
        another type, no time, exit code or ok)."""
        if not isinstance(data, dict) or any(k not in data for k in ("time", "exit_code", "ok")):
            return None
        known: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "extra" or f.name not in data or (data[f.name] is None and f.metadata):
                continue
            value = data[f.name]
            if not _KINDS[f.metadata.get("kind", f.name)](value):
                return None
            known[f.name] = _held(value)
        return cls(**known, extra={k: v for k, v in data.items() if k not in known})

    @classmethod
    def from_json(cls, raw: bytes | str | None) -> "RunStatus | None":
        """The record in a status file's bytes; None when there are none or they are damaged."""
        if raw is None:
            return None
        try:
            return cls.from_dict(json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return None

    def to_json(self, indent: int | None = 1) -> str:
        """status.json's text (indent=1), or history.jsonl's line (None)."""
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)


def run_status(now: float, code: int, error: str, target: str, server: str, fetched: list[str],
               failed: dict[str, str], up_to_date: list[str], scheduled: bool, **more) -> RunStatus:
    """What a backup run records as .ckptsync/status.json, on disk or in a bucket. Pure."""
    values = {"command": "backup", "error": error, "target": target, "server": server, "fetched": fetched,
              "failed": failed, "up_to_date": up_to_date, "scheduled": scheduled, **more}
    return RunStatus(time=now, exit_code=code, ok=code == 0, **{k: _held(v) for k, v in values.items()})


def last_run_summary(status: RunStatus | None) -> tuple[bool, str]:
    """(ok, one phrase) about the last recorded backup, from .ckptsync/status.json. Pure.

    A run refused by the lock is not recorded at all, so it never hides the last real result;
    an old status file may still hold one, which reads as skipped and does not count as failed.
    """
    if not status:
        return False, "none recorded"
    code = status.exit_code
    error = status.error or "no message"
    left = status.not_backed_up or ()
    unsaved = f"; not backed up: {', '.join(left)}" if left else ""
    if status.ok:
        fetched = status.fetched or ()
        if fetched:
            return True, f"ok, fetched {', '.join(fetched)}{unsaved}"
        current = status.up_to_date or ()
        return True, "ok, up to date" + (f" ({', '.join(current)})" if current else "") + unsaved
    if code == LOCKED:
        return True, "skipped, another run held the lock"
    if code == PARTIAL:
        return False, f"PARTIAL (exit {code}): {error}"
    return False, f"FAILED (exit {code}): {error}"


def named(given: str, known: Iterable[tuple[str, int | None]]) -> str:
    """The checkpoint a name typed by a user means, among (name, step) pairs. Pure.

    `checkpoint-3000/` (the slash shell completion adds to a directory) is checkpoint-3000, and a
    bare step (`1500`) is the one checkpoint with that step. Anything else comes back as typed,
    for the caller's "not found" with the names there are."""
    name = given.rstrip("/") or given
    known = list(known)
    if any(n == name for n, _ in known):
        return name
    if name.isdigit():
        hits = {n for n, step in known if step == int(name)}   # a name may be listed twice (server, backup)
        if len(hits) == 1:
            return hits.pop()
    return name


# -------------------------------------------------- the stall limit (server/watchdog.py applies it)

STALL_TIMEOUT = 300.0
STALL_ENV = "CKPTSYNC_STALL_TIMEOUT"
MAX_STALL = 86400.0


def valid_limit(value: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and 0 < value <= MAX_STALL


def stall_limit(configured: float | None = None) -> float:
    """Seconds without progress before a run gives up: $CKPTSYNC_STALL_TIMEOUT, else the config's
    `stall_timeout`, else 300."""
    text = os.environ.get(STALL_ENV, "").strip()
    if text:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not valid_limit(value):
            raise ConfigError(f"{STALL_ENV}={text}: expected a number of seconds (more than 0, at most {MAX_STALL:g})")
        return value
    return STALL_TIMEOUT if configured is None else float(configured)
