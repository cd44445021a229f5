"""ckptsync backup"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ckptsync.cli import options as o
from ckptsync.cli.context import output
from ckptsync.cli.shared import run_or_skip
from ckptsync.errors import Locked, UsageError
from ckptsync.output import Output, TextTable, human, rate

if TYPE_CHECKING:
    from ckptsync.backup import BackupOptions
    from ckptsync.backup_plan import BackupResult
    from ckptsync.multi import ManyResult
    from ckptsync.result import Discarded


def backup_cmd(
    instance: o.Instances = None, all_instances: o.AllInstances = False, host: o.Host = None,
    remote_dir: o.RemoteDir = None,
    local_dir: o.LocalDir = None, config: o.Config = None, accept_new_host_key: o.AcceptNew = False,
    max_checkpoints: Annotated[int, typer.Option("--max-checkpoints", "-k", min=1, metavar="N", help="At least the N newest complete checkpoints (a first run takes these).")] = 2,
    checkpoint: Annotated[Optional[list[str]], typer.Option("--checkpoint", metavar="NAME", help="Back up this checkpoint (repeatable).", show_default=False)] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every complete checkpoint.")] = False,
    include_best: Annotated[bool, typer.Option("--include-best", help="Also the best checkpoint (trainer_state.json), when older.")] = False,
    compress: o.Compress = "auto", bwlimit: o.BwLimit = None,
    parallel: o.Parallel = None,
    extra_file: o.ExtraFile = None,
    no_extra_files: Annotated[bool, typer.Option("--no-extra-files", help="Skip the configured extra_files.")] = False,
    dry_run: o.DryRun = False,
    wait: o.Wait = False,
    skip_if_locked: Annotated[bool, typer.Option("--skip-if-locked", help="When another run holds the lock, log one line and exit 0 (for cron); exit 11 when that run has made no progress for longer than stall_timeout.")] = False,
    discard_staged: Annotated[bool, typer.Option("--discard-staged", help="Only delete what interrupted backups left in staging (kept to resume them).")] = False,
    via_laptop: Annotated[bool, typer.Option("--via-laptop", help="A bucket store (s3://...) the server cannot reach: relay the bytes through this machine.")] = False,
    follow_runs: Annotated[bool, typer.Option("--follow-runs", help="Also back up newer run directories beside remote_dir (NAME_run_YYYYMMDD_HHMMSS, or the config's runs:), each into its own subdirectory.")] = False,
) -> int:
    """Fetch complete checkpoints from the server, verified, into the backup directory.

    Default: every complete checkpoint newer than the newest one already
    backed up, and the 2 newest (all that a first run takes), plus
    extra_files; a complete checkpoint left out is named. Checkpoints still
    being written are skipped. A checkpoint is committed as soon as all of
    it is copied, even if the server deletes it right after (rotation).
    Safe to run from cron. Several instances
    (-i 0 -i 1, or --all-instances) are backed up in parallel, each into its
    own directory under its own lock, with one summary table; the exit code
    is the worst of theirs.
    """
    if wait and skip_if_locked:
        raise UsageError("give --wait or --skip-if-locked, not both")
    if extra_file and no_extra_files:
        raise UsageError("give --extra-file or --no-extra-files, not both")
    if all_ and checkpoint:
        raise UsageError("give --all or --checkpoint, not both",
                         hint="--all backs up every complete checkpoint; --checkpoint NAME only the named ones")
    compression = o.parse_compress(compress)
    ts = o.with_bwlimits(o.targets(config, instance, all_instances, host, remote_dir, local_dir, accept_new_host_key,
                                   need_remote=not discard_staged), bwlimit)
    ts = o.with_extra_files(ts, extra_file)
    if follow_runs:
        ts = [t.with_policy(follow_runs=True) for t in ts]
    ts = o.with_parallel(ts, parallel)
    from ckptsync.stores import is_directory, open_store

    if is_directory(ts[0]) and len(ts) == 1 and not (discard_staged or via_laptop) and ts[0].transport is not None:
        ts[0].transport.prestart()   # the login and the server's Python start while the backup's code loads
    from ckptsync import datapath

    datapath.one_run_per_store(ts)
    store = open_store(ts[0])
    datapath.check_backup(store, via_laptop, {"--discard-staged": discard_staged, "--follow-runs": follow_runs,
                                              "--wait": wait, "--parallel": parallel is not None and parallel > 1})
    from ckptsync.backup import BackupOptions, discard_staging
    from ckptsync.multi import run_many

    opts = BackupOptions(max_checkpoints=max_checkpoints, names=list(checkpoint or []), all=all_,
                         include_best=include_best, compress=compression, dry_run=dry_run,
                         wait=wait, extra_files=not no_extra_files)
    out = output()
    if len(ts) > 1:
        if discard_staged:
            raise UsageError("--discard-staged clears one backup directory: give one --instance")
        return out.render(run_many("backup", ts, functools.partial(_backup_one, opts=opts, skip_if_locked=skip_if_locked),
                                   out.reporter()), show_backups)
    t = ts[0]
    if discard_staged:
        from ckptsync.result import Discarded

        held = discard_staging(t, dry_run, wait)
        return out.render(Discarded(t.label, str(t.local_dir), held, dry_run), show_discarded)
    out.info(datapath.backup_line(t, store, via_laptop))
    return run_or_skip(out, t.label, store.location, lambda: datapath.backup(t, opts, out.reporter(), via_laptop),
                       skip_if_locked, show_backup)


def show_discarded(out: Output, r: Discarded) -> None:
    verb = "would delete" if r.dry_run else "deleted"
    out.result(f"{verb} {human(r.discarded_bytes)} of staging in {r.dest}" if r.discarded_bytes
               else f"nothing staged in {r.dest}")


def _moved(r: BackupResult) -> str:
    """Where the bytes went: to this machine's disk, or (a bucket) into the store."""
    if r.direct:
        return (f"{human(r.sent_bytes)} sent from the server to the bucket"
                + (f", {human(r.copied_bytes)} copied inside the bucket" if r.copied_bytes else "")
                + (f", {human(r.resumed_bytes)} of parts kept from an interrupted upload" if r.resumed_bytes else ""))
    return (f"{human(r.raw_bytes)} of files, {human(r.wire_bytes)} on the wire, "
            + (f"{human(r.sent_bytes)} sent to the bucket" if r.sent_bytes else f"{human(max(r.disk_bytes, 0))} new on disk")
            + _shared(r)
            + (f"; {human(r.resumed_bytes)} of partly fetched files kept from an interrupted run, "
               "not sent again" if r.resumed_bytes else ""))


