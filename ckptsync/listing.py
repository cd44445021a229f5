"""`ckptsync list`: the server's checkpoints and the backups side by side."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Callable

from ckptsync.commit import staging_note
from ckptsync.config import Target
from ckptsync.digests import LocalDigests
from ckptsync.freshness import judge_view
from ckptsync.layout import best_checkpoint
from ckptsync.policy import RunStatus, newest_first
from ckptsync.result import Result
from ckptsync.runs import RunState, survey
from ckptsync.scan import ServerView, empty_hint, scan_server
from ckptsync.server import Server, open_server
from ckptsync.stores import Store, ability, open_store
from ckptsync.stores.manifest import EXTRA, Manifest


@dataclass
class Row:
    name: str
    step: int | None
    kind: str
    size: int
    mtime: float
    on_server: bool | None         # None: the server was not checked (list --local)
    complete: bool | None          # None: not on the server, or not checked
    reason: str
    content: str
    resumable: bool
    backup: str                    # "yes", "no", "outdated" (server copy differs), "local only", "damaged"
    is_best: bool
    meta_error: str | None = None
    abandoned: bool = False
    unreadable: bool = False       # part or all of it could not be listed or read on the server (reason: why)
    restored: bool = False         # weights put there by restore --adapter-only: not a save in progress

    @property
    def state(self) -> str | None:
        """complete, writing (still being written), abandoned, unreadable or restored (adapter only);
        None when not seen on the server."""
        if self.complete is None:
            return None
        if self.restored:
            return "restored"
        if self.complete:
            return "complete"
        return "unreadable" if self.unreadable else ("abandoned" if self.abandoned else "writing")


@dataclass
class GenerationRow:
    index: int                     # 1: the version just before the current one
    id: str                        # when that version was backed up (UTC), e.g. 20261201-101500
    step: int | None
    size: int
    files: int
    backed_up_at: float
    verified_at: float


def generation_rows(store: Store) -> dict[str, list[GenerationRow]]:
    return {name: [GenerationRow(i, g.id, g.manifest.step, g.manifest.size, len(g.manifest.files),
                                 g.manifest.backed_up_at, g.manifest.verified_at)
                   for i, g in enumerate(gens, 1)]
            for name, gens in store.generations().items()}


@dataclass
class ListResult(Result):
    target: str
    server: str | None             # None: not checked (list --local)
    dest: str
    remote_dir: str | None = None
    rows: list[Row] = field(default_factory=list)
    last_backup: RunStatus | None = None
    unmanaged: list[str] = field(default_factory=list)
    damaged: dict[str, str] = field(default_factory=dict)      # name -> why its manifest cannot be trusted
    runs: list[RunState] = field(default_factory=list)         # newer run directories beside remote_dir
    generations: dict[str, list[GenerationRow]] = field(default_factory=dict)   # with --generations
    follow_hint: str = ""
    empty_hint: str = ""           # no checkpoints on the server: what its remote_dir holds instead
    stopped: str = ""              # why the server's listing is incomplete; "" when it is whole
    warnings: list[str] = field(default_factory=list)
    staged: list[str] = field(default_factory=list)   # entries unfinished backups left in staging
    staged_bytes: int = 0
    staging_note: str = ""         # says so, with the command that clears it
    unfinished_uploads: int = 0    # a bucket store: multipart uploads in progress or abandoned

    @property
    def total_server(self) -> int:
        return sum(r.size for r in self.rows if r.on_server)

    @property
    def backed_up(self) -> list[Row]:
        return [r for r in self.rows if r.backup in ("yes", "outdated", "local only")]

    @property
    def total_local(self) -> int:
        return sum(r.size for r in self.backed_up)

    exit_code = 0

    def to_dict(self) -> dict:
        checked = self.server is not None
        on_server = [r for r in self.rows if r.on_server]
        return {
            "server": self.server, "server_checked": checked, "remote_dir": self.remote_dir,
            "backup_dir": self.dest,
            "checkpoints": [{**asdict(r), "state": r.state} for r in self.rows],
            "totals": {"checkpoints": len(self.rows),
                       "on_server": len(on_server) if checked else None,
                       "server_bytes": self.total_server if checked else None,
                       "backed_up": len(self.backed_up), "backed_up_bytes": self.total_local},
            "last_backup": self.last_backup.to_dict() if self.last_backup else None, "unmanaged": self.unmanaged, "damaged": self.damaged,
            "exit_code": self.exit_code,
            "runs": [{**asdict(r), "covered": r.covered} for r in self.runs],
            "generations": {n: [asdict(g) for g in gens] for n, gens in self.generations.items()},
            "stopped": self.stopped, "warnings": self.warnings,
            "staged": self.staged, "staged_bytes": self.staged_bytes,
            "unfinished_uploads": self.unfinished_uploads,
        }


DAMAGED = "damaged"


def merge(view: ServerView | None, manifests: dict[str, Manifest], current: dict[str, bool] | None = None,
          damaged: dict[str, tuple[int, float]] | None = None) -> list[Row]:
    """Pure: one row per checkpoint name, server rows, backup-only rows and those whose manifest is
    damaged (`damaged` gives their bytes and mtime on disk) together, newest first."""
    rows: list[Row] = []
    seen = set()
    damaged = damaged or {}
    if view is not None:
        for c in view.checkpoints:
            m = manifests.get(c.name)
            if c.name in damaged:
                backup = DAMAGED
            elif m is None:
                backup = "no"
            elif c.restored:  # weights restore --adapter-only put there from this backup
                backup = "yes"
            else:
                backup = "yes" if (current or {}).get(c.name) else "outdated"
            reason = f"abandoned (incomplete): {c.reason}" if c.abandoned else c.reason
            rows.append(Row(c.name, c.step, c.kind, c.size, c.mtime, True, c.complete, reason, c.content,
                            c.resumable, backup, c.is_best, c.meta_error, c.abandoned, bool(c.unreadable),
                            c.restored))
            seen.add(c.name)
    local = [m for name, m in manifests.items() if name not in seen and name != EXTRA]
    # A manifest says whether its checkpoint was the best when it was backed up; a later state may
    # name another. The server's word counts when it has one, else the newest backed-up state's.
    best = None if any(r.is_best for r in rows) else best_backed_up(local)
    # Without a view the server was not checked: a backup is all that is known of each.
    on_server, backup = (False, "local only") if view is not None else (None, "yes")
    for m in local:
        rows.append(Row(m.name, m.step, m.kind, m.size, m.mtime, on_server, None, "", m.content, m.resumable,
                        backup, best is not None and m.name in best))
    for name, (size, mtime) in sorted(damaged.items()):
        if name not in seen and name != EXTRA:
            rows.append(Row(name, None, "-", size, mtime, on_server, None, "", DAMAGED, False, DAMAGED, False))
    return newest_first(rows)


def best_backed_up(manifests: list[Manifest]) -> set[str]:
    """The best checkpoint among backups, by the rule discovery applies on the server. Pure."""
    sources = [(m.step or 0, m.mtime, m.state["best_model_checkpoint"]) for m in manifests
               if isinstance(m.state.get("best_model_checkpoint"), str)]
    named = best_checkpoint(sources)
    return {m.name for m in manifests if m.name == named or (m.layout == "single-file" and m.kind == "best")}


def run_list(target: Target, local_only: bool, generations: bool = False,
             connect: Callable[[], Server] | None = None) -> ListResult:
    """The server's checkpoints beside the backups. A store whose files are not on this machine (a
    bucket) is listed alone: its entries are compared with the server's by backup, not here."""
    store = open_store(target)
    result = _run_list(target, store, local_only or not ability(store, "files_here"), connect)
    if generations:
        result.generations = generation_rows(store)
    return result


