"""Is a backup still the server's copy? The quick check first, the server's hash where it cannot tell.

One answer for backup's plan, list, show, prune --remote and checklist (restic's rule: a file
whose size and mtime match but whose inode or ctime changed is read again before it is trusted).
The server hashes in its best algorithm; a value of the backup in that algorithm comes from the
manifest, or from its stored copy, hashed once and recorded (digests.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Mapping

from ckptsync.policy import CHANGED, CHECK, CURRENT, quick_check
from ckptsync.digests import LocalDigests, recorded
from ckptsync.server import FileStat, Server
from ckptsync.stores.manifest import FileRecord

if TYPE_CHECKING:
    from ckptsync.stores.manifest import Manifest


@dataclass
class Judgement:
    current: bool
    # Files with the recorded bytes but new stamps (mtime, mode, ctime, inode): the manifest and
    # the local copy should take the server's stamps; nothing needs sending.
    restamp: dict[str, FileStat] = field(default_factory=dict)
    hashed: int = 0                 # bytes the server read to decide

    @property
    def exact(self) -> bool:
        """Current with every stamp already recorded."""
        return self.current and not self.restamp


def judge(server: Server | None, root: str, stored: list[FileRecord] | None, files: Mapping[str, FileStat],
          legacy: str = CURRENT, where: Mapping[str, str] | None = None,
          local: LocalDigests | None = None) -> Judgement:
    """Whether `stored` (a manifest's records) still holds the server's `files`.

    `where` maps a record path to the path to hash on the server when they differ (extra files).
    The doubtful files are hashed on the server in its best algorithm and compared with the
    backup's value in the same algorithm: recorded, or read from the stored copy through `local`.
    Without a server, or without a value of the backup to compare with, a file the quick check
    doubts counts as changed: when unsure, back it up again.
    """
    state, doubtful = quick_check(stored, files, legacy)
    if state == CURRENT:
        return Judgement(True)
    if state == CHANGED or server is None:
        return Judgement(False)
    alg = server.best_hash
    records = {f.path: f for f in stored or ()}
    mine = {p: local.get(records[p], alg) if local is not None else recorded(records[p], alg) for p in doubtful}
    if any(v is None for v in mine.values()):
        return Judgement(False)
    paths = {p: (where or {}).get(p, p) for p in doubtful}
    got = server.hash(root, sorted(set(paths.values())), alg)
    hashed = sum(files[p].size for p in doubtful)
    if any(got.get(paths[p]) != mine[p] for p in doubtful):
        return Judgement(False, hashed=hashed)
    return Judgement(True, {p: files[p] for p in doubtful}, hashed)


def judge_view(server: Server | None, view, manifests: Mapping[str, "Manifest"], legacy: str = CURRENT,
               names: Iterable[str] | None = None, local: LocalDigests | None = None) -> dict[str, bool]:
    """Checkpoint name -> whether its backup is current, for the checkpoints of a ServerView that
    have a manifest (all, or those in `names`). What `local` learnt is recorded in the manifests
    before this returns."""
    wanted = None if names is None else set(names)
    out = {}
    for c in view.checkpoints:
        m = manifests.get(c.name)
        if m is not None and (wanted is None or c.name in wanted):
            out[c.name] = judge(server, view.root, m.files, view.files_of(c), legacy, local=local).current
    if local is not None:
        local.save()
    return out


__all__ = ["CHANGED", "CHECK", "CURRENT", "Judgement", "judge", "judge_view"]
