"""`ckptsync cron`: the crontab table functions, the commands against a fake crontab,
the installed line run as cron would run it, and one round trip through the real crontab."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from ckptsync import cron
from ckptsync.errors import UsageError
from ckptsync.policy import RunStatus
from ckptsync.stores.directory import DirectoryStore
from helpers import run_cli, set_tree_mtime, tree_digest

NOW = datetime(2024, 12, 24, 14, 23)  # a Tuesday

FAKE_CRONTAB = """#!/bin/sh
# Keeps the table in one file, like `crontab -l` / `crontab -`.
table={table}
case "$1" in
  -l) [ -f "$table" ] || {{ echo "no crontab for $(id -un)" >&2; exit 1; }}; exec cat "$table" ;;
  -) cat > "$table.new" && mv "$table.new" "$table" ;;
  *) echo "fake crontab: unexpected $*" >&2; exit 2 ;;
esac
"""

USER_TABLE = (
    b"# my own jobs\n"
    b"MAILTO=me@example.com\n"
    b"SHELL=/bin/bash\n"
    b"0 3 * * * /usr/local/bin/cleanup --days 7  # keep\n"
    b"\n"
    b"# caf\xe9 \xff not UTF-8\n"
    b"*/5 * * * *\tdate +\\%s >> /tmp/ticks"  # no newline at the end
)


# -------------------------------------------------- pure: schedules

@pytest.mark.parametrize("every, expr, minutes", [
    ("1m", "* * * * *", 1),
    ("5m", "*/5 * * * *", 5),
    ("15m", "*/15 * * * *", 15),
    ("30m", "*/30 * * * *", 30),
    ("30min", "*/30 * * * *", 30),
    (" 20M ", "*/20 * * * *", 20),
    ("60m", "23 * * * *", 60),
    ("1h", "23 * * * *", 60),
    ("2h", "23 */2 * * *", 120),
    ("120m", "23 */2 * * *", 120),
    ("3h", "23 2-23/3 * * *", 180),
    ("8h", "23 6-23/8 * * *", 480),
    ("12h", "23 2-23/12 * * *", 720),
    ("24h", "23 14 * * *", 1440),
    ("1d", "23 14 * * *", 1440),
    ("7d", "23 14 * * 2", 10080),
    ("1w", "23 14 * * 2", 10080),
])
def test_parse_every(every, expr, minutes):
    s = cron.parse_every(every, NOW)
    assert (s.expr, s.minutes) == (expr, minutes)
    assert cron.interval_of(s.expr) == minutes


@pytest.mark.parametrize("every", ["7m", "45m", "90m", "5h", "7h", "25h", "2d", "3w", "0m", "0h", "30", "m", "1.5h", "30s", "-5m", "1h30m"])
def test_parse_every_rejects(every):
    with pytest.raises(UsageError) as exc:
        cron.parse_every(every, NOW)
    assert exc.value.exit_code == 2 and "--every" in exc.value.message


@pytest.mark.parametrize("expr, minutes", [
    ("*/10 * * * *", 10), ("0 * * * *", 60), ("5 1-23/4 * * *", 240), ("0 0 * * 0", 10080),
    ("0 0 1 * *", None), ("@daily", None), ("*/x * * * *", None), ("0 9-17 * * *", None),
])
def test_interval_of(expr, minutes):
    assert cron.interval_of(expr) == minutes


@pytest.mark.parametrize("minutes, text", [(1, "1m"), (30, "30m"), (60, "1h"), (180, "3h"), (1440, "1d"), (10080, "1w")])
def test_every_text(minutes, text):
    assert cron.every_text(minutes) == text


# -------------------------------------------------- pure: the table

LINE_A = "*/30 * * * * /py -m ckptsync backup --local-dir /b/a"
LINE_B = "0 * * * * /py -m ckptsync backup --local-dir /b/b"


@pytest.mark.parametrize("before, after, replaced", [
    ("", "# ckptsync backup a -> /b/a\n" + LINE_A + "\n", False),
    ("0 3 * * * x", "0 3 * * * x\n# ckptsync backup a -> /b/a\n" + LINE_A + "\n", False),
    ("0 3 * * * x\n", "0 3 * * * x\n# ckptsync backup a -> /b/a\n" + LINE_A + "\n", False),
    # replaced in place, neighbours untouched
    ("1\n# ckptsync backup a -> /b/a\nold ckptsync line\n2\n", "1\n# ckptsync backup a -> /b/a\n" + LINE_A + "\n2\n", True),
    # a marker whose job line was deleted by hand: the next (foreign) line stays
    ("# ckptsync backup a -> /b/a\n0 3 * * * x\n", "# ckptsync backup a -> /b/a\n" + LINE_A + "\n0 3 * * * x\n", True),
    # duplicates (a copy-paste) collapse into one
    ("# ckptsync backup a -> /b/a\nckptsync 1\nmid\n# ckptsync backup a -> /b/a\nckptsync 2\n",
     "# ckptsync backup a -> /b/a\n" + LINE_A + "\nmid\n", True),
    # another directory's entry is another entry
    ("# ckptsync backup b -> /b/b\n" + LINE_B + "\n",
     "# ckptsync backup b -> /b/b\n" + LINE_B + "\n# ckptsync backup a -> /b/a\n" + LINE_A + "\n", False),
    # a prefix of the directory is not the directory
    ("# ckptsync backup a -> /b/a2\n" + LINE_B + "\n",
     "# ckptsync backup a -> /b/a2\n" + LINE_B + "\n# ckptsync backup a -> /b/a\n" + LINE_A + "\n", False),
])
def test_put_entry(before, after, replaced):
    assert cron.put_entry(before, "a", "/b/a", LINE_A) == (after, replaced)
    # idempotent
    assert cron.put_entry(after, "a", "/b/a", LINE_A) == (after, True)


@pytest.mark.parametrize("before, after, removed", [
    ("", "", False),
    ("0 3 * * * x", "0 3 * * * x", False),
    ("x\n# ckptsync backup a -> /b/a\n" + LINE_A + "\ny", "x\ny", True),
    ("# ckptsync backup a -> /b/a\n" + LINE_A, "", True),
    ("# ckptsync backup a -> /b/a\n\n0 3 * * * x\n", "\n0 3 * * * x\n", True),
    ("# ckptsync backup b -> /b/b\n" + LINE_B + "\n", "# ckptsync backup b -> /b/b\n" + LINE_B + "\n", False),
])
def test_remove_entry(before, after, removed):
    assert cron.remove_entry(before, "/b/a") == (after, removed)


def test_entries_and_find():
    table = ("# ckptsync backup instance-1 -> /b/with -> arrow\n" + LINE_A + "\n"
             "# ckptsync backup local -> /b/b\n"
             "# not ours\n")
    found = cron.entries(table)
    assert [(e.label, e.backup_dir, e.line) for e in found] == [
        ("instance-1", "/b/with -> arrow", LINE_A), ("local", "/b/b", "")]
    assert cron.find_entry(table, "/b/b").line == ""
    assert cron.find_entry(table, "/b") is None


def test_job_line_escapes_percent_and_splits_back():
    command = cron.job_command("/v env/bin/python3", ["--local-dir", "/b/50%/x"], "/b/log's", ["/v env/bin", "/usr/bin"])
    line = cron.job_line("*/30 * * * *", command)
    assert "50\\%" in line and line.count("%") == line.count("\\%")
    when, back = cron.split_line(line)
    assert (when, back) == ("*/30 * * * *", command)
    words = shlex.split(back)
    assert words[:3] == ["CKPTSYNC_SCHEDULED=1", "PATH=/v env/bin:/usr/bin", "/v env/bin/python3"]
    assert words[3:6] == ["-m", "ckptsync", "backup"]
    assert cron.option_value(back, "--log-file") == "/b/log's"
    assert cron.option_value(back, "--local-dir") == "/b/50%/x"
    assert back.endswith(" >/dev/null 2>>'/b/log'\"'\"'s'")
    assert cron.split_line("@hourly run it") == ("@hourly", "run it")


# -------------------------------------------------- the commands, against a fake crontab

@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fake `crontab`, an isolated HOME/cwd whose ~/.ssh/config names tnr-1 to tnr-3, and a
    process table with a cron daemon in it: -> (env for run_cli, table file)."""
    table = tmp_path / "crontab.txt"
    script = tmp_path / "fake-crontab"
    script.write_text(FAKE_CRONTAB.format(table=shlex.quote(str(table))))
    script.chmod(0o755)
    home = tmp_path / "home"
    (home / "cwd").mkdir(parents=True)
    (home / ".ssh").mkdir()
    (home / ".ssh" / "config").write_text("".join(f"Host tnr-{n}\n  HostName 127.0.0.1\n" for n in (1, 2, 3)))
    monkeypatch.chdir(home / "cwd")
    env = {"CKPTSYNC_CRONTAB": str(script), "HOME": str(home), "CKPTSYNC_CONFIG": None, "XDG_CONFIG_HOME": None,
           "CKPTSYNC_PROC": str(fake_proc(tmp_path / "proc", "cron")),
           "COLUMNS": None}  # plain lines, as in a pipe (pytest-xdist workers set COLUMNS)
    return env, table


