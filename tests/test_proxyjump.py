"""ProxyJump from ~/.ssh/config: the server is reached through a jump host's direct-tcpip channel.

The jump host and the target are the same test sshd; sshd's log shows one login per hop.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

from helpers import run_cli


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


def test_backup_through_a_jump_host(sshd, ssh_home, server_tree, tmp_path):
    add_host(ssh_home, sshd, "behind-jump", sshd.port, "tnr-0")
    before = logins(sshd)
    dest = tmp_path / "backups"
    res = run_cli("backup", "--host", "behind-jump", "--remote-dir", server_tree, "--local-dir", dest, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["exit_code"] == 0
    assert (dest / "checkpoint-12" / "trainer_state.json").read_bytes() == \
        (server_tree / "checkpoint-12" / "trainer_state.json").read_bytes()
    assert logins(sshd) - before == 2  # the jump host, then the target through it
    assert run_cli("verify", "--local-dir", dest).returncode == 0


def test_jump_host_that_cannot_reach_the_target_exits_20(sshd, ssh_home, server_tree):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    add_host(ssh_home, sshd, "unreachable", dead, "tnr-0")
    res = run_cli("list", "--host", "unreachable", "--remote-dir", server_tree, timeout=60)
    assert res.returncode == 20, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert "jump host tnr-0 cannot reach" in lines[0] and "Traceback" not in res.stderr


def test_more_than_one_jump_is_refused_in_one_line(sshd, ssh_home, server_tree):
    add_host(ssh_home, sshd, "two-hops", sshd.port, "tnr-0,tnr-1")
    res = run_cli("list", "--host", "two-hops", "--remote-dir", server_tree, timeout=60)
    assert res.returncode == 20, res.stderr
    assert "has 2 hops; only one is supported" in res.stderr.splitlines()[0]
    assert "command: [ssh, two-hops]" in res.stderr
