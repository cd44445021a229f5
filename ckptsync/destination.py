"""What a restore finds on the server and leaves there: the same run directory on another home,
a checkpoint already there with the backup's bytes, and the mark of an adapter-only restore."""

from __future__ import annotations

import io
import json
import posixpath
from typing import Callable

from ckptsync.errors import CkptsyncError, IntegrityError
from ckptsync.checkpoint_names import RESTORED_MARKER
from ckptsync.server import Server, Stat
from ckptsync.stores.manifest import FileRecord, Manifest


def under_home(path: str, home: str) -> str | None:
    """`path` relative to `home` when it lies below it, else None. Pure."""
    home = posixpath.normpath(home) if home else ""
    if home in ("", "/", ".") or not path.startswith(home + "/"):
        return None
    return posixpath.relpath(path, home)


def same_place(source: dict, root: str, home: str) -> bool:
    """Whether `root` (absolute, on a server whose home is `home`) is the remote_dir a backup's
    `source` names: the same path, or the same path relative to each server's home, as a relative
    remote_dir in the config means on a new instance whose home is another. Pure."""
    if not source.get("remote_dir"):
        return False
    old = posixpath.normpath(str(source["remote_dir"]))
    if old == root:
        return True
    rel = under_home(root, home)
    if rel is None:
        return False
    if source.get("home"):
        return under_home(old, str(source["home"])) == rel
    return old.endswith("/" + rel)  # backed up before the server's home was recorded


def identical_there(server: Server, root: str, name: str, want: list[FileRecord], there: Stat,
                    local_hash: Callable[[FileRecord, str], str | None], ignore: set[str] = frozenset()) -> bool:
    """Whether the server's `name` under `root` holds exactly the files `want` (paths relative to
    root), with their bytes: the same paths and sizes, then the server's hash of each against the
    backup's in the same algorithm (`local_hash`). Names in `ignore` (inside the checkpoint) do not count."""
    if there.is_dir:
        try:
            listing = server.scan(posixpath.join(root, name))
        except CkptsyncError:
            return False
        found = {posixpath.join(name, f.path): f.size for f in listing.files if f.path not in ignore}
    else:
        found = {name: there.size}
    if not want or found != {f.path: f.size for f in want}:
        return False
    alg = server.best_hash
    got = server.hash(root, sorted(found), alg)
    return all(got.get(f.path) is not None and got.get(f.path) == local_hash(f, alg) for f in want)


def mark_restored(server: Server, root: str, m: Manifest, compress: str) -> None:
    """Stage RESTORED_MARKER in the checkpoint being restored with --adapter-only: list and checklist
    then call the directory "adapter only, restored" instead of a save still being written."""
    member = posixpath.join(m.name, RESTORED_MARKER)
    data = json.dumps({"checkpoint": m.name, "step": m.step, "restored": "restore --adapter-only"}).encode()
    stamp = max((f.mtime_ns for f in m.files), default=0)  # the directory keeps its checkpoint's mtime
    up = server.receive(root, m.name, compress=compress)
    sent = up.add(member, io.BytesIO(data), len(data), stamp, 0o644)
    got = up.finish().get(member)
    if got is None or got.hash != sent:
        raise IntegrityError(f"arrived damaged on the server: {member}; nothing was put in place",
                             hint="run the same restore again")
