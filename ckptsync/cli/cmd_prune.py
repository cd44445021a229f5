"""ckptsync prune"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ckptsync.cli import options as o
from ckptsync.cli.context import output
from ckptsync.errors import UsageError
from ckptsync.output import Column, Output, TextTable, age, human, size_cell, stamp, when

if TYPE_CHECKING:
    from ckptsync.prune import PruneResult


def prune_cmd(
    instance: o.Instance = None, host: o.Host = None, remote_dir: o.RemoteDir = None,
    local_dir: o.LocalDir = None, config: o.Config = None, accept_new_host_key: o.AcceptNew = False,
    remote: Annotated[bool, typer.Option("--remote", help="Prune the server's checkpoints instead of the backups.")] = False,
    keep_last: Annotated[int, typer.Option("--keep-last", min=0, metavar="K", show_default=False, help="Keep the K newest complete checkpoints.")] = 0,
    keep_best: Annotated[bool, typer.Option("--keep-best", help="Keep the best checkpoint(s) (trainer_state.json, best_model.pt); on by default with any other rule.")] = False,
    no_keep_best: Annotated[bool, typer.Option("--no-keep-best", help="Let the other rules delete the best checkpoint too.")] = False,
    keep_every: Annotated[int, typer.Option("--keep-every", min=0, metavar="STEPS", show_default=False, help="Keep the first checkpoint at or after every multiple of STEPS.")] = 0,
    keep_within: Annotated[Optional[str], typer.Option("--keep-within", metavar="DURATION", help="Keep checkpoints written within DURATION (e.g. 12h, 7d, 2w).", show_default=False)] = None,
    keep_generations: Annotated[Optional[int], typer.Option("--keep-generations", min=0, metavar="N", show_default=False, help="Keep the N newest earlier versions of each reused name (backups only; backup itself keeps keep_generations, default 2).")] = None,
    dry_run: o.DryRun = False, force: o.Force = False, wait: o.Wait = False,
) -> int:
    """Delete the checkpoints no --keep rule keeps, in the backup directory or (--remote) on the server.

    A checkpoint is kept if any rule keeps it; each one is listed with the
    reasons. Always kept, whatever the rules: checkpoints still being written,
    and locally the newest backup. The best checkpoint is kept unless
    --no-keep-best. With --remote, a checkpoint without a
    verified local backup (same files, sizes and mtimes) is kept unless
    --force. Each checkpoint disappears whole; an interrupted run is finished
    by the next one.

    Before anything older is removed, the newest backup kept is verified
    (every file re-read against its checksum); one that fails is kept, the
    newest that verifies is kept too, and when none verifies nothing is removed.

    Exit 2 without any --keep rule, 3 when a checkpoint could not be removed,
    11 when another run holds the backup directory (--wait waits for it),
    30 when a backup failed verification or a manifest is damaged.
    """
    from ckptsync.prune import PruneOptions, run_prune
    from ckptsync.retention import Policy, parse_duration
    from ckptsync.stores import open_store, refuse

    policy = Policy(keep_last=keep_last, keep_best=keep_best, keep_every=keep_every,
                    keep_within=parse_duration(keep_within) if keep_within is not None else 0.0)
    t = o.target(config, instance, host, remote_dir, local_dir, accept_new_host_key, need_remote=remote)
    store = open_store(t)
    refuse(store, "--remote", remote, needs="files_here")
    refuse(store, "--wait", wait, needs="files_here")   # a bucket's lease is never waited for
    out = output()
    if keep_best and no_keep_best:
        raise UsageError("give --keep-best or --no-keep-best, not both")
    result = run_prune(t, PruneOptions(policy=policy, remote=remote, dry_run=dry_run, force=force,
                                       keep_best=not no_keep_best, keep_generations=keep_generations, wait=wait),
                       out.reporter())
    return out.render(result, show_prune)


def prune_table(r: PruneResult, plain: bool, wide: int) -> TextTable:
    """wide 3: with the modification time and why; 2: with the age and why; 1: the age, why below;
    0: name, step and size. Plain rows: one word a cell, why last (the rest of the line)."""
    gone = "remove" if r.dry_run else "removed"
    cols: list = [Column("", plain_header="action"), "name", "step", "size"]
    cols += ["modified"] if wide == 3 else ["age"] if wide else []
    cols += ["why"] if wide >= 2 else []
    tab = TextTable.of(*cols)
    for e in r.entries:
        action = "keep" if e.keep else (gone if r.dry_run or e.removed else "FAILED")
        cells = [action, e.name, "-" if e.step is None else str(e.step), size_cell(e.size, plain)]
        cells += [stamp(e.mtime) if plain else when(e.mtime)] if wide == 3 else [age(e.mtime)] if wide else []
        cells += ["; ".join(e.reasons)] if wide >= 2 else []
        tab.add(*cells)
    return tab


def show_prune(out: Output, r: PruneResult) -> None:
    for w in r.warnings:
        out.warn(w)
    out.result(f"{'server' if r.side == 'server' else 'backups'}: {r.where}")
    if r.generations:
        out.paragraph(f"{'would remove' if r.dry_run else 'removed'} {len(r.generations)} earlier version(s): "
                      f"{', '.join(r.generations)}")
    if not r.entries and r.policy_empty:
        return
    if not r.entries:
        out.result("no checkpoints: nothing to prune")
        return
    plain = out.width is None
    drawn = out.table([prune_table(r, plain, wide) for wide in ((3,) if plain else (3, 2, 1, 0))])
    if "why" not in [c.header for c in drawn.columns]:   # the reasons did not fit in the table
        for e in r.entries:
            out.paragraph("; ".join(e.reasons), indent="    ", first=f"  {e.name}: ")
    for name, why in r.failed.items():
        out.warn(f"{name}: {why}")
    if r.deleted_objects or r.aborted_uploads:
        verb = "would remove" if r.dry_run else "removed"
        out.result(f"{verb} {r.deleted_objects} object(s) no manifest names ({human(r.deleted_bytes)})"
                   + (f"; {'would abort' if r.dry_run else 'aborted'} {r.aborted_uploads} unfinished upload(s)"
                      if r.aborted_uploads else ""))
    unbacked = [e.name for e in r.entries if e.keep and "no verified local backup" in e.reasons]
    if unbacked:
        out.warn(f"kept without a verified local backup: {', '.join(unbacked)} "
                 "(back them up first, or use --force)")
    kept = len(r.entries) - len(r.doomed)
    if r.dry_run:
        out.result(f"dry run: would remove {len(r.doomed)} of {len(r.entries)} and keep {kept}, "
                   f"freeing {human(r.freed_bytes)}; nothing was changed")
    elif not r.doomed:
        out.result(f"nothing to remove: all {kept} kept")
    else:
        out.result(f"removed {len(r.removed)} of {len(r.entries)} ({', '.join(r.removed) or 'none'}), "
                   f"kept {kept}; freed {human(r.freed_bytes)}")
