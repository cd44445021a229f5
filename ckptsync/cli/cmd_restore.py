"""ckptsync restore"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ckptsync.cli import options as o
from ckptsync.cli.context import output
from ckptsync.cli.shared import show_restore_all
from ckptsync.output import Output, TextTable, human, size_cell
from ckptsync.errors import UsageError

if TYPE_CHECKING:
    from ckptsync.restore import RestoreResult


def restore_cmd(
    instance: o.Instance = None, host: o.Host = None, remote_dir: o.RemoteDir = None,
    local_dir: o.LocalDir = None, config: o.Config = None, accept_new_host_key: o.AcceptNew = False,
    checkpoint: Annotated[Optional[str], typer.Option("--checkpoint", metavar="NAME", help="Restore this checkpoint (default: the newest resumable backup).", show_default=False)] = None,
    adapter_only: Annotated[bool, typer.Option("--adapter-only", help="Send only the adapter/model weights and their configs: to fine-tune from, not to resume.")] = False,
    extra_file: Annotated[Optional[list[str]], typer.Option("--extra-file", metavar="PATH", help="Put back only this backed-up extra file, by the path it was backed up from or its name (repeatable; default: every one).", show_default=False)] = None,
    no_extra_files: Annotated[bool, typer.Option("--no-extra-files", help="Do not put the backed-up extra files back.")] = False,
    extra_files_to: Annotated[Optional[str], typer.Option("--extra-files-to", metavar="DIR", help="Put the extra files in DIR on the server (relative to --remote-dir, or absolute) instead of where they were.", show_default=False)] = None,
    extra_files_only: Annotated[bool, typer.Option("--extra-files-only", help="Send only the extra files (the checkpoint is already there).")] = False,
    discard_staged: Annotated[bool, typer.Option("--discard-staged", help="Only delete what an interrupted restore of this checkpoint left in staging on the server.")] = False,
    all_: Annotated[bool, typer.Option("--all", help="Restore every backed-up checkpoint, newest first, each checked and renamed into place on its own.")] = False,
    generation: Annotated[Optional[str], typer.Option("--generation", metavar="N", help="With --checkpoint: an earlier version kept of it (1 = the one before the current; see list --generations).", show_default=False)] = None,
    compress: o.Compress = "auto", bwlimit: o.BwLimit = None, parallel: o.Parallel = None,
    force: o.Force = False, dry_run: o.DryRun = False,
) -> int:
    """Put a backed-up checkpoint on a (new) server, ready to resume training.

    The backup is re-read and checked against its manifest first, the files are
    staged on the server and checked there, and only then renamed into place.
    An existing checkpoint of the same name is never replaced without --force
    (exit 2); one that holds the backup's bytes (by the server's hash) is
    already there: nothing is sent, exit 0. Damaged backup: exit 30. Not
    enough space on the server: exit 5. An interrupted restore leaves nothing
    under the final name; run it again to send only what is missing, or drop
    it with --discard-staged. Onto a new instance from the backups of an old
    one: --instance NEW --local-dir ~/ckpt-backups/instance-OLD. Extra files
    that lay outside the run's directory go back only to the same remote_dir
    (the same path relative to the server's home counts); elsewhere they are
    skipped with a line saying where they are kept, unless --extra-files-to DIR.
    --all restores every checkpoint of the backup (those already on the
    server are skipped unless --force); when some fail the others are still
    restored, with exit 3 and a line per failure.
    """
    from ckptsync import datapath
    from ckptsync.stores import is_directory, open_store

    if generation is not None and not checkpoint:
        raise UsageError("--generation needs --checkpoint NAME (list --generations shows them)")
    if all_:
        given = [flag for flag, on in (("--checkpoint", checkpoint), ("--adapter-only", adapter_only),
                                       ("--generation", generation is not None),
                                       ("--extra-files-only", extra_files_only),
                                       ("--discard-staged", discard_staged)) if on]
        if given:
            raise UsageError(f"--all restores every checkpoint whole: it cannot be combined with {', '.join(given)}")
    if extra_file and no_extra_files:
        raise UsageError("give --extra-file or --no-extra-files, not both")
    compression = o.parse_compress(compress)
    t = o.with_bwlimit(o.target(config, instance, host, remote_dir, local_dir, accept_new_host_key), bwlimit)
    t = o.with_parallel([t], parallel)[0]
    if is_directory(t) and t.transport is not None:
        t.transport.prestart()   # the login and the server's Python start while the restore's code loads
    store = open_store(t)
    datapath.check_restore(store, {"--parallel": parallel is not None and parallel > 1,
                                   "--adapter-only": adapter_only, "--extra-files-only": extra_files_only,
                                   "--extra-file": bool(extra_file), "--discard-staged": discard_staged,
                                   "--dry-run": dry_run})
    from ckptsync.restore import RestoreOptions

    opts = RestoreOptions(checkpoint=checkpoint, adapter_only=adapter_only, extra_files=not no_extra_files,
                          force=force, dry_run=dry_run, compress=compression,
                          extra_files_to=extra_files_to, discard_staged=discard_staged,
                          extra_files_only=extra_files_only, generation=generation,
                          extra_paths=tuple(extra_file or ()))
    out = output()
    out.info(datapath.restore_line(t, store, every=all_))
    if all_:
        return out.render(datapath.restore_all(t, opts, out.reporter()), show_restore_all)
    return out.render(datapath.restore(t, opts, out.reporter()), show_restore)


def show_restore(out: Output, result: RestoreResult) -> None:
    from ckptsync.restore_choice import files_text

    for w in result.warnings:
        out.warn(w)
    if result.discarded_bytes is not None:
        verb = "would delete" if result.dry_run else "deleted"
        out.result(f"{verb} {result.server}:{result.path} ({human(result.discarded_bytes)})"
                   if result.discarded_bytes else f"nothing staged for {result.checkpoint} on {result.server}")
        return
    if result.dry_run:
        show_plan(out, result)
        return
    if out.quiet:
        return
    if result.extra_files_only:
        for e in result.extras:
            out.result(f"{e.dest or e.source}: {'restored' if e.action in ('send', 'replace') else e.action}")
        return
    resumed = f", {result.resumed_files} kept from an interrupted restore" if result.resumed_files else ""
    if result.resumed_bytes:
        resumed += (f", {human(result.resumed_bytes)} of partly sent files kept on the server from an interrupted "
                    "restore, not sent again")
    replaced = " (the existing copy was replaced)" if result.replaced else ""
    version = f" (generation {result.generation})" if result.generation else ""
    if result.identical:
        out.paragraph(f"already there, identical: {result.checkpoint}{version} at {result.server}:{result.path} "
                      "(checked by the server's hash; nothing of it was sent)")
    else:
        out.paragraph(f"restored {result.checkpoint}{version} to {result.server}:{result.path}{replaced}")
    if result.sent_files or not result.identical:
        how = ("from the bucket straight to the server, checked there" if result.direct
               else f"({human(result.wire_bytes)} on the wire)")
        out.paragraph(f"{files_text(result.sent_files)} sent, {human(result.sent_bytes)} {how}{resumed}; "
                      f"{result.seconds:.1f}s"
                      + (f" over {result.channels} channels" if result.channels > 1 else ""), indent="    ", first="  ")
    for e in result.extras:
        if e.dest:
            out.paragraph(f"{e.dest}: {'restored' if e.action in ('send', 'replace') else e.action}",
                          indent="    ", first="  ")
        else:
            out.paragraph(f"{e.source}: {e.action}; kept at {e.kept_at}", indent="    ", first="  ")
    show_hint(out, result.resume_hint)


# The action of a file or an extra file (restore.FileItem/ExtraItem.action), as a word for a table
# cell, and what the word means: the legend names only the words shown.
ACTION_WORDS = {"send": "send", "staged": "staged", "already there": "there",
                "kept existing (differs)": "differs", "replace": "replace",
                "skipped (outside the new run's directory)": "skipped"}
ACTION_MEANING = {"send": "sent now", "staged": "already staged on the server by an interrupted restore",
                  "there": "already there, identical", "differs": "already there with other content: kept",
                  "replace": "replaced (--force)", "skipped": "outside the new run's directory: not restored"}


def plan_table(result: RestoreResult, plain: bool) -> TextTable:
    """The dry run's files: one word an action (see ACTION_MEANING)."""
    tab = TextTable.of("file", "size", "action")
    for f in result.files:
        tab.add(f.path, size_cell(f.size, plain), ACTION_WORDS.get(f.action, f.action))
    for e in result.extras:
        tab.add(e.dest or e.source, size_cell(e.size, plain), ACTION_WORDS.get(e.action, e.action))
    return tab


def show_plan(out: Output, result: RestoreResult) -> None:
    step = "" if result.step is None else f" (step {result.step}, {result.content})"
    if result.identical:
        out.paragraph(f"dry run: {result.checkpoint}{step} is already there, identical: {result.server}:{result.path}")
    else:
        out.paragraph(f"dry run: would restore {result.checkpoint}{step} from {result.source} "
                      f"to {result.server}:{result.path}")
    if result.creates_remote_dir:
        out.paragraph(f"{result.remote_dir} does not exist yet and would be created", indent="  ", first="  ")
    if result.replaced:
        out.paragraph(f"the existing {result.checkpoint} there would be replaced (--force)", indent="  ", first="  ")
    out.table([plan_table(result, out.width is None)])
    words = {ACTION_WORDS.get(x.action, x.action) for x in [*result.files, *result.extras]}
    shown = [f"{w} = {text}" for w, text in ACTION_MEANING.items() if w in words]
    if shown:
        out.paragraph("; ".join(shown), indent="    ", first="  action: ")
    for e in result.extras:
        if e.kept_at:
            out.paragraph(f"{e.source}: kept at {e.kept_at}", indent="    ", first="  ")
    out.paragraph(f"would send {human(result.send_bytes)}; nothing was changed")
    show_hint(out, result.resume_hint, first="then: ")


def show_hint(out: Output, hint: str, first: str = "") -> None:
    """How to go on; the option or call to paste is never broken across lines."""
    lead, sep, code = hint.partition("resume with: ")
    if sep and not lead:
        out.to_paste(f"{first}resume with:", code)
    else:
        out.paragraph(hint, indent="  ", first=first)
