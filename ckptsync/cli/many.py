"""Rendering a command run over several instances: each one's own output under a heading."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from ckptsync.multi import ManyResult
    from ckptsync.output import Output


def show_each(out: Output, many: ManyResult, show_one: Callable[[Output, Any], None]) -> None:
    """Each target's result as the single-target command shows it, in the order given; errors in place."""
    for i, o in enumerate(many.outcomes):
        if i:
            out.result("")
        out.result(f"== {o.target} ==")
        if o.result is not None:
            show_one(out, o.result)
        else:
            out.error(f"{o.target}: {o.error}", o.hint)
