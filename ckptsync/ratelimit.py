"""--bwlimit: a rate given as text, and a limiter that holds a byte stream to it."""

from __future__ import annotations

import re
import threading
import time
from typing import Callable

# Decimal like rsync's K/M/G suffixes with a B (and like every size ckptsync prints); the IEC ones are binary.
UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "KI": 1 << 10, "MI": 1 << 20, "GI": 1 << 30}
RATE_HELP = "bytes per second, e.g. 20M or 500K (K, M, G: 1000-based; KiB, MiB, GiB: 1024-based)"
# After an idle spell (a scan, a hash on the server) at most this much time's worth goes out at once.
BURST_SECONDS = 0.05


def parse_rate(text: str | int | float) -> int:
    """'20M' -> 20_000_000 bytes/s. Raises ValueError with the expected form."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?)?B?(?:/s)?\s*", str(text), re.IGNORECASE)
        if not m:
            raise ValueError(f"{text!r} is not a rate: expected {RATE_HELP}")
        value, unit = float(m.group(1)), (m.group(2) or "").upper()
    rate = int(value * UNITS[unit])
    if rate < 1024:
        raise ValueError(f"{text!r} is below the smallest rate of 1024 bytes per second")
    return rate


class RateLimiter:
    """Keeps the bytes counted by `take` to `rate` per second on average, by sleeping.

    Each call books its bytes at the end of the line; when the line runs ahead of
    the clock, the caller sleeps until it is due. The clock and the sleep are injected
    so tests can run it on a fake clock. Shared by both directions of one link.
    """

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, burst: float = BURST_SECONDS) -> None:
        self.rate = rate
        self.clock = clock
        self.sleep = sleep
        self.burst = burst
        self.due = clock()           # when the bytes booked so far have been paid for
        self.lock = threading.Lock()

    def take(self, n: int) -> None:
        if n <= 0:
            return
        with self.lock:
            now = self.clock()
            self.due = max(self.due, now - self.burst) + n / self.rate
            wait = self.due - now
        if wait > 0:
            self.sleep(wait)
