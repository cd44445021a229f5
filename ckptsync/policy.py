"""Rules that several commands apply, each defined once: freshness, order, sizes, space."""

from __future__ import annotations

from typing import Iterable, Mapping, Protocol, TypeVar

from ckptsync.errors import LOCKED, PARTIAL

# Kept free on top of what a transfer needs, on either side: filesystems misbehave when full.
SPACE_MARGIN = 64 << 20


class _Stamped(Protocol):
    size: int
    mtime_ns: int
    mode: int


class _Ordered(Protocol):
    name: str
    step: int | None
    mtime: float


T = TypeVar("T", bound=_Ordered)


def backup_is_current(stored: Iterable[_Stamped] | None, server: Mapping[str, _Stamped]) -> bool:
    """A backup is current when it lists exactly the server's files with the same size, mtime and mode.

    `stored` are the manifest's file records (with `.path`); None means no backup.
    """
    if stored is None:
        return False
    mine = {f.path: (f.size, f.mtime_ns, f.mode) for f in stored}  # type: ignore[attr-defined]
    return mine == {p: (s.size, s.mtime_ns, s.mode) for p, s in server.items()}


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


def human(n: float | None) -> str:
    """Decimal units, as disks and links are sold: 1.5 GB is 1.5e9 bytes."""
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def fits(need: int, free: int) -> bool:
    """Whether a transfer of `need` bytes fits in `free`, leaving SPACE_MARGIN over."""
    return need + SPACE_MARGIN <= free


def last_run_summary(status: dict | None) -> tuple[bool, str]:
    """(ok, one phrase) about the last recorded backup, from .ckptsync/status.json. Pure.

    A run refused by the lock is not recorded at all, so it never hides the last real result;
    an old status file may still hold one, which reads as skipped and does not count as failed.
    """
    if not status:
        return False, "none recorded"
    code = status.get("exit_code")
    error = status.get("error") or "no message"
    if status.get("ok"):
        fetched = status.get("fetched") or []
        if fetched:
            return True, f"ok, fetched {', '.join(fetched)}"
        current = status.get("up_to_date") or []
        return True, "ok, up to date" + (f" ({', '.join(current)})" if current else "")
    if code == LOCKED:
        return True, "skipped, another run held the lock"
    if code == PARTIAL:
        return False, f"PARTIAL (exit {code}): {error}"
    return False, f"FAILED (exit {code}): {error}"
