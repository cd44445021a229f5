"""The output mode of one run, and the one Output built from it.

The global options (--json, --quiet, --log-file, --debug, --ssh, --config) may come before the command or after
it; both places write here. The Output is built on first use, once every option is parsed,
and the final error of the run goes through the same Output as its results.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

from ckptsync.errors import UsageError
from ckptsync.output import Output


@dataclass
class Settings:
    json: bool = False
    quiet: bool = False
    log_file: str | None = None
    debug: bool = field(default_factory=lambda: bool(os.environ.get("CKPTSYNC_DEBUG")))
    ssh: str | None = None
    config: str | None = None
    _output: Output | None = field(default=None, repr=False)

    def update(self, *, json: bool = False, quiet: bool = False, log_file: str | None = None,
               debug: bool = False, ssh: str | None = None, config: str | None = None) -> None:
        """Merge options given in one place: a flag set anywhere stays set; the last --log-file
        (--ssh, --config) wins."""
        self.json = self.json or json
        self.quiet = self.quiet or quiet
        self.debug = self.debug or debug
        if log_file is not None:
            self.log_file = log_file
        if ssh is not None:
            self.ssh = ssh
        if config is not None:
            self.config = config

    def argv(self) -> list[str]:
        """These settings as global options, for a child `ckptsync` process."""
        return ((["--json"] if self.json else []) + (["--quiet"] if self.quiet else [])
                + (["--log-file", self.log_file] if self.log_file else []) + (["--debug"] if self.debug else []) + (["--ssh", self.ssh] if self.ssh else [])
                + (["--config", self.config] if self.config else []))

    @property
    def output_built(self) -> bool:
        return self._output is not None

    def output(self) -> Output:
        if self._output is None:
            try:
                self._output = Output(json_mode=self.json, quiet=self.quiet, log_file=self.log_file)
            except UsageError:
                # The log file cannot be opened: that error, and anything after it, still has
                # to reach the user in the chosen mode.
                self._output = Output(json_mode=self.json, quiet=self.quiet)
                raise
        return self._output


_current = Settings()


def begin() -> Settings:
    """Fresh settings for a new run (main() calls this once per invocation)."""
    global _current
    _current = Settings()
    return _current


def settings() -> Settings:
    return _current


def output() -> Output:
    """The run's one Output."""
    return _current.output()


def render(result: Any, human: Callable[[Output, Any], None], to_json: Callable[[Any], Any] | None = None) -> int:
    """Hand a command's result to the run's Output; returns the exit code."""
    return output().render(result, human, to_json)


def scan_global_options(args: list[str]) -> dict[str, Any]:
    """The global options in a raw command line, for a usage error: click stops parsing at the
    first bad word, before it records --json given earlier (or later) on the line.

    Words after `--` are operands. A value that happens to read like one of these options
    (`--remote-dir --json`) is taken as the option; a usage error is the only user of this.
    """
    found: dict[str, Any] = {}
    words = iter(args)
    for word in words:
        if word == "--":
            break
        if word == "--json":
            found["json"] = True
        elif word in ("--quiet", "-q"):
            found["quiet"] = True
        elif word == "--debug":
            found["debug"] = True
        elif word == "--log-file":
            found["log_file"] = next(words, None)
        elif word.startswith("--log-file="):
            found["log_file"] = word.split("=", 1)[1]
    return found
