"""Holds: complete checkpoints not yet backed up, hard-linked on the server against the trainer's rotation.

The agent links a checkpoint's files into `<remote_dir>/.ckptsync-hold/<name>/` (agent/hold.py):
no bytes are copied, and deleting the checkpoint leaves them there until the backup has
committed it. A listing with holds (`Server.scan(holds=True)`) is merged here: a held file is
read from the hold (it survives a rotation in the middle of the read), and a checkpoint the
trainer has deleted since stays in the view as its held files.

What a hold costs is the space of the files the trainer deletes while they are held, so
`plan` keeps the server's free space above max(10 %, twice the newest checkpoint) and holds
at most `hold_max` checkpoints, the newest first. Pure functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ckptsync.policy import HOLD_MAX, human
from ckptsync.server import HOLD_DIR, FileStat, Listing

FREE_SHARE = 0.10     # of the filesystem, kept free whatever the holds


@dataclass
class Merged:
    files: list[FileStat]                          # the listing, plus held files whose originals are gone
    meta: dict
    sources: dict[str, str]                        # path -> where the server reads it (the hold)
    held: dict[str, dict[str, FileStat]]           # name -> its held files, by path under remote_dir
    gone: set[str] = field(default_factory=set)    # held names of which the trainer deleted some file
    stale: set[str] = field(default_factory=set)   # held names saved again since (another version): not used


def top(path: str) -> str:
    return path.split("/", 1)[0]


def source_of(name: str, path: str) -> str:
    return f"{HOLD_DIR}/{name}/{path}"


def merge(listing: Listing) -> Merged:
    """The listing with what the holds keep (see the module's note). Pure."""
    by_path = {f.path: f for f in listing.files}
    held: dict[str, dict[str, FileStat]] = {}
    for f in listing.held:
        name, _, path = f.path.partition("/")
        if path and top(path) == name:
            held.setdefault(name, {})[path] = replace(f, path=path)
    out = Merged(list(listing.files), dict(listing.meta), {}, {})
    for name, files in sorted(held.items()):
        originals = {p: f for p, f in by_path.items() if top(p) == name}
        if any(p not in files or files[p].inode != f.inode for p, f in originals.items()):
            out.stale.add(name)   # not the files held: the name was saved again
            continue
        out.held[name] = files
        for path, f in sorted(files.items()):
            out.sources[path] = source_of(name, path)
            if path not in by_path:
                out.gone.add(name)
                out.files.append(f)
                meta = listing.held_meta.get(source_of(name, path)[len(HOLD_DIR) + 1:])
                if meta is not None:
                    out.meta[path] = meta
    return out


@dataclass(frozen=True)
class Candidate:
    """A complete checkpoint not backed up yet, newest first in plan()'s list."""

    name: str
    size: int
    held: bool = False
    gone: bool = False      # held, and the trainer deleted (some of) it: the hold is the only copy


@dataclass
class HoldPlan:
    make: list[str] = field(default_factory=list)        # newest first
    release: list[str] = field(default_factory=list)
    unheld: dict[str, str] = field(default_factory=dict)  # name -> why it is not held
    reserve: int = 0


def plan(pending: list[Candidate], free: int, total: int, newest_size: int, hold_max: int = HOLD_MAX) -> HoldPlan:
    """Which checkpoints to hold and release, `pending` newest first: at most hold_max, those whose
    only copy is a hold first, then the newest, while the space the holds will keep once the trainer deletes the originals leaves
    max(10 % of the filesystem, twice the newest checkpoint) free. Pure."""
    out = HoldPlan(reserve=int(max(total * FREE_SHARE, 2 * newest_size)))
    # Free space once every held original is deleted: a held file of which the trainer still has
    # its own link costs nothing yet, and all of its size then.
    future = free - sum(c.size for c in pending if c.held and not c.gone)
    # A hold the trainer has deleted the original of is the only copy: it stays (counted against
    # hold_max); the newest of the others take the places left.
    only_copy = [c for c in pending if c.held and c.gone]
    others = [c for c in pending if not (c.held and c.gone)]
    chosen = {c.name for c in only_copy + others[:max(hold_max - len(only_copy), 0)]}
    wanted = [c for c in pending if c.name in chosen]
    for c in [c for c in pending if c.name not in chosen]:
        out.unheld[c.name] = f"hold_max ({hold_max}) reached: the newer ones are held"
        if c.held:
            out.release.append(c.name)
            future += c.size
    for c in reversed(wanted):           # the oldest give way first
        if future >= out.reserve:
            break
        if c.held:
            out.release.append(c.name)
            future += c.size
            out.unheld[c.name] = f"released to keep {human(out.reserve)} free on the server"
    for c in wanted:
        if c.held or c.name in out.unheld:
            continue
        if future - c.size >= out.reserve:
            out.make.append(c.name)
            future -= c.size
        else:
            out.unheld[c.name] = f"holding it would leave less than {human(out.reserve)} free on the server"
    return out
