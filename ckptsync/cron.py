"""`ckptsync cron`: one crontab entry per backup directory, kept through `crontab -l` / `crontab -`.

An entry is two lines: a marker naming the target and its backup directory, then the job.

    # ckptsync backup instance-1 -> /home/me/ckpt-backups/instance-1
    */30 * * * * CKPTSYNC_SCHEDULED=1 PATH=... /venv/bin/python3 -m ckptsync backup ... >/dev/null 2>>LOG

CKPTSYNC_SCHEDULED marks the runs cron starts, so that `cron show` tells them from manual ones;
with `--notify`, CKPTSYNC_NOTIFY makes a failed run put up a desktop notice (see notify.py).

The backup directory is the key: installing again for it replaces its entry in place;
every other line of the table is kept byte for byte. The table functions are pure;
the only I/O is running `crontab` (or $CKPTSYNC_CRONTAB).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from ckptsync import notify, osdeps
from ckptsync.config import Target, find_config
from ckptsync.errors import CkptsyncError, ConfigError, IOFailure, UsageError
from ckptsync.policy import RunStatus
from ckptsync.result import Result
from ckptsync.stores import Description, Store, ability, describe, open_store

MARKER_RE = re.compile(r"^# ckptsync backup (?P<label>\S+) -> (?P<dir>.+)$")
LINE_RE = re.compile(r"^\s*(?P<when>@\S+|(?:\S+\s+){4}\S+)\s+(?P<command>.*)$")
STANDARD_PATH = ("/usr/local/bin", "/usr/bin", "/bin")
UNITS = {"m": 1, "min": 1, "h": 60, "d": 1440, "w": 10080}
EVERY_HINT = ("cron runs evenly only at a divisor of an hour (1m, 2m, 3m, 4m, 5m, 6m, 10m, 12m, 15m, 20m, 30m), "
              "of a day (1h, 2h, 3h, 4h, 6h, 8h, 12h), or 1d, 1w")
LOG_TAIL = 5
STALE_SLACK = 300


# -------------------------------------------------- schedules (pure)

@dataclass(frozen=True)
class Schedule:
    expr: str      # the five time fields
    minutes: int   # the interval


def parse_every(text: str, now: datetime) -> Schedule:
    """`30m`, `2h`, `1d` -> a cron schedule. Hourly and longer ones keep the phase of `now`."""
    m = re.fullmatch(r"\s*(\d+)\s*(m|min|h|d|w)\s*", text.lower())
    if not m:
        raise UsageError(f"--every {text!r}: expected a number and a unit (m, h, d, w), e.g. 15m, 30m, 1h, 1d")
    minutes = int(m.group(1)) * UNITS[m.group(2)]
    expr = cron_expr(minutes, now)
    if expr is None:
        raise UsageError(f"--every {text}: cron cannot run a job every {text} evenly", hint=EVERY_HINT)
    return Schedule(expr, minutes)


def cron_expr(minutes: int, now: datetime) -> str | None:
    if minutes <= 0:
        return None
    if minutes < 60:
        if 60 % minutes:
            return None
        return "* * * * *" if minutes == 1 else f"*/{minutes} * * * *"
    if minutes < 1440:
        hours, rest = divmod(minutes, 60)
        if rest or 24 % hours:
            return None
        if hours == 1:
            return f"{now.minute} * * * *"
        start = now.hour % hours
        return f"{now.minute} {f'*/{hours}' if start == 0 else f'{start}-23/{hours}'} * * *"
    if minutes == 1440:
        return f"{now.minute} {now.hour} * * *"
    if minutes == 10080:
        return f"{now.minute} {now.hour} * * {(now.weekday() + 1) % 7}"
    return None


def interval_of(expr: str) -> int | None:
    """The interval in minutes of a schedule written by cron_expr; None for anything else."""
    fields = expr.split()
    if len(fields) != 5 or fields[2:4] != ["*", "*"]:
        return None
    minute, hour, _dom, _mon, dow = fields
    if hour == "*" and dow == "*":
        if minute == "*":
            return 1
        m = re.fullmatch(r"\*/(\d+)", minute)
        if m and int(m.group(1)) > 0:
            return int(m.group(1))
        return 60 if minute.isdigit() else None
    if not minute.isdigit():
        return None
    m = re.fullmatch(r"(?:\*|\d+-23)/(\d+)", hour)
    if m and dow == "*" and int(m.group(1)) > 0:
        return int(m.group(1)) * 60
    if hour.isdigit():
        return 1440 if dow == "*" else 10080 if dow.isdigit() else None
    return None


def every_text(minutes: int) -> str:
    for size, unit in ((10080, "w"), (1440, "d"), (60, "h")):
        if minutes % size == 0:
            return f"{minutes // size}{unit}"
    return f"{minutes}m"


# -------------------------------------------------- the crontab table (pure)

@dataclass
class Entry:
    label: str
    backup_dir: str
    line: str   # the job line; "" when the marker has lost its line

    @property
    def schedule(self) -> str:
        return split_line(self.line)[0]

    @property
    def command(self) -> str:
        return split_line(self.line)[1]


def _lines(text: str) -> list[str]:
    return re.findall(r"[^\n]*\n|[^\n]+\Z", text)


def _is_job(line: str) -> bool:
    s = line.strip()
    return bool(s) and not s.startswith("#") and "ckptsync" in s


def marker(label: str, backup_dir: str) -> str:
    return f"# ckptsync backup {label} -> {backup_dir}"


def entries(table: str) -> list[Entry]:
    lines = _lines(table)
    found = []
    for i, raw in enumerate(lines):
        m = MARKER_RE.match(raw.rstrip("\n"))
        if m:
            nxt = lines[i + 1].rstrip("\n") if i + 1 < len(lines) else ""
            found.append(Entry(m.group("label"), m.group("dir"), nxt if _is_job(nxt) else ""))
    return found


def find_entry(table: str, backup_dir: str) -> Entry | None:
    return next((e for e in entries(table) if e.backup_dir == backup_dir), None)


def _strip(table: str, backup_dir: str) -> tuple[list[str], int, int | None]:
    """The lines without this directory's entries, how many were removed, and where the first was."""
    lines = _lines(table)
    keep: list[str] = []
    removed, first, skip = 0, None, False
    for i, raw in enumerate(lines):
        if skip:
            skip = False
            continue
        m = MARKER_RE.match(raw.rstrip("\n"))
        if m and m.group("dir") == backup_dir:
            removed += 1
            first = len(keep) if first is None else first
            skip = i + 1 < len(lines) and _is_job(lines[i + 1])
            continue
        keep.append(raw)
    return keep, removed, first


