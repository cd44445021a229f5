"""Commits made durable on a thread of their own while the transfer goes on.

Committing a group of finished checkpoints (fsync every file, the manifests, the renames) takes
the disk's time; done where the stream is read, it stops the reading, the server blocks on a
full pipe and the link idles. A `Committer` runs the commits one at a time, in the order they
were given, on one thread fed by a bounded queue: the transfer waits only when that many are
still queued. What follows a commit (the results, the dedup index, status.json) is run back on
the caller's thread by `collect`, so nothing but the store's disk is shared.

After a failed commit the queued ones are not started: they stay staged, every file verified
and recorded, and the next run commits them. The failure is raised by the next `submit`,
`collect` or `finish`, as the commit itself would have raised it.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

DEPTH = 2   # queued commits before the transfer waits for the disk


class Committer:
    def __init__(self, depth: int = DEPTH) -> None:
        self.jobs: queue.Queue = queue.Queue(maxsize=depth)
        self.lock = threading.Lock()
        self.finished: list[tuple[Callable[[Any], None], Any]] = []   # (then, what the commit returned)
        self.failure: BaseException | None = None
        self.thread: threading.Thread | None = None

    def submit(self, commit: Callable[[], Any], then: Callable[[Any], None]) -> None:
        """Queue `commit` (run on the thread); `then(its result)` runs here, at a later collect."""
        self.collect()
        if self.thread is None:
            # Not a daemon: an interpreter that exits waits for a commit under way.
            self.thread = threading.Thread(target=self._work, name="ckptsync-commit")
            self.thread.start()
        self.jobs.put((commit, then))

    def collect(self) -> None:
        """Run the follow-ups of the commits finished so far; raise a commit's failure."""
        with self.lock:
            done, self.finished = self.finished, []
            failure = self.failure
        for then, value in done:
            then(value)
        if failure is not None:
            raise failure

    def finish(self) -> None:
        """Wait until every queued commit has completed (or one failed), then collect."""
        self.wait()
        self.collect()

    def wait(self) -> None:
        """Wait until every queued commit has completed or been dropped after a failure."""
        if self.thread is not None:
            self.jobs.put(None)
            self.thread.join()
            self.thread = None

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            commit, then = job
            with self.lock:
                if self.failure is not None:
                    continue   # left staged for the next run
            try:
                value = commit()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                with self.lock:
                    self.failure = exc
                continue
            with self.lock:
                self.finished.append((then, value))
