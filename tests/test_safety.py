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
from ckptsync.stores.directory import DirectoryStore
from helpers import ROOT, run_cli, tmpfs, tree_digest
from test_server_boundary import always, make_target


def test_a_run_that_got_the_lock_after_another_committed_plans_again(server_tree, tmp_path):
    dest = tmp_path / "b"
    other = []

    def another_run_finishes_first(_value: dict) -> None:
        # Between this run's scan and its lock, a second run backs up the same checkpoints.
        other.append(run_backup(make_target(server_tree, dest), BackupOptions(), connect=always(InProcessServer())))

    hooks = Hooks()
    hooks.on_after("scan", another_run_finishes_first, times=1)
    late = run_backup(make_target(server_tree, dest), BackupOptions(), connect=always(InProcessServer(hooks)))
    assert other and other[0].fetched == ["checkpoint-12", "checkpoint-8"]
    assert late.fetched == [] and late.failed == {}
    # no false "changed": its only warning names the complete checkpoint neither run took
    assert late.not_backed_up == ["checkpoint-4"] and len(late.warnings) == 1 and "checkpoint-4" in late.warnings[0]
    assert sorted(p.name for p in dest.iterdir()) == [".ckptsync", "checkpoint-12", "checkpoint-8"]
    assert tree_digest(dest / "checkpoint-12") == tree_digest(server_tree / "checkpoint-12")


def test_a_refused_run_does_not_hide_the_last_real_result(server_tree, tmp_path):
    dest = tmp_path / "b"
    first = run_backup(make_target(server_tree, dest), BackupOptions(), connect=always(InProcessServer()))
    assert first.exit_code == 0
    status = (dest / ".ckptsync" / "status.json").read_text()
    with DirectoryStore(dest).lock("a long backup"):
        with pytest.raises(Locked):
            run_backup(make_target(server_tree, dest), BackupOptions(all=True), connect=always(InProcessServer()))
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
    cmd = t.printed.command("restore", "--checkpoint", "checkpoint-16")
    assert shlex.split(cmd) == ["ckptsync", "restore", "--checkpoint", "checkpoint-16", "--instance", "1",
                                "--local-dir", str(tmp_path / "b b"), "--config", str(cfg)]
    h = resolve_target(Config(), host="me@gpu:2222", remote_dir="runs/x", need_remote=False)
    assert shlex.split(h.printed.command("backup")) == ["ckptsync", "backup", "--host", "me@gpu:2222",
                                                        "--remote-dir", "runs/x"]
    assumed = resolve_target(Config(values={"remote_dir": "/r"}), need_remote=False)
    assert assumed.printed.assumed_instance and "--instance 0" in assumed.printed.command("list")


def test_a_target_changed_in_one_part_leaves_the_target_it_came_from_alone():
    """Targets share their parts (several instances, a followed run): a change makes a new one."""
    t = resolve_target(Config(values={"remote_dir": "/r", "bwlimit": "1M"}), instance="1", need_remote=False)
    fast = t.with_link(bwlimit=8_000_000)
    verbed = t.with_printed(verb=("backup",))
    assert (t.link.bwlimit, fast.link.bwlimit) == (1_000_000, 8_000_000)
    assert (t.printed.verb, verbed.printed.verb) == ((), ("backup",))
    assert fast.policy is t.policy and fast.printed is t.printed and verbed.link is t.link
    with pytest.raises(AttributeError):   # frozen: a part is never changed in place
        t.policy.settle_seconds = 0


