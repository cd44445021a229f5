"""ckptsync verify"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ckptsync.cli import options as o
from ckptsync.cli.context import output
from ckptsync.output import Output, human, rate
from ckptsync.errors import UsageError

if TYPE_CHECKING:
    from ckptsync.repair import RepairResult
    from ckptsync.verify import EntryCheck, VerifyResult


def verify_cmd(
    names: Annotated[Optional[list[str]], typer.Argument(metavar="NAME", help="Checkpoints to verify (default: every backup and extra-files).", show_default=False)] = None,
    instance: o.Instance = None, host: o.Host = None, remote_dir: o.RemoteDir = None,
    local_dir: o.LocalDir = None, config: o.Config = None, accept_new_host_key: o.AcceptNew = False,
    remote: Annotated[bool, typer.Option("--remote", help="Compare the server's copy with the backup (hashed on the server) instead of re-reading the backup.")] = False,
    repair: Annotated[bool, typer.Option("--repair", help="Fetch again, from the server, the files that fail their manifest (when the server still has them unchanged).")] = False,
    read_data: Annotated[bool, typer.Option("--read-data", help="A bucket store: also stream every object through this machine and hash it (without it: sizes and ETags). A backup directory is always read.")] = False,
) -> int:
    """Check backups: re-read every file and compare size and xxh3-128 with the manifest.

    Also reports files missing (those a resume needs are marked), and files in a
    checkpoint that the manifest does not list. A checkpoint that passes is
    marked as verified now. No connection is made unless --remote is given.

    With --remote, compares the server's checkpoints with the backups instead,
    file by file, and lists checkpoints found on one side only.

    With --repair, files that fail their manifest are fetched again from the
    server, through staging, when the server still has them with the same
    size and checksum; everything is then verified again.

    Exit 30 when any check fails (or, with --repair, anything is left damaged).
    """
    from ckptsync.repair import run_repair
    from ckptsync.stores import ability, open_store, refuse
    from ckptsync.verify import run_verify

    if remote and repair:
        raise UsageError("give --remote or --repair, not both")
    t = o.target(config, instance, host, remote_dir, local_dir, accept_new_host_key, need_remote=remote or repair)
    store = open_store(t)
    refuse(store, "--remote", remote, needs="files_here")
    if remote and ability(store, "check_objects"):   # checked against its own listing, not the server
        raise UsageError(f"--remote does not work on {store.kind}")
    refuse(store, "--repair", repair, needs="files_here")
    refuse(store, "--repair", repair, needs="commit")   # it puts fetched files back: an archive cannot
    out = output()
    if repair:
        out.info(f"repair {t.local_dir} from {t.describe()}:{t.remote_dir}")
        return out.render(run_repair(t, list(names or []), rep=out.reporter()), show_repair)
    if remote:
        out.info(f"verify {t.describe()}:{t.remote_dir} against {t.local_dir}")
    return out.render(run_verify(t, list(names or []), remote=remote, rep=out.reporter(), read_data=read_data),
                      show_verify)


def show_repair(out: Output, result: RepairResult) -> None:
    for name, files in result.repaired.items():
        out.result(f"repaired {name}: {', '.join(files)} fetched again and checked")
    for path, why in result.unrepaired.items():
        out.warn(f"not repaired: {path}: {why}")
    if result.after is not None:
        show_verify(out, result.after)
    if not result.repaired and not result.unrepaired:
        out.result("nothing to repair")


def show_verify(out: Output, result: VerifyResult) -> None:
    for w in result.warnings:
        out.warn(w)
    for e in result.entries:
        if out.quiet and not e.failed:
            continue
        out.result(_line(e))
        for p in e.problems:
            out.result(f"    {p.kind}: {p.path}" + (f" ({p.detail})" if p.detail else ""))
    out.result(_summary(result))
    if result.failed:
        bad = ", ".join(f"{e.name} ({e.status})" for e in result.failed)
        out.error(f"integrity check failed: {bad}")


def _line(e: EntryCheck) -> str:
    mark = "FAILED" if e.failed else ("ok" if e.status == "ok" else "note")
    status = "" if e.status == "ok" else f": {e.status}"
    return f"{mark:<7} {e.name}{status} ({e.files} files, {human(e.bytes)})"


def _summary(r: VerifyResult) -> str:
    counts: dict[str, int] = {"ok": 0}
    for e in r.entries:
        if not e.failed:
            counts[e.status] = counts.get(e.status, 0) + 1
    states = ", ".join(f"{n} {status}" for status, n in counts.items())
    speed = rate(r.bytes_read, r.seconds)
    where = f"{r.server}:{r.remote_dir} against {r.dest} ({r.alg})" if r.remote else r.dest
    how = (f"{human(r.bytes_read)} read" if r.read_data
           else "sizes and ETags from the listing (--read-data reads every object back)")
    return (f"checked {len(r.entries)} in {where}: {states}, {len(r.failed)} failed; "
            f"{how} in {r.seconds:.1f}s" + (f", {speed}" if speed and r.read_data else ""))