def put_entry(table: str, label: str, backup_dir: str, line: str) -> tuple[str, bool]:
    """The table with this directory's entry set to `line` (in place if it had one). -> (table, replaced)"""
    keep, removed, at = _strip(table, backup_dir)
    if at is None:
        if keep and not keep[-1].endswith("\n"):
            keep[-1] += "\n"
        at = len(keep)
    keep[at:at] = [marker(label, backup_dir) + "\n", line + "\n"]
    return "".join(keep), removed > 0


def remove_entry(table: str, backup_dir: str) -> tuple[str, bool]:
    keep, removed, _ = _strip(table, backup_dir)
    return ("".join(keep), True) if removed else (table, False)


# -------------------------------------------------- the job line (pure)

def job_command(python: str, args: list[str], log_file: str, path_dirs: list[str],
                pythonpath: str | None = None, notify_on_failure: bool = False,
                more_env: dict[str, str] | None = None) -> str:
    """The shell command cron runs: quiet, lock-tolerant, no mail. stderr goes to the log too, so
    what fails before the log is open (no interpreter, a broken config) is still recorded."""
    env = f"{notify.SCHEDULED_ENV}=1 "
    if notify_on_failure:
        env += f"{notify.NOTIFY_ENV}=1 "
    env += f"PATH={shlex.quote(':'.join(path_dirs))}"
    if pythonpath:
        env += f" PYTHONPATH={shlex.quote(pythonpath)}"
    for name, value in sorted((more_env or {}).items()):
        env += f" {name}={shlex.quote(value)}"
    argv = [python, "-m", "ckptsync", "backup", *args, "--quiet", "--skip-if-locked", "--log-file", log_file]
    return f"{env} {shlex.join(argv)} >/dev/null 2>>{shlex.quote(log_file)}"


def job_line(expr: str, command: str) -> str:
    return expr + " " + command.replace("%", "\\%")  # an unescaped % ends a cron command


def split_line(line: str) -> tuple[str, str]:
    """(schedule, command as the shell gets it) of a crontab job line."""
    m = LINE_RE.match(line)
    if not m:
        return "", ""
    return m.group("when"), m.group("command").replace("\\%", "%")


