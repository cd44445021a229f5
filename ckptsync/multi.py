"""One command over several targets (`-i 0 -i 1`, `--all-instances`): each on its own thread.

Every target has its own backup directory (<local_dir>/instance-N), so its own lock and
status; one target's failure is its own outcome and never stops the others. The exit
code of the whole is the worst of them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

from ckptsync.config import Target
from ckptsync.errors import UNEXPECTED, CkptsyncError, Interrupted
from ckptsync.progress import QUIET, Reporter
from ckptsync.result import Result


@dataclass
class Outcome(Result):
    target: str
    dest: str
    exit_code: int = 0
    result: Any = None        # the command's own result, when it ran to the end
    error: str = ""
    hint: str = ""
    kind: str = ""

    def to_dict(self) -> dict:
        out: dict = {"target": self.target, "dest": self.dest, "exit_code": self.exit_code,
                     "result": self.result.to_dict() if self.result is not None else None}
        if self.error:
            out["error"] = {"message": self.error, "hint": self.hint, "kind": self.kind, "exit_code": self.exit_code}
        return out


@dataclass
class ManyResult(Result):
    command: str
    outcomes: list[Outcome]

    @property
    def exit_code(self) -> int:
        """The worst of them: exit codes grow with how bad things are (0, 2, 3, ... 30, 130)."""
        return max((o.exit_code for o in self.outcomes), default=0)

    def to_dict(self) -> dict:
        return {"command": self.command, "targets": [o.to_dict() for o in self.outcomes], "exit_code": self.exit_code}


class Labelled(Reporter):
    """Info lines of one target, prefixed with its label; no progress bars (several would interleave)."""

    def __init__(self, rep: Reporter, label: str, lock: threading.Lock) -> None:
        self.rep, self.label, self.lock = rep, label, lock

    def info(self, message: str) -> None:
        with self.lock:
            self.rep.info(f"{self.label}: {message}")


def run_many(command: str, targets: list[Target], run_one: Callable[[Target, Reporter], Any],
             rep: Reporter = QUIET, parallel: bool = True) -> ManyResult:
    """run_one(target, reporter) for every target, in parallel threads unless `parallel` is False."""
    outcomes = [Outcome(t.label, str(t.local_dir)) for t in targets]
    lock = threading.Lock()

    def work(i: int, t: Target) -> None:
        o = outcomes[i]
        try:
            o.result = run_one(t, Labelled(rep, t.label, lock))
            o.exit_code = getattr(o.result, "exit_code", 0)
        except CkptsyncError as exc:
            o.exit_code, o.error, o.hint, o.kind = exc.exit_code, exc.message, exc.hint, exc.kind
        except Exception as exc:  # a bug in one target's run must not hide the others' results
            o.exit_code, o.error, o.kind = UNEXPECTED, f"{type(exc).__name__}: {exc}", "unexpected"

    if not parallel:
        for i, t in enumerate(targets):
            work(i, t)
        return ManyResult(command, outcomes)
    # Daemon threads: on Ctrl+C the process ends with them; what each verified stays in its staging.
    threads = [threading.Thread(target=work, args=(i, t), daemon=True, name=f"ckptsync-{t.label}")
               for i, t in enumerate(targets)]
    for th in threads:
        th.start()
    try:
        for th in threads:
            th.join()
    except KeyboardInterrupt:
        running = [t.label for t, th in zip(targets, threads) if th.is_alive()]
        raise Interrupted(f"interrupted while {', '.join(running) or 'the targets'} still ran: each keeps what it "
                          "had verified, and the next run fetches only the rest") from None
    return ManyResult(command, outcomes)
