"""ckptsync show"""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ckptsync.cli import options as o
from ckptsync.cli.context import output, render
from ckptsync.output import Output, TextTable, ago, human, size_cell, when

if TYPE_CHECKING:
    from ckptsync.details import ShowResult

DEFAULT_WIDTH = 72
CHART_STYLES = {r"[\u2800-\u28ff]+": "cyan", "●": "magenta"}


def show_cmd(
    name: Annotated[Optional[str], typer.Argument(help="Checkpoint name (default: the newest).", show_default=False)] = None,
    instance: o.Instance = None, host: o.Host = None, remote_dir: o.RemoteDir = None,
    local_dir: o.LocalDir = None, config: o.Config = None, accept_new_host_key: o.AcceptNew = False,
    remote: Annotated[bool, typer.Option("--remote", help="Read the checkpoint on the server instead of the backup (implied by --host/--remote-dir).")] = False,
    ascii_: Annotated[bool, typer.Option("--ascii", help="Draw with ASCII characters only.")] = False,
    width: Annotated[Optional[int], typer.Option("--width", min=40, max=400, metavar="COLUMNS", help="Chart width (default: the terminal's, 72 in a pipe).", show_default=False)] = None,
) -> int:
    """Details of one checkpoint: step, losses, best, files, resumability, backup times, loss curve.

    Reads the backup directory (no network) unless --remote is given.
    """
    from ckptsync import datapath

    remote = remote or host is not None or remote_dir is not None
    t = o.target(config, instance, host, remote_dir, local_dir, accept_new_host_key, need_remote=remote)
    result = datapath.show(t, name, remote)
    return render(result, functools.partial(show_checkpoint, width=width or terminal_width(output().width),
                                            plain=ascii_ or not utf8_output()))


def utf8_output() -> bool:
    encoding = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "").replace("_", "")
    return encoding == "utf8"


def terminal_width(columns: int | None) -> int:
    """The chart's width: the output's ($COLUMNS, else the terminal's), else 72."""
    return max(columns, 40) if columns else DEFAULT_WIDTH


def show_checkpoint(out: Output, r: ShowResult, width: int, plain: bool) -> None:
    from ckptsync.details import describe_resume
    from ckptsync.plot import Series, line_chart, number, sparkline

    where = "backup in" if r.source == "backup" else "on"
    title = f"{r.name}{'  * best checkpoint' if r.is_best else ''}"
    if out.width is not None and len(title) + len(where) + len(r.location) + 5 > out.width:
        out.result(title)   # the location on a line of its own, never cut
        out.paragraph(r.location, first=f"  {where} ", indent="    ")
    else:
        out.result(f"{title}   ({where} {r.location})")
    rows = [("layout", f"{r.layout} ({r.kind})")]
    if r.complete is not None:
        rows.append(("state", "complete" if r.complete else f"in progress: {r.reason}"))
    step = "-" if r.step is None else str(r.step)
    if r.max_steps is not None:
        step += f" of {r.max_steps}"
    if r.epoch is not None:
        step += f", epoch {number(r.epoch)}"
    rows.append(("step", step))
    if r.loss is not None:
        rows.append(("train loss", number(r.loss) + (f" at step {r.loss_step}" if r.loss_step is not None else "")))
    if r.eval_loss is not None:
        rows.append(("eval loss", number(r.eval_loss) + (f" at step {r.eval_step}" if r.eval_step is not None else "")))
    if r.learning_rate is not None:
        rows.append(("learning rate", number(r.learning_rate)))
    if r.best_checkpoint:
        metric = f", best_metric {number(r.best_metric)}" if r.best_metric is not None else ""
        rows.append(("best", f"{r.best_checkpoint}{' (this one)' if r.is_best else ''}{metric}"))
    rows.append(("resume", describe_resume(r.content, r.resumable, r.missing)))
    if r.source == "server":
        rows.append(("backed up", {"yes": "yes", "no": "no", "outdated": "outdated (the server copy differs)"}[r.backup]
                     + (f", {when(r.backed_up_at)}" if r.backed_up_at else "")))
    else:
        rows.append(("backed up", f"{when(r.backed_up_at)} ({ago(r.backed_up_at)})"))
        rows.append(("verified", f"{when(r.verified_at)} ({ago(r.verified_at)})"))
    for label, value in rows:
        out.paragraph(value, indent=" " * 16, first=f"  {label:<14}")
    out.result("")
    tab = TextTable.of("file", "size", "resume")
    for f in r.files:
        tab.add(f.path, size_cell(f.size, out.width is None), "yes" if f.resume else "no")
    out.table([tab])
    needed = [f for f in r.files if f.resume]
    out.result(f"{len(r.files)} file{'s' if len(r.files) != 1 else ''}, {human(r.size)}; "
               f"{len(needed)} needed to resume ({human(r.resume_size)})")
    for note in r.notes:
        out.paragraph(note, indent="  ", first="note: ")
    if r.curve:
        out.result("")
        out.result("loss by step")
        chart = line_chart([Series("train loss", tuple(r.curve.train)),
                            Series("eval loss", tuple(r.curve.eval), "marker")],
                           width=width, height=10, ascii_only=plain)
        out.lines(chart, None if plain else CHART_STYLES)
    lr = [v for _, v in r.curve.learning_rate]
    if len(lr) > 1:
        spark = sparkline(lr, max(width - 44, 8), plain)
        out.result(f"learning rate  {spark}  max {number(max(lr), 3)}, last {number(lr[-1], 3)}")
