"""What a command shows alike for a backup directory and a bucket store."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckptsync.errors import Locked
from ckptsync.output import Column, Output, TextTable, human, size_cell

if TYPE_CHECKING:
    from ckptsync.listing import ListResult
    from ckptsync.restore_all import RestoreAllResult


def run_or_skip(out, label: str, dest: str, run, skip_if_locked: bool, show) -> int:
    """run() rendered by show; with --skip-if-locked, a lock held by another run is one line and exit 0,
    unless that run has made no progress for longer than the stall limit: then it is exit 11."""
    try:
        result = run()
    except Locked as exc:
        if not skip_if_locked or exc.stuck:
            raise
        from ckptsync.result import Skipped

        out.info(f"skipped: {exc.message}")
        return out.render(Skipped(label, dest, exc.message), lambda out, r: None)
    return out.render(result, show)


def show_generations(out: Output, result: ListResult) -> None:
    if not result.generations:
        return
    out.paragraph("earlier versions (restore one with --checkpoint NAME --generation N):")
    tab = TextTable.of("name", "N", Column("backed up (UTC)", plain_header="backed_up_utc"), "step", "size",
                       "files")
    for name, gens in sorted(result.generations.items()):
        for g in gens:
            tab.add(name, g.index, g.id, "-" if g.step is None else g.step, size_cell(g.size, out.width is None),
                    g.files)
    out.table([tab])


def show_restore_all(out: Output, result: RestoreAllResult) -> None:
    from ckptsync.restore_all import RESTORED, SKIPPED, WOULD

    for w in result.warnings:
        out.warn(w)
    for item in result.failed:
        out.warn(f"{item.checkpoint}: {item.error or item.outcome}")
    if out.quiet and not result.failed:
        return
    tab = TextTable.of("checkpoint", "step", "size", "result")
    for item in result.items:
        tab.add(item.checkpoint, "-" if item.step is None else item.step, human(item.size), item.outcome)
    out.table([tab])
    for item in result.items:
        if item.outcome == SKIPPED:
            out.paragraph(f"{item.checkpoint}: skipped, {item.error}", indent="    ", first="  ")
    if result.dry_run:
        out.result(f"dry run: would restore {sum(1 for i in result.items if i.outcome == WOULD)} checkpoints "
                   f"from {result.source} to {result.server}:{result.remote_dir}; nothing was changed")
        return
    restored = sum(1 for i in result.items if i.outcome == RESTORED)
    out.result(f"restored {restored} of {len(result.items)} checkpoints to {result.server}:{result.remote_dir}, "
               f"{human(result.sent_bytes)} sent "
               + ("from the bucket straight to the server, " if result.direct
                  else f"({human(result.wire_bytes)} on the wire), ") +
               f"{sum(1 for i in result.items if i.outcome == SKIPPED)} skipped, "
               f"{len(result.failed)} failed; {result.seconds:.1f}s")
    if result.restores:
        out.result(result.restores[0].resume_hint)
