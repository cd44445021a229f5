"""The agent's error replies, turned into the client's exceptions by their `kind`, in one table."""

from __future__ import annotations

from ckptsync import liveness
from ckptsync.errors import AgentError, CkptsyncError, DiskFull, Locked, NotFound, ProtocolError


class RemoteDirMissing(NotFound):
    """remote_dir itself does not exist on the server (not a checkpoint that is missing)."""

    def __init__(self, message: str, *, path: str = "", hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.path = path


class MissingOnServer(NotFound):
    """A path an operation needed is gone on the server."""

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class ServerPermission(AgentError):
    """The server's user may not read or write a path."""


class ServerDiskFull(DiskFull):
    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class ServerLocked(Locked):
    """Another run holds the lock of a server directory; `holder` is what it wrote there (pid, host,
    command, since), or empty."""

    def __init__(self, message: str, *, path: str = "", holder: dict | None = None) -> None:
        super().__init__(message, hint="wait for it to finish, then run again")
        self.path = path
        self.holder = holder or {}


class AgentCrashed(CkptsyncError):
    """The agent raised something it did not expect: a bug on the server side."""


def _not_found(message: str, kind: str, path: str) -> CkptsyncError:
    return MissingOnServer(message, path=path)


def _permission(message: str, kind: str, path: str) -> CkptsyncError:
    return ServerPermission(message, kind=kind, path=path)


def _no_space(message: str, kind: str, path: str) -> CkptsyncError:
    return ServerDiskFull(message, path=path)


def _protocol(message: str, kind: str, path: str) -> CkptsyncError:
    return ProtocolError(message)


def _crashed(message: str, kind: str, path: str) -> CkptsyncError:
    return AgentCrashed(f"the agent failed on the server: {message}",
                        hint="run again with --debug and report it")


def _locked(message: str, kind: str, path: str) -> CkptsyncError:
    return ServerLocked(message, path=path)


def _os(message: str, kind: str, path: str) -> CkptsyncError:
    return AgentError(message, kind=kind, path=path)


KINDS = {
    "not_found": _not_found,
    "permission": _permission,
    "no_space": _no_space,
    "protocol": _protocol,
    "unknown_op": _protocol,
    "bad_member": _protocol,
    "bad_path": _protocol,
    "unsupported": _protocol,
    "internal": _crashed,
    "locked": _locked,
    "is_dir": _os,
    "not_dir": _os,
    "exists": _os,
    "os": _os,
}


def from_reply(payload: dict, where: str) -> CkptsyncError:
    """The exception for one error reply of the agent running on `where`."""
    kind = str(payload.get("kind", ""))
    message = str(payload.get("message") or "the agent reported an error")
    path = str(payload.get("path") or "")
    make = KINDS.get(kind, _os)
    if make is not _crashed:
        message = f"on {where}: {message}"
    if make is _locked:
        holder = payload.get("info") if isinstance(payload.get("info"), dict) else {}
        return ServerLocked(f"on {where}: {liveness.writer_text(holder, path)} holds the server's lock "
                            f"({liveness.who(holder)})", path=path, holder=holder)
    return make(message, kind, path)


