"""What a new user meets first: remote paths relative to the server's home, a port that is not
SSH, the help text, and the small refusals and hints around list, backup and restore."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from helpers import run_cli, set_tree_mtime

RUN = "models/socrates-qwen-full-dataset"
TRANSPORTS = ["openssh", "paramiko"]


def one_line_error(res, code: int, *needles: str) -> None:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout
    assert [line for line in res.stderr.splitlines() if line.startswith("error: ")], res.stderr
    for needle in needles:
        assert needle in res.stderr, (needle, res.stderr)


# -------------------------------------------------- remote_dir relative to the server's home

@pytest.fixture
def in_server_home(other_user, server_tree, tmp_path):
    """The fixture run copied into the home of the server's user (tnr-7): -> its path relative to that home."""
    name = f"ckptsync-test-{os.getpid()}-{tmp_path.name}"
    top = other_user.home / name
    shutil.copytree(server_tree.parents[1], top, symlinks=True, copy_function=shutil.copy2)
    other_user.chown_tree(top)
    try:
        yield f"{name}/{RUN}"
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.parametrize("ssh", TRANSPORTS)
def test_relative_remote_dir_is_relative_to_the_servers_home(ssh_home, in_server_home, other_user, ssh):
    env = {"CKPTSYNC_SSH": ssh}
    assert Path(os.environ["HOME"]) != other_user.home  # the laptop's home is not the server's
    res = run_cli("list", "--instance", other_user.instance, "--remote-dir", in_server_home, env=env)
    assert res.returncode == 0, res.stderr
    assert "checkpoint-12" in res.stdout and f"{other_user.home}/{in_server_home}" in res.stdout


@pytest.fixture
def laptop_home(sshd, ssh_home, reachable_tmp) -> Path:
    """A HOME the server's user can look into (tmp_path is private to root), set up like ssh_home,
    so that a laptop path is simply absent on the server, as it is on a real one."""
    home = reachable_tmp / "laptop-home"
    home.mkdir()
    sshd.write_home(home)
    return home


@pytest.mark.parametrize("ssh", TRANSPORTS)
def test_a_tilde_the_laptop_expanded_gets_the_command_to_paste(laptop_home, in_server_home, other_user, tmp_path, ssh):
    env = {"CKPTSYNC_SSH": ssh, "HOME": str(laptop_home)}
    expanded = f"{laptop_home}/{in_server_home}"   # what `--remote-dir ~/...` becomes in the laptop's shell
    dest = tmp_path / "b"
    res = run_cli("list", "-i", other_user.instance, "--remote-dir", expanded, "--local-dir", dest, env=env)
    one_line_error(res, 10, f"remote directory does not exist on ", expanded,
                   f"{laptop_home} is this machine's home: the shell probably expanded ~")
    hint = re.search(r"relative to the server's home: (ckptsync .+)$", res.stderr, re.M)
    assert hint, res.stderr
    words = shlex.split(hint.group(1))
    assert words[:2] == ["ckptsync", "list"] and in_server_home in words and str(dest) in words
    pasted = run_cli(*words[1:], env=env)
    assert pasted.returncode == 0, pasted.stderr
    assert "checkpoint-12" in pasted.stdout

    # the same path from the config file: the hint names the file and the key
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"remote_dir": expanded}))
    res = run_cli("backup", "-i", other_user.instance, "--config", cfg, "--local-dir", dest, "--quiet", env=env)
    one_line_error(res, 10, f"Write remote_dir in {cfg} relative to the server's home: {in_server_home}")


