"""The Typer application, the exit-code table and the one place that maps errors to exits."""

from __future__ import annotations

import importlib
import os
import signal
import sys
import traceback
from typing import Annotated, Optional

import typer

# Newer typer vendors click (typer._click) and does not install it; older typer uses click
# itself. Catch the exceptions of whichever are present.
_sources = []
try:
    from typer._click import exceptions as _vendored
    _sources.append(_vendored)
except ImportError:  # pragma: no cover
    pass
try:
    from click import exceptions as _click
    _sources.append(_click)
except ImportError:
    pass


def _exceptions(name: str) -> tuple[type, ...]:
    return tuple({getattr(m, name) for m in _sources if hasattr(m, name)})


NO_ARGS = _exceptions("NoArgsIsHelpError")
USAGE_ERRORS = _exceptions("UsageError")
ABORTS = tuple(set(_exceptions("Abort")) | ({typer.Abort} if hasattr(typer, "Abort") else set()))
CLICK_ERRORS = _exceptions("ClickException")

from ckptsync import __version__
from ckptsync.errors import EXIT_CODES, INTERRUPTED, UNEXPECTED, USAGE, CkptsyncError
from ckptsync.output import Output

EXIT_TABLE = "\n\n".join(f"{code:>3}  {text}" for code, text in EXIT_CODES)

app = typer.Typer(
    name="ckptsync",
    help="Back up, verify and restore training checkpoints between rented GPU servers and this machine.",
    epilog="Exit codes:\n\n" + EXIT_TABLE,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

state = {"debug": bool(os.environ.get("CKPTSYNC_DEBUG"))}

# Each module registers its command(s) on `app`.
COMMANDS = ("list", "backup", "restore", "verify", "prune", "show", "compare", "archive",
            "checklist", "cron", "demo")


def _version(value: bool) -> None:
    if value:
        print(f"ckptsync {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", "-V", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks (also CKPTSYNC_DEBUG=1).")] = False,
) -> None:
    if debug:
        state["debug"] = True


def _load_commands() -> None:
    for name in COMMANDS:
        try:
            importlib.import_module(f"ckptsync.cli.cmd_{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"ckptsync.cli.cmd_{name}":
                raise


def _on_sigterm(_signum, _frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Run the CLI and exit with the documented code."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    _load_commands()
    out = Output()
    try:
        code = app(args=argv, prog_name="ckptsync", standalone_mode=False)
    except NO_ARGS as exc:
        print(exc.ctx.get_help() if exc.ctx else "")
        code = USAGE
    except USAGE_ERRORS as exc:
        hint = f"see '{exc.ctx.command_path} --help'" if exc.ctx else "see 'ckptsync --help'"
        out.error(exc.format_message(), hint)
        code = USAGE
    except ABORTS:
        out.error("interrupted")
        code = INTERRUPTED
    except CLICK_ERRORS as exc:
        out.error(exc.format_message())
        code = exc.exit_code
    except CkptsyncError as exc:
        if state["debug"]:
            traceback.print_exc()
        out.error(exc.message, exc.hint)
        code = exc.exit_code
    except KeyboardInterrupt:
        out.error("interrupted")
        code = INTERRUPTED
    except BrokenPipeError:
        code = 0
    except Exception as exc:  # the last line of defence: one line, and a way to get more
        if state["debug"]:
            traceback.print_exc()
        out.error(f"unexpected {type(exc).__name__}: {exc}", "run again with --debug for a traceback, and report it")
        code = UNEXPECTED
    sys.exit(code if isinstance(code, int) else 0)
