"""A backup run's record in status.json, written whether the run ends well or not."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ckptsync import notify
from ckptsync.disk import io_error
from ckptsync.errors import CkptsyncError, ConfigError, IntegrityError, Interrupted, Locked, NotFound, UsageError
from ckptsync.policy import run_status
from ckptsync.server import Server

if TYPE_CHECKING:
    from ckptsync.backup import Backup
    from ckptsync.backup_plan import BackupResult


def run_job(job: "Backup", server: Server | None = None) -> BackupResult:
    """Run `job` and record how it went, failed runs too (not a dry run, nor a refusal before the lock)."""
    opts = job.opts
    try:
        try:
            result = job.run(server)
        except OSError as exc:  # every laptop-side write failure is one line with exit 5
            raise io_error(exc, f"writing in {job.store.root}") from None
    except Locked:
        raise  # another run is doing the work; its result, not this refusal, is the last backup
    except CkptsyncError as exc:
        if not opts.dry_run and (job.touched or not _refusal(exc)):
            record_run(job, exc.exit_code, exc.message)
        raise
    except KeyboardInterrupt:
        if not opts.dry_run:
            record_run(job, Interrupted.exit_code, "interrupted")
        raise
    busy = result.fetched or result.failed or result.restamped or result.deleted_on_server
    if not opts.dry_run and (job.record_idle or busy):
        record_run(job, result.exit_code, "; ".join(f"{k}: {v}" for k, v in result.failed.items()))
    return result


def _refusal(exc: CkptsyncError) -> bool:
    """A manual run refused before it took the lock (a usage error, nothing found, a config error) is
    not a backup result: the last real one stays. A scheduled run is always recorded, so that
    cron show and checklist see an entry that keeps failing."""
    return isinstance(exc, (UsageError, NotFound, ConfigError)) and not notify.scheduled()


def record_run(job: Backup, code: int, error: str, final: bool = True) -> None:
    """status.json for this run; `final`: the run's end, which may also send a notification."""
    if not job.store.root.exists():
        return  # a run that never got to write leaves no trace (it may have been refused for space)
    r = job.result
    status = run_status(time.time(), code, error, r.target, r.server, r.fetched, r.failed, r.current,
                        notify.scheduled(), restamped=r.restamped, generations=r.generations,
                        skipped={p.name: p.reason for p in r.plan if p.action == "skip"},
                        not_backed_up=r.not_backed_up, deleted_on_server=r.deleted_on_server,
                        raw_bytes=r.raw_bytes, wire_bytes=r.wire_bytes, seconds=round(r.seconds, 3),
                        command=job.command)
    try:
        job.store.record_status(status)
    except IntegrityError:
        return  # a backup directory refused for a symlink in its bookkeeping: nothing is written there
    except OSError as exc:
        r.warnings.append(f"could not record this run in {job.store.meta}: {exc.strerror or exc} "
                          "(list, cron show and checklist will not see it)")
    sent = notify.after_run(status) if final else ""
    if sent:
        job.rep.info(sent)