def option_value(command: str, option: str) -> str | None:
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    for i, word in enumerate(words[:-1]):
        if word == option:
            return words[i + 1]
    return None


# -------------------------------------------------- what the job needs from this machine

def path_dirs(python: str, tools: tuple[str, ...] = ()) -> list[str]:
    """PATH for the job: the interpreter, ssh, python3, zstd (and `tools`) as found now, then the usual."""
    dirs = [os.path.dirname(python)]
    for tool in ("ssh", "python3", "zstd", *tools):
        found = shutil.which(tool)
        if found:
            dirs.append(os.path.dirname(os.path.abspath(found)))
    dirs.extend(STANDARD_PATH)
    return list(dict.fromkeys(dirs))


def package_path() -> str | None:
    """The directory to put on PYTHONPATH when this copy of ckptsync is found only through
    PYTHONPATH or the current directory (a checkout that is not installed)."""
    root = str(Path(__file__).resolve().parent.parent)
    given = [str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    try:
        here = str(Path.cwd().resolve())
    except OSError:
        here = ""
    return root if root in given or here == root else None


# -------------------------------------------------- crontab I/O

class Crontab:
    """`crontab -l` and `crontab -`; $CKPTSYNC_CRONTAB replaces the command (tests use a fake)."""

    def __init__(self, argv: list[str] | None = None) -> None:
        self.argv = argv or shlex.split(os.environ.get("CKPTSYNC_CRONTAB") or "crontab")

    def _run(self, args: list[str], text: str | None = None) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(self.argv + args, input=text, capture_output=True, timeout=30,
                                  encoding="utf-8", errors="surrogateescape")
        except FileNotFoundError:
            raise ConfigError(f"cannot run {self.argv[0]}: not found",
                              hint="install cron (Debian/Ubuntu: apt-get install cron)") from None
        except OSError as exc:
            raise ConfigError(f"cannot run {self.argv[0]}: {exc.strerror or exc}") from None
        except subprocess.TimeoutExpired:
            raise IOFailure(f"{self.argv[0]} did not answer within 30s") from None

    def read(self) -> str:
        proc = self._run(["-l"])
        if proc.returncode == 0:
            return proc.stdout
        err = proc.stderr.strip()
        if proc.returncode == 1 and not proc.stdout.strip() and "no crontab" in err.lower():
            return ""
        # Anything else: refuse, rather than write a table that lost the user's lines.
        raise IOFailure(f"{self.argv[0]} -l failed (exit {proc.returncode}): {err or 'no message'}",
                        hint="the crontab was not changed")

    def write(self, text: str) -> None:
        proc = self._run(["-"], text)
        if proc.returncode != 0:
            raise IOFailure(f"{self.argv[0]} refused the new table (exit {proc.returncode}): "
                            f"{proc.stderr.strip() or 'no message'}", hint="the crontab was not changed")


# -------------------------------------------------- the three operations

@dataclass
class CronJob:
    """What `cron install` was given; target options are passed on to the job."""

    instance: str | None = None
    host: str | None = None
    remote_dir: str | None = None
    config: str | None = None
    every: str = "30m"
    log_file: str | None = None
    notify: bool = False        # a desktop notice when a scheduled run fails
    ssh: str | None = None      # --ssh (or $CKPTSYNC_SSH) as given to install: the job uses the same client


@dataclass
class CronResult(Result):
    action: str                 # installed, replaced, unchanged, removed, absent, shown
    target: str
    backup_dir: str
    installed: bool
    line: str | None = None
    schedule: str | None = None
    every: str | None = None
    log_file: str | None = None
    others: list[dict] = field(default_factory=list)
    last_run: RunStatus | None = None            # the last run of either kind
    last_scheduled: RunStatus | None = None      # the last run cron started
    last_manual: RunStatus | None = None         # the last run started by hand
    log_tail: list[str] = field(default_factory=list)
    stale: bool = False
    notify: bool = False
    removed_dir: bool = False               # remove: the backup directory held nothing, and is gone
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = super().to_dict()
        for key in ("last_run", "last_scheduled", "last_manual"):
            status = getattr(self, key)
            out[key] = status.to_dict() if status else None
        return out


def default_log_file(backup_dir: Path | str) -> Path:
    return describe(backup_dir).log_dir / "cron.log"


def _abs(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def backup_dir_of(target: Target) -> str:
    """Where the target's backups are: its store URL, or its backup directory made absolute."""
    return describe(target).key


def last_runs(store: Store) -> tuple[RunStatus | None, RunStatus | None, RunStatus | None]:
    """(last run, last scheduled run, last manual run), as the store recorded them."""
    return store.status(), store.status("scheduled"), store.status("manual")


def carried_environment(store: Description, environ) -> tuple[dict[str, str], list[str]]:
    """For a cron entry: the settings of this shell that the store's client reads and that go into
    the entry (a bucket's where and who, never a key), and the names of the keys that cannot."""
    carried = {n: environ[n] for n in store.environment if environ.get(n)}
    return carried, [n for n in store.secrets if environ.get(n)]


def backup_args(target: Target, job: CronJob) -> list[str]:
    """Options for the job's `backup`: the config in use and the target, all paths absolute."""
    args: list[str] = []
    config = find_config(job.config)
    if config is not None:
        args += ["--config", str(config.expanduser().resolve())]
    if job.instance is not None:
        args += ["--instance", job.instance]
    if job.host is not None:
        args += ["--host", job.host]
    if job.remote_dir is not None:
        # A local source is a path here; a server's path stays as given.
        args += ["--remote-dir", _abs(job.remote_dir) if target.label == "local" else job.remote_dir]
    args += ["--local-dir", backup_dir_of(target)]
    if job.ssh is not None:
        args += ["--ssh", job.ssh]
    return args


def _result(action: str, target: Target, table: str, entry: Entry | None) -> CronResult:
    backup_dir = backup_dir_of(target)
    others = [{"target": e.label, "backup_dir": e.backup_dir} for e in entries(table) if e.backup_dir != backup_dir]
    label = entry.label if entry is not None else target.label  # as installed, even if chosen by --local-dir now
    r = CronResult(action=action, target=label, backup_dir=backup_dir, installed=entry is not None,
                   others=others)
    if entry is not None and entry.line:
        r.line = entry.line
        r.schedule = entry.schedule
        minutes = interval_of(entry.schedule)
        r.every = every_text(minutes) if minutes else None
        r.log_file = option_value(entry.command, "--log-file")
        r.notify = f"{notify.NOTIFY_ENV}=1" in entry.command.split()
    return r


def install(target: Target, job: CronJob, crontab: Crontab, now: float | None = None) -> CronResult:
    now = time.time() if now is None else now
    schedule = parse_every(job.every, datetime.fromtimestamp(now))
    problem = target.transport.unreachable() if target.transport is not None else None
    if problem is not None:  # an entry that can only fail: refuse it now, not at every run
        message, hint = problem
        raise ConfigError(f"{target.label}: {message}; no cron entry installed", hint=hint)
    store = describe(target)
    backup_dir = store.key
    log_file = _abs(job.log_file) if job.log_file else str(store.log_dir / "cron.log")
    args = backup_args(target, job)
    if any("\n" in a or "\r" in a for a in args + [log_file]):
        raise UsageError("a path or option with a line break cannot go into a crontab")
    try:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IOFailure(f"cannot create {Path(log_file).parent}: {exc.strerror or exc}") from None
    python = os.path.abspath(sys.executable)  # not resolved: a venv's python is a symlink that matters
    tools = notify.TOOLS if job.notify else ()
    carried, secret = carried_environment(store, os.environ)
    command = job_command(python, args, log_file, path_dirs(python, tools), package_path(), job.notify, carried)
    line = job_line(schedule.expr, command)
    table = crontab.read()
    new, replaced = put_entry(table, target.label, backup_dir, line)
    if new != table:
        crontab.write(new)
    action = "unchanged" if new == table else "replaced" if replaced else "installed"
    r = _result(action, target, new, find_entry(new, backup_dir))
    running = daemon_running()
    if running is False:
        r.warnings.append(no_daemon_text(sys.platform))
    if secret:
        r.warnings.append(f"{', '.join(secret)} set in this shell will not reach the cron job (keys do not go "
                          "into a crontab): keep them in ~/.aws/credentials or a profile")
    if job.notify and notify.notifier() is None:
        r.warnings.append(f"--notify: no {notify.wanted()} found on PATH; "
                          "a failed run will only show in the log and in `ckptsync list`")
    r.warnings.extend(remote_dir_warnings(target))
    return r


def remote_dir_warnings(target: Target) -> list[str]:
    """What the entry's backup will find in remote_dir, said as list says it: no checkpoints there
    (and where they are instead), or that it cannot be looked at now."""
    from ckptsync.scan import empty_remote_dir, scan_server
    from ckptsync.server import RemoteDirMissing, open_server

    if target.transport is None:
        return []
    try:
        with open_server(target) as server:
            view = scan_server(server, target.remote_dir, target.policy.settle_seconds)
            if view.checkpoints:
                return []
            empty = empty_remote_dir(server, view, target, "cron install")
    except RemoteDirMissing as exc:  # not made yet, perhaps: the entry's backups fail until it is
        return [f"{exc.message}; each backup fails (exit 10) until it exists" + (f"; {exc.hint}" if exc.hint else "")]
    except CkptsyncError as exc:
        return [f"could not look into {target.remote_dir} now: {exc.message}"]
    if empty.young:
        return [empty.young_text]
    return [f"{empty.message}: {empty.hint}"]


def remove(target: Target, crontab: Crontab) -> CronResult:
    table = crontab.read()
    store = describe(target)
    backup_dir = store.key
    old = find_entry(table, backup_dir)
    new, removed = remove_entry(table, backup_dir)
    if removed:
        crontab.write(new)
    r = _result("removed" if removed else "absent", target, new, None)
    r.target = old.label if old is not None else r.target
    if old is not None and store.can("files_here"):  # only a store here has a directory that install made
        log = option_value(old.command, "--log-file") if old.line else None
        r.removed_dir = drop_if_unused(Path(backup_dir), Path(log) if log else None)
    return r


def drop_if_unused(backup_dir: Path, log_file: Path | None) -> bool:
    """Remove what install made when nothing else ever came into it: the backup directory, its
    .ckptsync/ and an empty cron log. Anything else in there keeps the whole directory."""
    meta = backup_dir / ".ckptsync"
    default_log = default_log_file(backup_dir)
    try:
        if log_file in (None, default_log) and default_log.is_file() and default_log.stat().st_size == 0:
            default_log.unlink()
        for d in (meta, backup_dir):
            if d.is_dir() and not d.is_symlink():
                d.rmdir()  # only when empty
    except OSError:
        return False
    return not backup_dir.exists()


def show(target: Target, crontab: Crontab, now: float | None = None) -> CronResult:
    now = time.time() if now is None else now
    table = crontab.read()
    backup_dir = backup_dir_of(target)
    r = _result("shown", target, table, find_entry(table, backup_dir))
    store = open_store(target)
    r.last_run, r.last_scheduled, r.last_manual = last_runs(store)
    if r.last_scheduled is None and r.last_manual is None and r.last_run is not None:
        # Recorded before runs were told apart: it counts as whichever kind it says it was.
        if r.last_run.scheduled:
            r.last_scheduled = r.last_run
        else:
            r.last_manual = r.last_run
    log = r.log_file or str(default_log_file(backup_dir))
    r.log_file = log
    r.log_tail = tail(Path(log), LOG_TAIL)
    minutes = interval_of(r.schedule or "")
    # A manual run says nothing about whether cron still runs the entry.
    last = r.last_scheduled
    if r.installed and minutes and last:
        r.stale = now - last.time > 2 * minutes * 60 + STALE_SLACK
    holder = ability(store, "stuck_holder")   # a bucket's lease lock expires by itself
    stuck = holder(now, target.link.stall_timeout) if holder else ""
    if stuck:
        r.warnings.append(stuck)
    return r


# -------------------------------------------------- is a cron daemon running

CRON_DAEMONS = {"cron", "crond", "cronie", "fcron", "busybox-crond"}


def daemon_running(proc: str | None = None) -> bool | None:
    """Whether a cron daemon runs here; None when this cannot be told. $CKPTSYNC_PROC replaces /proc."""
    return osdeps.process_running(CRON_DAEMONS, proc)


def no_daemon_text(platform: str) -> str:
    if platform == "darwin":
        return ("no cron daemon is running. On macOS launchd starts cron once a crontab exists; if the "
                "entry does not run, enable it with 'sudo launchctl load -w "
                "/System/Library/LaunchDaemons/com.vix.cron.plist' and give /usr/sbin/cron Full Disk "
                "Access (System Settings > Privacy & Security) when the backups are under your home")
    return ("no cron daemon is running: the entry will not run until one is started "
            "(Debian/Ubuntu: sudo systemctl enable --now cron; elsewhere: cronie or crond)")


def tail(path: Path, count: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
            data = f.read()
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-count:]