def _shared(r: BackupResult) -> str:
    parts = [f"{n} files {what}, {human(b)}" for n, b, what in (
        (r.reflinked_files, r.reflinked_bytes, "reflinked"),
        (r.linked_files, r.linked_bytes, "hard-linked"),
        (r.copied_files, r.copied_bytes, "copied locally instead of fetched")) if n]
    return f" ({', '.join(parts)})" if parts else ""


def show_backup(out: Output, result: BackupResult) -> None:
    _show_one(out, result)
    for sub in result.runs:
        out.result(f"run {sub.dest}:")
        _show_one(out, sub)
    for r in result.unfollowed:
        out.warn(f"newer run on the server: {r.path} ({r.problem}); back up with: {result.follow_hint}")


def _show_one(out: Output, result: BackupResult) -> None:
    for w in result.warnings:
        out.warn(w)
    skipped = [p for p in result.plan if p.action == "skip"]
    for p in skipped:
        if p.name in result.failed:  # a failure is said once, below
            continue
        if p.writing:  # what a training run looks like between two saves: no cause for a warning
            out.info(f"skipped {p.name}: {p.reason} (being saved now; a later run takes it once complete)")
        else:
            out.warn(f"skipped {p.name}: {p.reason}")
    for name, why in result.failed.items():
        out.warn(f"{name}: {why}")
    if result.dry_run:
        for p in result.plan:
            if p.action == "fetch":
                out.result(f"would fetch {p.name}: {p.files} files, {human(p.fetch_bytes)}")
            elif p.action == "up-to-date":
                out.result(f"up to date  {p.name}")
            elif p.action == "restamp":
                out.result(f"up to date  {p.name} (same bytes; would record {p.files} new timestamp(s))")
        out.result(f"dry run: would fetch {human(result.fetch_bytes)} "
                   f"in {len(result.to_fetch)} item(s) into {result.dest}; nothing was changed")
        return
    _show_deleted(out, result)
    if result.adopted:
        out.info(f"adopted {len(result.adopted)} older copies left by an earlier version as generations "
                 f"(manifests built from their bytes): {', '.join(result.adopted)}")
    if result.restamped:
        out.info(f"same bytes, new timestamps on the server (0 bytes sent): {', '.join(result.restamped)}")
    if result.generations:
        out.info(f"previous versions kept as generations: {', '.join(result.generations)}"
                 + (f"; dropped beyond keep_generations: {', '.join(result.dropped_generations)}"
                    if result.dropped_generations else ""))
    current = result.current
    if not result.fetched and not result.failed:
        if not out.quiet:
            out.result(f"up to date: {', '.join(current) or 'nothing to back up'} ({result.seconds:.1f}s)")
        return
    if out.quiet and not result.failed:
        return
    speed = rate(result.raw_bytes or result.sent_bytes, result.seconds)
    out.result(f"fetched {len(result.fetched)} ({', '.join(result.fetched) or 'none'}), "
               f"up to date {len(current)}, skipped {len(skipped)}, failed {len(result.failed)}; "
               + _moved(result)
               + f"; {result.seconds:.1f}s" + (f", {speed}" if speed else "")
               + (f" over {result.channels} channels" if result.channels > 1 else ""))


