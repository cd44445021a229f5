"""ckptsync list"""

from __future__ import annotations

import functools
from typing import Annotated

import typer

from ckptsync.cli import options as o
from ckptsync.cli.context import render
from ckptsync.listing import ListResult, run_list
from ckptsync.policy import last_run_summary
from ckptsync.output import Output, ago, human, table, when


def list_cmd(
    instance: o.Instance = None, host: o.Host = None, remote_dir: o.RemoteDir = None,
    local_dir: o.LocalDir = None, config: o.Config = None, accept_new_host_key: o.AcceptNew = False,
    local: Annotated[bool, typer.Option("--local", help="Only the backup directory; no connection.")] = False,
) -> int:
    """List checkpoints on the server and in the backup directory, newest first."""
    t = o.target(config, instance, host, remote_dir, local_dir, accept_new_host_key, need_remote=not local)
    result = run_list(t, local_only=local)
    return render(result, functools.partial(show_list, remote_dir=None if local else t.remote_dir),
                  ListResult.to_rows)


def show_list(out: Output, result: ListResult, remote_dir: str | None) -> None:
    where = f"server: {result.server}  " if result.server else ""
    out.result(f"{where}backups: {result.dest}")
    if not result.rows:
        out.result("no checkpoints found" + (f" in {remote_dir}" if remote_dir else ""))
        return
    tab = table("", "name", "step", "kind", "size", "modified", "state", "contents", "backed up")
    for r in result.rows:
        state = "-" if r.complete is None else ("complete" if r.complete else f"in progress: {r.reason}")
        if r.meta_error:
            state += " (metadata unreadable)"
        tab.add_row("*" if r.is_best else "", r.name, "-" if r.step is None else str(r.step), r.kind,
                    human(r.size), when(r.mtime), state,
                    "resumable" if r.resumable else r.content, r.backup)
    out.rich(tab)
    footer = [f"server total {human(result.total_server)}"] if result.server else []
    footer.append(f"backed up {human(result.total_local)}")
    if any(r.is_best for r in result.rows):
        footer.append("* = best checkpoint")
    out.result("  ".join(footer))
    if result.last_backup:
        lb = result.last_backup
        out.result(f"last backup: {ago(lb.get('time'))}, {last_run_summary(lb)[1]}")
    for r in result.rows:
        if r.meta_error:
            out.warn(f"{r.name}: {r.meta_error}")
    if result.unmanaged:
        out.warn(f"not made by ckptsync (no manifest): {', '.join(result.unmanaged[:5])}")
