"""The OpenSSH transport: what `tnr connect` writes, ckptsync's host-key policy over it, no port
forwards, one shared login, the choice of SSH client, and ssh's failures as one-line errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from helpers import cli_env, run_cli
from ckptsync.errors import ConfigError, ConnectError, HostKeyError, LoginRefused
from ckptsync.server.agent_server import AgentServer
from ckptsync.transport import SshTarget, ssh_transport
from ckptsync.transport.openssh import OpenSshTransport, Settings, control_dir, explain


@pytest.fixture(autouse=True)
def openssh(monkeypatch):
    """These tests are about the OpenSSH client, also when the suite runs with CKPTSYNC_SSH=paramiko."""
    monkeypatch.setenv("CKPTSYNC_SSH", "openssh")


def logins(sshd) -> int:
    return sshd.log_path.read_text(errors="replace").count("Accepted publickey")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def tnr_block(home: Path, sshd, instance: str, forwards: list[int]) -> str:
    """A config block as `tnr connect` writes it (Thunder's CLI, utils/sshconfig.go)."""
    lines = [
        f"Host tnr-{instance}",
        f"    HostName {sshd.host}",
        f"    User {sshd.user}",
        f'    IdentityFile "{home / ".ssh" / "id_ed25519"}"',
        "    IdentitiesOnly yes",
        "    StrictHostKeyChecking no",
        f"    Port {sshd.port}",
        *(f"    LocalForward {p} localhost:{p}" for p in forwards),
    ]
    return "\n".join(lines) + "\n"


@pytest.fixture
def tnr_home(ssh_home: Path, sshd) -> Path:
    """ssh_home with only a `tnr connect` block for instance 9, and an empty known_hosts."""
    ports = free_ports(2)  # stand-ins for 8888 and 6006, which may be taken on this machine
    (ssh_home / ".ssh" / "config").write_text(tnr_block(ssh_home, sshd, "9", ports))
    (ssh_home / ".ssh" / "known_hosts").write_text("")
    ssh_home.joinpath("forwards").write_text(" ".join(map(str, ports)))
    return ssh_home


def forwards(home: Path) -> list[int]:
    return [int(p) for p in home.joinpath("forwards").read_text().split()]


def masters(runtime: str) -> list[Path]:
    return [p for p in Path(runtime, "ckptsync").iterdir() if p.is_socket()]


# ---------------------------------------------------------------- tnr connect's block

def test_tnr_block_unknown_key_is_refused_despite_strict_checking_no(tnr_home, server_tree):
    res = run_cli("list", "-i", "9", "--remote-dir", server_tree)
    assert res.returncode == 20, res.stderr
    assert res.stderr.startswith("error: unknown host key for [127.0.0.1]:"), res.stderr
    assert "--accept-new-host-key" in res.stderr and "Traceback" not in res.stderr
    assert tnr_home.joinpath(".ssh", "known_hosts").read_text() == ""


def test_tnr_block_key_trusted_once_then_checked(tnr_home, sshd, server_tree):
    first = run_cli("list", "-i", "9", "--remote-dir", server_tree, "--accept-new-host-key")
    assert first.returncode == 0, first.stderr
    assert "trusted the new host key of [127.0.0.1]:" in first.stderr
    found = subprocess.run(["ssh-keygen", "-F", f"[127.0.0.1]:{sshd.port}",
                            "-f", tnr_home / ".ssh" / "known_hosts"], capture_output=True, text=True)
    assert found.returncode == 0, found
    again = run_cli("list", "-i", "9", "--remote-dir", server_tree)
    assert again.returncode == 0, again.stderr
    assert "trusted" not in again.stderr


def test_tnr_block_changed_key_is_refused_even_with_accept_new(tnr_home, sshd, server_tree, tmp_path):
    other = tmp_path / "otherkey"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kind, key = other.with_suffix(".pub").read_text().split()[:2]
    known = tnr_home / ".ssh" / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {kind} {key}\n")
    res = run_cli("list", "-i", "9", "--remote-dir", server_tree, "--accept-new-host-key")
    assert res.returncode == 20, res.stderr
    assert res.stderr.startswith(f"error: host key for [127.0.0.1]:{sshd.port} has CHANGED (ED25519)"), res.stderr
    assert f"ssh-keygen -R '[127.0.0.1]:{sshd.port}' -f {known}" in res.stderr
    assert "@@@" not in res.stderr


def test_tnr_block_local_forwards_are_not_opened(tnr_home, sshd, server_tree):
    ports = forwards(tnr_home)
    res = run_cli("backup", "-i", "9", "--remote-dir", server_tree, "--local-dir", tnr_home / "b",
                  "--accept-new-host-key", "--json")
    assert res.returncode == 0, res.stderr
    [master] = masters(os.environ["XDG_RUNTIME_DIR"])
    check = subprocess.run(["ssh", "-F", "none", "-o", f"ControlPath={master}", "-O", "check", "x"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr  # the shared connection is still up...
    assert not any(listening(p) for p in ports)  # ...and forwards none of the block's ports


def test_tnr_block_runs_while_the_users_own_session_holds_the_ports(tnr_home, sshd, server_tree):
    ports = forwards(tnr_home)
    held = []
    for p in ports:  # what the user's own `ssh tnr-9` holds
        s = socket.socket()
        s.bind(("127.0.0.1", p))
        s.listen()
        held.append(s)
    try:
        res = run_cli("list", "-i", "9", "--remote-dir", server_tree, "--accept-new-host-key")
    finally:
        for s in held:
            s.close()
    assert res.returncode == 0, res.stderr
    assert "Address already in use" not in res.stderr and "forwarding" not in res.stderr


# ---------------------------------------------------------------- one login, shared

def test_runs_share_one_login_and_the_master_stops_on_request(ssh_home, sshd, server_tree):
    before = logins(sshd)
    for _ in range(3):
        res = run_cli("list", "-i", "1", "--remote-dir", server_tree)
        assert res.returncode == 0, res.stderr
    assert logins(sshd) - before == 1
    transport = ssh_transport(SshTarget(host="tnr-1"), "openssh")
    assert isinstance(transport, OpenSshTransport)
    transport.stop_master()
    assert masters(os.environ["XDG_RUNTIME_DIR"]) == []
    with AgentServer(transport) as server:
        assert server.scan(str(server_tree)).files
    assert logins(sshd) - before == 2


def test_control_directory_must_be_private(ssh_home, tmp_path, monkeypatch):
    runtime = tmp_path / "rt"
    (runtime / "ckptsync").mkdir(parents=True)
    os.chmod(runtime / "ckptsync", 0o755)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    with pytest.raises(ConnectError, match="not a private directory"):
        control_dir()


# ---------------------------------------------------------------- which client

def test_openssh_is_the_default_and_paramiko_the_fallback(monkeypatch, tmp_path):
    monkeypatch.delenv("CKPTSYNC_SSH", raising=False)
    assert type(ssh_transport(SshTarget(host="h"))).__name__ == "OpenSshTransport"
    assert type(ssh_transport(SshTarget(host="h"), "paramiko")).__name__ == "SshTransport"
    assert type(ssh_transport(SshTarget(host="h"), None, "paramiko")).__name__ == "SshTransport"
    monkeypatch.setenv("CKPTSYNC_SSH", "paramiko")
    assert type(ssh_transport(SshTarget(host="h"))).__name__ == "SshTransport"
    assert type(ssh_transport(SshTarget(host="h"), None, "openssh")).__name__ == "SshTransport"  # env over config
    assert type(ssh_transport(SshTarget(host="h"), "openssh")).__name__ == "OpenSshTransport"  # option over env
    monkeypatch.delenv("CKPTSYNC_SSH")
    monkeypatch.setenv("PATH", str(tmp_path))  # no ssh binary
    assert type(ssh_transport(SshTarget(host="h"))).__name__ == "SshTransport"
    with pytest.raises(ConfigError, match="no ssh on PATH"):
        ssh_transport(SshTarget(host="h"), "openssh")


def test_ssh_option_and_config_key_choose_the_client(ssh_home, sshd, server_tree, tmp_path, monkeypatch):
    monkeypatch.delenv("CKPTSYNC_SSH", raising=False)  # it would win over the config
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"remote_dir": str(server_tree), "ssh": "paramiko"}))
    before = logins(sshd)
    for _ in range(2):  # paramiko logs in every time
        assert run_cli("list", "-i", "1", "--config", cfg).returncode == 0
    assert logins(sshd) - before == 2
    for _ in range(2):  # --ssh wins over the config; OpenSSH shares one login
        res = run_cli("list", "-i", "1", "--config", cfg, "--ssh", "openssh")
        assert res.returncode == 0, res.stderr
    assert logins(sshd) - before == 3


