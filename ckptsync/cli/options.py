"""Options shared by several commands, and the step from options to a Target."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ckptsync.policy import MAX_PARALLEL
from ckptsync.errors import UsageError
from ckptsync.ratelimit import RATE_HELP, RateLimiter, parse_rate

if TYPE_CHECKING:
    from ckptsync.config import Target

Config = Annotated[Optional[str], typer.Option("--config", "-c", metavar="FILE", help="Config file (default: $CKPTSYNC_CONFIG, ./ckptsync.yaml, ~/.config/ckptsync/config.yaml).", show_default=False)]
Instance = Annotated[Optional[str], typer.Option("--instance", "-i", metavar="N", help="Instance number: from the config, else the SSH alias tnr-N (what `tnr connect N` writes).", show_default=False)]
Host = Annotated[Optional[str], typer.Option("--host", "-H", metavar="HOST", help="[user@]host[:port] or an ~/.ssh/config alias.", show_default=False)]
RemoteDir = Annotated[Optional[str], typer.Option("--remote-dir", "-r", metavar="DIR", help="Checkpoint directory on the server. Without --host or --instance: a directory on this machine.", show_default=False)]
LocalDir = Annotated[Optional[str], typer.Option("--local-dir", "-l", metavar="DIR", help="Backup directory (default: <local_dir>/instance-N).", show_default=False)]
# For the commands that run several instances at once (backup, list, checklist, cron install).
Instances = Annotated[Optional[list[str]], typer.Option("--instance", "-i", metavar="N", help="Instance number: from the config, else the SSH alias tnr-N (what `tnr connect N` writes). Repeat it for several instances.", show_default=False)]
AllInstances = Annotated[bool, typer.Option("--all-instances", help="Every instance of the config, each with its own backup directory <local_dir>/instance-N.")]
AcceptNew = Annotated[bool, typer.Option("--accept-new-host-key", help="Trust and remember the host key of a server seen for the first time.")]
DryRun = Annotated[bool, typer.Option("--dry-run", "-n", help="Show what would happen; change nothing.")]
Wait = Annotated[bool, typer.Option("--wait", help="Wait for another run on the same backup directory instead of exiting 11.")]
Force = Annotated[bool, typer.Option("--force", help="Allow replacing or deleting what is otherwise protected.")]
Compress = Annotated[str, typer.Option("--compress", metavar="auto|off|1-19", help="auto (measure and decide), off, or a zstd level 1-19.")]
BwLimit = Annotated[Optional[str], typer.Option("--bwlimit", metavar="RATE", help=f"Limit the link to RATE {RATE_HELP}; both directions together, after compression; several instances share it. Default: bwlimit in the config, else none.", show_default=False)]
Parallel = Annotated[Optional[int], typer.Option("--parallel", min=1, max=MAX_PARALLEL, metavar="N", help=f"Move files over N channels at once (1-{MAX_PARALLEL}), each a share of the bytes (backup also splits a large file into byte ranges): one SSH channel carries at most its window per round trip. Default: parallel in the config, else enough for the link's rate (--bwlimit, else 1 Gbit/s) times the server's round trip: 1 on a LAN, 4 at 100 ms (the most chosen without it).", show_default=False)]
ExtraFile = Annotated[Optional[list[str]], typer.Option("--extra-file", metavar="PATH", help="A file beside the checkpoints to back up too (a config, a dataset list), relative to --remote-dir or absolute; repeatable; added to extra_files of the config.", show_default=False)]

# Global options: accepted before the command and after it, with the same meaning (see
# ckptsync.cli.commands, which adds them to every command, and the root callback in app.py).
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON, for scripts; an error as one JSON object.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print less: no progress or info lines, fewer details of what went well.")]
LogFile = Annotated[Optional[str], typer.Option("--log-file", metavar="FILE", help="Append log lines to this file, the final error included.", show_default=False)]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks (also CKPTSYNC_DEBUG=1).")]
Ssh = Annotated[Optional[str], typer.Option("--ssh", metavar="openssh|paramiko", help="SSH client: the system's OpenSSH (the default when ssh is on PATH) or paramiko (also $CKPTSYNC_SSH, ssh: in the config).", show_default=False)]

GLOBAL_OPTIONS = {"json": (Json, False), "quiet": (Quiet, False), "log_file": (LogFile, None), "debug": (Debug, False),
                  "ssh": (Ssh, None), "config": (Config, None)}


def with_bwlimit(t: Target, value: str | None) -> Target:
    """The target with --bwlimit applied (it overrides the config's bwlimit)."""
    if value is None:
        return t
    try:
        return t.with_link(bwlimit=parse_rate(value))
    except ValueError as exc:
        raise UsageError(f"--bwlimit: {exc}") from None


def with_bwlimits(ts: list[Target], value: str | None) -> list[Target]:
    """--bwlimit for one target or several: several share one limiter, since they share the link
    it protects. A bwlimit from the config stays each target's own."""
    ts = [with_bwlimit(t, value) for t in ts]
    if value is None or len(ts) < 2:
        return ts
    shared = RateLimiter(ts[0].link.bwlimit)
    return [t.with_link(limiter=shared) for t in ts]


def with_parallel(ts: list[Target], value: int | None) -> list[Target]:
    """--parallel overrides the config's parallel."""
    return ts if value is None else [t.with_link(parallel=value) for t in ts]


def with_extra_files(ts: list[Target], paths: list[str] | None) -> list[Target]:
    """--extra-file adds to the config's extra_files (each path once)."""
    if not paths:
        return ts
    if any(not p.strip() for p in paths):
        raise UsageError("--extra-file: an empty value (give a path on the server)")
    return [t.with_policy(extra_files=list(dict.fromkeys([*t.policy.extra_files, *paths]))) for t in ts]


def parse_compress(value: str) -> str:
    if value in ("auto", "off"):
        return value
    if value.isdigit() and 1 <= int(value) <= 19:
        return value
    raise UsageError(f"--compress {value!r}: expected auto, off or a level 1-19")


def target(config: str | None, instance: str | None = None, host: str | None = None,
           remote_dir: str | None = None, local_dir: str | None = None,
           accept_new: bool = False, need_remote: bool = True) -> Target:
    from ckptsync.cli.context import settings
    from ckptsync.config import load_config, resolve_target
    from ckptsync.transport import SSH_CHOICES

    ssh = settings().ssh
    if ssh is not None and ssh not in SSH_CHOICES:
        raise UsageError(f"--ssh {ssh!r}: expected openssh, paramiko or auto")
    t = resolve_target(
        load_config(config), instance=instance, host=host, remote_dir=remote_dir, local_dir=local_dir,
        accept_new_host_key=accept_new, need_remote=need_remote, ssh=ssh,
    )
    t = t.with_printed(verb=_verb())
    from ckptsync.datapath import check_command

    check_command(t)
    from ckptsync.cli.context import output

    if t.transport is not None:
        t.transport.on_notice = lambda message: output().warn(message)
    if t.printed.assumed_instance and need_remote:
        output().warn(f"no --instance or --host given: using instance 0 ({t.describe()})")
    return t


def targets(config: str | None, instances: list[str] | None, all_instances: bool, host: str | None = None,
            remote_dir: str | None = None, local_dir: str | None = None, accept_new: bool = False,
            need_remote: bool = True) -> list[Target]:
    """The targets of -i N (repeatable) or --all-instances; one target for every other form."""
    from ckptsync.config import load_config

    names = list(dict.fromkeys(instances or []))
    if all_instances:
        if names:
            raise UsageError("give --instance or --all-instances, not both")
        cfg = load_config(config)
        names = sorted(cfg.instances, key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))
        if not names:
            raise UsageError(f"--all-instances: no instances in {cfg.path or 'the config (no config file found)'}",
                             hint="list them under instances: in the config, or name them with -i N -i M")
    if len(names) <= 1 and not all_instances:
        return [target(config, names[0] if names else None, host, remote_dir, local_dir, accept_new, need_remote)]
    if host is not None:
        raise UsageError("--host names one server: give it without --instance or --all-instances")
    if local_dir is not None:
        raise UsageError("--local-dir is the backup directory of one instance: with several, each uses "
                         "<local_dir>/instance-N (local_dir of the config, default ~/ckpt-backups)")
    return [target(config, n, None, remote_dir, None, accept_new, need_remote) for n in names]


def _verb() -> tuple[str, ...]:
    """The words naming the running command (`cron install`), for hints that repeat it."""
    try:
        from typer._click.globals import get_current_context  # newer typer vendors click (see app.py)
    except ImportError:
        from click import get_current_context
    ctx = get_current_context(silent=True)
    return tuple(ctx.command_path.split()[1:]) if ctx is not None else ()
