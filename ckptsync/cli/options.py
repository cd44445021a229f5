"""Options shared by several commands, and the step from options to a Target."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ckptsync.config import Target, load_config, resolve_target
from ckptsync.errors import UsageError

Config = Annotated[Optional[str], typer.Option("--config", "-c", help="Config file (default: $CKPTSYNC_CONFIG, ./ckptsync.yaml, ~/.config/ckptsync/config.yaml).", show_default=False)]
Instance = Annotated[Optional[str], typer.Option("--instance", "-i", help="Instance number: from the config, else the SSH alias tnr-N (what `tnr connect N` writes).", show_default=False)]
Host = Annotated[Optional[str], typer.Option("--host", "-H", help="[user@]host[:port] or an ~/.ssh/config alias.", show_default=False)]
RemoteDir = Annotated[Optional[str], typer.Option("--remote-dir", "-r", help="Checkpoint directory on the server. Without --host or --instance: a directory on this machine.", show_default=False)]
LocalDir = Annotated[Optional[str], typer.Option("--local-dir", "-l", help="Backup directory (default: <local_dir>/instance-N).", show_default=False)]
AcceptNew = Annotated[bool, typer.Option("--accept-new-host-key", help="Trust and remember the host key of a server seen for the first time.")]
DryRun = Annotated[bool, typer.Option("--dry-run", "-n", help="Show what would happen; change nothing.")]
Force = Annotated[bool, typer.Option("--force", help="Allow replacing or deleting what is otherwise protected.")]
Compress = Annotated[str, typer.Option("--compress", help="auto (measure and decide), off, or a zstd level 1-19.")]

# Global options: accepted before the command and after it, with the same meaning (see
# ckptsync.cli.commands, which adds them to every command, and the root callback in app.py).
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON, for scripts; an error as one JSON object.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print less: no progress or info lines, fewer details of what went well.")]
LogFile = Annotated[Optional[str], typer.Option("--log-file", help="Append log lines to this file, the final error included.", show_default=False)]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks (also CKPTSYNC_DEBUG=1).")]

GLOBAL_OPTIONS = {"json": (Json, False), "quiet": (Quiet, False), "log_file": (LogFile, None), "debug": (Debug, False)}


def parse_compress(value: str) -> str:
    if value in ("auto", "off"):
        return value
    if value.isdigit() and 1 <= int(value) <= 19:
        return value
    raise UsageError(f"--compress {value!r}: expected auto, off or a level 1-19")


def target(config: str | None, instance: str | None = None, host: str | None = None,
           remote_dir: str | None = None, local_dir: str | None = None,
           accept_new: bool = False, need_remote: bool = True) -> Target:
    t = resolve_target(
        load_config(config), instance=instance, host=host, remote_dir=remote_dir, local_dir=local_dir,
        accept_new_host_key=accept_new, need_remote=need_remote,
    )
    if t.assumed_instance and need_remote:
        from ckptsync.cli.context import output

        output().warn(f"no --instance or --host given: using instance 0 ({t.describe()})")
    return t