def fake_proc(root: Path, *names: str) -> Path:
    """A /proc with one process per name (only `<pid>/comm` is read)."""
    root.mkdir()
    for pid, name in enumerate(names, start=100):
        (root / str(pid)).mkdir()
        (root / str(pid) / "comm").write_text(name + "\n")
    return root


def cli(env, *args):
    return run_cli("cron", *args, env=env, timeout=60)


def test_install_twice_keeps_one_entry_and_other_lines(fake, server_tree, tmp_path):
    env, table = fake
    table.write_bytes(USER_TABLE)
    dest = tmp_path / "backups" / "a"
    args = ("--remote-dir", server_tree, "--local-dir", dest)
    first = cli(env, "install", *args)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines()[:2] == ["installed: cron entry for local, every 30m (*/30 * * * *)",
                                             f"  backups:  {dest}"]
    assert "warning" not in first.stderr
    once = table.read_bytes()
    assert once.startswith(USER_TABLE + b"\n# ckptsync backup local -> " + str(dest).encode() + b"\n*/30 * * * * ")
    assert (dest / ".ckptsync").is_dir()  # the log's directory exists before the first run

    second = cli(env, "install", *args, "--every", "1h")
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith("replaced: cron entry for local")
    twice = table.read_bytes()
    assert twice.startswith(USER_TABLE + b"\n")
    assert twice.count(b"# ckptsync backup") == 1 and twice.count(b"-m ckptsync backup") == 1
    entry = cron.find_entry(twice.decode("utf-8", "surrogateescape"), str(dest))
    assert cron.interval_of(entry.schedule) == 60

    # the line: this interpreter, absolute paths, quiet, lock-tolerant, logged, no mail
    words = shlex.split(entry.command)
    assert words[0] == "CKPTSYNC_SCHEDULED=1" and "CKPTSYNC_NOTIFY=1" not in words
    path = words[1].removeprefix("PATH=").split(":")
    assert os.path.dirname(os.path.abspath(sys.executable)) in path
    if shutil.which("ssh"):
        assert os.path.dirname(shutil.which("ssh")) in path
    python = words.index(os.path.abspath(sys.executable))
    assert words[python + 1:python + 4] == ["-m", "ckptsync", "backup"]
    assert "--config" not in words
    assert cron.option_value(entry.command, "--remote-dir") == str(server_tree)
    assert cron.option_value(entry.command, "--local-dir") == str(dest)
    assert cron.option_value(entry.command, "--log-file") == str(dest / ".ckptsync" / "cron.log")
    assert {"--quiet", "--skip-if-locked"} <= set(words)
    assert words[-2:] == [">/dev/null", f"2>>{dest / '.ckptsync' / 'cron.log'}"]


