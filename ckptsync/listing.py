"""`ckptsync list`: the server's checkpoints and the backups side by side."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ckptsync.config import Target
from ckptsync.policy import backup_is_current, newest_first
from ckptsync.scan import ServerView, scan_server
from ckptsync.server import open_server
from ckptsync.store import EXTRA, Manifest, Store


@dataclass
class Row:
    name: str
    step: int | None
    kind: str
    size: int
    mtime: float
    on_server: bool
    complete: bool | None          # None: not on the server
    reason: str
    content: str
    resumable: bool
    backup: str                    # "yes", "no", "outdated" (server copy differs), "local only"
    is_best: bool
    meta_error: str | None = None


@dataclass
class ListResult:
    target: str
    server: str | None
    dest: str
    rows: list[Row] = field(default_factory=list)
    last_backup: dict | None = None
    unmanaged: list[str] = field(default_factory=list)

    @property
    def total_server(self) -> int:
        return sum(r.size for r in self.rows if r.on_server)

    @property
    def total_local(self) -> int:
        return sum(r.size for r in self.rows if r.backup in ("yes", "outdated", "local only"))

    def to_rows(self) -> list[dict]:
        return [asdict(r) for r in self.rows]


def merge(view: ServerView | None, manifests: dict[str, Manifest]) -> list[Row]:
    """Pure: one row per checkpoint name, newest first (server order, then local-only ones by step/time)."""
    rows: list[Row] = []
    seen = set()
    if view is not None:
        for c in view.checkpoints:
            m = manifests.get(c.name)
            if m is None:
                backup = "no"
            else:
                backup = "yes" if backup_is_current(m.files, view.files_of(c)) else "outdated"
            reason = f"abandoned (incomplete): {c.reason}" if c.abandoned else c.reason
            rows.append(Row(c.name, c.step, c.kind, c.size, c.mtime, True, c.complete, reason, c.content,
                            c.resumable, backup, c.is_best, c.meta_error))
            seen.add(c.name)
    local = [m for name, m in manifests.items() if name not in seen and name != EXTRA]
    local = newest_first(local)
    for m in local:
        rows.append(Row(m.name, m.step, m.kind, m.size, m.mtime, False, None, "", m.content, m.resumable,
                        "local only", m.is_best))
    return rows


def run_list(target: Target, local_only: bool) -> ListResult:
    store = Store(target.local_dir)
    manifests = store.manifests()
    result = ListResult(target=target.label, server=None if local_only else target.describe(),
                        dest=str(target.local_dir), last_backup=store.status(), unmanaged=store.unmanaged())
    view = None
    if not local_only:
        with open_server(target) as server:
            view = scan_server(server, target.remote_dir, target.settle_seconds)
    result.rows = merge(view, manifests)
    return result
