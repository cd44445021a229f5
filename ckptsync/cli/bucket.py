"""The commands that work on a bucket store (local_dir / --local-dir `s3://bucket/prefix`), rendered."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckptsync.cli.context import output
from ckptsync.cli.shared import run_or_skip, show_restore_all
from ckptsync.errors import UsageError
from ckptsync.output import Output, human, rate

if TYPE_CHECKING:
    from ckptsync.backup import BackupOptions
    from ckptsync.config import Target

SUPPORTED = ("backup", "list", "show", "compare", "verify", "restore", "prune", "checklist", "cron")


def refuse_unsupported(t: Target) -> None:
    """One line, exit 2, for a command that has no bucket version; and boto3 must be installed."""
    from ckptsync.s3 import require_boto3

    verb = " ".join(t.verb) or "this command"
    if t.verb and t.verb[0] not in SUPPORTED:
        raise UsageError(f"{verb} does not work on a bucket store ({t.store_url}); "
                         f"{', '.join(SUPPORTED)} do")
    require_boto3()


def one(ts: list[Target]) -> Target | None:
    """The bucket target of a run, or None when the run uses backup directories."""
    if not any(t.store_url for t in ts):
        return None
    if len(ts) > 1:
        raise UsageError("a bucket store serves one instance per run: give one --instance")
    return ts[0]


def refuse(flag: str, given: bool) -> None:
    if given:
        raise UsageError(f"{flag} does not work on a bucket store")


def labelled(result, t: Target):
    """The target's label in the result, as every command's JSON has it."""
    result.target = t.label
    return result


def _store(t: Target):
    from ckptsync.stores import open_store

    return open_store(t)


# -------------------------------------------------- backup


def backup(t: Target, opts: BackupOptions, via_laptop: bool = False, skip_if_locked: bool = False) -> int:
    from ckptsync.s3.backup import run_bucket_backup

    out = output()
    store = _store(t)
    how = "relayed through this machine" if via_laptop else "from the server straight to the bucket"
    out.info(f"backup {t.describe()}:{t.remote_dir} -> {store.root} ({how})")
    return run_or_skip(out, t.label, str(store.root),
                       lambda: run_bucket_backup(t, opts, out.reporter(), store, via_laptop=via_laptop),
                       skip_if_locked, show_backup)


def show_backup(out: Output, r) -> None:
    for w in r.warnings:
        out.warn(w)
    for name, why in r.failed.items():
        out.warn(f"{name}: {why}")
    if r.dry_run:
        for name, action in r.planned.items():
            out.result(f"{action:<10} {name}")
        out.result(f"dry run: would send {human(r.plan_bytes)} to {r.dest}; nothing was changed")
        return
    current = [n for n, a in r.planned.items() if a == "up-to-date"]
    if not r.uploaded and not r.failed:
        out.result(f"up to date: {', '.join(current) or 'nothing to back up'} ({r.seconds:.1f}s)")
        return
    speed = rate(r.sent_bytes, r.seconds)
    out.result(f"uploaded {len(r.uploaded)} ({', '.join(r.uploaded) or 'none'}), up to date {len(current)}, "
               f"failed {len(r.failed)}; {human(r.sent_bytes)} sent from the server to the bucket"
               + (f", {human(r.copied_bytes)} copied inside the bucket" if r.copied_bytes else "")
               + (f", {human(r.resumed_bytes)} of parts kept from an interrupted upload" if r.resumed_bytes else "")
               + f"; {r.seconds:.1f}s" + (f", {speed}" if speed else ""))
    if r.generations:
        out.paragraph(f"changed on the server: {', '.join(r.replaced) or 'none recorded'}; the earlier version(s) "
                      f"kept as {', '.join(r.generations)}"
                      + (f"; dropped {', '.join(r.dropped_generations)} (keep_generations)" if r.dropped_generations
                         else ""))


# -------------------------------------------------- show, compare (rendered by their commands)


def show(t: Target, name: str | None, on_server: bool):
    from ckptsync.s3.checks import show_bucket, show_on_server

    return show_on_server(t, _store(t), name) if on_server else show_bucket(_store(t), name)


def compare(t: Target, a: str, b: str):
    from ckptsync.s3.checks import compare_bucket

    return compare_bucket(_store(t), a, b)


# -------------------------------------------------- restore


def restore(t: Target, name: str | None, force: bool, generation: str | None = None) -> int:
    from ckptsync.s3.flows import run_bucket_restore

    out = output()
    store = _store(t)
    out.info(f"restore {store.root} -> {t.describe()}:{t.remote_dir} (from the bucket straight to the server)")
    return out.render(run_bucket_restore(t, store, name, force, out.reporter(), generation=generation), show_restore)


def restore_all(t: Target, force: bool) -> int:
    from ckptsync.s3.flows import run_bucket_restore_all

    out = output()
    store = _store(t)
    out.info(f"restore {store.root} -> {t.describe()}:{t.remote_dir}, every entry (from the bucket straight to the server)")
    return out.render(run_bucket_restore_all(t, store, force, out.reporter()), show_restore_all)


def show_restore(out: Output, r) -> None:
    for n in r.notes:
        out.info(n)
    speed = rate(r.bytes, r.seconds)
    version = f" (generation {r.generation})" if r.generation else ""
    out.result(f"restored {r.name}{version} to {r.server}:{r.path}: {r.files} files, {human(r.bytes)}, checked on the "
               f"server; {r.seconds:.1f}s" + (f", {speed}" if speed else ""))
    if r.hint:
        out.result(r.hint)
