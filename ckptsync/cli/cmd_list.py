"""ckptsync list"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Annotated

import typer

from ckptsync.cli import options as o
from ckptsync.cli.context import render
from ckptsync.cli.many import show_each
from ckptsync.cli.shared import show_generations
from ckptsync.policy import last_run_summary
from ckptsync.output import Column, Output, TextTable, age, ago, human, size_cell, stamp, when, where_lines

if TYPE_CHECKING:
    from ckptsync.listing import ListResult, Row


def list_cmd(
    instance: o.Instances = None, all_instances: o.AllInstances = False, host: o.Host = None,
    remote_dir: o.RemoteDir = None,
    local_dir: o.LocalDir = None, config: o.Config = None, accept_new_host_key: o.AcceptNew = False,
    local: Annotated[bool, typer.Option("--local", help="Only the backup directory; no connection.")] = False,
    generations: Annotated[bool, typer.Option("--generations", help="Also the earlier versions kept of reused names (latest.pt, a checkpoint that changed).")] = False,
) -> int:
    """List checkpoints on the server and in the backup directory, newest first.

    Several instances (-i 0 -i 1, or --all-instances) are asked in parallel and
    listed one after the other; the exit code is the worst of theirs.
    """
    from ckptsync.listing import run_list
    from ckptsync.multi import run_many

    ts = o.targets(config, instance, all_instances, host, remote_dir, local_dir, accept_new_host_key,
                   need_remote=not local)
    if len(ts) > 1:
        many = run_many("list", ts, lambda t, _rep: run_list(t, local_only=local, generations=generations))
        return render(many, lambda out, m: show_each(out, m, lambda out, r: show_list(out, r, None if local else r.remote_dir)))
    t = ts[0]
    result = run_list(t, local_only=local, generations=generations)
    return render(result, functools.partial(show_list, remote_dir=None if local else t.remote_dir))


def show_list(out: Output, result: ListResult, remote_dir: str | None) -> None:
    checked = result.server is not None
    if checked:
        for line in where_lines("server:  ", result.server, result.remote_dir or remote_dir, out.width):
            out.result(line)
    out.paragraph(result.dest, indent="         ", first="backups: ")
    for w in result.warnings:
        out.warn(w)
    if result.stopped:
        out.warn(f"the server's listing is incomplete ({result.stopped}): checkpoints past that point "
                 "are not shown")
    if not result.rows and remote_dir is None and result.empty_hint:
        out.warn(result.empty_hint)   # copies made without ckptsync: there are checkpoints, without manifests
        return
    if not result.rows:
        out.result("no checkpoints found" + (f" in {result.remote_dir or remote_dir}" if remote_dir else ""))
        if result.empty_hint:
            out.warn(result.empty_hint)
        return
    plain = out.width is None
    out.table([list_table(result.rows, checked, plain, wide) for wide in (2, 1, 0)])
    totals = []
    if checked:
        totals.append(f"on the server: {sum(1 for r in result.rows if r.on_server)}, {human(result.total_server)}")
    totals.append(f"backed up: {len(result.backed_up)}, {human(result.total_local)}")
    out.paragraph("; ".join(totals))
    if result.last_backup:
        lb = result.last_backup
        out.paragraph(f"last backup: {ago(lb.time)}, {last_run_summary(lb)[1]}", indent="  ")
    for line in legend(result.rows, checked):
        out.paragraph(line, indent="  ")
    for r in result.rows:
        if r.reason and r.complete is False:
            out.paragraph(f"{r.name} ({r.state}): {r.reason}", indent="  ")
        if r.meta_error:
            out.paragraph(f"{r.name}: metadata unreadable (the warning says why)", indent="  ")
    for r in result.rows:
        if r.meta_error:
            out.warn(f"{r.name}: {r.meta_error}")
    for name, why in result.damaged.items():
        out.warn(f"{name}: {why}")
    if result.unmanaged:
        out.warn(f"not made by ckptsync (no manifest): {', '.join(result.unmanaged[:5])}")
    if result.staging_note:
        out.warn(result.staging_note)
    if result.unfinished_uploads:
        out.result(f"{result.unfinished_uploads} unfinished upload(s) in {result.dest}: the next backup "
                   "resumes them, prune aborts them")
    show_runs(out, result)
    show_generations(out, result)


def show_runs(out: Output, result: ListResult) -> None:
    for r in result.runs:
        if r.covered:
            out.paragraph(f"run {r.name}: {r.checkpoints} complete checkpoint(s), newest backed up in "
                          f"{r.local_dir}", indent="  ")
        else:
            out.warn(f"newer run on the server: {r.path} ({r.problem}); back up with: {result.follow_hint}")


# Short words for the contents column: what the checkpoint can be used for.
CONTENTS = {
    "exact": "resumes exactly",
    "no-rng": "resumes without the RNG state (data order differs)",
    "full": "full contents, not usable to resume (see below)",
    "partial": "part of the training state is missing",
    "adapter": "adapter weights only",
    "weights": "model weights only",
    "optim": "optimizer state only",
    "unknown": "contents not recognised",
    "damaged": "its manifest is damaged (the warning says how)",
}
BACKUP = {"old": "backed up, but the server's copy changed since", "local": "only in the backup directory",
          "damaged": "its manifest is damaged: not a usable backup"}
STATE = {"writing": "still being written (why: below)", "abandoned": "incomplete and untouched for long",
         "unreadable": "could not be listed or read whole on the server (why: below)",
         "restored": "weights put there by restore --adapter-only, not a save in progress"}
STYLES = {"writing": "yellow", "abandoned": "red", "unreadable": "red", "no": "red", "old": "yellow", "yes": "green",
          "complete": "green", "damaged": "red"}


def contents_word(r: Row) -> str:
    if r.resumable:
        return "exact" if r.content == "full" else "no-rng"
    return {"adapter-only": "adapter", "weights-only": "weights", "optimizer-only": "optim",
            "no-rng": "partial"}.get(r.content, r.content)


def backup_word(r: Row) -> str:
    return {"outdated": "old", "local only": "local"}.get(r.backup, r.backup)


def list_table(rows: list[Row], checked: bool, plain: bool, wide: int) -> TextTable:
    """wide 2: kind and the modification time; 1: kind and age; 0: age only. Plain rows: one word a cell."""
    cols: list = [Column("", plain_header="best"), "name", "step"]
    cols += ["kind"] if wide or plain else []
    cols += ["size", "modified" if wide == 2 or plain else "age"]
    cols += ["state", "contents", "backup"] if checked else ["contents"]
    tab = TextTable.of(*cols)
    for r in rows:
        size = size_cell(r.size, plain)
        modified = stamp(r.mtime) if plain else (when(r.mtime) if wide == 2 else age(r.mtime))
        cells = ["*" if r.is_best else "", r.name, "-" if r.step is None else r.step]
        cells += [r.kind] if wide or plain else []
        cells += [size, modified]
        cells += [r.state or "-", contents_word(r), backup_word(r)] if checked else [contents_word(r)]
        tab.add(*cells, styles={i: STYLES[c] for i, c in enumerate(map(str, cells)) if i > 2 and c in STYLES})
    return tab


def legend(rows: list[Row], checked: bool) -> list[str]:
    """One line per column whose words need explaining, naming only the words on the screen."""
    lines = ["* best checkpoint"] if any(r.is_best for r in rows) else []
    for title, words, table in (("state", {r.state for r in rows}, STATE if checked else {}),
                                ("contents", {contents_word(r) for r in rows}, CONTENTS),
                                ("backup", {backup_word(r) for r in rows}, BACKUP if checked else {})):
        shown = [f"{w} = {text}" for w, text in table.items() if w in words]
        if shown:
            lines.append(f"{title}: " + "; ".join(shown))
    return lines
