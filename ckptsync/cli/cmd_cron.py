"""ckptsync cron install | show | remove"""

from __future__ import annotations

import time
from typing import Annotated, Optional

import typer

from ckptsync import cron
from ckptsync.cli import options as o
from ckptsync.cli.context import render
from ckptsync.policy import last_run_summary
from ckptsync.output import Output, ago

HELP = "Run `ckptsync backup` from your crontab: one entry per target, installed, shown or removed."

Every = Annotated[str, typer.Option("--every", help="How often, e.g. 15m, 30m, 1h, 2h, 1d or 1w: a divisor of an hour or of a day. Hourly and longer runs keep the current minute (and hour).")]
# The global --log-file, with what it also means here (named log_file, it gets the value given
# before or after the command name alike).
CronLogFile = Annotated[Optional[str], typer.Option("--log-file", help="Log of the cron runs (default: <backup dir>/.ckptsync/cron.log); this command logs there too.", show_default=False)]


def install_cmd(
    instance: o.Instance = None, host: o.Host = None, remote_dir: o.RemoteDir = None,
    local_dir: o.LocalDir = None, config: o.Config = None,
    every: Every = "30m", log_file: CronLogFile = None,
) -> int:
    """Add the crontab entry that backs up this target, or replace it when there is one.

    The entry runs `backup --quiet --skip-if-locked` with this Python, the config
    file in use and the target options given here, logs to the log file and
    sends no mail. Other lines of the crontab are left as they are.
    """
    t = o.target(config, instance, host, remote_dir, local_dir)
    job = cron.CronJob(instance=instance, host=host, remote_dir=remote_dir, config=config, every=every,
                       log_file=log_file)
    # The Output (which opens the log) is built after install made the log's directory.
    return render(cron.install(t, job, cron.Crontab()), show_installed)


def show_installed(out: Output, r: cron.CronResult) -> None:
    done = {"installed": "installed", "replaced": "replaced", "unchanged": "already installed"}[r.action]
    out.result(f"{done}: cron entry for {r.target} ({r.backup_dir}), every {r.every} ({r.schedule})")
    out.result(f"  log file: {r.log_file}")
    out.result(f"  {r.line}")


def show_cmd(
    instance: o.Instance = None, host: o.Host = None, remote_dir: o.RemoteDir = None,
    local_dir: o.LocalDir = None, config: o.Config = None,
) -> int:
    """The crontab entry of this target, how its last run went, and the end of its log."""
    t = o.target(config, instance, host, remote_dir, local_dir, need_remote=False)
    return render(cron.show(t, cron.Crontab()), show_entry)


def show_entry(out: Output, r: cron.CronResult) -> None:
    if r.installed:
        every = f"every {r.every} ({r.schedule})" if r.every else f"schedule {r.schedule or '?'}"
        out.result(f"cron entry for {r.target} ({r.backup_dir}): {every}")
        out.result(f"  {r.line or '(the marker line has no job line after it: run cron install again)'}")
    else:
        out.result(f"no cron entry for {r.target} ({r.backup_dir})")
        _others(out, r)
    out.result(last_run_text(r.last_run))
    if r.stale:
        out.warn("no run recorded for longer than two intervals; run the entry's command by hand to see why")
    if r.log_tail:
        n = len(r.log_tail)
        out.result(f"log {r.log_file} (last {n} line{'' if n == 1 else 's'}):")
        for line in r.log_tail:
            out.result(f"  {line}")


def remove_cmd(
    instance: o.Instance = None, host: o.Host = None, remote_dir: o.RemoteDir = None,
    local_dir: o.LocalDir = None, config: o.Config = None,
) -> int:
    """Remove this target's crontab entry; other lines are left as they are."""
    t = o.target(config, instance, host, remote_dir, local_dir, need_remote=False)
    return render(cron.remove(t, cron.Crontab()), show_removed)


def show_removed(out: Output, r: cron.CronResult) -> None:
    if r.action == "removed":
        out.result(f"removed the cron entry for {r.target} ({r.backup_dir})")
    else:
        out.result(f"no cron entry for {r.target} ({r.backup_dir}); nothing to remove")
        _others(out, r)


def _others(out: Output, r: cron.CronResult) -> None:
    if r.others:
        listed = ", ".join(f"{e['target']} -> {e['backup_dir']}" for e in r.others)
        out.result(f"  other ckptsync entries (select them with --local-dir): {listed}")


def last_run_text(status: dict | None, now: float | None = None) -> str:
    """One line about the last recorded backup run, from .ckptsync/status.json."""
    if not status:
        return "last run: none recorded"
    return f"last run {ago(status.get('time'), now or time.time())}: {last_run_summary(status)[1]}"
