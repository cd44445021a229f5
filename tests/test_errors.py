"""Bad input gets one clear line and its documented exit code, never a traceback."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest

from helpers import HANG, run_cli


def one_line_error(res, code: int, *needles: str) -> None:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    assert res.stderr.startswith("error: "), res.stderr
    for needle in needles:
        assert needle in res.stderr, (needle, res.stderr)


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- ssh


def test_unknown_host_key_refused_then_accepted(ssh_home, sshd, server_tree):
    (ssh_home / ".ssh" / "known_hosts").write_text("")
    res = run_cli("list", "--host", "tnr-1", "--remote-dir", server_tree)
    one_line_error(res, 20, "unknown host key", "--accept-new-host-key")
    ok = run_cli("list", "--host", "tnr-1", "--remote-dir", server_tree, "--accept-new-host-key")
    assert ok.returncode == 0, ok.stderr
    # OpenSSH may store the name hashed (HashKnownHosts); ssh-keygen -F finds it either way.
    found = subprocess.run(["ssh-keygen", "-F", f"[127.0.0.1]:{sshd.port}", "-f", ssh_home / ".ssh" / "known_hosts"],
                           capture_output=True, text=True)
    assert found.returncode == 0 and found.stdout.strip(), found
    again = run_cli("list", "--host", "tnr-1", "--remote-dir", server_tree)
    assert again.returncode == 0


def test_changed_host_key_always_refused(ssh_home, sshd, server_tree, tmp_path):
    import subprocess

    other = tmp_path / "otherkey"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    fake = (other.with_suffix(".pub")).read_text().split()[:2]
    (ssh_home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{sshd.port} {fake[0]} {fake[1]}\n")
    res = run_cli("list", "--host", "tnr-1", "--remote-dir", server_tree, "--accept-new-host-key")
    one_line_error(res, 20, "CHANGED")


def test_refused_key(ssh_home, sshd, server_tree, tmp_path):
    import subprocess

    key = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    cfg = ssh_home / "c.yaml"
    cfg.write_text(json.dumps({"remote_dir": str(server_tree), "instances": {
        "7": {"host": "127.0.0.1", "port": sshd.port, "user": sshd.user, "identity_file": str(key)}}}))
    res = run_cli("list", "-i", "7", "--config", cfg)
    one_line_error(res, 20, "authentication failed")


def test_dead_port_fails_fast(ssh_home, server_tree):
    # An hour of connect timeout: a refused connection is reported at once, or the run hangs past HANG.
    res = run_cli("list", "--host", f"127.0.0.1:{dead_port()}", "--remote-dir", server_tree,
                  env={"CKPTSYNC_CONNECT_TIMEOUT": "3600"}, timeout=HANG)
    one_line_error(res, 20, "cannot connect", "refused")


def test_unresolvable_instance_alias(ssh_home):
    res = run_cli("list", "--instance", "42", "--remote-dir", "/data")
    one_line_error(res, 20, "tnr-42")


def test_missing_remote_dir(ssh_home, tmp_path):
    res = run_cli("list", "-i", "1", "--remote-dir", tmp_path / "nope")
    one_line_error(res, 10, "does not exist")


def test_no_python_on_server(tmp_path):
    bare = tmp_path / "bin"  # a server with a shell but no python
    bare.mkdir()
    (bare / "sh").symlink_to("/bin/sh")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"remote_dir": "/tmp", "instances": {
        "5": {"command": ["env", "-i", f"PATH={bare}"]}}}))
    res = run_cli("list", "-i", "5", "--config", cfg)
    one_line_error(res, 20, "no python3 on the server")


# A fake agent's shell keeps reading the client's input (an asynchronous command's own stdin would be
# /dev/null), so the client's writes succeed and what it reads decides the outcome.
READ_INPUT = "exec 3<&0; cat <&3 >/dev/null & "


def test_garbage_instead_of_agent(tmp_path):
    cfg = tmp_path / "c.yaml"
    # It stays until the client closes its input: the client must see the garbage for what it is,
    # not wait for a 4 GiB frame.
    script = READ_INPUT + "printf 'CKPTSYNC-AGENT-READY\\n\\377\\377\\377\\377\\377garbage'; wait"
    cfg.write_text(json.dumps({"remote_dir": "/tmp", "instances": {"5": {"command": ["sh", "-c", script, "x"]}}}))
    res = run_cli("list", "-i", "5", "--config", cfg, timeout=60)
    one_line_error(res, 20, "frame of 4294967295 bytes is larger than allowed")


def test_agent_dies_mid_frame(tmp_path):
    cfg = tmp_path / "c.yaml"
    script = READ_INPUT + "printf 'CKPTSYNC-AGENT-READY\\nJ\\000\\000\\001\\000{\"proto'; exit 0"
    cfg.write_text(json.dumps({"remote_dir": "/tmp", "instances": {"5": {"command": ["sh", "-c", script, "x"]}}}))
    res = run_cli("list", "-i", "5", "--config", cfg, timeout=60)
    one_line_error(res, 20, "mid-frame")


def test_a_stream_cut_mid_frame_says_what_the_server_said(tmp_path):
    cfg = tmp_path / "c.yaml"
    # Its stderr ends with it (the input reader's goes to /dev/null), so what it said is all there.
    script = ("exec 3<&0; cat <&3 >/dev/null 2>&1 & printf 'CKPTSYNC-AGENT-READY\\nJ\\000\\000\\001\\000{\"proto'; "
              "echo 'MemoryError: the agent ran out of memory' >&2; exit 1")
    cfg.write_text(json.dumps({"remote_dir": "/tmp", "instances": {"5": {"command": ["sh", "-c", script, "x"]}}}))
    res = run_cli("list", "-i", "5", "--config", cfg, timeout=60)
    one_line_error(res, 20, "mid-frame (MemoryError: the agent ran out of memory)")


def test_unreadable_trainer_state_is_reported_not_fatal(server_tree, tmp_path):
    (server_tree / "checkpoint-8" / "trainer_state.json").write_text("{ not json")
    import os

    old = time.time() - 3000
    os.utime(server_tree / "checkpoint-8" / "trainer_state.json", (old, old))
    res = run_cli("list", "--remote-dir", server_tree, "--local-dir", tmp_path / "b")
    assert res.returncode == 0, res.stderr
    assert "metadata unreadable" in res.stdout
    assert "checkpoint-8: trainer_state.json" in res.stderr
    rows = {r["name"]: r for r in json.loads(run_cli("list", "--remote-dir", server_tree, "--local-dir",
                                                     tmp_path / "b", "--json").stdout)["checkpoints"]}
    assert rows["checkpoint-8"]["meta_error"] and rows["checkpoint-8"]["step"] == 8


# ---------------------------------------------------------------- config and usage


@pytest.mark.parametrize("text,needles", [
    ("remote_dir: /x\nbogus: 1\n", ["unknown key 'bogus'"]),
    ("remote_dir: /x\nsettle_seconds: soon\n", ["settle_seconds", "expected a number of seconds"]),
    ("remote_dir: /x\ninstances:\n  '1': {user: ubuntu}\n", ["instances.1", "missing host"]),
    ("remote_dir: /x\ninstances:\n  '1': {host: h, port: 99999}\n", ["instances.1.port"]),
    ("remote_dir: [unclosed\n", ["not valid YAML"]),
    ("- just\n- a list\n", ["expected a mapping"]),
    ("instances:\n  '1': {host: h, colour: red}\n", ["instances.1", "unknown key 'colour'"]),
    # values of the right type that make no sense
    ("remote_dir: /x\nsettle_seconds: -5\n", ["settle_seconds", "0 or more, got -5"]),
    ("remote_dir: /x\nsettle_seconds: .nan\n", ["settle_seconds", "got nan"]),
    ("remote_dir: /x\nsettle_seconds: .inf\n", ["settle_seconds", "got inf"]),
    ("remote_dir: /x\ninstances:\n  '1': {host: ''}\n", ["instances.1.host", "an empty string"]),
    ("remote_dir: /x\nlocal_dir: ''\n", ["local_dir", "an empty string"]),
    ("remote_dir: ' '\n", ["remote_dir", "an empty string"]),
    ("remote_dir: /x\ninstances:\n  '1': {host: h, user: ''}\n", ["instances.1.user", "an empty string"]),
    ("remote_dir: /x\nextra_files: [config.json, '']\n", ["extra_files", "an empty string"]),
    ("remote_dir: /x\ninstances:\n  '1': {command: ['', x]}\n", ["instances.1.command", "program"]),
    ("remote_dir: /x\nparallel: -1\n", ["parallel", "got -1"]),
    ("remote_dir: /x\nkeep_generations: -1\n", ["keep_generations", "got -1"]),
    ("remote_dir: /x\nbwlimit: -5M\n", ["bwlimit", "is not a rate"]),
    ("remote_dir: /x\nbwlimit: 0\n", ["bwlimit", "below the smallest rate"]),
    ("a: " + "[" * 10000 + "]" * 10000 + "\n", ["nested too deeply"]),
    ("remote_dir: /x\nstall_timeout: 0\n", ["stall_timeout", "more than 0"]),
    ("remote_dir: /x\ninstances:\n  '1': {host: h, stall_timeout: .nan}\n", ["instances.1.stall_timeout"]),
])
def test_broken_config_exits_4_naming_file_and_key(tmp_path, text, needles):
    cfg = tmp_path / "ckptsync.yaml"
    cfg.write_text(text)
    res = run_cli("list", "-i", "1", "--config", cfg)
    one_line_error(res, 4, str(cfg), *needles)


def test_a_stall_timeout_from_the_environment_that_is_no_number_of_seconds_exits_4(tmp_path):
    res = run_cli("list", "--remote-dir", tmp_path, env={"CKPTSYNC_STALL_TIMEOUT": "soon"})
    one_line_error(res, 4, "CKPTSYNC_STALL_TIMEOUT=soon", "a number of seconds")


def test_config_env_var_and_missing_file(tmp_path):
    res = run_cli("list", "-i", "1", env={"CKPTSYNC_CONFIG": str(tmp_path / "missing.yaml")})
    one_line_error(res, 4, "missing.yaml", "CKPTSYNC_CONFIG")


def test_config_found_in_cwd(tmp_path, server_tree):
    (tmp_path / "ckptsync.yaml").write_text(f"remote_dir: {server_tree}\nlocal_dir: {tmp_path / 'b'}\n"
                                            "instances:\n  '9': {command: [sh, -c, 'exec \"$@\"', x]}\n")
    res = run_cli("list", "-i", "9", "--json", cwd=tmp_path, env={"CKPTSYNC_CONFIG": None})
    assert res.returncode == 0, res.stderr
    assert len(json.loads(res.stdout)["checkpoints"]) == 3


@pytest.mark.parametrize("args,needle", [
    (["backup", "--max-checkpoints", "x"], "--max-checkpoints"),
    (["backup", "--frobnicate"], "--frobnicate"),
    (["backup", "--compress", "fast", "--remote-dir", "/tmp"], "--compress"),
    (["nosuchcommand"], "nosuchcommand"),
    (["list", "--instance", "1", "--host", "h", "--remote-dir", "/tmp"], "not both"),
    (["list", "--host", "a@b@c:x", "--remote-dir", "/tmp"], "--host"),
    (["list", "--local", "--local-dir", ""], "--local-dir: an empty value"),
    (["backup", "--remote-dir", "", "--local-dir", "/tmp/b"], "--remote-dir: an empty value"),
    (["list", "--instance", " "], "--instance: an empty value"),
])
def test_usage_errors_exit_2(args, needle, tmp_path):
    res = run_cli(*args, cwd=tmp_path, env={"CKPTSYNC_CONFIG": None})
    one_line_error(res, 2, needle)


def test_no_remote_dir_anywhere(tmp_path):
    res = run_cli("list", "-i", "3", cwd=tmp_path, env={"CKPTSYNC_CONFIG": None, "HOME": str(tmp_path)})
    one_line_error(res, 4, "no remote_dir")


def test_version_and_help_list_exit_codes():
    import ckptsync

    res = run_cli("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"ckptsync {ckptsync.__version__}"
    helptext = run_cli("--help").stdout
    for code in ("0", "1", "2", "3", "4", "5", "10", "11", "20", "30", "130"):
        assert f"\n  {code:>3}  " in helptext or f"{code:>3}  " in helptext


def test_cli_runs_where_click_is_not_installed(tmp_path):
    """Newer typer vendors click and does not install it: the CLI must not need it."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['click'] = None; sys.argv = ['ckptsync', 'verify', '--bogus']; "
            "from ckptsync.cli.app import main; main()")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "--bogus" in res.stderr and "Traceback" not in res.stderr


def test_every_error_class_names_its_kind():
    """`kind` is the stable word --json reports for an error: one per class, set on the class."""
    import re

    from ckptsync import errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.CkptsyncError)]
    assert len(classes) >= 12
    for cls in classes:
        assert "kind" in vars(cls), cls.__name__
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", cls.kind), cls.kind
    assert errors.UsageError.kind == "usage" and errors.ConfigError.kind == "config"
    assert errors.NotFound.kind == "not_found" and errors.ConnectError.kind == "connect"
    assert errors.HostKeyError.kind == "host_key" and errors.Interrupted.kind == "interrupted"
    agent = errors.AgentError("on the server: is a directory", kind="is_dir", path="a/b")
    assert (agent.kind, agent.agent_kind, agent.path, agent.exit_code) == ("io", "is_dir", "a/b", errors.IO)
