"""The SSH cipher: AES-GCM first where both CPUs have AES instructions, the user's own Ciphers kept,
the server's answer remembered for the next connection; OpenSSH and paramiko."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_cli
from ckptsync import osdeps
from ckptsync.agent.cpu import cpu_aes
from ckptsync.transport import SshTarget, ssh_transport
from ckptsync.transport.base import FAST_CIPHERS, cipher_order
from ckptsync.transport.openssh import OpenSshTransport, config_text, servers_file, supported_ciphers

OPENSSH_CIPHERS = ("chacha20-poly1305@openssh.com", "aes128-ctr", "aes192-ctr", "aes256-ctr",
                   "aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
X86 = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 ssse3 {aes} avx2\n\nprocessor\t: 1\n"
ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd {aes} pmull sha1 sha2\n"

needs_aes = pytest.mark.skipif(not osdeps.cpu_has_aes(),
                               reason="this machine's CPU has no AES instructions (no `aes` in /proc/cpuinfo)")


def openssh_of(host: str) -> OpenSshTransport:
    transport = ssh_transport(SshTarget(host=host), "openssh")
    assert isinstance(transport, OpenSshTransport)
    return transport


def negotiated(transport: OpenSshTransport) -> str:
    """The cipher a connection with ckptsync's ssh command line and config agrees on."""
    res = subprocess.run([*transport.argv(share=False), "-o", "LogLevel=DEBUG1", "--", transport.target.host, "true"],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert res.returncode == 0, res.stderr
    found = re.search(r"kex: server->client cipher: (\S+)", res.stderr)
    assert found, res.stderr
    return found.group(1)


# ---------------------------------------------------------------- the choice (pure)

def test_aes_gcm_goes_first_only_where_both_cpus_have_aes():
    assert cipher_order(OPENSSH_CIPHERS, True, None) == list(FAST_CIPHERS)   # the server not yet known
    assert cipher_order(OPENSSH_CIPHERS, True, True) == list(FAST_CIPHERS)
    assert cipher_order(OPENSSH_CIPHERS, True, True)[2] == "chacha20-poly1305@openssh.com"  # still agreed on
    assert cipher_order(OPENSSH_CIPHERS, False, None) == []     # OpenSSH's own order
    assert cipher_order(OPENSSH_CIPHERS, False, True) == []
    assert cipher_order(OPENSSH_CIPHERS, True, False) == []
    # Only what this ssh knows; without AES-GCM nothing is gained.
    assert cipher_order(("aes128-ctr", "chacha20-poly1305@openssh.com", "aes256-gcm@openssh.com"), True, True) == [
        "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com", "aes128-ctr"]
    assert cipher_order(("aes128-ctr", "chacha20-poly1305@openssh.com"), True, True) == []
    assert cipher_order((), True, True) == []


def test_cpu_flags_are_read_on_x86_and_arm(tmp_path):
    cases = {"x86-aes": X86.format(aes="aes"), "x86": X86.format(aes="pclmulqdq"),
             "arm-aes": ARM.format(aes="aes"), "arm": ARM.format(aes="crc32"), "none": "processor\t: 0\n"}
    for name, text in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "cpuinfo").write_text(text)
    assert [cpu_aes(str(tmp_path / n / "cpuinfo")) for n in cases] == [True, False, True, False, None]
    assert cpu_aes(str(tmp_path / "missing")) is None
    if sys.platform.startswith("linux"):
        assert [osdeps.cpu_has_aes(str(tmp_path / n)) for n in cases] == [True, False, True, False, False]


def test_the_generated_config_offers_the_order_after_the_users_own_config(tmp_path):
    user = tmp_path / "config"
    user.write_text("Host *\n    User someone\n")
    text = config_text(SshTarget(host="h", ssh_config=str(user)), FAST_CIPHERS)
    assert f"    Ciphers {','.join(FAST_CIPHERS)}" in text
    # OpenSSH takes the first value it reads: a Ciphers line of the user's (included above) wins.
    assert text.index(f"Include \"{user}\"") < text.index("    Ciphers ")
    assert "Ciphers" not in config_text(SshTarget(host="h", ssh_config=str(user)))


def test_the_ciphers_of_an_ssh_are_asked_once_per_build(tmp_path):
    """`ssh -Q cipher` is run by the first connection only; an ssh replaced (another size or time)
    is asked again."""
    asked = tmp_path / "asked"
    ssh = tmp_path / "ssh"
    ssh.write_text(f"#!/bin/sh\necho \"$*\" >> {asked}\nprintf 'aes128-ctr\\naes128-gcm@openssh.com\\n'\n")
    ssh.chmod(0o755)
    know = supported_ciphers.__wrapped__   # as a new process would: without this one's memory
    assert know(str(ssh)) == ("aes128-ctr", "aes128-gcm@openssh.com")
    assert know(str(ssh)) == ("aes128-ctr", "aes128-gcm@openssh.com")
    assert asked.read_text() == "-Q cipher\n"
    ssh.write_text(ssh.read_text() + "# upgraded\n")
    assert know(str(ssh)) == ("aes128-ctr", "aes128-gcm@openssh.com")
    assert asked.read_text() == "-Q cipher\n-Q cipher\n"


# ---------------------------------------------------------------- OpenSSH, against the test sshd

@needs_aes
def test_a_connection_agrees_on_aes128_gcm(ssh_home, sshd):
    assert negotiated(openssh_of("tnr-1")) == "aes128-gcm@openssh.com"


@needs_aes
def test_the_users_own_ciphers_are_kept(ssh_home, sshd):
    config = ssh_home / ".ssh" / "config"
    config.write_text("Host tnr-2\n    Ciphers chacha20-poly1305@openssh.com\n\n" + config.read_text())
    assert negotiated(openssh_of("tnr-2")) == "chacha20-poly1305@openssh.com"
    assert negotiated(openssh_of("tnr-1")) == "aes128-gcm@openssh.com"   # the other hosts of that config


@needs_aes
def test_the_servers_cpu_is_remembered_for_the_next_connection(ssh_home, sshd, server_tree):
    res = run_cli("list", "-i", "1", "--remote-dir", server_tree)
    assert res.returncode == 0, res.stderr
    path = Path(servers_file())
    assert path.is_relative_to(ssh_home / ".local" / "state")
    assert json.loads(path.read_text()) == {"tnr-1": {"aes": True}}   # the test server is this machine
    # A server without AES: the next connection leaves OpenSSH's own order (chacha20 first).
    path.write_text(json.dumps({"tnr-1": {"aes": False}}))
    assert negotiated(openssh_of("tnr-1")) == "chacha20-poly1305@openssh.com"
    assert negotiated(openssh_of("tnr-2")) == "aes128-gcm@openssh.com"


# ---------------------------------------------------------------- paramiko

def paramiko_cipher(host: str) -> str:
    proc = ssh_transport(SshTarget(host=host), "paramiko").start()
    try:
        return proc.client.get_transport().local_cipher
    finally:
        proc.close()


def test_paramiko_offers_aes_gcm_first_and_keeps_the_users_ciphers(ssh_home, sshd):
    config = ssh_home / ".ssh" / "config"
    config.write_text("Host tnr-2\n    Ciphers aes256-ctr,chacha20-poly1305@openssh.com\n\n" + config.read_text())
    assert paramiko_cipher("tnr-1") == "aes128-gcm@openssh.com"
    assert paramiko_cipher("tnr-2") == "aes256-ctr"
