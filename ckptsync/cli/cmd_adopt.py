"""ckptsync adopt"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from ckptsync.cli import options as o
from ckptsync.cli.context import output
from ckptsync.output import Output, TextTable, human, size_cell

if TYPE_CHECKING:
    from ckptsync.adopt import AdoptResult

SERVER_WORDS = {"same": "the server's copy has the same bytes",
                "differs": "the server's copy differs: the next backup fetches it, this one is kept as an earlier version",
                "absent": "the server no longer has it: this copy is the only one"}


def adopt_cmd(
    directory: Annotated[str, typer.Argument(metavar="DIR", help="A backup directory made without ckptsync: checkpoint-N/ directories, and the config files beside them.")],
    instance: o.Instance = None, host: o.Host = None, remote_dir: o.RemoteDir = None,
    config: o.Config = None, accept_new_host_key: o.AcceptNew = False, extra_file: o.ExtraFile = None,
    dry_run: o.DryRun = False,
) -> int:
    """Take over checkpoints copied without ckptsync (by scripts, scp, tar): write their manifests.

    Each complete checkpoint directory in DIR without a manifest is read and
    hashed here; the configured extra files found beside them move into
    DIR/extra-files/. With a server (--instance, --host or --remote-dir),
    each one the server still has is compared with it by the server's hash:
    a copy that differs is marked (exit 3), and the next backup fetches the
    server's copy. A backup into DIR afterwards fetches only what is new.
    """
    from ckptsync.adopt import run_adopt

    with_server = instance is not None or host is not None or remote_dir is not None
    t = o.target(config, instance, host, remote_dir, directory, accept_new_host_key, need_remote=with_server)
    t = o.with_extra_files([t], extra_file)[0]
    out = output()
    return out.render(run_adopt(t, dry_run, out.reporter()), show_adopt)


def server_word(state: str) -> str:
    return {"not on the server": "absent", "not checked": "-"}.get(state, state)


def show_adopt(out: Output, r: AdoptResult) -> None:
    for w in r.warnings:
        out.warn(w)
    for name, why in r.skipped.items():
        out.warn(f"not adopted: {name}: {why}")
    if not r.adopted and not r.extra_files:
        out.paragraph(f"nothing to adopt in {r.dest}: every checkpoint there has a manifest")
        return
    plain = out.width is None
    if r.adopted:
        tab = TextTable.of("checkpoint", "step", "files", "size", *(["server"] if r.server else []))
        for a in r.adopted:
            tab.add(a.name, "-" if a.step is None else a.step, a.files, size_cell(a.size, plain),
                    *([server_word(a.server)] if r.server else []))
        out.table([tab])
        shown = {server_word(a.server) for a in r.adopted}
        legend = [f"{w} = {text}" for w, text in SERVER_WORDS.items() if w in shown]
        if legend:
            out.paragraph("; ".join(legend), indent="    ", first="  server: ")
        for a in r.adopted:
            if a.differs:
                out.paragraph(", ".join(a.differs), indent="    ", first=f"  {a.name} differs in: ")
    if r.extra_files:
        moved = "would move" if r.dry_run else "moved"
        out.paragraph(f"extra files {moved} into {r.dest}/extra-files/: {', '.join(r.extra_files)}")
    total = human(sum(a.size for a in r.adopted))
    if r.dry_run:
        out.paragraph(f"dry run: would adopt {len(r.adopted)} checkpoint(s), {total}; nothing was changed")
    else:
        out.paragraph(f"adopted {len(r.adopted)} checkpoint(s), {total}, in {r.dest}: a backup into it "
                      "fetches only what is new")
