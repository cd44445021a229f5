"""Several channels through a real sshd: a large file as byte ranges both ways, and the channels
beyond the first connection's four on a connection of their own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_cli, tree_digest
from test_backup import assert_same_as_server, big_checkpoint, cfg_args, manifest, write_config


@pytest.fixture(autouse=True)
def openssh(monkeypatch):
    """Connections are counted for the OpenSSH client, also when the suite runs with CKPTSYNC_SSH=paramiko."""
    monkeypatch.setenv("CKPTSYNC_SSH", "openssh")


@pytest.fixture
def setup(ssh_home, server_tree, tmp_path):
    dest = tmp_path / "backups"
    write_config(ssh_home, server_tree, dest)
    return server_tree, dest / "instance-1", ssh_home


def logins(sshd) -> int:
    return sshd.log_path.read_text(errors="replace").count("Accepted publickey")


def masters(runtime: str) -> list[Path]:
    return [p for p in Path(runtime, "ckptsync").iterdir() if p.is_socket()]


def test_one_large_file_is_restored_as_ranges_over_three_channels(setup):
    """checkpoint-12 is a few kB of small files and one 80 MiB shard: whole, the shard would fill one
    share and the small files another, so three channels used means the shard went as three ranges."""
    server, dest, home = setup
    big_checkpoint(server, mb=80)
    res = run_cli("backup", "-i", "1", *cfg_args(home), "--checkpoint", "checkpoint-12", "--no-extra-files",
                  "--parallel", "3", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["channels"] == 3
    assert_same_as_server(server / "checkpoint-12", dest / "checkpoint-12", manifest(dest, "checkpoint-12"),
                          "checkpoint-12")

    fresh = server.parent / "restored"
    res = run_cli("restore", "-i", "1", *cfg_args(home), "--remote-dir", fresh, "--checkpoint", "checkpoint-12",
                  "--no-extra-files", "--parallel", "3", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["channels"] == 3
    assert tree_digest(fresh / "checkpoint-12") == tree_digest(server / "checkpoint-12")
    assert not list(fresh.rglob("*.part")) and sorted(p.name for p in fresh.iterdir()) == ["checkpoint-12"]


def test_five_channels_go_over_two_connections(setup, sshd, ssh_runtime_dir):
    """Four channels share one login's TCP connection; the fifth opens a second (its own ssh master)."""
    server, dest, home = setup
    big_checkpoint(server, mb=100)   # five ranges of 20 MiB
    before = logins(sshd)
    res = run_cli("backup", "-i", "1", *cfg_args(home), "--checkpoint", "checkpoint-12", "--no-extra-files",
                  "--parallel", "5", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["channels"] == 5
    assert logins(sshd) - before == 2
    assert len(masters(str(ssh_runtime_dir))) == 2
    assert_same_as_server(server / "checkpoint-12", dest / "checkpoint-12", manifest(dest, "checkpoint-12"),
                          "checkpoint-12")
