"""ckptsync archive"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ckptsync.cli import options as o
from ckptsync.cli.context import output
from ckptsync.output import Output, human

if TYPE_CHECKING:
    from ckptsync.archive import ArchiveResult


def archive_cmd(
    instance: o.Instance = None, local_dir: o.LocalDir = None, config: o.Config = None,
    archive: Annotated[Optional[str], typer.Option("--output", "-o", metavar="FILE", help="Archive file (default: <backup-dir>-<YYYYmmdd>.tar.zst next to the backup directory).", show_default=False)] = None,
    remove: Annotated[bool, typer.Option("--remove", help="After the archive is read back and verified, remove the archived checkpoints and their manifests.")] = False,
    wait: o.Wait = False,
) -> int:
    """Pack a finished run's backup directory into one .tar.zst and verify it by reading it back.

    The archive keeps every checkpoint with its manifest, modes and mtimes;
    `verify` and `restore` accept it in place of a backup directory. With
    --remove the originals go only after the read-back check passed; if the
    archive exists already, it is read back and checked instead of rewritten.
    """
    from ckptsync.archive import ArchiveOptions, run_archive

    t = o.target(config, instance, local_dir=local_dir, need_remote=False)
    opts = ArchiveOptions(output=Path(archive) if archive else None, remove=remove, wait=wait)
    out = output()
    out.info(f"archive {t.local_dir}")
    return out.render(run_archive(t.local_dir, opts, out.reporter()), show_archive)


def show_archive(out: Output, r: ArchiveResult) -> None:
    for w in r.warnings:
        out.warn(w)
    if r.reused:
        out.result(f"{r.archive} already holds {len(r.entries)} entries of {r.source}: read back and verified "
                   f"({r.files} files, {human(r.archive_bytes)})")
    else:
        ratio = f", {r.archive_bytes / r.bytes:.0%} of the files" if r.bytes else ""
        out.result(f"archived {len(r.entries)} entries ({', '.join(r.entries)}) into {r.archive}: "
                   f"{r.files} files, {human(r.bytes)} -> {human(r.archive_bytes)}{ratio}"
                   + (f", {r.linked} as hard links" if r.linked else "") + f"; {r.seconds:.1f}s")
        out.result("read back and verified: every file matches its manifest")
    if r.removed:
        out.result(f"removed from {r.source}: {', '.join(r.removed)}")
    elif not out.quiet:
        out.result("the originals can now be removed with --remove")
