"""Which checkpoints a backup takes: the options, the rule, and the ones it leaves out. Pure."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Mapping

from ckptsync.errors import NotFound
from ckptsync.layout import Checkpoint
from ckptsync.policy import named, newest_first
from ckptsync.stores.manifest import EXTRA, Manifest

if TYPE_CHECKING:
    from ckptsync.scan import ServerView


@dataclass
class BackupOptions:
    max_checkpoints: int = 2
    names: list[str] = field(default_factory=list)
    all: bool = False
    include_best: bool = False
    compress: str = "auto"
    dry_run: bool = False
    wait: bool = False
    extra_files: bool = True
    also: list[str] = field(default_factory=list)   # complete checkpoints taken whatever their age (held ones)


@dataclass
class PlanItem:
    name: str
    action: str          # fetch, up-to-date, restamp (same bytes, new timestamps), skip
    size: int = 0        # bytes the checkpoint holds
    fetch_bytes: int = 0
    files: int = 0
    reason: str = ""
    step: int | None = None
    writing: bool = False  # skipped as the newest checkpoint, being saved now: normal during training


def resolve_names(opts: BackupOptions, checkpoints: list[Checkpoint]) -> BackupOptions:
    """The options with each --checkpoint as the name it means (`checkpoint-3000/`, `3000`). Pure."""
    if not opts.names:
        return opts
    known = [(c.name, c.step) for c in checkpoints]
    return dataclasses.replace(opts, names=[named(n, known) for n in opts.names])


def select(checkpoints: list[Checkpoint], opts: BackupOptions,
           stored: Iterable[Manifest] = ()) -> tuple[list[Checkpoint], list[PlanItem]]:
    """Which checkpoints to back up (newest first), and which to report as skipped. Pure.

    By default: every complete checkpoint newer than the newest one in `stored` (the backups
    already made), and the `max_checkpoints` newest (all that a first run takes)."""
    opts = resolve_names(opts, checkpoints)
    complete = [c for c in checkpoints if c.complete]
    # Weights that restore --adapter-only put there come from a backup: skipped only when named.
    newest = next(iter(newest_first(checkpoints)), None)
    skipped = [PlanItem(c.name, "skip", c.size, step=c.step, reason=skip_reason(c), writing=c is newest and being_saved(c))
               for c in checkpoints if not c.complete and (not c.restored or c.name in opts.names)]
    if opts.names:
        by_name = {c.name: c for c in checkpoints}
        missing = [n for n in opts.names if n not in by_name]
        if missing:
            have = ", ".join(c.name for c in checkpoints) or "none"
            raise NotFound(f"not on the server: {', '.join(missing)} (checkpoints there: {have})")
        chosen = [c for c in complete if c.name in opts.names]
        skipped = [s for s in skipped if s.name in opts.names]
    elif opts.all:
        chosen = list(complete)
    else:
        wanted = {c.name for c in complete[: max(opts.max_checkpoints, 0)]}
        wanted.update(c.name for c in new_since(complete, stored))
        wanted.update(opts.also)
        chosen = [c for c in complete if c.name in wanted]
    if opts.include_best:
        best = next((c for c in complete if c.is_best), None)
        if best is not None and best not in chosen:
            chosen.append(best)
    return chosen, skipped


def unseen_failures(view: "ServerView", names: list[str]) -> dict[str, str]:
    """What a backup of this listing cannot vouch for: each checkpoint (of `names`, when given)
    that the server could not list or read whole, and the listing itself when it stopped early. Pure."""
    failed = {c.name: skip_reason(c) for c in view.checkpoints if c.unreadable and (not names or c.name in names)}
    if view.stopped:
        failed[view.root] = f"{view.stopped}; checkpoints past that point were not seen, nor backed up"
    return failed


def new_since(complete: list[Checkpoint], stored: Iterable[Manifest]) -> list[Checkpoint]:
    """The complete checkpoints newer than the newest backup in `stored` (none when nothing is
    stored: a first run takes the --max-checkpoints newest instead). Pure."""
    backups = [m for m in stored if m.name != EXTRA]
    names = {m.name for m in backups}
    if not backups:
        return []
    newer = []
    for item in newest_first([*complete, *backups]):
        if item.name in names:
            break
        newer.append(item)
    return newer  # type: ignore[return-value]  # only checkpoints come before the first backup


def being_saved(c: Checkpoint) -> bool:
    """An incomplete checkpoint that a trainer is still writing: not abandoned, readable, not a restore's. Pure."""
    return not (c.complete or c.abandoned or c.unreadable or c.restored)


def skip_reason(c: Checkpoint) -> str:
    if c.restored:
        return f"{c.reason} from a backup; not backed up again"
    if c.unreadable:
        return f"{c.reason}; not recorded"
    return f"{'abandoned (incomplete)' if c.abandoned else 'in progress'}: {c.reason}"


def unsaved(checkpoints: list[Checkpoint], taken: set[str], failed: Mapping[str, str], stored: set[str],
            first_run: bool, opts: BackupOptions, hint: str) -> tuple[list[str], str]:
    """The complete checkpoints a run leaves without a backup, newest first: failed (each already
    named with its error), or not selected and not stored before; and a warning naming those not
    selected, why, and `hint` (the command that takes them all). Pure."""
    left = [c.name for c in checkpoints if c.complete and c.name not in taken
            and (c.name in failed or c.name not in stored)]
    unchosen = [n for n in left if n not in failed]
    if not unchosen:
        return left, ""
    why = ("not asked for" if opts.names else "a first run takes the --max-checkpoints newest" if first_run
           else "older than the newest backup")
    return left, f"complete on the server but not backed up ({why}: {', '.join(unchosen)}); back them up with: {hint}"
