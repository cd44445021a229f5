"""The server boundary: core code talks to a server only through `Server` and the values in `types`.

`AgentServer` (agent_server.py) speaks the agent's frames over a Transport, through
remote.py; `InProcessServer` (inprocess.py) runs the same agent on a thread here, with hooks
for fault tests; transfer.py turns a Download into verified local files. Nothing outside this
package reads a frame or names an agent operation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ckptsync.agent.frames import HOLD_DIR   # where the agent holds checkpoints against rotation
from ckptsync.server.base import Download, Hashes, Server, Upload
from ckptsync.server.errors import MissingOnServer, RemoteDirMissing, ServerDiskFull, ServerLocked, ServerPermission
from ckptsync.server.types import (
    Arrived, Changes, Committed, FileStat, Held, Hello, Listing, Probe, Process, Procs, Sent, Space, Staged, Stat,
    Stats, Unseen,
)

if TYPE_CHECKING:
    from ckptsync.config import Target


def open_server(target: "Target", connect: Callable[[], Server] | None = None) -> Server:
    """The server of a target, not yet opened (use it as a context manager). `connect` gives the
    server instead (tests hand in the in-process twin); None: the agent over the target's transport."""
    if connect is not None:
        return connect()
    from ckptsync.errors import ConfigError
    from ckptsync.server.agent_server import AgentServer

    if target.transport is None:
        raise ConfigError("no server given: use --instance or --host (or --remote-dir for a local directory)")
    return AgentServer(target.transport, missing_hint=target.printed.tilde_hint, bwlimit=target.link.bwlimit,
                       limiter=target.link.limiter, stall_timeout=target.link.stall_timeout)


__all__ = ["HOLD_DIR", "Server", "Download", "Upload", "Hashes", "open_server", "Stat", "Stats", "FileStat", "Listing",
           "Unseen", "Hello", "Space", "Probe", "Process", "Procs", "Staged", "Committed", "Arrived", "Sent",
           "Changes", "Held", "RemoteDirMissing", "MissingOnServer",
           "ServerDiskFull", "ServerLocked", "ServerPermission"]