def test_tilde_hint_only_for_a_path_under_this_machines_home(monkeypatch, tmp_path):
    from ckptsync.config import Config, resolve_target

    monkeypatch.setenv("HOME", "/home/me")
    given = resolve_target(Config(), instance="2", remote_dir="/home/me/run/models", need_remote=False)
    given = given.with_printed(verb=("backup",))
    assert given.printed.tilde_hint("/home/me/run/models", "/home/ubuntu").endswith(
        "relative to the server's home: ckptsync backup --instance 2 --remote-dir run/models")
    assert given.printed.tilde_hint("/home/me/run/models", "/home/me") == ""       # the same home: just missing
    assert given.printed.tilde_hint("/data/run", "/home/ubuntu") == ""             # not under this home
    assert given.printed.tilde_hint("/home/meg/run", "/home/ubuntu") == ""
    cfg = Config(path=tmp_path / "c.yaml", values={"remote_dir": "/home/me/run"})
    configured = resolve_target(cfg, instance="2", need_remote=False)
    assert configured.printed.tilde_hint("/home/me/run", "/root").endswith(
        f"Write remote_dir in {tmp_path / 'c.yaml'} relative to the server's home: run")


def test_local_relative_remote_dir_is_relative_to_the_current_directory(server_tree, tmp_path):
    res = run_cli("list", "--remote-dir", "socrates-training/" + RUN, "--local-dir", tmp_path / "b",
                  cwd=server_tree.parents[2], env={"HOME": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    assert "checkpoint-12" in res.stdout


# -------------------------------------------------- a port that accepts TCP but never speaks SSH

@pytest.fixture
def silent_port():
    """A TCP server on 127.0.0.1 that accepts every connection and never sends a byte."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield srv.getsockname()[1]
    finally:
        srv.close()
        for conn in held:
            conn.close()
        thread.join(5)


@pytest.mark.parametrize("ssh", TRANSPORTS)
def test_a_port_without_ssh_is_named_with_its_timeout(silent_port, tmp_path, ssh):
    if ssh == "openssh" and shutil.which("ssh") is None:
        pytest.skip("no ssh client")
    env = {"HOME": str(tmp_path), "CKPTSYNC_SSH": ssh, "CKPTSYNC_CONNECT_TIMEOUT": "1"}
    res = run_cli("list", "--host", f"127.0.0.1:{silent_port}", "--remote-dir", "run", env=env, timeout=60)
    one_line_error(res, 20, f"no SSH server answered on 127.0.0.1:{silent_port} "
                            "(connected, but no SSH banner within 1 s)")


def test_a_bad_connect_timeout_is_a_config_error(tmp_path):
    res = run_cli("list", "--host", "127.0.0.1:1", "--remote-dir", "run",
                  env={"HOME": str(tmp_path), "CKPTSYNC_SSH": "paramiko", "CKPTSYNC_CONNECT_TIMEOUT": "soon"})
    one_line_error(res, 4, "CKPTSYNC_CONNECT_TIMEOUT=soon")


# -------------------------------------------------- help

COMMANDS = ["list", "backup", "restore", "verify", "prune", "show", "compare", "archive", "checklist", "demo",
            "cron install", "cron show", "cron remove"]


def test_help_names_values_not_types(tmp_path):
    for command in COMMANDS:
        res = run_cli(*command.split(), "--help", env={"HOME": str(tmp_path), "COLUMNS": "80"})
        assert res.returncode == 0, (command, res.stderr)
        assert not re.search(r"<(str|int|float|list|path)\b[^>]*>", res.stdout), (command, res.stdout)
    res = run_cli("list", "--help", env={"HOME": str(tmp_path), "COLUMNS": "80"})
    assert re.search(r"--remote-dir DIR\b", res.stdout) and re.search(r"--instance N\b", res.stdout)


def test_exit_codes_in_help_are_one_per_line_within_80_columns(tmp_path):
    res = run_cli("--help", env={"HOME": str(tmp_path), "COLUMNS": "80"})
    table = res.stdout.split("Exit codes:", 1)[1].strip("\n").splitlines()
    assert "" not in table and table[0].split() == ["0", "success"]
    assert [line.split()[0] for line in table if line.split()[0].isdigit()] == \
        ["0", "1", "2", "3", "4", "5", "10", "11", "20", "30", "130"]
    assert max(len(line) for line in table) <= 80


# -------------------------------------------------- units

def test_progress_columns_use_the_units_of_every_other_size():
    from rich.progress import Progress

    from ckptsync.progress_bar import BytesColumn, SpeedColumn
    from ckptsync.policy import human

    progress = Progress()
    task_id = progress.add_task("x", total=3_500_000)
    progress.update(task_id, completed=1_250_000)
    task = progress.tasks[task_id]
    assert BytesColumn().render(task).plain == f"{human(1_250_000)}/{human(3_500_000)}" == "1.2 MB/3.5 MB"
    assert SpeedColumn().render(task).plain == "?"


def test_a_rate_is_shown_only_when_enough_moved():
    from ckptsync.policy import rate

    assert rate(1400, 1.0) == "" and rate(0, 0) == ""
    assert rate(50_000_000, 2.0) == "25.0 MB/s"


def test_a_tiny_backup_prints_no_rate(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint-1").mkdir(parents=True)
    (run / "checkpoint-1" / "trainer_state.json").write_text('{"global_step": 1}')
    (run / "checkpoint-1" / "adapter_model.safetensors").write_bytes(b"w" * 1400)
    set_tree_mtime(run, 1_700_000_000)
    res = run_cli("backup", "--remote-dir", run, "--local-dir", tmp_path / "b", env={"HOME": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    summary = [line for line in res.stdout.splitlines() if line.startswith("fetched ")]
    assert summary and "/s" not in summary[0], res.stdout


# -------------------------------------------------- refusals that are usage errors

def test_an_instance_must_be_a_number_or_named_in_the_config(tmp_path):
    env = {"HOME": str(tmp_path)}
    one_line_error(run_cli("list", "-i", "zero", env=env), 2, "--instance 'zero': expected a number")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"instances": {"gpu-a": {"host": "127.0.0.1"}}}))
    named = run_cli("list", "-i", "zeor", "--config", cfg, "--remote-dir", "x", env=env)
    one_line_error(named, 2, "or an instance named in the config (gpu-a)")


def test_all_with_checkpoint_is_refused(tmp_path):
    res = run_cli("backup", "--remote-dir", tmp_path, "--local-dir", tmp_path / "b", "--all",
                  "--checkpoint", "checkpoint-8", env={"HOME": str(tmp_path)})
    one_line_error(res, 2, "give --all or --checkpoint, not both")
    assert not (tmp_path / "b").exists()


def test_a_file_as_remote_dir_is_a_usage_error(ssh_home, server_tree, tmp_path):
    file = server_tree / "checkpoint-12" / "trainer_state.json"
    local = run_cli("list", "--remote-dir", file, "--local-dir", tmp_path / "b")
    one_line_error(local, 2, f"the remote directory is a file on this machine: {file}")
    remote = run_cli("backup", "-i", "0", "--remote-dir", file, "--local-dir", tmp_path / "b")
    one_line_error(remote, 2, "the remote directory is a file on ", str(file))


# -------------------------------------------------- hints

def test_list_of_a_directory_without_checkpoints_says_what_is_there(server_tree, tmp_path):
    env = {"HOME": str(tmp_path)}
    top = server_tree.parents[1]                              # socrates-training: the runs are below
    res = run_cli("list", "--remote-dir", top, "--local-dir", tmp_path / "b", env=env)
    assert res.returncode == 0, res.stderr
    assert f"no checkpoints found in {top}" in res.stdout
    hint = re.search(r"has checkpoints further down \((.+?)\): (ckptsync .+)$", res.stderr, re.M)
    assert hint and RUN in hint.group(1), res.stderr
    pasted = run_cli(*shlex.split(hint.group(2))[1:], env=env)
    assert pasted.returncode == 0 and "checkpoint-12" in pasted.stdout, pasted.stderr

    one = run_cli("list", "--remote-dir", server_tree / "checkpoint-12", "--local-dir", tmp_path / "b", env=env)
    assert one.returncode == 0 and "looks like one checkpoint; the run is its parent" in one.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run_cli("list", "--remote-dir", empty, "--local-dir", tmp_path / "b", env=env)
    assert res.returncode == 0 and f"{empty} is empty on the server" in res.stderr


def test_restore_from_the_parent_of_the_backup_directories_names_them(server_tree, tmp_path):
    env = {"HOME": str(tmp_path)}
    parent = tmp_path / "ckpt-backups"
    for name in ("instance-0", "instance-3"):
        res = run_cli("backup", "--remote-dir", server_tree, "--local-dir", parent / name, env=env)
        assert res.returncode == 0, res.stderr
    res = run_cli("restore", "--remote-dir", tmp_path / "fresh", "--local-dir", parent, "--dry-run", env=env)
    one_line_error(res, 10, f"{parent} holds backup directories (instance-0, instance-3), not a backup itself",
                   f"--local-dir {parent / 'instance-0'}")


# -------------------------------------------------- the host key trusted on first use

@pytest.mark.parametrize("ssh", TRANSPORTS)
def test_an_unknown_host_key_is_refused_with_its_fingerprint_and_where_to_compare_it(ssh_home, sshd, server_tree, ssh):
    (ssh_home / ".ssh" / "known_hosts").write_text("")
    res = run_cli("list", "--host", "tnr-1", "--remote-dir", server_tree, env={"CKPTSYNC_SSH": ssh})
    one_line_error(res, 20, f"unknown host key for [127.0.0.1]:{sshd.port}: ED25519 SHA256:",
                   "'ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub' prints on the server", "--accept-new-host-key")
    # What ssh-keygen -lf prints for the server's key is in the message.
    printed = subprocess.run(["ssh-keygen", "-lf", f"{sshd.host_key}.pub"], capture_output=True, text=True, check=True)
    assert printed.stdout.split()[1] in res.stderr.splitlines()[0], (printed.stdout, res.stderr)
    assert (ssh_home / ".ssh" / "known_hosts").read_text() == ""


@pytest.mark.parametrize("ssh", TRANSPORTS)
def test_accept_new_host_key_says_which_key_it_trusted(ssh_home, sshd, server_tree, ssh):
    (ssh_home / ".ssh" / "known_hosts").write_text("")
    env = {"CKPTSYNC_SSH": ssh}
    res = run_cli("list", "--host", "tnr-1", "--remote-dir", server_tree, "--accept-new-host-key", env=env)
    assert res.returncode == 0, res.stderr
    line = re.search(r"warning: trusted the new host key of (\S+): (\S+) (SHA256:\S+) \(added to (.+)\)$",
                     res.stderr, re.M)
    assert line, res.stderr
    assert line.group(1) == f"[127.0.0.1]:{sshd.port}" and line.group(4) == str(ssh_home / ".ssh" / "known_hosts")
    listed = subprocess.run(["ssh-keygen", "-l", "-F", line.group(1), "-f", line.group(4)],
                            capture_output=True, text=True)
    assert line.group(3) in listed.stdout  # the fingerprint of the key that was stored
    again = run_cli("list", "--host", "tnr-1", "--remote-dir", server_tree, env=env)
    assert again.returncode == 0 and "trusted" not in again.stderr


# -------------------------------------------------- restore puts the checkpoint directory's mtime back

def test_restore_gives_the_checkpoint_directory_its_mtime(ssh_home, server_tree, tmp_path):
    dest = tmp_path / "b"
    assert run_cli("backup", "-i", "1", "--remote-dir", server_tree, "--local-dir", dest).returncode == 0
    fresh = tmp_path / "new-server" / "run"
    fresh.mkdir(parents=True)
    res = run_cli("restore", "-i", "1", "--remote-dir", fresh, "--local-dir", dest, "--checkpoint", "checkpoint-12",
                  "--no-extra-files")
    assert res.returncode == 0, res.stderr
    restored, original = fresh / "checkpoint-12", server_tree / "checkpoint-12"
    # the fixture's directory carries its newest file's mtime, as a trainer's save leaves it
    newest = max(p.stat().st_mtime_ns for p in original.rglob("*"))
    assert original.stat().st_mtime_ns == newest
    assert restored.stat().st_mtime_ns == newest
    for sub in (p for p in restored.rglob("*") if p.is_dir()):
        assert sub.stat().st_mtime_ns == max(q.stat().st_mtime_ns for q in sub.iterdir())
