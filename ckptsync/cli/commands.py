"""Every command of the CLI, in one list, each also taking the global options.

Typer needs every command's options and help to build the app, for `--help` and for every
run, so all cmd_* modules are imported here. They are kept cheap to import: each declares its
options at the top and imports the core it runs (backup, restore, the agent, rich, yaml, ...)
inside the command function, so a run loads only what its own command uses.
tests/test_startup.py checks this.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, NamedTuple

import typer

from ckptsync.cli import (
    cmd_adopt, cmd_archive, cmd_backup, cmd_checklist, cmd_compare, cmd_complete, cmd_cron, cmd_demo, cmd_doctor,
    cmd_list, cmd_prune, cmd_restore, cmd_show, cmd_verify, cmd_watch, context,
)
from ckptsync.cli.options import GLOBAL_OPTIONS
from ckptsync.errors import Interrupted


class Group(NamedTuple):
    help: str
    commands: list[tuple[str, Callable[..., int]]]


def _command(module) -> tuple[str, Callable[..., int]]:
    """(NAME, module.NAME_cmd) of a module cmd_NAME."""
    name = module.__name__.rpartition(".cmd_")[2]
    return name, getattr(module, f"{name}_cmd")


# In the order `ckptsync --help` lists them.
COMMANDS: list[tuple[str, Callable[..., int] | Group]] = [
    *map(_command, (cmd_list, cmd_backup, cmd_watch, cmd_restore, cmd_verify, cmd_prune, cmd_show, cmd_compare,
                    cmd_archive, cmd_adopt, cmd_checklist, cmd_doctor)),
    ("cron", Group(cmd_cron.HELP, [
        ("install", cmd_cron.install_cmd),
        ("show", cmd_cron.show_cmd),
        ("remove", cmd_cron.remove_cmd),
    ])),
    _command(cmd_demo),
]


def register(app: typer.Typer) -> None:
    for name, what in COMMANDS:
        if isinstance(what, Group):
            group = typer.Typer(name=name, help=what.help, no_args_is_help=True, add_completion=False,
                                rich_markup_mode=None)
            for sub, func in what.commands:
                group.command(sub)(with_global_options(func))
            app.add_typer(group, name=name)
        else:
            app.command(name)(with_global_options(what))
    # For the shell completion scripts only: not in --help.
    app.command(cmd_complete.NAME, hidden=True)(with_global_options(cmd_complete.complete_checkpoints))


def with_global_options(func: Callable[..., int]) -> Callable[..., int]:
    """`func` as a command that also takes --json, --quiet, --log-file, --debug, --ssh and --config.

    Their values go to the run's settings, merged with those given before the command name. A
    command may declare one of them itself, for its own help text (cron install's --log-file);
    it is then passed the merged value, so both positions mean the same.
    """
    sig = inspect.signature(func, eval_str=True)
    declared = [name for name in GLOBAL_OPTIONS if name in sig.parameters]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
             for name, (annotation, default) in GLOBAL_OPTIONS.items() if name not in sig.parameters]

    @functools.wraps(func)
    def command(**kwargs):
        run = context.settings()
        run.update(**{name: kwargs[name] for name in GLOBAL_OPTIONS})
        for p in added:
            del kwargs[p.name]
        for name in declared:
            kwargs[name] = getattr(run, name)
        try:
            return func(**kwargs)
        except KeyboardInterrupt:
            # typer turns a KeyboardInterrupt into a silent exit 130; as an error it is reported.
            raise Interrupted("interrupted") from None

    params = [*sig.parameters.values(), *added]
    command.__signature__ = sig.replace(parameters=params)  # what typer reads the options from
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command
