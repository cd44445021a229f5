"""`ckptsync watch` through the real CLI and sshd, beside a trainer the test drives step by step;
and the service units it prints."""

from __future__ import annotations

import json
import os
import plistlib
import queue
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fake_trainer import FakeTrainer
from helpers import cli_env, run_cli, tree_digest
from test_backup import write_config
from test_watch import as_documented

WAIT = 120   # seconds an event may take at most before the test fails (never a pause)


class Watching:
    """`ckptsync watch --json` running; `until(kind)` reads its events up to the first of that kind."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "ckptsync", "watch", "--json", *args],
                                     env=cli_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.events: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def until(self, kind: str) -> dict:
        while True:
            try:
                line = self.lines.get(timeout=WAIT)
            except queue.Empty:
                raise AssertionError(f"no {kind} event within {WAIT}s: {self.events}") from None
            if line is None:
                raise AssertionError(f"watch ended before a {kind} event: {self.events}; {self.stderr()}")
            event = json.loads(line)
            self.events.append(event)
            if event["event"] == kind:
                return event

    def stderr(self) -> str:
        self.proc.wait(timeout=WAIT)
        assert self.proc.stderr is not None
        return self.proc.stderr.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=WAIT)


@pytest.fixture
def run_dir(ssh_home, tmp_path):
    run = tmp_path / "server" / "run"
    trainer = FakeTrainer(run)
    dest = tmp_path / "backups"
    write_config(ssh_home, run, dest, extra_files=[], settle_seconds=1)
    yield run, dest / "instance-1", trainer, ["-i", "1", "--config", str(ssh_home / "ckptsync.yaml")]
    trainer.stop()


def test_until_done_backs_up_every_save_and_exits_0_when_training_has_finished(run_dir):
    run, dest, trainer, args = run_dir
    watch = Watching(*args, "--until-done")
    try:
        assert watch.until("started")["how"] == "inotify"
        saved = {}
        for step in (10, 20, 30, 40, 50):
            trainer.save(step)
            saved[step] = tree_digest(trainer.checkpoint(step))
            assert watch.until("committed")["checkpoint"] == f"checkpoint-{step}"
        trainer.stop()
        finished = watch.until("finished")
        assert watch.proc.wait(timeout=WAIT) == 0
    finally:
        watch.stop()
    assert finished["safe"] and finished["not_backed_up"] == []
    assert "every checkpoint is backed up; checklist: SAFE" in finished["message"]
    for step, digest in saved.items():
        assert tree_digest(dest / f"checkpoint-{step}") == digest
    assert not (run / ".ckptsync-hold").exists()
    assert not [e for e in watch.events if e["event"] in ("lost", "skipped", "reconnected")]
    as_documented(watch.events)
    listed = json.loads(run_cli("list", *args, "--json").stdout)
    assert {c["name"]: c["backup"] for c in listed["checkpoints"]} == {
        "checkpoint-50": "yes", "checkpoint-40": "yes", "checkpoint-30": "yes",
        "checkpoint-20": "local only", "checkpoint-10": "local only"}   # rotated away on the server


def test_beside_a_watch_cron_skips_backup_and_the_other_commands_work(run_dir):
    run, dest, trainer, args = run_dir
    trainer.save(10)
    watch = Watching(*args)
    try:
        watch.until("started")
        watch.until("committed")
        skipped = run_cli("backup", *args, "--skip-if-locked")
        assert skipped.returncode == 0, skipped.stderr
        assert "skipped: a watch is running on" in skipped.stderr and "'ckptsync watch'" in skipped.stderr
        refused = run_cli("backup", *args)
        assert refused.returncode == 11
        assert "a watch is running on" in refused.stderr
        for command in (["list"], ["verify"], ["checklist"], ["prune", "--keep-last", "5"]):
            res = run_cli(*command, *args)
            assert res.returncode in (0, 3), (command, res.stderr)   # checklist: not safe while training runs
            assert "in use by" not in res.stderr, command
        second = run_cli("watch", *args)
        assert second.returncode == 11 and "one watch per backup directory" in second.stderr
        trainer.save(20)
        assert watch.until("committed")["checkpoint"] == "checkpoint-20"
        status = json.loads((dest / ".ckptsync" / "status.json").read_text())
        assert status["command"] == "watch" and status["fetched"] == ["checkpoint-20"]
        watch.proc.send_signal(signal.SIGINT)
        assert watch.proc.wait(timeout=WAIT) == 130
        error = watch.until("error")
        assert error["kind"] == "interrupted" and error["exit_code"] == 130
        as_documented(watch.events)
    finally:
        watch.stop()
    again = run_cli("backup", *args, "--skip-if-locked")
    assert again.returncode == 0 and "skipped" not in again.stderr


def test_a_missing_remote_dir_ends_the_watch_with_its_exit_code(run_dir, ssh_home, tmp_path):
    _run, _dest, _trainer, args = run_dir
    res = run_cli("watch", *args, "--remote-dir", str(tmp_path / "no-such-run"))
    assert res.returncode == 10
    assert "remote directory does not exist" in res.stderr


def test_two_instances_are_watched_at_once_and_ctrl_c_stops_both(ssh_home, tmp_path):
    runs = {n: tmp_path / "server" / f"run{n}" for n in ("1", "2")}
    trainers = {n: FakeTrainer(run) for n, run in runs.items()}
    cfg = ssh_home / "two.yaml"
    cfg.write_text(json.dumps({"local_dir": str(tmp_path / "backups"), "settle_seconds": 1, "instances": {
        n: {"host": f"tnr-{n}", "remote_dir": str(run)} for n, run in runs.items()}}))
    watch = Watching("-i", "1", "-i", "2", "--config", str(cfg))
    try:
        started = {watch.until("started")["target"], watch.until("started")["target"]}
        assert started == {"instance-1", "instance-2"}
        for n in ("1", "2"):
            trainers[n].save(10)
            assert watch.until("committed")["target"] == f"instance-{n}"
        trainers["2"].start_save(20)          # in progress: its last file open for writing
        watch.proc.send_signal(signal.SIGINT)
        assert watch.proc.wait(timeout=WAIT) == 130
        error = watch.until("error")
        assert error["kind"] == "interrupted"
        assert "instance-1: nothing was held" in error["message"] and "instance-2:" in error["message"]
    finally:
        watch.stop()
        for t in trainers.values():
            t.stop()
    for n in ("1", "2"):
        assert tree_digest(tmp_path / "backups" / f"instance-{n}" / "checkpoint-10") == \
            tree_digest(runs[n] / "checkpoint-10")
        assert not (runs[n] / ".ckptsync-hold").exists()
    assert not (tmp_path / "backups" / "instance-2" / "checkpoint-20").exists()


# ---------------------------------------------------------------- as a service


def service_text(tmp_path: Path, kind: str) -> str:
    res = run_cli("watch", "--remote-dir", tmp_path / "run dir", "--local-dir", tmp_path / "backup 100%",
                  "--hold-max", "2", "--print-service", kind, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "save it, then:" in res.stderr
    return res.stdout


def test_the_systemd_unit_runs_this_watch(tmp_path):
    (tmp_path / "run dir").mkdir()
    text = service_text(tmp_path, "systemd")
    lines = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    assert lines["ExecStart"] == (f"{sys.executable} -m ckptsync watch --remote-dir \"{tmp_path}/run dir\" "
                                  f"--local-dir \"{tmp_path}/backup 100%%\" --hold-max 2")
    assert lines["WorkingDirectory"] == str(tmp_path) and lines["Restart"] == "on-failure"
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "ckptsync-watch-local.service"
    unit.write_text(text)
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    broken = tmp_path / "broken.service"
    broken.write_text(text.replace(f"ExecStart={sys.executable}", "ExecStart=no-such-program"))
    assert subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True, timeout=60).returncode


def test_the_launchd_agent_runs_this_watch(tmp_path):
    text = service_text(tmp_path, "launchd")
    plist = plistlib.loads(text.encode())
    assert plist["ProgramArguments"] == [sys.executable, "-m", "ckptsync", "watch", "--remote-dir",
                                         f"{tmp_path}/run dir", "--local-dir", f"{tmp_path}/backup 100%",
                                         "--hold-max", "2"]
    assert plist["Label"] == "io.ckptsync.watch.local" and plist["RunAtLoad"]
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["WorkingDirectory"] == str(tmp_path)
    assert plist["StandardOutPath"] == os.path.expanduser("~/Library/Logs/ckptsync-watch-local.log")
