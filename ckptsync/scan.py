"""Ask the server what is in remote_dir and turn it into checkpoints."""

from __future__ import annotations

from dataclasses import dataclass, field

from ckptsync.layout import Checkpoint, FileEntry, Listing, dated_ahead, discover, unseen_outside
from ckptsync.policy import span
from ckptsync.server import FileStat, Server


@dataclass
class ServerView:
    root: str                                  # remote_dir as the server resolved it
    checkpoints: list[Checkpoint]
    exact: dict[str, FileStat]                 # path -> size, mtime_ns, mode as listed
    now: float
    errors: list[str]
    meta: dict = field(default_factory=dict)   # path -> parsed trainer_state.json etc., as the agent read it
    clock: str = ""                            # files dated after the server's clock, when some are
    stopped: str = ""                          # why the listing is incomplete ("" when whole): the run is uncertain

    def find(self, name: str) -> Checkpoint | None:
        return next((c for c in self.checkpoints if c.name == name), None)

    def files_of(self, c: Checkpoint) -> dict[str, FileStat]:
        return {f.path: self.exact[f.path] for f in c.files}


def scan_server(server: Server, remote_dir: str, settle_seconds: float) -> ServerView:
    listing = server.scan(remote_dir)
    files = tuple(FileEntry(path=f.path, size=f.size, mtime=f.mtime_ns / 1e9, mode=f.mode) for f in listing.files)
    unseen = tuple((u.path, u.why, u.mtime_ns / 1e9) for u in listing.unseen)
    found = discover(Listing(files=files, meta=listing.meta, now=listing.now, unseen=unseen), settle_seconds)
    # What could not be read outside every checkpoint is named; nothing there would be backed up.
    outside = unseen_outside(unseen)
    if outside:
        more = f" and {len(outside) - 1} more" if len(outside) > 1 else ""
        outside = [f"could not read {outside[0][0]} on the server ({outside[0][1]}){more}; "
                   "not in any checkpoint, so not backed up"]
    ahead, most = dated_ahead((f.mtime for f in files), listing.now)
    clock = (f"{ahead} file(s) under {listing.root} are dated up to {span(most)} after the server's clock "
             "(copied with another machine's times, or a filesystem with its own clock): only their "
             "layout's completion markers say whether they are finished") if ahead else ""
    return ServerView(
        root=listing.root,
        checkpoints=found,
        exact={f.path: f for f in listing.files},
        now=listing.now,
        errors=list(listing.errors) + outside,
        meta=listing.meta,
        clock=clock,
        stopped=listing.stopped,
    )