def test_two_targets_two_entries_and_remove_only_one(fake, tmp_path):
    env, table = fake
    table.write_bytes(USER_TABLE)
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli(env, "install", "--instance", "1", "--remote-dir", "/srv/ckpt", "--local-dir", a).returncode == 0
    assert cli(env, "install", "--instance", "2", "--remote-dir", "/srv/ckpt", "--local-dir", b, "--every", "15m").returncode == 0
    text = table.read_bytes().decode("utf-8", "surrogateescape")
    found = {e.backup_dir: e for e in cron.entries(text)}
    assert set(found) == {str(a), str(b)}
    assert found[str(a)].label == "instance-1" and found[str(b)].label == "instance-2"
    assert cron.option_value(found[str(b)].command, "--instance") == "2"
    # a server path is passed on as given, not made absolute here
    assert cron.option_value(found[str(b)].command, "--remote-dir") == "/srv/ckpt"
    with_b = table.read_bytes()

    res = cli(env, "remove", "--instance", "1", "--local-dir", a)
    assert res.returncode == 0 and res.stdout.startswith(f"removed the cron entry for instance-1 ({a})")
    after = table.read_bytes()
    assert after.startswith(USER_TABLE + b"\n")
    assert [e.backup_dir for e in cron.entries(after.decode("utf-8", "surrogateescape"))] == [str(b)]
    assert after == with_b.replace(cron.marker("instance-1", str(a)).encode() + b"\n"
                                   + found[str(a)].line.encode() + b"\n", b"")

    again = cli(env, "remove", "--local-dir", a)
    assert again.returncode == 0
    assert f"no cron entry for instance-0 ({a}); nothing to remove" in again.stdout
    assert f"instance-2 -> {b}" in again.stdout
    assert table.read_bytes() == after

    assert cli(env, "remove", "--local-dir", b).returncode == 0
    assert table.read_bytes() == USER_TABLE + b"\n"


def test_config_in_use_is_passed_as_absolute_path(fake, tmp_path):
    env, table = fake
    Path("ckptsync.yaml").write_text(json.dumps({"remote_dir": "/srv/ckpt", "local_dir": str(tmp_path / "bk")}))
    res = cli(env, "install", "-i", "3", "--every", "2h", "--log-file", "logs/cron.log")
    assert res.returncode == 0, res.stderr
    entry = cron.find_entry(table.read_text(), str(tmp_path / "bk" / "instance-3"))
    assert cron.option_value(entry.command, "--config") == str(Path("ckptsync.yaml").resolve())
    assert cron.option_value(entry.command, "--log-file") == str(Path("logs/cron.log").resolve())
    assert Path("logs").is_dir()


@pytest.mark.parametrize("every", ["7m", "90m", "2d", "soon"])
def test_uneven_every_is_refused(fake, tmp_path, every):
    env, table = fake
    table.write_bytes(USER_TABLE)
    res = cli(env, "install", "--remote-dir", tmp_path, "--local-dir", tmp_path / "b", "--every", every)
    assert res.returncode == 2
    assert "--every" in res.stderr and every in res.stderr
    assert "Traceback" not in res.stderr
    assert table.read_bytes() == USER_TABLE