def _show_deleted(out: Output, result: BackupResult, prefix: str = "") -> None:
    from ckptsync.commit import DELETED_AFTER_COPY

    for name in result.deleted_on_server:
        out.result(f"{prefix}{name}: {DELETED_AFTER_COPY}")


def _backup_one(t, rep, opts: BackupOptions, skip_if_locked: bool):
    """One instance of a multi-instance backup; a lock held elsewhere is that instance's outcome."""
    from ckptsync import datapath
    from ckptsync.result import Skipped

    try:
        return datapath.backup(t, opts, rep)
    except Locked as exc:
        if not skip_if_locked or exc.stuck:
            raise
        return Skipped(t.label, str(t.local_dir), exc.message)


def show_backups(out: Output, many: ManyResult) -> None:
    """Several instances: each one's warnings and failures, then one table and the errors."""
    from ckptsync.backup_plan import BackupResult
    from ckptsync.result import Skipped

    for o in many.outcomes:
        r = o.result
        if isinstance(r, BackupResult):
            for w in r.warnings:
                out.warn(f"{o.target}: {w}")
            for name, why in r.failed.items():
                out.warn(f"{o.target}: {name}: {why}")
            _show_deleted(out, r, f"{o.target}: ")
    tab = TextTable.of("instance", "exit", "fetched", "current", "failed", "files", "wire", "time")
    for o in many.outcomes:
        r = o.result
        if isinstance(r, BackupResult):
            tab.add(o.target, o.exit_code, len(r.fetched), sum(1 for p in r.plan if p.action == "up-to-date"),
                    len(r.failed), human(r.fetch_bytes if r.dry_run else r.raw_bytes),
                    "-" if r.dry_run else human(r.wire_bytes), f"{r.seconds:.1f}s")
        else:
            what = "skipped (locked)" if isinstance(r, Skipped) else "error"
            tab.add(o.target, o.exit_code, what, "", "", "", "", "")
    out.table([tab])
    for o in many.outcomes:
        if o.error:
            out.error(f"{o.target}: {o.error}", o.hint)
        elif isinstance(o.result, Skipped):
            out.info(f"{o.target}: skipped: {o.result.skipped}")
    if any(isinstance(o.result, BackupResult) and o.result.dry_run for o in many.outcomes):
        out.result("dry run: nothing was changed (files: what would be fetched)")
