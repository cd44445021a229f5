"""ProxyJump from ~/.ssh/config: the server is reached through one jump host or a chain of them.

The jump hosts and the target are the same test sshd; sshd's log shows one login per hop.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from helpers import run_cli

BOTH = pytest.mark.parametrize("ssh", ["openssh", "paramiko"])


def logins(sshd) -> int:
    return sshd.log_path.read_text(errors="replace").count("Accepted publickey")


def add_host(home: Path, sshd, alias: str, port: int, jump: str) -> None:
    ssh = home / ".ssh"
    block = "\n".join([
        f"Host {alias}",
        f"    HostName {sshd.host}",
        f"    Port {port}",
        f"    User {sshd.user}",
        f"    IdentityFile {ssh / 'id_ed25519'}",
        f"    UserKnownHostsFile {ssh / 'known_hosts'}",
        f"    ProxyJump {jump}",
    ])
    with open(ssh / "config", "a") as f:
        f.write("\n" + block + "\n")


def backup_through(sshd, server_tree, tmp_path, alias: str, ssh: str) -> int:
    """Back up through `alias`, check the result, and return the logins it took."""
    before = logins(sshd)
    dest = tmp_path / "backups"
    res = run_cli("--ssh", ssh, "backup", "--host", alias, "--remote-dir", server_tree, "--local-dir", dest, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["exit_code"] == 0
    assert (dest / "checkpoint-12" / "trainer_state.json").read_bytes() == \
        (server_tree / "checkpoint-12" / "trainer_state.json").read_bytes()
    assert run_cli("verify", "--local-dir", dest).returncode == 0
    return logins(sshd) - before


@BOTH
def test_backup_through_a_jump_host(sshd, ssh_home, server_tree, tmp_path, ssh):
    add_host(ssh_home, sshd, "behind-jump", sshd.port, "tnr-0")
    assert backup_through(sshd, server_tree, tmp_path, "behind-jump", ssh) == 2  # the jump host, then the target


def test_backup_through_two_jump_hosts(sshd, ssh_home, server_tree, tmp_path):
    add_host(ssh_home, sshd, "two-hops", sshd.port, "tnr-0,tnr-1")
    assert backup_through(sshd, server_tree, tmp_path, "two-hops", "openssh") == 3


@BOTH
def test_jump_host_that_cannot_reach_the_target_exits_20(sshd, ssh_home, server_tree, ssh):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    add_host(ssh_home, sshd, "unreachable", dead, "tnr-0")
    res = run_cli("--ssh", ssh, "list", "--host", "unreachable", "--remote-dir", server_tree, timeout=60)
    assert res.returncode == 20, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert "jump host tnr-0 cannot reach" in lines[0], res.stderr
    assert ssh == "paramiko" or "connection refused" in lines[0], res.stderr
    assert "Traceback" not in res.stderr and "stdio forwarding" not in res.stderr


def test_a_jump_host_that_refuses_the_key_exits_20(sshd, ssh_home, server_tree, tmp_path):
    import subprocess

    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    with open(ssh_home / ".ssh" / "config", "a") as f:
        f.write(f"\nHost bad-jump\n    HostName {sshd.host}\n    Port {sshd.port}\n    User {sshd.user}\n"
                f"    IdentityFile {stranger}\n    IdentitiesOnly yes\n"
                f"    UserKnownHostsFile {ssh_home / '.ssh' / 'known_hosts'}\n")
    add_host(ssh_home, sshd, "behind-bad-jump", sshd.port, "bad-jump")
    res = run_cli("--ssh", "openssh", "list", "--host", "behind-bad-jump", "--remote-dir", server_tree, timeout=60)
    assert res.returncode == 20, res.stderr
    assert res.stderr.startswith("error: authentication failed"), res.stderr
    assert "Permission denied" not in res.stderr


def test_paramiko_refuses_more_than_one_jump_in_one_line(sshd, ssh_home, server_tree):
    add_host(ssh_home, sshd, "two-hops", sshd.port, "tnr-0,tnr-1")
    res = run_cli("--ssh", "paramiko", "list", "--host", "two-hops", "--remote-dir", server_tree, timeout=60)
    assert res.returncode == 20, res.stderr
    assert "has 2 hops; only one is supported" in res.stderr.splitlines()[0]
    assert "--ssh openssh" in res.stderr
