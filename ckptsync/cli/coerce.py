"""Option values checked without pydantic, where typer would load it for nothing.

typer 0.29 converts every option's value through a pydantic TypeAdapter, built when the option
is first parsed, even for a value left at its default: every command paid 60-110 ms of pydantic
imports and adapters on each run. ckptsync's options are text, flags, lists of text and numbers
in a range; those values are converted here. Anything else, and every value that does not
convert plainly (a number out of range, a word where a number belongs), goes through typer's own
conversion, so what is accepted and every message stay typer's.
"""

from __future__ import annotations

import re
from typing import Any, get_args, get_origin

NUMBER = {int: re.compile(r"-?[0-9]+"), float: re.compile(r"-?[0-9]+(\.[0-9]+)?")}


def install() -> None:
    """Put the plain conversion in front of typer's, where this typer has the hook (else nothing)."""
    try:
        from typer._coercion import RuntimeParam, build_runtime_param
        from typer.core import _TyperParameter
    except ImportError:  # another typer: its own conversion stands
        return
    if not hasattr(_TyperParameter, "get_runtime_param") or getattr(_TyperParameter, "plain_values", False):
        return

    class Plain(RuntimeParam):
        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            converted = plain(self.annotation, self.parameter_info, value)
            if converted is not None:
                return converted
            return build_runtime_param(param.type_descriptor)._coerce_value(value, param=param, ctx=ctx)

    typer_own = _TyperParameter.get_runtime_param

    def get_runtime_param(self):
        if self._runtime_param is None and handled(self.type_descriptor):
            d = self.type_descriptor
            self._runtime_param = Plain(parameter_info=d.parameter_info, annotation=d.annotation)
        return typer_own(self)

    _TyperParameter.get_runtime_param = get_runtime_param
    _TyperParameter.plain_values = True


def handled(descriptor: Any) -> bool:
    """The kinds converted here: text, a flag, a list of text, a number without a parser or clamp."""
    info = descriptor.parameter_info
    if descriptor.file_annotation is not None or getattr(info, "parser", None) is not None \
            or getattr(info, "clamp", False):
        return False
    kind = descriptor.annotation
    if get_origin(kind) is list:
        return get_args(kind) == (str,)
    return kind in (str, bool, int, float)


def plain(kind: Any, info: Any, value: Any) -> Any:
    """`value` as `kind`, or None where typer's own conversion must decide (and say why not)."""
    if get_origin(kind) is list:
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        return None
    if kind is str:
        return value if isinstance(value, str) else None
    if kind is bool:
        return value if isinstance(value, bool) else None
    if isinstance(value, str) and NUMBER[kind].fullmatch(value):
        number = kind(value)
    elif type(value) is kind:
        number = value
    else:
        return None
    low, high = getattr(info, "min", None), getattr(info, "max", None)
    if (low is not None and number < low) or (high is not None and number > high):
        return None
    return number
