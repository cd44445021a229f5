"""ckptsync checklist"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Annotated

import typer

from ckptsync.cli import options as o
from ckptsync.cli.context import output
from ckptsync.cli.many import show_each
from ckptsync.output import Output, command_lines, where_lines

if TYPE_CHECKING:
    from ckptsync.checklist import ChecklistResult
    from ckptsync.multi import ManyResult


def checklist_cmd(
    instance: o.Instances = None, all_instances: o.AllInstances = False, host: o.Host = None,
    remote_dir: o.RemoteDir = None,
    local_dir: o.LocalDir = None, config: o.Config = None, accept_new_host_key: o.AcceptNew = False,
    extra_file: o.ExtraFile = None,
    backup: Annotated[bool, typer.Option("--backup", help="Run the missing backup first, then check.")] = False,
    training_stopped: Annotated[bool, typer.Option(
        "--training-stopped",
        help="Training has stopped: do not judge it by processes or the save cadence (a file being "
             "written now still fails the check).")] = False,
) -> int:
    """May I delete this instance now? Exit 0 only when it is safe; otherwise 3 and what to do.

    Checks: the server answers; training has stopped (no process of this
    run training, no GPU in use by one, nothing being written); the newest
    complete checkpoint is backed up and re-verifies now; the extra files
    have the server's content and their copies re-verify; the last backup
    succeeded. Several instances (-i 0 -i 1, or --all-instances) are
    checked in parallel; exit 0 only when every one is safe.
    """
    from ckptsync.checklist import run_checklist
    from ckptsync.multi import run_many

    ts = o.with_extra_files(o.targets(config, instance, all_instances, host, remote_dir, local_dir,
                                      accept_new_host_key), extra_file)
    out = output()

    def check(t, rep):
        return run_checklist(t, backup_first=backup, rep=rep, training_stopped=training_stopped)

    if len(ts) > 1:
        many = run_many("checklist", ts, check, out.reporter())
        return out.render(many, functools.partial(show_checklists, remote_dirs={t.label: t.remote_dir for t in ts}))
    t = ts[0]
    result = check(t, out.reporter())
    return out.render(result, functools.partial(show_checklist, remote_dir=t.remote_dir))


def show_checklist(out: Output, result: ChecklistResult, remote_dir: str) -> None:
    out.result("pre-shutdown checklist")
    for line in where_lines("server:  ", result.server, remote_dir, out.width):
        out.result(line)
    for c in result.checks:
        mark = "[ok]  " if c.ok else "[FAIL]"
        out.paragraph(f"{c.name}: {c.detail}", indent=" " * 9, first=f"  {mark} ")
        if c.fix:
            show_fix(out, c.fix)
    for note in result.notes:
        out.paragraph(note, indent=" " * 8, first="  note: ")
    for warning in result.warnings:
        out.warn(warning)
    if result.safe:
        out.paragraph("SAFE: everything on this server that matters is backed up and verified.")
    else:
        out.result("NOT SAFE to delete this instance yet.")


def show_fix(out: Output, fix: str) -> None:
    """A fix is a command (with maybe another after "(or: ...)") or a sentence; commands stay
    pasteable when laid out for the width."""
    first, _, other = fix.partition("   (or: ")
    for label, text in (("fix: ", first), (" or: ", other.removesuffix(")"))):
        if not text:
            continue
        lead = " " * 9 + label
        if text.startswith("ckptsync "):
            for line in command_lines(text, out.width, lead, " " * (len(lead) + 4)):
                out.result(line)
        else:
            out.paragraph(text, indent=" " * len(lead), first=lead)


def show_checklists(out: Output, many: ManyResult, remote_dirs: dict[str, str]) -> None:
    show_each(out, many, lambda out, r: show_checklist(out, r, remote_dirs.get(r.target, "")))
    out.result("")
    for o in many.outcomes:
        safe = o.result is not None and o.result.safe
        out.result(f"{o.target}: {'SAFE' if safe else 'NOT SAFE'}" + (f" ({o.error})" if o.error else ""))