@pytest.mark.skipif(not ROOT, reason="mounting a read-only tmpfs needs root")
def test_a_read_only_backup_directory_is_one_line_and_exit_5(server_tree, tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=256m") as ro:
        with pytest.raises(CkptsyncError) as info:
            run_backup(make_target(server_tree, ro / "b"), BackupOptions(), connect=always(InProcessServer()))
        assert info.value.exit_code == IO and "read-only file system" in info.value.message
        res = run_cli("backup", "--remote-dir", server_tree, "--local-dir", ro / "b")
        assert res.returncode == IO, res.stderr
        assert "Traceback" not in res.stderr and "unexpected" not in res.stderr
        assert "read-only file system" in res.stderr and str(ro / "b") in res.stderr
        assert list(ro.iterdir()) == []


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


@pytest.mark.skipif(not ROOT, reason="mounting a small tmpfs needs root")
def test_a_restore_that_filled_the_server_disk_does_not_block_its_rerun(server_tree, tmp_path):
    from ckptsync.restore import RestoreOptions, run_restore

    big = server_tree / "checkpoint-12" / "zz-big.bin"
    big.write_bytes(os.urandom(24 << 20))
    old = (server_tree / "checkpoint-12" / "optimizer.pt").stat().st_mtime
    os.utime(big, (old, old))
    dest = tmp_path / "b"
    assert run_backup(make_target(server_tree, dest),
                      BackupOptions(names=["checkpoint-12"]), connect=always(InProcessServer())).exit_code == 0
    with tmpfs(tmp_path / "disk", "size=96m") as disk:
        run = disk / "run"
        filler = disk / "filler"
        opts = RestoreOptions(checkpoint="checkpoint-12", extra_files=False)

        def fill_the_disk(_args: dict) -> None:
            # Another process eats the space after the check: about 12 MiB of zz-big.bin will fit.
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            filler.write_bytes(b"\0" * (free - (13 << 20)))

        hooks = Hooks()
        hooks.on_before("receive", fill_the_disk, times=1)
        with pytest.raises(CkptsyncError) as info:
            run_restore(make_target(run, dest), opts, connect=always(InProcessServer(hooks)))
        assert info.value.exit_code == IO and filler.exists()
        assert ".ckptsync-staging-checkpoint-12" in info.value.message
        assert "--discard-staged" in info.value.hint
        assert not (run / "checkpoint-12").exists()
        filler.unlink()
        staging = run / ".ckptsync-staging-checkpoint-12"
        held = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
        assert held > 8 << 20  # enough that counting it decides whether the rerun may start
        again = run_restore(make_target(run, dest), opts, connect=always(InProcessServer()))
        assert again.checkpoint == "checkpoint-12" and (run / "checkpoint-12" / "zz-big.bin").stat().st_size == 24 << 20
        assert sorted(os.listdir(run)) == ["checkpoint-12"]


def test_discard_staged_removes_what_an_interrupted_restore_left(server_tree, tmp_path):
    dest = tmp_path / "b"
    assert run_backup(make_target(server_tree, dest),
                      BackupOptions(names=["checkpoint-12"]), connect=always(InProcessServer())).exit_code == 0
    run = tmp_path / "new-run"
    staging = run / ".ckptsync-staging-checkpoint-12" / "checkpoint-12"
    staging.mkdir(parents=True)
    (staging / "optimizer.pt.part").write_bytes(b"x" * 1000)
    res = run_cli("restore", "--remote-dir", run, "--local-dir", dest, "--checkpoint", "checkpoint-12",
                  "--discard-staged")
    assert res.returncode == 0, res.stderr
    assert "deleted" in res.stdout and "(1.0 KB)" in res.stdout
    assert os.listdir(run) == []


def test_backup_discard_staged_drops_an_interrupted_backup(tmp_path):
    dest = tmp_path / "b"
    staged = dest / ".ckptsync" / "staging" / "checkpoint-8" / "checkpoint-8"
    staged.mkdir(parents=True)
    (staged / "optimizer.pt").write_bytes(b"y" * 2500)
    (dest / ".ckptsync" / "staging" / "checkpoint-8.progress.json").write_text("{}")
    dry = run_cli("backup", "--local-dir", dest, "--discard-staged", "--dry-run")
    assert dry.returncode == 0 and "would delete 2.5 KB" in dry.stdout and staged.exists()
    res = run_cli("backup", "--local-dir", dest, "--discard-staged")
    assert res.returncode == 0, res.stderr
    assert "deleted 2.5 KB of staging" in res.stdout
    assert os.listdir(dest / ".ckptsync" / "staging") == []


def test_verify_repair_fetches_a_damaged_file_again(server_tree, tmp_path):
    dest = tmp_path / "b"
    assert run_backup(make_target(server_tree, dest), BackupOptions(all=True),
                      connect=always(InProcessServer())).exit_code == 0
    victim = dest / "checkpoint-12" / "optimizer.pt"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    os.chmod(victim, 0o644)
    victim.write_bytes(bytes(data))
    assert run_cli("verify", "--local-dir", dest).returncode == 30
    backed_up = run_cli("backup", "--remote-dir", server_tree, "--local-dir", dest, "--all")
    assert "up to date" in backed_up.stdout  # a backup alone does not notice: that is what --repair is for
    res = run_cli("verify", "--remote-dir", server_tree, "--local-dir", dest, "--repair")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "repaired checkpoint-12: checkpoint-12/optimizer.pt" in res.stdout
    assert tree_digest(dest / "checkpoint-12") == tree_digest(server_tree / "checkpoint-12")
    assert run_cli("verify", "--local-dir", dest).returncode == 0
    assert not (dest / ".ckptsync" / "repair").exists()


def test_verify_repair_refuses_when_the_server_copy_changed(server_tree, tmp_path):
    dest = tmp_path / "b"
    assert run_backup(make_target(server_tree, dest), BackupOptions(all=True),
                      connect=always(InProcessServer())).exit_code == 0
    (dest / "checkpoint-8" / "scheduler.pt").unlink()
    changed = server_tree / "checkpoint-8" / "scheduler.pt"
    st = changed.stat()
    changed.write_bytes(b"z" * st.st_size)  # same size, other bytes: the trainer rewrote it
    res = run_cli("verify", "--remote-dir", server_tree, "--local-dir", dest, "--repair")
    assert res.returncode == 30
    assert "not repaired: checkpoint-8/scheduler.pt: the server's copy differs from the backup" in res.stderr
    assert not (dest / "checkpoint-8" / "scheduler.pt").exists()


@pytest.mark.skipif(not ROOT, reason="remounting a tmpfs read-only needs root")
def test_every_command_on_a_read_only_backup_directory(server_tree, tmp_path):
    with tmpfs(tmp_path / "disk", "size=256m") as disk:
        dest = disk / "b"
        assert run_backup(make_target(server_tree, dest), BackupOptions(all=True),
                          connect=always(InProcessServer())).exit_code == 0
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        before = tree_digest(dest)
        for argv, code, needle in [
            (["prune", "--local-dir", dest, "--keep-last", "1"], IO, "read-only file system"),
            (["archive", "--local-dir", dest, "--output", tmp_path / "ro.tar.zst"], None, None),
            (["backup", "--remote-dir", server_tree, "--local-dir", dest, "--all"], 0, "up to date"),
            (["verify", "--local-dir", dest], 0, "could not be updated"),
            (["restore", "--remote-dir", tmp_path / "new", "--local-dir", dest, "--no-extra-files"], 0,
             "read-only: restoring without its lock"),
        ]:
            res = run_cli(*argv)
            out = res.stdout + res.stderr
            assert "Traceback" not in out and "unexpected" not in out, (argv, out)
            if code is not None:
                assert res.returncode == code, (argv, out)
                assert needle in out, (argv, out)
            else:
                assert res.returncode in (0, IO), (argv, out)
        assert tree_digest(dest) == before
        assert (tmp_path / "new" / "checkpoint-12").is_dir()


def test_verify_remote_warns_about_checkpoints_never_backed_up(server_tree, tmp_path):
    dest = tmp_path / "b"
    assert run_backup(make_target(server_tree, dest),
                      BackupOptions(names=["checkpoint-12"]), connect=always(InProcessServer())).exit_code == 0
    res = run_cli("verify", "--remote", "--remote-dir", server_tree, "--local-dir", dest)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "checkpoint-8 is on the server but has never been backed up" in res.stderr
    hint = res.stderr.split("never been backed up: ")[1].splitlines()[0]
    assert shlex.split(hint)[:4] == ["ckptsync", "backup", "--checkpoint", "checkpoint-8"]
    changed = server_tree / "checkpoint-12" / "optimizer.pt"
    data = bytearray(changed.read_bytes())
    data[10] ^= 1
    st = changed.stat()
    changed.write_bytes(bytes(data))
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: only the hash tells
    assert run_cli("verify", "--remote", "--remote-dir", server_tree, "--local-dir", dest).returncode == 30


def test_assumed_instance_is_said_on_the_first_line(tmp_path):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("remote_dir: /data/run\n")
    res = run_cli("list", "--config", cfg, env={"HOME": str(home), "CKPTSYNC_CONFIG": None})
    assert res.returncode == 20
    assert res.stderr.splitlines()[0].startswith("warning: no --instance or --host given: using instance 0 (")
