"""Tests of the test infrastructure itself: the real sshd and the tree helpers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from helpers import HANG, digest_diff, run_cli, set_tree_mtime, tree_digest
from sshd import HOST_ALIASES, SshdServer, missing_tools, process_tree


def _running(pid: int) -> bool:
    """The process exists and has not ended (a zombie has)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat_line.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _remote_pid(client: subprocess.Popen) -> int:
    """The pid the remote command printed first ("echo $$; exec ..."): it is running."""
    line = client.stdout.readline()
    assert line.strip().isdigit(), f"the remote command did not start: {line!r}"
    return int(line)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def test_echo_hello(sshd: SshdServer) -> None:
    result = sshd.run_ssh("echo hello", timeout=30)
    assert result.returncode == 0, result.stderr + "\n" + sshd.log_tail()
    assert result.stdout == "hello\n"


@pytest.mark.parametrize("alias", HOST_ALIASES)
def test_every_alias_reaches_the_server(sshd: SshdServer, alias: str) -> None:
    result = sshd.run_ssh(["id", "-un"], host=alias, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == sshd.user


def test_attributes_and_files(sshd: SshdServer) -> None:
    assert sshd.host == "127.0.0.1"
    assert isinstance(sshd.port, int) and sshd.port > 0
    assert sshd.is_running()
    assert sshd.host_key_line.startswith(f"[127.0.0.1]:{sshd.port} ssh-ed25519 ")
    assert sshd.known_hosts.read_text().splitlines() == [
        sshd.host_key_line, sshd.host_key_line.replace(f":{sshd.port} ", f":{sshd.full_port} ")]
    assert stat.S_IMODE(os.stat(sshd.identity_file).st_mode) == 0o600
    config = sshd.ssh_config.read_text()
    for alias in HOST_ALIASES:
        assert f"Host {alias}\n" in config
    assert f"Port {sshd.port}" in config
    assert f"IdentityFile {sshd.identity_file}" in config
    assert f"UserKnownHostsFile {sshd.known_hosts}" in config
    assert "StrictHostKeyChecking yes" in config
    assert "IdentitiesOnly yes" in config
    assert "Server listening on 127.0.0.1" in sshd.log_path.read_text()


def test_unknown_host_key_is_refused(sshd: SshdServer, tmp_path: Path) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    result = subprocess.run(
        ["ssh", "-F", str(sshd.ssh_config),
         "-o", f"UserKnownHostsFile={empty}",
         "-o", "GlobalKnownHostsFile=/dev/null",
         "-o", "StrictHostKeyChecking=yes",
         "testhost", "echo should-not-run"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 255
    assert "should-not-run" not in result.stdout
    assert "Host key verification failed" in result.stderr
    assert empty.read_text() == ""


def test_wrong_user_key_is_refused(sshd: SshdServer, tmp_path: Path) -> None:
    other_key = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key)],
                   check=True, capture_output=True, timeout=30)
    config = tmp_path / "ssh_config"
    config.write_text(sshd.ssh_config.read_text().replace(
        str(sshd.identity_file), str(other_key)))
    result = subprocess.run(
        ["ssh", "-F", str(config), "testhost", "true"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 255
    assert "Permission denied" in result.stderr


def test_sftp_subsystem(sshd: SshdServer, tmp_path: Path) -> None:
    remote = tmp_path / "remote.txt"
    remote.write_text("over sftp\n")
    local = tmp_path / "local.txt"
    result = subprocess.run(
        ["sftp", "-F", str(sshd.ssh_config), "-b", "-", "testhost"],
        input=f"get {remote} {local}\n", capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert local.read_text() == "over sftp\n"


def test_no_sessions_when_idle(sshd: SshdServer) -> None:
    assert sshd.wait_idle()


def test_kill_sessions_drops_a_running_command(sshd: SshdServer) -> None:
    # The remote command ignores its input and outlives the test: only the kill can end it.
    client = subprocess.Popen(
        [*sshd.ssh_argv("tnr-1"), "echo $$; exec sleep 600"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        remote = _remote_pid(client)
        assert remote in sshd.session_pids(), sshd.log_tail()
        assert sshd.pid not in sshd.session_pids()

        killed = sshd.kill_sessions()
        assert remote in killed, (killed, client.poll(), sshd.log_tail())
        assert not _running(remote)
        assert client.wait(timeout=HANG) != 0
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(timeout=HANG)
        client.stdout.close()
        client.stderr.close()

    assert sshd.is_running()
    assert sshd.wait_idle()
    after = sshd.run_ssh("echo still-up", timeout=30)
    assert after.returncode == 0 and after.stdout == "still-up\n"


def test_kill_sessions_sshd_only_leaves_remote_command(sshd: SshdServer) -> None:
    client = subprocess.Popen(
        [*sshd.ssh_argv(), "echo $$; exec sleep 600"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    remote: list[int] = []
    try:
        remote.append(_remote_pid(client))
        killed = sshd.kill_sessions(signal.SIGKILL, sshd_only=True)
        assert killed and remote[0] not in killed
        assert client.wait(timeout=HANG) != 0
        assert _running(remote[0])
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(timeout=HANG)
        client.stdout.close()
        for pid in remote:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_write_home(sshd: SshdServer, tmp_path: Path) -> None:
    home = tmp_path / "home"
    ssh_dir = sshd.write_home(home)
    assert ssh_dir == (home / ".ssh").resolve()
    for name in ("config", "known_hosts", "id_ed25519", "id_ed25519.pub"):
        assert stat.S_IMODE(os.stat(ssh_dir / name).st_mode) == 0o600, name
    assert (ssh_dir / "id_ed25519").read_bytes() == sshd.identity_file.read_bytes()
    assert (ssh_dir / "known_hosts").read_text() == sshd.known_hosts_text
    config = (ssh_dir / "config").read_text()
    assert f"IdentityFile {ssh_dir / 'id_ed25519'}" in config
    assert f"UserKnownHostsFile {ssh_dir / 'known_hosts'}" in config
    result = subprocess.run(
        ["ssh", "-F", str(ssh_dir / "config"), "tnr-2", "echo from-home"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
        env={**os.environ, "HOME": str(home)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "from-home\n"


def test_ssh_home_fixture(ssh_home: Path, tmp_path: Path) -> None:
    assert os.environ["HOME"] == str(ssh_home)
    assert "CKPTSYNC_CONFIG" not in os.environ
    assert Path.cwd() == (tmp_path / "cwd").resolve()
    assert list(Path.cwd().iterdir()) == []
    assert (ssh_home / ".ssh" / "config").is_file()
    assert Path(os.path.expanduser("~/.ssh/known_hosts")).is_file()


def test_server_tree_metadata(server_tree: Path) -> None:
    now = time.time()
    assert server_tree.name == "socrates-qwen-full-dataset"
    root = server_tree.parents[1]
    assert root.name == "socrates-training"
    for dirpath, _dirs, files in os.walk(root):
        assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o755
        for name in files:
            mode = stat.S_IMODE(os.stat(os.path.join(dirpath, name)).st_mode)
            expected = 0o600 if name.endswith("model.safetensors") else 0o644
            assert mode == expected, (dirpath, name)
    for ckpt, age in (("checkpoint-4", 3600), ("checkpoint-8", 2400),
                      ("checkpoint-12", 1200)):
        ckpt_dir = server_tree / ckpt
        mtimes = {p.name: p.stat().st_mtime for p in ckpt_dir.iterdir()}
        state = mtimes.pop("trainer_state.json")
        assert len(set(mtimes.values())) == 1
        shared = next(iter(mtimes.values()))
        assert abs((now - age) - shared) < 60
        assert state == shared + 2
        assert shared == int(shared)
    for name in ("training.log", "config_full_dataset.json", "deepspeed_config.json"):
        assert abs((now - 4000) - (root / name).stat().st_mtime) < 60


def test_tree_digest_detects_one_flipped_byte(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(bytes(range(256)) * 64)
    (src / "sub" / "b.txt").write_text("hello\n")
    os.chmod(src / "sub" / "b.txt", 0o600)
    set_tree_mtime(src, 1_700_000_000)
    dst = tmp_path / "dst"
    shutil.copytree(src, dst, copy_function=shutil.copy2)

    original = tree_digest(src)
    assert set(original) == {"a.bin", "sub/b.txt"}
    assert original["sub/b.txt"][:3] == (6, 0o600, 1_700_000_000 * 10**9)
    assert tree_digest(dst) == original

    target = dst / "a.bin"
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[1000] ^= 0x01
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = tree_digest(dst)
    assert changed != original
    assert changed["a.bin"][:3] == original["a.bin"][:3]
    assert digest_diff(original, changed) == ["a.bin: content differs"]

    os.chmod(dst / "sub" / "b.txt", 0o644)
    assert any("mode 600 != 644" in line
               for line in digest_diff(original, tree_digest(dst)))


def test_separate_server_start_stop(tmp_path: Path) -> None:
    if missing_tools():
        pytest.skip("OpenSSH not installed")
    with SshdServer(tmp_path / "own") as server:
        port, pid = server.port, server.pid
        assert _port_open(server.host, port)
        assert server.run_ssh("true", timeout=30).returncode == 0
    assert not server.is_running()
    assert server.process.returncode is not None
    assert process_tree(pid) == []
    assert not _port_open("127.0.0.1", port)   # the listener went with sshd


def test_run_cli_sets_pythonpath(tmp_path: Path) -> None:
    from helpers import REPO_ROOT, cli_env

    env = cli_env({"CKPTSYNC_SOMETHING": "1", "HOME": None})
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(REPO_ROOT)
    assert env["CKPTSYNC_SOMETHING"] == "1"
    assert "HOME" not in env
    assert callable(run_cli)
