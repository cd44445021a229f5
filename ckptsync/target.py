"""A Target, by what it is made of: where the run is and which store (Target itself), the
policy that judges and keeps checkpoints, the link to the server, and how to print a command
that reaches the same server again."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ckptsync.policy import HOLD_MAX, STALL_TIMEOUT
from ckptsync.transport import Transport

DEFAULT_SETTLE = 60.0
DEFAULT_GENERATIONS = 2


@dataclass(frozen=True)
class RunPolicy:
    """How checkpoints are judged, stored and kept."""

    extra_files: list[str] = field(default_factory=list)
    settle_seconds: float = DEFAULT_SETTLE
    train_process: str | None = None
    # How identical files are stored: "reflink" (a clone, else a hard link when mode and
    # mtime match, else a copy: every file shows its own mtime) or "link" (always hard-link).
    dedup: str = "reflink"
    keep_generations: int = DEFAULT_GENERATIONS  # earlier versions kept per reused name (latest.pt)
    follow_runs: bool = False        # also back up newer sibling run directories (see runs.py)
    runs: tuple[str, ...] = ()       # glob patterns naming run directories, relative to remote_dir's parent
    hold_max: int = HOLD_MAX         # checkpoints a watch holds against rotation at most (hold.py)


@dataclass(frozen=True)
class Link:
    """How the connection to the server behaves."""

    host_key_policy: str = "strict"
    bwlimit: int | None = None       # bytes per second over the link, both directions (--bwlimit)
    limiter: Any = None              # a RateLimiter shared with the other targets of one run, else None
    parallel: int | None = None      # channels a transfer uses at once (--parallel); None: from the round trip
    stall_timeout: float = STALL_TIMEOUT  # seconds a server link may move nothing before the run ends


@dataclass(frozen=True)
class PrintBack:
    """The target options this run was given, so that a printed command reaches the same server."""

    args: tuple[str, ...] = ()
    assumed_instance: bool = False   # no --instance/--host/--remote-dir: instance 0 was taken
    verb: tuple[str, ...] = ()       # the command this run is, e.g. ("list",): for hints that repeat it
    config_path: Path | None = None  # the config file in use, if any

    def command(self, *words: str) -> str:
        """`ckptsync WORDS` aimed at this target, ready to paste into a shell."""
        return " ".join(shlex.quote(w) for w in ("ckptsync", *words, *self.args))

    def command_with(self, option: str, value: str, *words: str) -> str:
        """Like command(), with one target option (--remote-dir, --local-dir) set to another value."""
        args = list(self.args)
        if option in args:
            args[args.index(option) + 1] = value
        else:
            args += [option, value]
        return " ".join(shlex.quote(w) for w in ("ckptsync", *words, *args))

    def tilde_hint(self, missing: str, server_home: str) -> str:
        """For a remote directory the server lacks: when it lies under this machine's home and the
        server's home is another, the laptop's shell most likely expanded `~` (as in `~/run`)."""
        home = os.path.expanduser("~").rstrip("/")
        if not home or home == server_home.rstrip("/") or not missing.startswith(home + "/"):
            return ""
        rel = missing[len(home) + 1:]
        said = f"{home} is this machine's home: the shell probably expanded ~ before ckptsync saw it."
        if "--remote-dir" not in self.args:
            where = f"remote_dir in {self.config_path}" if self.config_path else "remote_dir"
            return f"{said} Write {where} relative to the server's home: {rel}"
        return (f"{said} A relative path is relative to the server's home: "
                f"{self.command_with('--remote-dir', rel, *self.verb)}")


@dataclass
class Target:
    """Where the run is and which store its backups are in; with the policy, the link and how to
    print a command back, each its own record."""

    label: str                      # instance-1, host name, or "local"
    transport: Transport | None     # None when only the backup directory is used
    remote_dir: str | None
    local_dir: Path                 # the backup directory of this target
    store_url: str | None = None    # s3://bucket/prefix/<label>: the backup lives in a bucket (ckptsync.s3)
    s3: dict[str, Any] = field(default_factory=dict)  # the config's s3: block
    policy: RunPolicy = field(default_factory=RunPolicy)
    link: Link = field(default_factory=Link)
    printed: PrintBack = field(default_factory=PrintBack)

    def with_policy(self, **changes: Any) -> Target:
        return replace(self, policy=replace(self.policy, **changes))

    def with_link(self, **changes: Any) -> Target:
        return replace(self, link=replace(self.link, **changes))

    def with_printed(self, **changes: Any) -> Target:
        return replace(self, printed=replace(self.printed, **changes))

    def describe(self) -> str:
        return self.transport.describe() if self.transport else "no server"
