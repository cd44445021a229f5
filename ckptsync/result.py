"""What every command's result has: an exit code, and as JSON its fields with that code."""

from __future__ import annotations

from dataclasses import asdict

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