def test_unreadable_crontab_is_never_overwritten(fake, tmp_path):
    env, table = fake
    broken = tmp_path / "broken-crontab"
    broken.write_text("#!/bin/sh\n[ \"$1\" = -l ] && { echo 'crontab: permission denied' >&2; exit 1; }\n"
                      f"cat > {shlex.quote(str(table))}\n")
    broken.chmod(0o755)
    table.write_bytes(USER_TABLE)
    res = cli({**env, "CKPTSYNC_CRONTAB": str(broken)}, "install", "--remote-dir", tmp_path, "--local-dir", tmp_path / "b")
    assert res.returncode == 5
    assert "permission denied" in res.stderr and "not changed" in res.stderr
    assert table.read_bytes() == USER_TABLE
    missing = cli({**env, "CKPTSYNC_CRONTAB": str(tmp_path / "no-such-crontab")}, "show")
    assert missing.returncode == 4 and "install cron" in missing.stderr


def test_show_without_and_with_status(fake, tmp_path):
    env, table = fake
    dest = tmp_path / "b"
    res = cli(env, "show", "--local-dir", dest)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [f"no cron entry for instance-0 ({dest})", "last scheduled run: none recorded",
                                       "last manual run: none recorded"]

    assert cli(env, "install", "--remote-dir", tmp_path, "--local-dir", dest).returncode == 0
    res = cli(env, "show", "--local-dir", dest)
    lines = res.stdout.splitlines()
    assert lines[:2] == ["cron entry for local: every 30m (*/30 * * * *)", f"  backups: {dest}"]
    assert lines[2].strip() == cron.find_entry(table.read_text(), str(dest)).line
    assert lines[3:] == ["last scheduled run: none recorded", "last manual run: none recorded"]

    DirectoryStore(dest).record_status(RunStatus.from_dict({"command": "backup", "time": time.time() - 12 * 60, "ok": True, "exit_code": 0,
                               "error": "", "fetched": ["checkpoint-500"], "failed": {}, "skipped": {},
                               "up_to_date": ["checkpoint-450"], "raw_bytes": 1, "seconds": 1.0, "scheduled": True}))
    log = dest / ".ckptsync" / "cron.log"
    log.write_text("".join(f"2024-12-24 14:{m:02d}:00 INFO line {m}\n" for m in range(8)))
    res = cli(env, "show", "--local-dir", dest)
    lines = res.stdout.splitlines()
    assert lines[3:5] == ["last scheduled run 12m ago: ok, fetched checkpoint-500", "last manual run: none recorded"]
    assert lines[5] == f"log {log} (last 5 lines):"
    assert [l.strip() for l in lines[6:]] == [f"2024-12-24 14:{m:02d}:00 INFO line {m}" for m in range(3, 8)]
    assert "warning" not in res.stderr

    DirectoryStore(dest).record_status(RunStatus.from_dict({"command": "backup", "time": time.time() - 2 * 3600, "ok": False, "exit_code": 20,
                               "error": "cannot connect to tnr-1: Connection refused", "fetched": [], "failed": {},
                               "skipped": {}, "up_to_date": [], "raw_bytes": 0, "seconds": 0.2, "scheduled": True}))
    # a manual run since then does not hide the failed scheduled one, nor that cron went quiet
    DirectoryStore(dest).record_status(RunStatus.from_dict({"command": "backup", "time": time.time() - 60, "ok": True, "exit_code": 0,
                               "error": "", "fetched": [], "failed": {}, "skipped": {},
                               "up_to_date": ["checkpoint-500"], "raw_bytes": 0, "seconds": 0.2, "scheduled": False}))
    res = cli(env, "show", "--local-dir", dest)
    lines = res.stdout.splitlines()
    assert lines[3:5] == ["last scheduled run 2h ago: FAILED (exit 20): cannot connect to tnr-1: Connection refused",
                          "last manual run 1m ago: ok, up to date (checkpoint-500)"]
    assert "no scheduled run recorded for longer than two intervals" in res.stderr  # every 30m, nothing for 2h

    data = json.loads(cli(env, "show", "--local-dir", dest, "--json").stdout)
    assert data["installed"] and data["every"] == "30m" and data["schedule"] == "*/30 * * * *"
    assert data["last_scheduled"]["exit_code"] == 20 and data["stale"] is True
    assert data["last_manual"]["exit_code"] == 0 and data["last_run"]["scheduled"] is False
    assert data["log_file"] == str(log) and len(data["log_tail"]) == 5


@pytest.mark.parametrize("damaged", [["backup", 0], {"time": "yesterday", "ok": True, "exit_code": 0},
                                     {"time": 1, "ok": True, "exit_code": 0, "scheduled": "yes"}],
                         ids=["list", "time-text", "scheduled-text"])
