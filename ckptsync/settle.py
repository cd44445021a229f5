"""When a save has finished: settling against the server's clock, and when an unfinished one was abandoned."""

from __future__ import annotations

import statistics
from dataclasses import replace
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from ckptsync.layout import Checkpoint

# An incomplete checkpoint untouched for this many save intervals (and at least ABANDON_MIN_S)
# is a crashed save, not one in progress.
ABANDON_INTERVALS = 3
ABANDON_MIN_S = 1800.0


def save_interval(checkpoints: list[Checkpoint]) -> float | None:
    """The typical time between two saves, for training's cadence and abandon_after. Pure. The median
    gap between complete checkpoints: a pause (an eval, a restart) or an extra save does not move it."""
    times = sorted(c.mtime for c in checkpoints if c.complete)
    gaps = [b - a for a, b in zip(times, times[1:]) if b > a]
    return statistics.median(gaps) if gaps else None


def abandon_after(checkpoints: list[Checkpoint]) -> float:
    """Seconds after which an unfinished save that stopped changing is a crashed one. Pure."""
    return max(ABANDON_INTERVALS * (save_interval(checkpoints) or 0.0), ABANDON_MIN_S)


def mark_abandoned(checkpoints: list[Checkpoint], now: float) -> list[Checkpoint]:
    """Flag incomplete checkpoints whose files stopped changing long ago. Pure."""
    limit = abandon_after(checkpoints)
    out = []
    for c in checkpoints:
        if not c.complete and not c.unreadable and not c.restored and now - c.mtime > limit:
            c = replace(c, abandoned=True)
        out.append(c)
    return out


# A file dated further than this after the server's clock was not stamped by a write happening
# now (a copy that kept another machine's times, a network filesystem with its own clock):
# its age says nothing, so it neither holds a checkpoint back nor counts as being written.
CLOCK_TOLERANCE = 120.0


def written_recently(mtime: float, now: float, seconds: float) -> bool:
    """Modified within `seconds` before `now`, by the clock that stamps the files; never with
    no settle time (a file may be stamped a clock tick past `now`). Pure."""
    return seconds > 0 and -CLOCK_TOLERANCE <= now - mtime < seconds


def dated_ahead(mtimes: Iterable[float], now: float) -> tuple[int, float]:
    """(how many, by how much at most) files are dated past CLOCK_TOLERANCE after `now`. Pure."""
    ahead = [m - now for m in mtimes if m - now > CLOCK_TOLERANCE]
    return len(ahead), max(ahead, default=0.0)
