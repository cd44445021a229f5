"""The Typer application, the exit-code table and the one place that maps errors to exits."""

from __future__ import annotations

import importlib
import signal
import sys
import textwrap
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

try:  # typer prints an argument's Python type after its name ("NAME <list[str]>"): the name says it
    from typer.core import TyperArgument

    if hasattr(TyperArgument, "display_type_rich"):
        TyperArgument.display_type_rich = lambda self, ctx: None
except ImportError:  # pragma: no cover
    pass



def _wrap_at_spaces_only() -> None:
    """Help text breaks lines at spaces, never after a hyphen: `--discard-staged` and
    `~/ckpt-backups/instance-OLD` stay whole, so they can be copied from the help."""
    for name in ("typer._click._textwrap", "click._textwrap"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        base = module.TextWrapper
        if getattr(base, "whole_words", False):
            continue

        class Wrapper(base):  # type: ignore[valid-type, misc]
            whole_words = True

            def __init__(self, *args, **kwargs) -> None:
                kwargs["break_on_hyphens"] = False
                super().__init__(*args, **kwargs)

        module.TextWrapper = Wrapper


_wrap_at_spaces_only()

from ckptsync import __version__, notify
from ckptsync.cli import coerce, commands, context
from ckptsync.cli import options as o
from ckptsync.errors import CONNECT, EXIT_CODES, INTERRUPTED, UNEXPECTED, USAGE, CkptsyncError
from ckptsync.output import Output, guard_std_streams

# One line per code, wrapped by hand to fit 80 columns under click's two-space indent.
EXIT_TABLE = "\n".join(f"{code:>3}  " + "\n     ".join(textwrap.wrap(text, 70)) for code, text in EXIT_CODES)

app = typer.Typer(
    name="ckptsync",
    help="Back up, verify and restore training checkpoints between rented GPU servers and this machine.",
    epilog="Exit codes:\n\n\b\n" + EXIT_TABLE,  # \b: click keeps the lines as they are
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"ckptsync {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", "-V", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
    json: o.Json = False, quiet: o.Quiet = False, log_file: o.LogFile = None, debug: o.Debug = False,
    ssh: o.Ssh = None, config: o.Config = None,
) -> None:
    context.settings().update(json=json, quiet=quiet, log_file=log_file, debug=debug, ssh=ssh, config=config)


commands.register(app)
coerce.install()   # option values without pydantic, which typer 0.29 would load on every run


def _load_commands() -> None:
    """Nothing left to load: commands.register(app) above lists them all. Kept because
    .ci/make-completions calls it."""


def _on_sigterm(_signum, _frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Run the CLI and exit with the documented code."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    guard_std_streams()
    args = sys.argv[1:] if argv is None else list(argv)
    run = context.begin()
    try:
        code = app(args=args, prog_name="ckptsync", standalone_mode=False)
    except NO_ARGS as exc:
        code = _no_command(run, exc)
    except USAGE_ERRORS as exc:
        if not run.output_built:
            run.update(**context.scan_global_options(args))  # click stopped before it saw them
        hint = f"see '{exc.ctx.command_path} --help'" if exc.ctx else "see 'ckptsync --help'"
        code = _fail(run, exc.format_message(), hint, USAGE, "usage")
    except ABORTS as exc:
        if isinstance(exc.__context__, EOFError):  # click turns an escaped EOFError into Abort
            code = _fail(run, "the connection ended unexpectedly", "run the same command again",
                         CONNECT, "connect")
        else:
            code = _fail(run, "interrupted", "", INTERRUPTED, "interrupted")
    except CLICK_ERRORS as exc:
        code = _fail(run, exc.format_message(), "", exc.exit_code, "usage" if exc.exit_code == USAGE else "unexpected")
    except CkptsyncError as exc:
        code = _fail(run, exc.message, exc.hint, exc.exit_code, type(exc).kind, exc)
    except KeyboardInterrupt:  # outside a command body, with a typer that lets it through
        code = _fail(run, "interrupted", "", INTERRUPTED, "interrupted")
    except Exception as exc:  # the last line of defence: one line, and a way to get more
        code = _fail(run, f"unexpected {type(exc).__name__}: {exc}",
                     "run again with --debug for a traceback, and report it", UNEXPECTED, "unexpected", exc)
    sys.stdout.flush()
    sys.exit(code if isinstance(code, int) else 0)


def _error_output(run: context.Settings) -> Output:
    """The run's Output, even when its log file is what could not be opened."""
    try:
        return run.output()
    except CkptsyncError as exc:
        out = run.output()  # built without the log this time
        out.warn(exc.message)
        return out


def _fail(run: context.Settings, message: str, hint: str, code: int, kind: str,
          exc: BaseException | None = None) -> int:
    out = _error_output(run)
    if exc is not None and run.debug:
        out.text_to_stderr("".join(traceback.format_exception(exc)))
    out.failure(message, hint, exit_code=code, kind=kind)
    notify.after_error(code, message)  # a scheduled run with --notify: no-op when the backup sent one
    return code


def _no_command(run: context.Settings, exc) -> int:
    """`ckptsync` or `ckptsync cron` alone: the help, and the usage exit code."""
    text = exc.ctx.get_help() if exc.ctx else ""
    out = _error_output(run)
    if out.json_mode:  # stdout is for the JSON object
        out.text_to_stderr(text + "\n")
        out.failure("missing command", f"see '{exc.ctx.command_path} --help'" if exc.ctx else "",
                    exit_code=USAGE, kind="usage")
    else:
        out.stdout.write(text + "\n")
    return USAGE
