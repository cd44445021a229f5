"""One error hierarchy; each class carries its exit code. Only the CLI turns them into exits."""

from __future__ import annotations

OK = 0
UNEXPECTED = 1
USAGE = 2
PARTIAL = 3
CONFIG = 4
IO = 5
NOT_FOUND = 10
LOCKED = 11
CONNECT = 20
INTEGRITY = 30
INTERRUPTED = 130

EXIT_CODES: tuple[tuple[int, str], ...] = (
    (OK, "success"),
    (UNEXPECTED, "unexpected error (a bug: run with --debug and report it)"),
    (USAGE, "usage error: a wrong flag or argument"),
    (PARTIAL, "partial: some items failed or were skipped, the rest succeeded"),
    (CONFIG, "configuration error"),
    (IO, "I/O error: disk full, permission denied, a read or write failure (here or on the server)"),
    (NOT_FOUND, "checkpoint not found"),
    (LOCKED, "another run holds the lock"),
    (CONNECT, "cannot connect, authenticate or start the agent"),
    (INTEGRITY, "integrity check failed"),
    (INTERRUPTED, "interrupted (Ctrl+C or SIGTERM)"),
)


class CkptsyncError(Exception):
    """Base class: a message for the user and an exit code."""

    exit_code = UNEXPECTED

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(CkptsyncError):
    exit_code = USAGE


class PartialFailure(CkptsyncError):
    exit_code = PARTIAL


class ConfigError(CkptsyncError):
    exit_code = CONFIG


class NotFound(CkptsyncError):
    exit_code = NOT_FOUND


class Locked(CkptsyncError):
    exit_code = LOCKED


class ConnectError(CkptsyncError):
    exit_code = CONNECT


class HostKeyError(ConnectError):
    """Unknown or changed host key."""


class IOFailure(CkptsyncError):
    """A file operation failed, here or on the server."""

    exit_code = IO


class AgentError(IOFailure):
    """The agent reported a failure of one operation (an OSError on the server, say)."""

    def __init__(self, message: str, *, kind: str = "", path: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.path = path


class ProtocolError(ConnectError):
    """The other side sent something that is not our protocol, or stopped mid-frame."""


class IntegrityError(CkptsyncError):
    exit_code = INTEGRITY


class DiskFull(IOFailure):
    pass


class Interrupted(CkptsyncError):
    exit_code = INTERRUPTED
