"""One error hierarchy; each class carries its exit code and its `kind`. Only the CLI turns them into exits."""

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
    (NOT_FOUND, "not found: a checkpoint, a backup, or the remote directory on the server"),
    (LOCKED, "another run holds the lock"),
    (CONNECT, "cannot connect, authenticate or start the agent"),
    (INTEGRITY, "integrity check failed"),
    (INTERRUPTED, "interrupted (Ctrl+C or SIGTERM)"),
)


class CkptsyncError(Exception):
    """Base class: a message for the user, an exit code and a `kind` (a stable word for scripts).

    A subclass names its own in its header, `class X(CkptsyncError, exit_code=..., kind=...)`;
    what it does not name it inherits.
    """

    exit_code = UNEXPECTED
    kind = "unexpected"

    def __init_subclass__(cls, *, exit_code: int | None = None, kind: str | None = None, **rest) -> None:
        super().__init_subclass__(**rest)
        if exit_code is not None:
            cls.exit_code = exit_code
        if kind is not None:
            cls.kind = kind

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(CkptsyncError, exit_code=USAGE, kind="usage"):
    """A wrong flag or argument, or a request that cannot be done as given."""


class ConfigError(CkptsyncError, exit_code=CONFIG, kind="config"):
    """The configuration file or a target in it is wrong."""


class NotFound(CkptsyncError, exit_code=NOT_FOUND, kind="not_found"):
    """A checkpoint, a backup or the remote directory is not there."""


class Locked(CkptsyncError, exit_code=LOCKED, kind="locked"):
    """Another run holds the lock."""

    def __init__(self, message: str, *, hint: str = "", stuck: bool = False) -> None:
        super().__init__(message, hint=hint)
        self.stuck = stuck  # the holder lives but has made no progress for longer than the stall limit


class ConnectError(CkptsyncError, exit_code=CONNECT, kind="connect"):
    """Cannot connect, log in or start the agent."""


class HostKeyError(ConnectError, kind="host_key"):
    """Unknown or changed host key."""


class LoginRefused(ConnectError, kind="login_refused"):
    """The server refused the login (no key it accepts): trying again will not change that."""


class ProtocolError(ConnectError, kind="protocol"):
    """The other side sent something that is not our protocol, or stopped mid-frame."""


class Stalled(ConnectError, kind="stalled"):
    """The link to the server moved nothing for longer than the stall limit, and was ended."""


class IOFailure(CkptsyncError, exit_code=IO, kind="io"):
    """A file operation failed, here or on the server."""


class DiskFull(IOFailure, kind="disk_full"):
    """Not enough space, here or on the server."""


class AgentError(IOFailure, kind="io"):
    """The agent reported a failure of one operation (an OSError on the server, say).

    `agent_kind` is the agent's own word for it (is_dir, exists, os, ...); `kind` stays the
    class's word, so that scripts see one value per class.
    """

    def __init__(self, message: str, *, kind: str = "", path: str = "") -> None:
        super().__init__(message)
        self.agent_kind = kind
        self.path = path


class IntegrityError(CkptsyncError, exit_code=INTEGRITY, kind="integrity"):
    """A checksum or a manifest check failed."""


class Interrupted(CkptsyncError, exit_code=INTERRUPTED, kind="interrupted"):
    """Ctrl+C or SIGTERM ended the run."""