@pytest.mark.parametrize("args, env, code, message", [
    (["--ssh", "putty"], {}, 2, "--ssh 'putty': expected openssh, paramiko or auto"),
    ([], {"CKPTSYNC_SSH": "putty"}, 4, "CKPTSYNC_SSH 'putty': expected openssh, paramiko or auto"),
    (["--ssh", "openssh"], {"PATH": "/nonexistent"}, 4, "no ssh on PATH"),
])
def test_a_wrong_ssh_choice_is_one_line(args, env, code, message, tmp_path):
    import sys

    res = subprocess.run([sys.executable, "-m", "ckptsync", "list", "-i", "1", "--remote-dir", "/x", *args],
                         capture_output=True, text=True, env=cli_env({**env, "HOME": str(tmp_path)}), cwd=tmp_path)
    assert res.returncode == code, res.stderr
    assert res.stderr.startswith(f"error: {message}") or message in res.stderr.splitlines()[0], res.stderr
    assert "Traceback" not in res.stderr


def test_config_ssh_value_is_checked(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"remote_dir": "/x", "instances": {"1": {"host": "h", "ssh": "putty"}}}))
    res = run_cli("list", "-i", "1", "--config", cfg)
    assert res.returncode == 4, res.stderr
    assert "instances.1.ssh: expected openssh, paramiko or auto, got 'putty'" in res.stderr