def test_show_reads_a_damaged_status_file_as_none_recorded(fake, tmp_path, damaged):
    env, table = fake
    dest = tmp_path / "b"
    (dest / ".ckptsync").mkdir(parents=True)
    for name in ("status.json", "status-scheduled.json"):
        (dest / ".ckptsync" / name).write_text(json.dumps(damaged))
    res = cli(env, "show", "--local-dir", dest)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-2:] == ["last scheduled run: none recorded", "last manual run: none recorded"]
    assert json.loads(cli(env, "show", "--local-dir", dest, "--json").stdout)["last_run"] is None


@pytest.mark.parametrize("status, text", [
    (None, "last run: none recorded"),
    ({"time": 100, "ok": True, "exit_code": 0, "fetched": [], "up_to_date": ["checkpoint-8"]},
     "last run 15m ago: ok, up to date (checkpoint-8)"),
    ({"time": 100, "ok": False, "exit_code": 11, "error": "in use"}, "last run 15m ago: skipped, another run held the lock"),
    ({"time": 100, "ok": False, "exit_code": 3, "error": "checkpoint-8: changed"}, "last run 15m ago: PARTIAL (exit 3): checkpoint-8: changed"),
])
def test_last_run_text(status, text):
    from ckptsync.cli.cmd_cron import last_run_text

    assert last_run_text(RunStatus.from_dict(status), now=100 + 15 * 60) == text


# -------------------------------------------------- the installed line, run as cron runs it

def cron_env(home: Path) -> dict[str, str]:
    """What cron gives a job: almost nothing."""
    return {"HOME": str(home), "LOGNAME": "root", "SHELL": "/bin/sh", "PATH": "/usr/bin:/bin"}


def content(path: Path) -> dict:
    return {rel: (size, mode, sha) for rel, (size, mode, _mtime, sha) in tree_digest(path).items()}


def test_installed_line_runs_a_backup(fake, server_tree, tmp_path):
    env, table = fake
    dest = tmp_path / "backups"
    assert cli(env, "install", "--remote-dir", server_tree, "--local-dir", dest).returncode == 0
    entry = cron.find_entry(table.read_text(), str(dest))
    _when, command = cron.split_line(entry.line)
    home = Path(env["HOME"])
    run = subprocess.run(["/bin/sh", "-c", command], env=cron_env(home), cwd=home,
                         capture_output=True, text=True, timeout=120)
    assert (run.returncode, run.stdout, run.stderr) == (0, "", "")  # nothing for cron to mail
    for name in ("checkpoint-12", "checkpoint-8"):
        # bytes and modes (files identical in both checkpoints share one inode, so one mtime)
        assert content(dest / name) == content(server_tree / name)
    assert not (dest / "checkpoint-4").exists()
    status = DirectoryStore(dest).status()
    assert status.ok and set(status.fetched) >= {"checkpoint-12", "checkpoint-8"}
    log = (dest / ".ckptsync" / "cron.log").read_text().splitlines()
    # the warning naming the complete checkpoint a first run leaves out also comes on stderr
    assert log and all(line[:4].isdigit() for line in log if not line.startswith("warning: "))
    assert any("checkpoint-12" in line for line in log)
    assert any("not backed up" in line and "checkpoint-4" in line for line in log)

    # the next run finds everything up to date, and show reports the run
    run = subprocess.run(["/bin/sh", "-c", command], env=cron_env(home), cwd=home,
                         capture_output=True, text=True, timeout=120)
    assert (run.returncode, run.stdout, run.stderr) == (0, "", "")
    shown = cli(env, "show", "--local-dir", dest).stdout
    assert "ago: ok, up to date (checkpoint-12, checkpoint-8" in shown


def test_the_log_says_each_thing_once_and_a_save_in_progress_is_no_warning(fake, server_tree, tmp_path):
    env, table = fake
    now = time.time()
    # The trainer is writing checkpoint-16 now; checkpoint-2 is a save that crashed a day ago.
    for name, age in (("checkpoint-16", 0), ("checkpoint-2", 86400)):
        shutil.copytree(server_tree / "checkpoint-12", server_tree / name)
        (server_tree / name / "trainer_state.json").unlink()
        set_tree_mtime(server_tree / name, now - age)
    dest = tmp_path / "backups"
    assert cli(env, "install", "--remote-dir", server_tree, "--local-dir", dest).returncode == 0
    _when, command = cron.split_line(cron.find_entry(table.read_text(), str(dest)).line)
    home = Path(env["HOME"])
    run = subprocess.run(["/bin/sh", "-c", command], env=cron_env(home), cwd=home,
                         capture_output=True, text=True, timeout=120)
    assert (run.returncode, run.stdout, run.stderr) == (0, "", "")
    log = (dest / ".ckptsync" / "cron.log").read_text().splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|WARN|ERROR) ", line) for line in log), log
    said = [line.split(" ", 2)[2] for line in log]
    assert len(said) == len(set(said)), log
    warned = [line for line in log if " WARN " in line]
    assert [line for line in log if "checkpoint-16" in line and "skipped" in line][0].split()[2] == "INFO", log
    assert not [line for line in warned if "checkpoint-16" in line], warned
    assert [line for line in warned if "skipped checkpoint-2: abandoned" in line], warned
    assert [line for line in warned if "not backed up" in line and "checkpoint-4" in line], warned


