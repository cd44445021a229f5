"""ckptsync checklist"""

from __future__ import annotations

import functools
from typing import Annotated

import typer

from ckptsync.checklist import ChecklistResult, run_checklist
from ckptsync.cli import options as o
from ckptsync.cli.context import output
from ckptsync.output import Output


def checklist_cmd(
    instance: o.Instance = None, host: o.Host = None, remote_dir: o.RemoteDir = None,
    local_dir: o.LocalDir = None, config: o.Config = None, accept_new_host_key: o.AcceptNew = False,
    backup: Annotated[bool, typer.Option("--backup", help="Run the missing backup first, then check.")] = False,
) -> int:
    """May I delete this instance now? Exit 0 only when it is safe; otherwise 3 and what to do.

    Checks: the server answers; training has stopped; the newest complete
    checkpoint is backed up and re-verifies now; extra files are backed up
    and identical; the last backup succeeded.
    """
    t = o.target(config, instance, host, remote_dir, local_dir, accept_new_host_key)
    out = output()
    result = run_checklist(t, backup_first=backup, rep=out.reporter())
    return out.render(result, functools.partial(show_checklist, remote_dir=t.remote_dir))


def show_checklist(out: Output, result: ChecklistResult, remote_dir: str) -> None:
    out.result(f"pre-shutdown checklist for {result.server} ({remote_dir})")
    for c in result.checks:
        mark = "[ok]  " if c.ok else "[FAIL]"
        out.result(f"  {mark} {c.name}: {c.detail}")
        if c.fix:
            out.result(f"         fix: {c.fix}")
    if result.safe:
        out.result("SAFE: everything on this server that matters is backed up and verified.")
    else:
        out.result("NOT SAFE to delete this instance yet.")