# ---------------------------------------------------------------- ssh's stderr -> one error

TARGET = Settings(alias="tnr-3", hostname="10.0.0.3", port=2222, user="ubuntu", proxy_jump=None,
                  timeout="15", identity_files=[])
JUMPED = Settings(alias="gpu", hostname="10.0.0.3", port=22, user="ubuntu", proxy_jump="bastion",
                  timeout="15", identity_files=[])
CHANGED = """\
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!
Someone could be eavesdropping on you right now (man-in-the-middle attack)!
It is also possible that a host key has just been changed.
The fingerprint for the ED25519 key sent by the remote host is
SHA256:abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG.
Please contact your system administrator.
Add correct host key in /home/u/.ssh/known_hosts to get rid of this message.
Offending ED25519 key in /home/u/.ssh/known_hosts:3
Host key for [10.0.0.3]:2222 has changed and you have requested strict checking.
Host key verification failed.
"""


@pytest.mark.parametrize("settings, stderr, kind, message", [
    (TARGET, CHANGED, HostKeyError,
     "host key for [10.0.0.3]:2222 has CHANGED (ED25519); refusing to connect"),
    (TARGET, "No ED25519 host key is known for [10.0.0.3]:2222 and you have requested strict checking.\n"
     "Host key verification failed.\n", HostKeyError, "unknown host key for [10.0.0.3]:2222: ED25519"),
    (TARGET, "ubuntu@10.0.0.3: Permission denied (publickey).\n", LoginRefused,
     "authentication failed for ubuntu@10.0.0.3:2222 (tried default keys and the SSH agent)"),
    (TARGET, "ssh: connect to host 10.0.0.3 port 2222: Connection refused\n", ConnectError,
     "cannot connect to ubuntu@10.0.0.3:2222: connection refused"),
    (TARGET, "ssh: connect to host 10.0.0.3 port 2222: Connection timed out\n", ConnectError,
     "cannot connect to ubuntu@10.0.0.3:2222: timed out after 15s"),
    (TARGET, "ssh: connect to host 10.0.0.3 port 2222: No route to host\n", ConnectError,
     "cannot connect to ubuntu@10.0.0.3:2222: no route to host"),
    (TARGET, "ssh: Could not resolve hostname 10.0.0.3: Name or service not known\n", ConnectError,
     "cannot resolve host 10.0.0.3: Name or service not known"),
    (TARGET, "kex_exchange_identification: banner line contains invalid characters\n"
     "banner exchange: Connection to 10.0.0.3 port 2222: invalid format\n", ConnectError,
     "no SSH server answered on 10.0.0.3:2222 (connected, but it does not speak SSH)"),
    (TARGET, "kex_exchange_identification: read: Connection reset by peer\n"
     "Connection reset by 10.0.0.3 port 2222\n", ConnectError,
     "SSH failed with ubuntu@10.0.0.3:2222: the connection closed during the handshake"),
    (TARGET, "/home/u/.ssh/config: line 4: Bad configuration option: hostnmae\n"
     "/home/u/.ssh/config: terminating, 1 bad configuration options\n", ConfigError,
     "/home/u/.ssh/config line 4: Bad configuration option: hostnmae"),
    (TARGET, "something new\n", ConnectError, "SSH failed with ubuntu@10.0.0.3:2222 (ssh exited with status 255)"),
    (JUMPED, "channel 0: open failed: connect failed: No route to host\nstdio forwarding failed\n"
     "kex_exchange_identification: Connection closed by remote host\n", ConnectError,
     "jump host bastion cannot reach 10.0.0.3:22: no route to host"),
    (JUMPED, "ssh: connect to host 192.168.1.1 port 22: Connection refused\n"
     "kex_exchange_identification: Connection closed by remote host\n", ConnectError,
     "cannot connect to jump host 192.168.1.1:22 (ProxyJump bastion): connection refused"),
    (JUMPED, "admin@192.168.1.1: Permission denied (publickey).\n", LoginRefused,
     "authentication failed for jump host admin@192.168.1.1"),
    (JUMPED, "ssh: Could not resolve hostname bastion: Temporary failure in name resolution\n", ConnectError,
     "cannot resolve host bastion (a jump host): Temporary failure in name resolution"),
])
def test_ssh_failures_become_one_line_errors(settings, stderr, kind, message):
    err = explain(stderr, settings)
    assert type(err) is kind
    assert err.message == message
    assert "\n" not in err.message and "\n" not in err.hint


def test_unknown_tnr_alias_hints_at_tnr_connect():
    s = Settings(alias="tnr-42", hostname="tnr-42", port=22, user="u", proxy_jump=None, timeout="15",
                 identity_files=[])
    err = explain("ssh: Could not resolve hostname tnr-42: Name or service not known\r\n", s)
    assert err.message == "cannot resolve host tnr-42: Name or service not known"
    assert "run 'tnr connect 42' first" in err.hint
