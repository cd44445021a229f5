"""The edges where ckptsync must never be wrong about safety: locks, cron, copied hints, read-only disks."""

from __future__ import annotations

import json
import os
import shlex
import subprocess

import pytest

from ckptsync.backup import BackupOptions, run_backup
from ckptsync.config import Config, resolve_target
from ckptsync.errors import IO, LOCKED, CkptsyncError, Locked
from ckptsync.server.inprocess import Hooks, InProcessServer
from ckptsync.store import Store
from helpers import run_cli, tree_digest
from test_server_boundary import make_target


def test_a_run_that_got_the_lock_after_another_committed_plans_again(server_tree, tmp_path):
    dest = tmp_path / "b"
    other = []

    def another_run_finishes_first(_value: dict) -> None:
        # Between this run's scan and its lock, a second run backs up the same checkpoints.
        other.append(run_backup(make_target(server_tree, dest, InProcessServer()), BackupOptions()))

    hooks = Hooks()
    hooks.on_after("scan", another_run_finishes_first, times=1)
    late = run_backup(make_target(server_tree, dest, InProcessServer(hooks)), BackupOptions())
    assert other and other[0].fetched == ["checkpoint-12", "checkpoint-8"]
    assert late.fetched == [] and late.failed == {} and late.warnings == []
    assert sorted(p.name for p in dest.iterdir()) == [".ckptsync", "checkpoint-12", "checkpoint-8"]
    assert tree_digest(dest / "checkpoint-12") == tree_digest(server_tree / "checkpoint-12")


def test_a_refused_run_does_not_hide_the_last_real_result(server_tree, tmp_path):
    dest = tmp_path / "b"
    first = run_backup(make_target(server_tree, dest, InProcessServer()), BackupOptions())
    assert first.exit_code == 0
    status = (dest / ".ckptsync" / "status.json").read_text()
    with Store(dest).lock("a long backup"):
        with pytest.raises(Locked):
            run_backup(make_target(server_tree, dest, InProcessServer()), BackupOptions(all=True))
        res = run_cli("backup", "--remote-dir", server_tree, "--local-dir", dest, "--all", "--skip-if-locked")
        assert res.returncode == 0, res.stderr
        assert "skipped" in res.stderr
        refused = run_cli("backup", "--remote-dir", server_tree, "--local-dir", dest, "--all")
        assert refused.returncode == LOCKED
    assert (dest / ".ckptsync" / "status.json").read_text() == status  # still the real last result
    listed = run_cli("list", "--local", "--local-dir", dest)
    assert "failed" not in listed.stdout + listed.stderr


def test_printed_commands_carry_the_target_and_paste(tmp_path):
    cfg = tmp_path / "my config.yaml"
    cfg.write_text("remote_dir: /data/run\n")
    from ckptsync.config import load_config

    t = resolve_target(load_config(str(cfg)), instance="1", local_dir=str(tmp_path / "b b"), need_remote=False)
    cmd = t.command("restore", "--checkpoint", "checkpoint-16")
    assert shlex.split(cmd) == ["ckptsync", "restore", "--checkpoint", "checkpoint-16", "--instance", "1",
                                "--local-dir", str(tmp_path / "b b"), "--config", str(cfg)]
    h = resolve_target(Config(), host="me@gpu:2222", remote_dir="runs/x", need_remote=False)
    assert shlex.split(h.command("backup")) == ["ckptsync", "backup", "--host", "me@gpu:2222",
                                                "--remote-dir", "runs/x"]
    assumed = resolve_target(Config(values={"remote_dir": "/r"}), need_remote=False)
    assert assumed.assumed_instance and "--instance 0" in assumed.command("list")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a read-only tmpfs needs root")
def test_a_read_only_backup_directory_is_one_line_and_exit_5(server_tree, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=256m", "tmpfs", str(ro)], capture_output=True)
    if mounted.returncode != 0:
        pytest.fail(f"could not mount a tmpfs: {mounted.stderr!r}")
    try:
        with pytest.raises(CkptsyncError) as info:
            run_backup(make_target(server_tree, ro / "b", InProcessServer()), BackupOptions())
        assert info.value.exit_code == IO and "read-only file system" in info.value.message
        res = run_cli("backup", "--remote-dir", server_tree, "--local-dir", ro / "b")
        assert res.returncode == IO, res.stderr
        assert "Traceback" not in res.stderr and "unexpected" not in res.stderr
        assert "read-only file system" in res.stderr and str(ro / "b") in res.stderr
        assert list(ro.iterdir()) == []
    finally:
        subprocess.run(["umount", str(ro)], check=False)


class _DeadChannel:
    """A paramiko channel whose connection just died: closing it writes to a dead socket."""

    def recv_stderr(self, n):
        return b""

    def shutdown_write(self):
        raise EOFError()

    def close(self):
        raise EOFError()


class _DeadClient:
    closed = False

    def close(self):
        self.closed = True
        raise EOFError()


def test_closing_a_dead_ssh_session_does_not_hide_the_lost_connection():
    # The race behind "exit 130 instead of 20": paramiko raised EOFError from close() while the
    # ConnectError was unwinding, and click turned the EOFError into "interrupted".
    from ckptsync.transport.ssh import SshProcess

    client = _DeadClient()
    SshProcess(client, _DeadChannel(), None).close()
    assert client.closed
