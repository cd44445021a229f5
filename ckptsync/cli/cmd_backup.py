"""ckptsync backup"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Annotated, Optional

import typer

from ckptsync.backup import BackupOptions, BackupResult, discard_staging, run_backup
from ckptsync.cli import options as o
from ckptsync.cli.context import output
from ckptsync.errors import Locked, UsageError
from ckptsync.output import Output, human


@dataclass
class Skipped:
    """--skip-if-locked met a lock: the run holding it does the work."""

    target: str
    dest: str
    skipped: str
    exit_code: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def backup_cmd(
    instance: o.Instance = None, host: o.Host = None, remote_dir: o.RemoteDir = None,
    local_dir: o.LocalDir = None, config: o.Config = None, accept_new_host_key: o.AcceptNew = False,
    max_checkpoints: Annotated[int, typer.Option("--max-checkpoints", "-k", min=1, help="How many of the newest complete checkpoints.")] = 2,
    checkpoint: Annotated[Optional[list[str]], typer.Option("--checkpoint", help="Back up this checkpoint (repeatable).", show_default=False)] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every complete checkpoint.")] = False,
    include_best: Annotated[bool, typer.Option("--include-best", help="Also the best checkpoint (trainer_state.json), when older.")] = False,
    compress: o.Compress = "auto",
    no_extra_files: Annotated[bool, typer.Option("--no-extra-files", help="Skip the configured extra_files.")] = False,
    dry_run: o.DryRun = False,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for another run on the same backup directory instead of exiting 11.")] = False,
    skip_if_locked: Annotated[bool, typer.Option("--skip-if-locked", help="When another run holds the lock, log one line and exit 0 (for cron).")] = False,
    discard_staged: Annotated[bool, typer.Option("--discard-staged", help="Only delete what interrupted backups left in staging (kept to resume them).")] = False,
) -> int:
    """Fetch complete checkpoints from the server, verified, into the backup directory.

    Default: the 2 newest complete checkpoints plus extra_files. Checkpoints
    still being written are skipped. Safe to run from cron.
    """
    if wait and skip_if_locked:
        raise UsageError("give --wait or --skip-if-locked, not both")
    opts = BackupOptions(max_checkpoints=max_checkpoints, names=list(checkpoint or []), all=all_,
                         include_best=include_best, compress=o.parse_compress(compress), dry_run=dry_run,
                         wait=wait, extra_files=not no_extra_files)
    t = o.target(config, instance, host, remote_dir, local_dir, accept_new_host_key, need_remote=not discard_staged)
    out = output()
    if discard_staged:
        held = discard_staging(t, dry_run)
        return out.render(Discarded(t.label, str(t.local_dir), held, dry_run), show_discarded)
    out.info(f"backup {t.describe()}:{t.remote_dir} -> {t.local_dir}")
    try:
        result = run_backup(t, opts, out.reporter())
    except Locked as exc:
        if not skip_if_locked:
            raise
        out.info(f"skipped: {exc.message}")
        return out.render(Skipped(t.label, str(t.local_dir), exc.message), lambda out, r: None)
    return out.render(result, show_backup)


@dataclass
class Discarded:
    target: str
    dest: str
    discarded_bytes: int
    dry_run: bool
    exit_code: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def show_discarded(out: Output, r: Discarded) -> None:
    verb = "would delete" if r.dry_run else "deleted"
    out.result(f"{verb} {human(r.discarded_bytes)} of staging in {r.dest}" if r.discarded_bytes
               else f"nothing staged in {r.dest}")


def _shared(r: BackupResult) -> str:
    parts = [f"{n} files {what}, {human(b)}" for n, b, what in (
        (r.reflinked_files, r.reflinked_bytes, "reflinked"),
        (r.linked_files, r.linked_bytes, "hard-linked"),
        (r.copied_files, r.copied_bytes, "copied locally instead of fetched")) if n]
    return f" ({', '.join(parts)})" if parts else ""


def show_backup(out: Output, result: BackupResult) -> None:
    for w in result.warnings:
        out.warn(w)
    skipped = [p for p in result.plan if p.action == "skip"]
    for p in skipped:
        out.warn(f"skipped {p.name}: {p.reason}")
    if result.dry_run:
        for p in result.plan:
            if p.action == "fetch":
                out.result(f"would fetch {p.name}: {p.files} files, {human(p.fetch_bytes)}")
            elif p.action == "up-to-date":
                out.result(f"up to date  {p.name}")
        out.result(f"dry run: would fetch {human(result.fetch_bytes)} "
                   f"in {len(result.to_fetch)} item(s) into {result.dest}; nothing was changed")
        return
    for name, why in result.failed.items():
        out.warn(f"{name}: {why}")
    current = [p.name for p in result.plan if p.action == "up-to-date"]
    if not result.fetched and not result.failed:
        if not out.quiet:
            out.result(f"up to date: {', '.join(current) or 'nothing to back up'} ({result.seconds:.1f}s)")
        return
    if out.quiet and not result.failed:
        return
    rate = result.raw_bytes / result.seconds if result.seconds else 0
    out.result(f"fetched {len(result.fetched)} ({', '.join(result.fetched) or 'none'}), "
               f"up to date {len(current)}, skipped {len(skipped)}, failed {len(result.failed)}; "
               f"{human(result.raw_bytes)} of files, {human(result.wire_bytes)} on the wire, "
               f"{human(max(result.disk_bytes, 0))} new on disk"
               + _shared(result)
               + f"; {result.seconds:.1f}s, {human(rate)}/s")
