"""ckptsync compare"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from ckptsync.cli import options as o
from ckptsync.cli.context import render
from ckptsync.output import Column, Output, TextTable, human, size_cell

if TYPE_CHECKING:
    from ckptsync.details import CompareResult

LABELS = {"step": "step", "epoch": "epoch", "loss": "train loss", "eval_loss": "eval loss",
          "learning_rate": "learning rate"}


def compare_cmd(
    a: Annotated[str, typer.Argument(metavar="A", help="A backed-up checkpoint, e.g. checkpoint-500.")],
    b: Annotated[str, typer.Argument(metavar="B", help="Another one, e.g. checkpoint-1000.")],
    instance: o.Instance = None, local_dir: o.LocalDir = None, config: o.Config = None,
) -> int:
    """Compare two backed-up checkpoints: step, epoch, loss and learning-rate changes, and which files differ.

    Reads the backup directory only (no network). Files are compared by
    content (xxh3-128 and size from the manifests).
    """
    from ckptsync import datapath

    t = o.target(config, instance, local_dir=local_dir, need_remote=False)
    return render(datapath.compare(t, a, b), show_compare)


def show_compare(out: Output, r: CompareResult) -> None:
    out.result(f"{r.a} -> {r.b}")
    out.paragraph(r.location, indent="  ", first="  backups in ")
    # Plain rows name their value by its JSON key: one word a cell.
    values = TextTable.of(Column("", plain_header="value"), r.a, r.b, Column("change", right=True))
    for c in r.values:
        delta = "" if c.delta is None else (f"{c.delta:+d}" if isinstance(c.delta, int) else f"{c.delta:+.4g}")
        values.add(c.key if out.width is None else LABELS.get(c.key, c.key), _fmt(c.a), _fmt(c.b), delta)
    out.table([values])
    out.result("")
    out.paragraph(f"files: {len(r.differ)} differ, {len(r.identical)} identical, "
                  f"{len(r.only_a)} only in {r.a}, {len(r.only_b)} only in {r.b}", indent="  ")
    # One word for where a file is; the line below says which checkpoint A and B are.
    files = TextTable.of(Column("", plain_header="where"), "file", Column("size", right=True))
    plain = out.width is None
    for label, group in (("differs", r.differ), ("only-A", r.only_a), ("only-B", r.only_b),
                         ("identical", r.identical)):
        for f in group:
            files.add(label, f.path, _sizes(f.a_size, f.b_size, plain))
    out.table([files])
    if (r.only_a or r.only_b) and not plain:
        out.paragraph(f"only-A: only in {r.a}; only-B: only in {r.b}", indent="  ")


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        from ckptsync.plot import number

        return number(value)
    return str(value)


def _sizes(a: int | None, b: int | None, plain: bool) -> str:
    if a is None or b is None or a == b:
        return size_cell(a if b is None else b, plain)
    return f"{size_cell(a, plain)}->{size_cell(b, plain)}" if plain else f"{human(a)} -> {human(b)}"