@pytest.mark.parametrize("how", ["flag", "env"])
def test_the_ssh_client_chosen_at_install_is_the_jobs(fake, server_tree, tmp_path, how):
    env, table = fake
    dest = tmp_path / "backups"
    if how == "flag":
        done = cli(env, "install", "--remote-dir", server_tree, "--local-dir", dest, "--ssh", "paramiko")
    else:
        done = cli({**env, "CKPTSYNC_SSH": "paramiko"}, "install", "--remote-dir", server_tree, "--local-dir", dest)
    assert done.returncode == 0, done.stderr
    _when, command = cron.split_line(cron.find_entry(table.read_text(), str(dest)).line)
    assert cron.option_value(command, "--ssh") == "paramiko"
    home = Path(env["HOME"])
    run = subprocess.run(["/bin/sh", "-c", command], env=cron_env(home), cwd=home,
                         capture_output=True, text=True, timeout=120)
    assert (run.returncode, run.stderr) == (0, "")   # the entry's --ssh is accepted where it stands
    assert (dest / "checkpoint-12").is_dir()
    plain = tmp_path / "plain"
    assert cli({**env, "CKPTSYNC_SSH": None}, "install", "--remote-dir", server_tree, "--local-dir", plain).returncode == 0
    assert cron.option_value(cron.split_line(cron.find_entry(table.read_text(), str(plain)).line)[1], "--ssh") is None