def _run_list(target: Target, store: Store, local_only: bool, connect: Callable[[], Server] | None) -> ListResult:
    manifests = store.manifests()
    damaged = {name: why for name, why in store.damaged().items() if "@" not in name}
    result = ListResult(target=target.label, server=None if local_only else target.describe(),
                        dest=store.location, remote_dir=None if local_only else target.remote_dir,
                        last_backup=store.status(), unmanaged=store.unmanaged())
    for name, (path, why) in damaged.items():
        result.damaged[name] = (f"its manifest {path} is damaged ({why}): not verified and not restored; "
                                f"to back it up again while the server has it: "
                                f"{target.printed.command('backup', '--checkpoint', name)}")
    if ability(store, "staged_names"):
        result.staged, result.staged_bytes, result.staging_note = staging_note(
            store, target.printed.command("backup", "--discard-staged"))
    uploads = ability(store, "unfinished_uploads")
    if uploads is not None:
        result.unfinished_uploads = uploads()
    view, current = None, None
    if not local_only:
        with open_server(target, connect) as server:
            view = scan_server(server, target.remote_dir, target.policy.settle_seconds, writers=True,
                               pattern=target.policy.train_process or "")
            current = judge_view(server, view, manifests, local=LocalDigests(store))
            result.runs = survey(server, view.root, target)
        if any(not r.covered for r in result.runs):
            result.follow_hint = target.printed.command("backup", "--follow-runs")
        result.remote_dir = view.root
        result.stopped, result.warnings = view.stopped, list(view.errors)
        if not view.checkpoints:
            result.empty_hint = empty_hint(view, target)
    on_disk = ability(store, "entry")   # a directory's damaged entries: their bytes as found
    result.rows = merge(view, manifests, current,
                        {name: _on_disk(on_disk(name)) if on_disk else (0, 0.0) for name in damaged})
    if local_only and not result.rows and ability(store, "files_here"):
        from ckptsync.adopt import adopt_hint, unadopted

        copies = unadopted(store)
        if copies:
            result.empty_hint = adopt_hint(store.root, copies)
    return result


def _on_disk(entry) -> tuple[int, float]:
    """Bytes and mtime of an entry as it is on disk (links not followed)."""
    try:
        mtime = os.lstat(entry).st_mtime
    except OSError:
        return 0, 0.0
    if not os.path.isdir(entry) or os.path.islink(entry):
        return os.lstat(entry).st_size, mtime
    total = 0
    for dirpath, _dirs, files in os.walk(entry):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total, mtime

