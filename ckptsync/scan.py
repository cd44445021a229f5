"""Ask the server what is in remote_dir and turn it into checkpoints."""

from __future__ import annotations

from dataclasses import dataclass, field

from ckptsync import agent as wire
from ckptsync.errors import ProtocolError
from ckptsync.layout import Checkpoint, FileEntry, Listing, discover
from ckptsync.remote import Remote


@dataclass
class ServerView:
    root: str                                  # remote_dir as the server resolved it
    checkpoints: list[Checkpoint]
    exact: dict[str, tuple[int, int, int]]     # path -> (size, mtime_ns, mode)
    now: float
    errors: list[str]
    meta: dict = field(default_factory=dict)   # path -> parsed trainer_state.json etc., as the agent read it

    def find(self, name: str) -> Checkpoint | None:
        return next((c for c in self.checkpoints if c.name == name), None)


def scan_server(remote: Remote, remote_dir: str, settle_seconds: float) -> ServerView:
    reply = remote.call("scan", root=remote_dir)
    files = []
    exact: dict[str, tuple[int, int, int]] = {}
    try:
        for path, size, mtime_ns, mode in reply["files"]:
            if not isinstance(path, str) or not wire.safe_member(path):
                raise ProtocolError(f"{remote.describe()}: the server listed an unsafe path {path!r}")
            files.append(FileEntry(path=path, size=int(size), mtime=int(mtime_ns) / 1e9, mode=int(mode)))
            exact[path] = (int(size), int(mtime_ns), int(mode))
        meta = dict(reply.get("meta") or {})
        now = float(reply["now"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"{remote.describe()}: malformed listing ({exc})") from None
    listing = Listing(files=tuple(files), meta=meta, now=now)
    return ServerView(
        root=str(reply.get("root", remote_dir)),
        checkpoints=discover(listing, settle_seconds),
        exact=exact,
        now=now,
        errors=list(reply.get("errors") or []),
        meta=meta,
    )
