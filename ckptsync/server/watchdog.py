"""The watchdog that ends a link on which nothing moves.

A server can stop answering without closing the connection: its agent stopped, its disk hung,
a connection that stays open and carries nothing. A read would then wait forever. Every read
and write on an agent's link is timed here; when one has waited `limit` seconds and no byte
moved either way, the watchdog breaks the link (`on_stall`, the server's abort), and the
waiting call raises `Stalled`. Work on the server that sends nothing for a while (hashing a
large file, walking a slow filesystem) keeps its link moving with the agent's heartbeat frames,
which it sends only while that work advances.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from ckptsync import liveness

READ, WRITE = "read", "write"


class Watchdog:
    """Calls `on_stall` once when a read or write has waited `limit` seconds with nothing moved.

    `clock` is injectable: `check(now)` is the whole decision, the thread only asks it.
    """

    def __init__(self, limit: float, on_stall: Callable[[], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.on_stall = on_stall
        self.clock = clock
        self.lock = threading.Lock()
        self.waiting = {READ: 0, WRITE: 0}
        self.since = clock()   # the last byte moved, or the start of the current wait
        self.fired = ""         # READ or WRITE: which kind of wait the limit ended
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    @property
    def beat_every(self) -> float:
        """How often the agent should report work that advances: well inside the limit."""
        return min(self.limit / 4, 30.0)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()

    def begin(self, how: str) -> None:
        with self.lock:
            if not any(self.waiting.values()):
                self.since = self.clock()  # time spent here between calls is not the server's
            self.waiting[how] += 1

    def end(self, how: str, moved: bool) -> None:
        with self.lock:
            self.waiting[how] -= 1
            if moved:
                self.since = self.clock()
        if moved:
            liveness.note()

    def check(self, now: float) -> bool:
        """True (once) when a call has waited the limit out; it then records which kind it was."""
        with self.lock:
            if self.fired or not any(self.waiting.values()) or now - self.since < self.limit:
                return False
            self.fired = READ if self.waiting[READ] else WRITE
            return True

    def _run(self) -> None:
        every = min(self.limit / 4, 5.0)
        while not self.stop.wait(every):
            if self.check(self.clock()):
                self.on_stall()
                return
