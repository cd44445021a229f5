"""Runs started by cron, and the desktop notice a failed one puts up (`cron install --notify`).

The crontab line sets CKPTSYNC_SCHEDULED=1 (and CKPTSYNC_NOTIFY=1 with --notify); a backup
records the first in its status, and after a failed run calls the notifier of this machine:
notify-send on Linux, osascript on macOS. A run that fails before the backup can record it (a
broken config) is noticed by the CLI's error path instead. No notifier, no notice: the log and
`list` still say it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from ckptsync.policy import RunStatus

SCHEDULED_ENV = "CKPTSYNC_SCHEDULED"
NOTIFY_ENV = "CKPTSYNC_NOTIFY"
TOOLS = ("notify-send", "osascript")
TITLE = "ckptsync backup failed"
# Shows the text without putting it inside AppleScript source (no quoting to get wrong).
OSASCRIPT = ("on run argv", "display notification (item 2 of argv) with title (item 1 of argv)", "end run")


def scheduled() -> bool:
    return os.environ.get(SCHEDULED_ENV) == "1"


def wanted(platform: str | None = None) -> str:
    return "osascript" if (platform or sys.platform) == "darwin" else "notify-send"


def notifier(platform: str | None = None) -> str | None:
    return shutil.which(wanted(platform))


def argv(tool: str, title: str, body: str) -> list[str]:
    if os.path.basename(tool) == "osascript":
        return [tool, *(w for line in OSASCRIPT for w in ("-e", line)), title, body]
    return [tool, "--app-name=ckptsync", "--urgency=critical", title, body]


def _session_env() -> dict[str, str]:
    """cron gives a job no session bus address; the user's bus is at a fixed place on Linux."""
    from ckptsync import osdeps  # not at the top: the CLI imports this module for --help

    env = dict(os.environ)
    bus = osdeps.session_bus() if "DBUS_SESSION_BUS_ADDRESS" not in env else None
    if bus is not None:
        env["DBUS_SESSION_BUS_ADDRESS"] = f"unix:path={bus}"
    return env


_handled = False  # one notice per process: a backup's own, or the CLI's for an earlier failure


def after_run(status: RunStatus) -> str | None:
    """Put up a notice for a failed scheduled run when asked to; -> what was said, or None."""
    global _handled
    if status.ok or not scheduled() or os.environ.get(NOTIFY_ENV) != "1" or _handled:
        return None
    _handled = True
    tool = notifier()
    if tool is None:
        return None
    body = f"{status.target or 'backup'}: exit {status.exit_code}: {status.error or 'see the log'}"
    try:
        subprocess.run(argv(tool, TITLE, body), env=_session_env(), stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None  # a notice is a courtesy: it never changes how the run ends
    return f"desktop notice sent with {os.path.basename(tool)}: {body}"


def after_error(exit_code: int, message: str) -> None:
    """For a run that failed before a backup could record it (a broken config, say)."""
    after_run(RunStatus(time=time.time(), exit_code=exit_code, ok=False, error=message))
