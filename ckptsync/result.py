"""What every command's result has: an exit code, and as JSON its fields with that code."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ckptsync.errors import OK


class Result:
    """Mixed into a command's result dataclass; a result that can fail overrides exit_code."""

    @property
    def exit_code(self) -> int:
        return OK

    def to_dict(self) -> dict:
        out = asdict(self)  # type: ignore[call-overload]
        out["exit_code"] = self.exit_code
        return out


@dataclass
class Skipped(Result):
    """--skip-if-locked met a lock: the run holding it does the work."""

    target: str
    dest: str
    skipped: str
    exit_code: int = 0


@dataclass
class Discarded(Result):
    """What backup --discard-staged deleted (or, in a dry run, would)."""

    target: str
    dest: str
    discarded_bytes: int
    dry_run: bool
    exit_code: int = 0
