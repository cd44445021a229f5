"""ckptsync cron install | show | remove"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Annotated, Callable, Optional

import typer

from ckptsync.cli import options as o
from ckptsync.cli.context import render, settings
from ckptsync.cli.many import show_each
from ckptsync.policy import RunStatus, last_run_summary
from ckptsync.output import Output, ago

if TYPE_CHECKING:
    from ckptsync.cron import CronResult

HELP = "Run `ckptsync backup` from your crontab: one entry per target, installed, shown or removed."

Every = Annotated[str, typer.Option("--every", metavar="INTERVAL", help="How often, e.g. 15m, 30m, 1h, 2h, 1d or 1w: a divisor of an hour or of a day. Hourly and longer runs keep the current minute (and hour).")]
# The global --log-file, with what it also means here (named log_file, it gets the value given
# before or after the command name alike).
CronLogFile = Annotated[Optional[str], typer.Option("--log-file", metavar="FILE", help="Log of the cron runs (default: <backup dir>/.ckptsync/cron.log); this command logs there too.", show_default=False)]
Notify = Annotated[bool, typer.Option("--notify", help="When a scheduled run fails, show a desktop notice (notify-send on Linux, osascript on macOS).")]


def install_cmd(
    instance: o.Instances = None, all_instances: o.AllInstances = False, host: o.Host = None,
    remote_dir: o.RemoteDir = None,
    local_dir: o.LocalDir = None, config: o.Config = None,
    every: Every = "30m", log_file: CronLogFile = None, notify: Notify = False,
) -> int:
    """Add the crontab entry that backs up this target, or replace it when there is one.

    The entry runs `backup --quiet --skip-if-locked` with this Python, the config
    file in use, the target options given here and the SSH client chosen with
    --ssh or $CKPTSYNC_SSH, logs to the log file and
    sends no mail. Other lines of the crontab are left as they are. A target
    whose host does not resolve is refused (exit 4); a missing cron daemon is
    reported. Several instances (-i 0 -i 1, or --all-instances) get one entry
    each; the exit code is the worst of theirs.
    """
    from ckptsync import cron
    from ckptsync.multi import run_many

    ts = o.targets(config, instance, all_instances, host, remote_dir, local_dir)
    job = cron.CronJob(instance=instance[0] if instance else None, host=host, remote_dir=remote_dir, config=config,
                       every=every, log_file=log_file, notify=notify,
                       ssh=settings().ssh or os.environ.get("CKPTSYNC_SSH") or None)
    if len(ts) > 1:
        def one(t, _rep):  # one at a time: each install rewrites the crontab
            return cron.install(t, replace(job, instance=t.label.removeprefix("instance-")), cron.Crontab())

        return render(run_many("cron install", ts, one, parallel=False),
                      lambda out, many: show_each(out, many, show_installed))
    t = ts[0]
    # The Output (which opens the log) is built after install made the log's directory.
    return render(cron.install(t, job, cron.Crontab()), show_installed)


def show_installed(out: Output, r: CronResult) -> None:
    done = {"installed": "installed", "replaced": "replaced", "unchanged": "already installed"}[r.action]
    out.result(f"{done}: cron entry for {r.target}, every {r.every} ({r.schedule})")
    out.paragraph(r.backup_dir or "", indent="    ", first="  backups:  ")
    out.paragraph(r.log_file or "", indent="    ", first="  log file: ")
    if r.notify:
        out.result("  a failed run shows a desktop notice")
    out.paragraph(r.line or "", indent="      ", first="  ")  # wrapped on a terminal, whole in a pipe
    for w in r.warnings:
        out.warn(w)


def _entry_command(action: str, show: Callable[[Output, CronResult], None], doc: str) -> Callable[..., int]:
    """A command that runs cron.<action> on one target's crontab entry and renders the result with `show`."""
    def command(
        instance: o.Instance = None, host: o.Host = None, remote_dir: o.RemoteDir = None,
        local_dir: o.LocalDir = None, config: o.Config = None,
    ) -> int:
        from ckptsync import cron

        t = o.target(config, instance, host, remote_dir, local_dir, need_remote=False)
        return render(getattr(cron, action)(t, cron.Crontab()), show)

    command.__name__ = command.__qualname__ = f"{action}_cmd"
    command.__doc__ = doc
    return command


def show_entry(out: Output, r: CronResult) -> None:
    if r.installed:
        every = f"every {r.every} ({r.schedule})" if r.every else f"schedule {r.schedule or '?'}"
        out.result(f"cron entry for {r.target}: {every}{', desktop notice on failure' if r.notify else ''}")
        out.paragraph(r.backup_dir, indent="    ", first="  backups: ")
        out.paragraph(r.line or "(the marker line has no job line after it: run cron install again)",
                      indent="      ", first="  ")
    else:
        out.paragraph(f"no cron entry for {r.target} ({r.backup_dir})", indent="  ")
        _others(out, r)
    out.paragraph(last_run_text(r.last_scheduled, label="last scheduled run"), indent="  ")
    out.paragraph(last_run_text(r.last_manual, label="last manual run"), indent="  ")
    if r.stale:
        out.warn("no scheduled run recorded for longer than two intervals; "
                 "run the entry's command by hand to see why")
    for w in r.warnings:
        out.warn(w)
    if r.log_tail:
        n = len(r.log_tail)
        out.paragraph(f"log {r.log_file} (last {n} line{'' if n == 1 else 's'}):", indent="  ")
        for line in r.log_tail:
            out.result(f"  {line}")


def show_removed(out: Output, r: CronResult) -> None:
    if r.action == "removed":
        out.paragraph(f"removed the cron entry for {r.target} ({r.backup_dir})", indent="  ")
        if r.removed_dir:
            out.paragraph(f"{r.backup_dir} held no backups and was removed too", indent="  ", first="  ")
    else:
        out.paragraph(f"no cron entry for {r.target} ({r.backup_dir}); nothing to remove", indent="  ")
        _others(out, r)


show_cmd = _entry_command("show", show_entry,
                          "The crontab entry of this target, how its last run went, and the end of its log.")
remove_cmd = _entry_command("remove", show_removed,
                            "Remove this target's crontab entry; other lines are left as they are.")


def _others(out: Output, r: CronResult) -> None:
    if r.others:
        listed = ", ".join(f"{e['target']} -> {e['backup_dir']}" for e in r.others)
        out.paragraph(f"other ckptsync entries (select them with --local-dir): {listed}", indent="    ", first="  ")


def last_run_text(status: RunStatus | None, now: float | None = None, label: str = "last run") -> str:
    """One line about a recorded backup run, from .ckptsync/status*.json."""
    if not status:
        return f"{label}: none recorded"
    return f"{label} {ago(status.time, now or time.time())}: {last_run_summary(status)[1]}"