def test_failed_cron_run_is_in_the_log_and_in_show(fake, tmp_path):
    env, table = fake
    dest = tmp_path / "backups"
    assert cli(env, "install", "--remote-dir", tmp_path / "no-such-run", "--local-dir", dest).returncode == 0
    _when, command = cron.split_line(cron.find_entry(table.read_text(), str(dest)).line)
    home = Path(env["HOME"])
    run = subprocess.run(["/bin/sh", "-c", command], env=cron_env(home), cwd=home,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and (run.stdout, run.stderr) == ("", "")
    log = dest / ".ckptsync" / "cron.log"
    errors = [line for line in log.read_text().splitlines() if "ERROR" in line or line.startswith("error:")]
    assert errors and all("no-such-run" in line for line in errors)
    shown = cli(env, "show", "--local-dir", dest).stdout
    assert f"ago: FAILED (exit {run.returncode}): " in shown and "no-such-run" in shown

    # an interpreter that is gone (a deleted venv) leaves its trace in the same log
    broken = command.replace(shlex.quote(os.path.abspath(sys.executable)), "/gone/venv/bin/python3")
    assert broken != command
    run = subprocess.run(["/bin/sh", "-c", broken], env=cron_env(home), cwd=home,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 127 and (run.stdout, run.stderr) == ("", "")
    assert "/gone/venv/bin/python3" in log.read_text().splitlines()[-1]


def test_skip_if_locked_exits_0_with_one_log_line(tmp_path, server_tree):
    dest = tmp_path / "backups"
    log = tmp_path / "cron.log"
    args = ("backup", "--remote-dir", server_tree, "--local-dir", dest, "--quiet", "--log-file", log)
    with DirectoryStore(dest).lock("ckptsync backup (the test)"):
        plain = run_cli(*args)
        assert plain.returncode == 11 and "in use by 'ckptsync backup (the test)'" in plain.stderr
        log.unlink()
        res = run_cli(*args, "--skip-if-locked")
        assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
        lines = log.read_text().splitlines()
        skipped = [line for line in lines if "skipped:" in line]
        assert len(skipped) == 1 and "in use by 'ckptsync backup (the test)'" in skipped[0]
        assert not [line for line in lines if " ERROR " in line or " WARN " in line]
        assert not (dest / "checkpoint-12").exists()
    both = run_cli(*args, "--skip-if-locked", "--wait")
    assert both.returncode == 2 and "not both" in both.stderr
    done = run_cli(*args, "--skip-if-locked")
    assert done.returncode == 0 and (dest / "checkpoint-12").is_dir()


# -------------------------------------------------- what install checks, what remove cleans up

@pytest.mark.parametrize("target, named", [
    (("--instance", "5"), "tnr-5"),                       # no config entry, no tnr-5 alias
    (("--host", "ubuntu@no-such-host.invalid"), "no-such-host.invalid"),
])
def test_install_refuses_a_target_that_does_not_resolve(fake, tmp_path, target, named):
    env, table = fake
    table.write_bytes(USER_TABLE)
    dest = tmp_path / "b"
    res = cli(env, "install", *target, "--remote-dir", "/srv/ckpt", "--local-dir", dest)
    assert res.returncode == 4, res.stderr
    assert f"cannot resolve host {named}" in res.stderr and "no cron entry installed" in res.stderr
    if named == "tnr-5":
        assert "tnr connect 5" in res.stderr
    assert "Traceback" not in res.stderr
    assert table.read_bytes() == USER_TABLE and not dest.exists()


def test_install_says_where_the_checkpoints_are_when_remote_dir_is_above_them(fake, server_tree, tmp_path):
    env, table = fake
    dest = tmp_path / "b"
    res = cli(env, "install", "--remote-dir", server_tree.parent, "--local-dir", dest)
    assert res.returncode == 0, res.stderr
    hint = re.search(rf"^warning: no checkpoints in {re.escape(str(server_tree.parent))}: .* has checkpoints "
                     r"further down \(.+?\): (ckptsync cron install .+)$", res.stderr, re.M)
    assert hint, res.stderr
    pasted = cli(env, *shlex.split(hint.group(1))[2:])
    assert pasted.returncode == 0 and "warning" not in pasted.stderr, pasted.stderr
    command = cron.split_line(cron.find_entry(table.read_text(), str(dest)).line)[1]
    assert cron.option_value(command, "--remote-dir") == str(server_tree)


def test_install_refuses_a_command_that_is_not_installed(fake, tmp_path):
    env, table = fake
    Path("ckptsync.yaml").write_text(json.dumps({"instances": {"4": {"command": ["no-such-kubectl", "exec"]}}}))
    res = cli(env, "install", "-i", "4", "--remote-dir", "/srv/ckpt", "--local-dir", tmp_path / "b")
    assert res.returncode == 4 and "cannot run no-such-kubectl: not found" in res.stderr
    assert not table.exists()


def test_install_warns_when_no_cron_daemon_runs(fake, tmp_path):
    env, table = fake
    env = {**env, "CKPTSYNC_PROC": str(fake_proc(tmp_path / "quiet-proc", "sshd", "bash"))}
    res = cli(env, "install", "--remote-dir", tmp_path, "--local-dir", tmp_path / "b")
    assert res.returncode == 0 and res.stdout.startswith("installed: ")
    assert "warning: no cron daemon is running" in res.stderr
    assert cron.find_entry(table.read_text(), str(tmp_path / "b")) is not None


def test_daemon_detection_and_the_macos_note(tmp_path):
    assert cron.daemon_running(str(fake_proc(tmp_path / "a", "bash", "crond"))) is True
    assert cron.daemon_running(str(fake_proc(tmp_path / "b", "bash", "cronjob-runner"))) is False
    mac = cron.no_daemon_text("darwin")
    assert "launchctl load -w /System/Library/LaunchDaemons/com.vix.cron.plist" in mac and "Full Disk Access" in mac
    assert "systemctl enable --now cron" in cron.no_daemon_text("linux")


def test_remove_leaves_no_empty_backup_directory(fake, tmp_path):
    env, table = fake
    home = Path(env["HOME"])
    res = cli(env, "install", "-i", "1", "--remote-dir", "/srv/ckpt")
    assert res.returncode == 0, res.stderr
    made = home / "ckpt-backups" / "instance-1"
    assert (made / ".ckptsync").is_dir()
    res = cli(env, "remove", "-i", "1")
    assert res.returncode == 0 and f"{made} held no backups and was removed too" in res.stdout
    assert not made.exists() and (home / "ckpt-backups").is_dir()

    # a directory that holds anything else stays as it is
    assert cli(env, "install", "-i", "2", "--remote-dir", "/srv/ckpt").returncode == 0
    kept = home / "ckpt-backups" / "instance-2"
    (kept / ".ckptsync" / "cron.log").write_text("2024-12-24 14:00:00 ERROR cannot connect\n")
    res = cli(env, "remove", "-i", "2")
    assert res.returncode == 0 and "removed too" not in res.stdout
    assert (kept / ".ckptsync" / "cron.log").is_file()
    assert cron.entries(table.read_text()) == []


def test_install_and_show_fit_80_columns(fake, tmp_path):
    env, table = fake
    env = {**env, "COLUMNS": "80"}
    dest = tmp_path / "b"
    installed = cli(env, "install", "--remote-dir", tmp_path / "server", "--local-dir", dest)
    shown = cli(env, "show", "--local-dir", dest)
    assert installed.returncode == 0 and shown.returncode == 0, installed.stderr + shown.stderr
    line = cron.find_entry(table.read_text(), str(dest)).line
    for res in (installed, shown):
        lines = res.stdout.splitlines()
        # only a word longer than the width (a path) may stand out, alone on its line
        assert all(len(l) <= 80 or len(l.split()) == 1 for l in lines), lines
        assert " ".join(" ".join(lines).split()).count(" ".join(line.split())) == 1  # the entry, whole


# -------------------------------------------------- scheduled runs: marked, and a notice on failure

FAKE_NOTIFIER = """#!/bin/sh
# Records each call: one argument per line, then a blank line.
for a in "$@"; do printf '%s\\n' "$a"; done >> {calls}
echo >> {calls}
"""


def install_notifier(tmp_path: Path) -> tuple[Path, Path]:
    """A notify-send (osascript on macOS) that only records its arguments: -> (its dir, the record)."""
    bin_dir = tmp_path / "notifier-bin"
    bin_dir.mkdir()
    calls = tmp_path / "notices.txt"
    tool = bin_dir / ("osascript" if sys.platform == "darwin" else "notify-send")
    tool.write_text(FAKE_NOTIFIER.format(calls=shlex.quote(str(calls))))
    tool.chmod(0o755)
    return bin_dir, calls


def test_failed_scheduled_run_puts_up_a_desktop_notice(fake, tmp_path):
    env, table = fake
    bin_dir, calls = install_notifier(tmp_path)
    env = {**env, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    dest = tmp_path / "backups"
    res = cli(env, "install", "--remote-dir", tmp_path / "no-such-run", "--local-dir", dest, "--notify")
    assert res.returncode == 0, res.stderr
    assert "a failed run shows a desktop notice" in res.stdout and "--notify" not in res.stderr
    _when, command = cron.split_line(cron.find_entry(table.read_text(), str(dest)).line)
    assert shlex.split(command)[:2] == ["CKPTSYNC_SCHEDULED=1", "CKPTSYNC_NOTIFY=1"]
    assert "desktop notice on failure" in cli(env, "show", "--local-dir", dest).stdout.splitlines()[0]

    home = Path(env["HOME"])
    run = subprocess.run(["/bin/sh", "-c", command], env=cron_env(home), cwd=home,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 10 and (run.stdout, run.stderr) == ("", "")
    notice = calls.read_text().split("\n\n")[0].splitlines()
    assert "ckptsync backup failed" in notice
    assert any(line.startswith("local: exit 10: ") and "no-such-run" in line for line in notice)
    assert "desktop notice sent with" in (dest / ".ckptsync" / "cron.log").read_text()

    # a manual run that fails the same way is the user's to see: no notice
    calls.unlink()
    manual = run_cli("backup", "--remote-dir", tmp_path / "no-such-run", "--local-dir", dest,
                     env={**env, "CKPTSYNC_NOTIFY": "1"})
    assert manual.returncode == 10 and not calls.exists()

    # a scheduled run that fails before the backup starts (here a bad option) gets its notice too
    broken = command.replace(" backup ", " backup --instance 'no such' ", 1)
    run = subprocess.run(["/bin/sh", "-c", broken], env=cron_env(home), cwd=home,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and (run.stdout, run.stderr) == ("", "")
    notices = calls.read_text().split("\n\n")
    assert len(notices) == 2 and notices[1] == ""  # one notice, ended by its blank line
    assert any(line.startswith("backup: exit 2: --instance 'no such'") for line in notices[0].splitlines())


def test_install_notify_without_a_notifier_warns(fake, tmp_path):
    env, table = fake
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    for tool in ("sh", "cat", "mv", "id"):  # what the fake crontab needs
        os.symlink(shutil.which(tool), empty / tool)
    res = cli({**env, "PATH": str(empty)}, "install", "--remote-dir", tmp_path, "--local-dir", tmp_path / "b", "--notify")
    assert res.returncode == 0, res.stderr
    assert "--notify: no " in res.stderr and "found on PATH" in res.stderr


# -------------------------------------------------- the real crontab

def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _crontab(*args: str, text: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["crontab", *args], input=text, capture_output=True, timeout=30,
                          encoding="utf-8", errors="surrogateescape")


def test_real_crontab_round_trip(tmp_path, monkeypatch):
    if shutil.which("crontab") is None:
        if _in_ci():
            pytest.fail("crontab is missing (apt-get install cron; .ci/test installs it)", pytrace=False)
        pytest.skip("crontab is not installed")
    if os.geteuid() != 0:
        pytest.skip("changes the crontab of the user running the tests: only as root (CI)")
    saved = _crontab("-l")
    original = saved.stdout if saved.returncode == 0 else None
    if original is None and "no crontab" not in saved.stderr.lower():
        pytest.fail(f"crontab -l: {saved.stderr.strip()}", pytrace=False)
    monkeypatch.chdir(tmp_path)
    env = {"CKPTSYNC_CRONTAB": None, "HOME": str(tmp_path), "CKPTSYNC_CONFIG": None, "COLUMNS": None}
    mine = "# a line of the user's own\n17 4 * * * true\n"
    dest = tmp_path / "backups 100%"
    try:
        assert _crontab("-", text=(original or "") + mine).returncode == 0
        before = _crontab("-l").stdout
        for every in ("30m", "2h"):
            res = run_cli("cron", "install", "--remote-dir", tmp_path, "--local-dir", dest, "--every", every, env=env)
            assert res.returncode == 0, res.stderr
        table = _crontab("-l").stdout
        assert table.startswith(before)
        assert table.count(f"# ckptsync backup local -> {dest}\n") == 1
        entry = cron.find_entry(table, str(dest))
        assert cron.interval_of(entry.schedule) == 120 and "\\%" in entry.line
        shown = run_cli("cron", "show", "--local-dir", dest, env=env)
        assert f"every 2h ({entry.schedule})" in shown.stdout
        res = run_cli("cron", "remove", "--local-dir", dest, env=env)
        assert res.returncode == 0 and "removed" in res.stdout
        assert _crontab("-l").stdout == before
    finally:
        if original is None:
            _crontab("-r")
        else:
            _crontab("-", text=original)
