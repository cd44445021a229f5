"""`ckptsync restore --all`: every backed-up checkpoint of a run, newest first, over one connection.

Each checkpoint is a full single restore (checked against its manifest, staged,
checked on the server, renamed into place), so an interruption leaves every
finished one in place and the current one in staging only. Checkpoints whose
name is already taken on the server are skipped unless --force; the rest of
the run carries on past a failed checkpoint, and the result says which failed.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

from ckptsync.config import Target
from ckptsync.errors import OK, PARTIAL, CkptsyncError, ConnectError, DiskFull, IntegrityError, Interrupted, NotFound
from ckptsync.policy import SPACE_MARGIN, fits, human
from ckptsync.progress import QUIET, Reporter
from ckptsync.restore import Restore, RestoreOptions, RestoreResult, RestoreRun
from ckptsync.restore_choice import newest_first
from ckptsync.server import Server, open_server
from ckptsync.disk import io_error
from ckptsync.stores.directory import DirectoryStore
from ckptsync.stores.manifest import EXTRA, Manifest

# RestoreAllItem.outcome values.
RESTORED = "restored"
WOULD = "would restore"
SKIPPED = "skipped"      # `error` says why
FAILED = "failed"
NOT_TRIED = "not tried"
EXISTS = "already on the server (--force replaces it)"
LOST = "the connection was lost"


@dataclass
class RestoreAllItem:
    checkpoint: str
    step: int | None
    size: int
    outcome: str
    error: str = ""
    exit_code: int = OK


@dataclass
class RestoreAllResult(RestoreRun):
    items: list[RestoreAllItem] = field(default_factory=list)
    restores: list[RestoreResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[RestoreAllItem]:
        return [i for i in self.items if i.outcome in (FAILED, NOT_TRIED)]

    @property
    def exit_code(self) -> int:
        """0 when nothing failed; 3 when some failed; a lone failure's own code when nothing else was tried."""
        bad = self.failed
        if not bad:
            return OK
        if all(i.outcome != RESTORED for i in self.items) and len({i.exit_code for i in bad}) == 1:
            return bad[0].exit_code or PARTIAL
        return PARTIAL

    @property
    def sent_bytes(self) -> int:
        return sum(r.sent_bytes for r in self.restores)

    @property
    def wire_bytes(self) -> int:
        return sum(r.wire_bytes for r in self.restores)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.update(sent_bytes=self.sent_bytes, wire_bytes=self.wire_bytes)
        return out


def run_restore_all(target: Target, opts: RestoreOptions, rep: Reporter = QUIET,
                    connect: Callable[[], Server] | None = None) -> RestoreAllResult:
    """Restore every checkpoint backed up in the target's backup directory (an archive too), newest first.
    `connect`: gives the server (see open_server)."""
    from ckptsync.restore import local_copy

    try:
        with local_copy(target, rep) as store:
            return RestoreAll(target, opts, rep, store=store, connect=connect).run()
    except OSError as exc:
        raise io_error(exc, f"reading {target.local_dir}") from None


class RestoreAll:
    def __init__(self, target: Target, opts: RestoreOptions, rep: Reporter, store: DirectoryStore | None = None,
                 connect: Callable[[], Server] | None = None) -> None:
        """`store`: where the backups are read (an archive's extracted copy), else the target's directory."""
        self.target, self.opts, self.rep, self.connect = target, opts, rep, connect
        self.store = store or DirectoryStore(target.local_dir)
        self.result = RestoreAllResult(target=target.label, server=target.describe(), source=str(target.local_dir),
                                       remote_dir=target.remote_dir or "", dry_run=opts.dry_run)

    def run(self) -> RestoreAllResult:
        started = time.monotonic()
        r = self.result
        try:
            manifests = self.manifests()
            ordered = newest_first(manifests)
            for name, (path, why) in self.damaged().items():
                r.items.append(RestoreAllItem(name, None, 0, FAILED, f"its manifest {path} is damaged ({why})",
                                              IntegrityError.exit_code))
            if not ordered and r.items:
                raise IntegrityError(f"no backup in {r.source} can be checked: "
                                     + "; ".join(f"{i.checkpoint}: {i.error}" for i in r.items))
            if not ordered:
                raise NotFound(f"no checkpoint backups in {r.source}", hint="give the backup directory with --local-dir")
            names = frozenset(m.name for m in ordered)
            with open_server(self.target, self.connect) as server:
                root = self.target.remote_dir
                there = server.stat(root, [m.name for m in ordered])
                todo = []
                for m in ordered:
                    if there.get(m.name) is not None and not self.opts.force:
                        r.items.append(RestoreAllItem(m.name, m.step, m.size, SKIPPED, EXISTS))
                    else:
                        todo.append(m)
                self._check_space(server, root, todo, manifests.get(EXTRA))
                extras = self.opts.extra_files and EXTRA in manifests
                lost = False
                for m in todo:
                    if lost:
                        r.items.append(RestoreAllItem(m.name, m.step, m.size, NOT_TRIED, LOST, ConnectError.exit_code))
                        continue
                    try:
                        done = self.restore_one(server, m.name, extras, names)
                    except Interrupted as exc:
                        restored = [i.checkpoint for i in r.items if i.outcome == RESTORED]
                        raise Interrupted(exc.message + (f" (already restored: {', '.join(restored)})" if restored else ""),
                                          hint=exc.hint) from None
                    except CkptsyncError as exc:
                        r.items.append(RestoreAllItem(m.name, m.step, m.size, FAILED, exc.message, exc.exit_code))
                        lost = isinstance(exc, ConnectError)
                        continue
                    extras = False  # the extra files go back once, with the first checkpoint that made it
                    r.restores.append(done)
                    r.warnings.extend(f"{m.name}: {w}" for w in done.warnings)
                    if done.remote_dir:
                        r.remote_dir = done.remote_dir
                    r.items.append(RestoreAllItem(m.name, m.step, m.size, WOULD if self.opts.dry_run else RESTORED))
            order = {m.name: i for i, m in enumerate(ordered)}
            r.items.sort(key=lambda i: order.get(i.checkpoint, len(order)))
            return r
        finally:
            r.seconds = time.monotonic() - started

    # What a bucket store does its own way (s3/direct.py).

    def manifests(self) -> dict[str, Manifest]:
        return self.store.manifests()

    def damaged(self) -> dict:
        """Checkpoints whose manifest is damaged: name -> (manifest path, why)."""
        return {n: why for n, why in self.store.damaged().items() if "@" not in n and n != EXTRA}

    def restore_one(self, server, name: str, extras: bool, names: frozenset[str]):
        one = dataclasses.replace(self.opts, checkpoint=name, extra_files=extras, also=names)
        return Restore(self.target, one, self.rep, store=self.store).run(server=server)

    def _check_space(self, server, root: str, todo, extras) -> None:
        """All of it must fit before the first byte is sent, not only the next checkpoint."""
        need = sum(m.size for m in todo) + (extras.size if extras is not None and self.opts.extra_files else 0)
        free = server.df(root).free
        if todo and not fits(need, free):
            if self.opts.dry_run:
                self.result.warnings.append(f"not enough space on {self.result.server}: the restore needs "
                                            f"{human(need)} plus a {human(SPACE_MARGIN)} margin, {human(free)} is free")
                return
            raise DiskFull(
                f"not enough space on {self.result.server} in {root}: restoring {len(todo)} checkpoints needs "
                f"{human(need)} plus a {human(SPACE_MARGIN)} margin, {human(free)} is free (nothing was sent)",
                hint="free some space on the server, or restore fewer checkpoints with --checkpoint NAME")
