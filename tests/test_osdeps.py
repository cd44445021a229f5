"""ckptsync/osdeps.py on this system, and its fallbacks with the system's module taken away."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ckptsync import osdeps

pytestmark = pytest.mark.laptop


def open_lock(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


@pytest.fixture(params=["native", "marker file"])
def locks(request, monkeypatch):
    """The system's lock (flock or msvcrt.locking), and the marker file used where there is neither."""
    if request.param == "marker file":
        monkeypatch.setattr(osdeps, "fcntl", None)
        monkeypatch.setattr(osdeps, "msvcrt", None)
    return request.param


def test_a_held_lock_refuses_a_second_holder_until_it_is_given_back(locks, tmp_path):
    path = tmp_path / "lock"
    first, second = open_lock(path), open_lock(path)
    try:
        assert osdeps.lock_file(first, path, wait=False)
        assert not osdeps.lock_file(second, path, wait=False)
        osdeps.unlock_file(first, path)
        assert osdeps.lock_file(second, path, wait=False)
        assert not osdeps.lock_file(first, path, wait=False)
        osdeps.unlock_file(second, path)
    finally:
        os.close(first)
        os.close(second)
    assert list(tmp_path.iterdir()) == [path]   # no marker left behind


@pytest.mark.skipif(not osdeps.POSIX, reason="a pid is checked with os.kill only on POSIX")
def test_a_marker_left_by_a_process_that_ended_is_taken_over_and_one_from_another_host_is_not(
        monkeypatch, tmp_path):
    monkeypatch.setattr(osdeps, "fcntl", None)
    monkeypatch.setattr(osdeps, "msvcrt", None)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, check=True)
    path = tmp_path / "lock"
    marker = tmp_path / "lock.held"
    fd = open_lock(path)
    try:
        marker.write_text('{"pid": %d, "host": "elsewhere"}' % int(ended.stdout))
        assert not osdeps.lock_file(fd, path, wait=False)
        marker.write_text('{"pid": %d, "host": "%s"}' % (int(ended.stdout), socket.gethostname()))
        assert osdeps.lock_file(fd, path, wait=False)
        assert f'"pid": {os.getpid()}' in marker.read_text()
        osdeps.unlock_file(fd, path)
    finally:
        os.close(fd)


def test_without_pwd_ssh_takes_the_usual_home(monkeypatch, tmp_path):
    monkeypatch.setattr(osdeps, "pwd", None)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("USERPROFILE", str(tmp_path))
    assert osdeps.passwd_home() is None
    assert osdeps.ssh_home() == str(tmp_path)


def test_the_user_name_comes_from_the_environment_first(monkeypatch):
    monkeypatch.setenv("LOGNAME", "someone")
    assert osdeps.user_name() == "someone"


def test_runtime_files_go_under_xdg_runtime_dir_else_into_a_per_user_temp_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert osdeps.runtime_dir("ckptsync") == str(tmp_path / "ckptsync")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    base = osdeps.runtime_dir("ckptsync")
    assert os.path.basename(base).startswith("ckptsync-") and base != str(tmp_path / "ckptsync")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    assert osdeps.is_private_dir(private.stat())
    if osdeps.POSIX:
        private.chmod(0o755)
        assert not osdeps.is_private_dir(private.stat())


def test_no_proc_and_no_pgrep_means_it_cannot_be_told(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert osdeps.process_running({"cron"}, str(tmp_path / "no-proc")) is None
    proc = tmp_path / "proc"
    (proc / "100").mkdir(parents=True)
    (proc / "100" / "comm").write_text("crond\n")
    assert osdeps.process_running({"cron", "crond"}, str(proc)) is True
    assert osdeps.process_running({"cron"}, str(proc)) is False


def test_paramiko_without_a_user_name_asks_for_one(monkeypatch, tmp_path):
    from ckptsync.errors import ConfigError
    from ckptsync.transport.base import SshTarget
    from ckptsync.transport.ssh import resolve

    monkeypatch.setattr(osdeps, "user_name", lambda: "")
    with pytest.raises(ConfigError) as info:
        resolve(SshTarget(host="somehost", ssh_config=str(tmp_path / "no-config")))
    assert "somehost: no user to log in as" in info.value.message
    assert resolve(SshTarget(host="somehost", user="me", ssh_config=str(tmp_path / "no-config"))).user == "me"
