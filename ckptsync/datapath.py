"""How a backup's bytes travel, chosen by the store a target names (stores.open_store).

A store whose files are on this machine (a backup directory: the ability `files_here`) is
filled by backup.py and read by restore.py, the bytes through this machine. A store with the
ability `data_path` (a bucket) says itself how its bytes travel (s3/direct.py: the server
moves them through presigned URLs, or with `--via-laptop` through this machine; restore_direct.py
runs a restore through it); the results are the same types either way. show and compare read any store through the
protocol (details.py); a directory may be an archive, read through its index. The commands call the functions here and never ask which
kind of store they are on; a flag that only one data path has is refused here, one line,
exit 2.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ckptsync.errors import UsageError
from ckptsync.progress import QUIET, Reporter
from ckptsync.stores import Store, ability, describe, is_directory, open_store, refuse

if TYPE_CHECKING:
    from ckptsync.backup import BackupOptions
    from ckptsync.backup_plan import BackupResult
    from ckptsync.config import Target
    from ckptsync.restore import RestoreOptions, RestoreResult
    from ckptsync.restore_all import RestoreAllResult
    from ckptsync.server import Server

# The commands that work on a store whose files are not on this machine (a bucket).
ELSEWHERE = ("backup", "list", "show", "compare", "verify", "restore", "prune", "checklist", "cron")


def here(store: Store) -> bool:
    return bool(ability(store, "files_here"))


def check_command(t: Target) -> None:
    """One line, exit 2, for a command that works only on a store here; a store elsewhere needs its
    client (a bucket: boto3). Told from the location, before anything is opened."""
    if is_directory(t):   # serves every command; its code loads after the login has started
        return
    store = describe(t)
    if store.can("files_here"):
        return
    verb = " ".join(t.printed.verb) or "this command"
    if t.printed.verb and t.printed.verb[0] not in ELSEWHERE:
        raise UsageError(f"{verb} does not work on {store.kind} ({store.key}); {', '.join(ELSEWHERE)} do")
    store.ready()


def one_run_per_store(ts: list[Target]) -> None:
    """A store elsewhere (a bucket) serves one instance per backup run."""
    if len(ts) > 1 and any(t.store_url for t in ts):
        raise UsageError("a bucket store serves one instance per run: give one --instance")


# -------------------------------------------------- backup


def check_backup(store: Store, via_laptop: bool, flags: dict[str, bool]) -> None:
    """`flags`: the backup flags that need this machine's copy (staging, runs, a wait, channels)."""
    refuse(store, "backup", True, needs="record_status")  # a store that cannot be written (an archive)
    if via_laptop and here(store):
        raise UsageError("--via-laptop relays to a bucket store: give local_dir / --local-dir s3://BUCKET/PREFIX")
    for flag, given in flags.items():
        refuse(store, flag, given, needs="files_here")


def backup_line(t: Target, store: Store, via_laptop: bool) -> str:
    if here(store):
        return f"backup {t.describe()}:{t.remote_dir} -> {t.local_dir}"
    how = "relayed through this machine" if via_laptop else "from the server straight to the bucket"
    return f"backup {t.describe()}:{t.remote_dir} -> {store.location} ({how})"


def backup(t: Target, opts: BackupOptions, rep: Reporter = QUIET, via_laptop: bool = False,
           connect: Callable[[], Server] | None = None) -> BackupResult:
    store = open_store(t)
    path = ability(store, "data_path")
    if path is not None:
        return path(via_laptop).backup(t, opts, rep, connect)
    from ckptsync.backup import run_backup

    return run_backup(t, opts, rep, connect)


# -------------------------------------------------- restore


def check_restore(store: Store, flags: dict[str, bool]) -> None:
    """`flags`: the restore flags only a store here has (what a bucket restore does not offer)."""
    for flag, given in flags.items():
        refuse(store, flag, given, needs="files_here")


def restore_line(t: Target, store: Store, every: bool = False) -> str:
    if here(store):
        return f"restore {t.local_dir} -> {t.describe()}:{t.remote_dir}"
    return (f"restore {store.location} -> {t.describe()}:{t.remote_dir}" + (", every entry" if every else "")
            + " (from the bucket straight to the server)")


def restore(t: Target, opts: RestoreOptions, rep: Reporter = QUIET) -> RestoreResult:
    return _restore(t, opts, rep, every=False)


def restore_all(t: Target, opts: RestoreOptions, rep: Reporter = QUIET) -> RestoreAllResult:
    return _restore(t, opts, rep, every=True)


def _restore(t: Target, opts: RestoreOptions, rep: Reporter, every: bool):
    """One checkpoint, or with `every` each entry, by the store's data path or through this machine."""
    store = open_store(t)
    path = ability(store, "data_path")
    if path is not None:
        from ckptsync import restore_direct

        run = restore_direct.run_direct_restore_all if every else restore_direct.run_direct_restore
        return run(t, store, path(), opts, rep)
    if every:
        from ckptsync.restore_all import run_restore_all

        return run_restore_all(t, opts, rep)
    from ckptsync.restore import run_restore

    return run_restore(t, opts, rep)


# -------------------------------------------------- show, compare


def show(t: Target, name: str | None, on_server: bool):
    """A directory may be an archive: details reads its index (archive_index)."""
    from ckptsync.details import show_backup, show_server, show_stored

    store = open_store(t)
    if on_server:
        return show_server(t, name, store)
    return show_backup(t.local_dir, name) if here(store) else show_stored(store, name)


def compare(t: Target, a: str, b: str):
    from ckptsync.details import compare_backups, compare_stored

    store = open_store(t)
    return compare_backups(t.local_dir, a, b) if here(store) else compare_stored(store, a, b)
