"""`ckptsync doctor` and the first backup's note: what the server's python3 offers, said plainly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ckptsync.doctor import missing
from ckptsync.server import Hello
from helpers import run_cli
from sshd import FULL_ALIAS, STOCK_PYTHON

STOCK = "tnr-0"
# What a stock server's python3 packs with: its own zstd from Python 3.14 on, else zlib (a zstd
# binary on the machine makes no difference).
STOCK_CODEC = ("zstd-stdlib" if subprocess.run([*STOCK_PYTHON, "-c", "import compression.zstd"],
                                               capture_output=True).returncode == 0 else "zlib-lanes")
MISSING_CODEC = {"zstd-stdlib": [], "zlib-lanes": ["zstandard"]}[STOCK_CODEC]
# How that python3 takes modules: a distribution's (PEP 668's EXTERNALLY-MANAGED file) refuses pip,
# so its own packages; the test server logs in as this user.
MANAGED = subprocess.run([*STOCK_PYTHON, "-c", "import os, sysconfig; print(os.path.isfile(os.path.join("
                          "sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')))"],
                         capture_output=True, text=True, check=True).stdout.strip() == "True"
SUDO = "" if getattr(os, "geteuid", lambda: -1)() == 0 else "sudo "
INSTALL = (f"{SUDO}apt-get install python3-xxhash python3-zstandard" if MANAGED and shutil.which("apt-get")
           else "python3 -m pip install --user xxhash zstandard")


def doctor(host: str, remote_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("doctor", "--host", host, "--remote-dir", remote_dir, *args)


def stock_version() -> str:
    return subprocess.run([*STOCK_PYTHON, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_doctor_on_a_stock_server_says_what_is_missing_and_how_to_install_it(ssh_home: Path, server_tree: Path) -> None:
    res = doctor(STOCK, server_tree, "--json")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert (got["python"], got["executable"]) == (stock_version(), STOCK_PYTHON[0])
    assert got["hash"] == "sha1" and got["hash_rate"] > 0
    assert got["codec"] == STOCK_CODEC
    assert got["free_path"] == str(server_tree) and got["free_bytes"] > 0
    assert got["writers_visible"] is True and 0 < got["fd_readable"] <= got["fd_total"]
    pieces = {m["piece"]: m["fix"] for m in got["missing"]}
    assert sorted(pieces) == sorted(["xxhash", *MISSING_CODEC])
    assert pieces["xxhash"].startswith(INSTALL)
    if MISSING_CODEC:
        assert pieces["zstandard"] == pieces["xxhash"]

    human = doctor(STOCK, server_tree)
    assert human.returncode == 0, human.stderr
    lines = human.stdout.splitlines()
    assert lines[0].startswith("server:  tnr-0")
    assert lines[1] == f"python3: {stock_version()} ({STOCK_PYTHON[0]})"
    assert lines[2].startswith("hash:    sha1, ") and lines[2].endswith("/s on the server")
    assert any(line.startswith("no xxhash: files are hashed with sha1 instead of xxh3-128") for line in lines)
    assert INSTALL in human.stdout


def test_doctor_on_a_server_with_the_modules_finds_nothing_missing(ssh_home: Path, server_tree: Path) -> None:
    res = doctor(FULL_ALIAS, server_tree, "--json")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert (got["hash"], got["codec"], got["missing"]) == ("xxh3_128", "zstd-zstandard", [])
    human = doctor(FULL_ALIAS, server_tree)
    assert human.stdout.splitlines()[-1] == "nothing missing: xxhash and zstd in process"


def test_doctor_without_a_server_fails_in_one_line(ssh_home: Path, tmp_path: Path) -> None:
    res = run_cli("doctor", "--host", "no-such-host.invalid", "--remote-dir", tmp_path, "--json")
    assert res.returncode == 20, res.stderr
    assert json.loads(res.stdout)["exit_code"] == 20 and "Traceback" not in res.stderr


def note_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "has neither xxhash" in line or "has no xxhash" in line]


def test_first_backup_of_a_new_target_says_once_that_the_server_falls_back(ssh_home: Path, server_tree: Path,
                                                                          tmp_path: Path) -> None:
    dest = tmp_path / "b"
    args = ("--remote-dir", server_tree, "--local-dir", dest, "--checkpoint", "checkpoint-4")
    first = run_cli("backup", "--host", STOCK, *args)
    assert first.returncode == 0, first.stderr
    [line] = note_lines(first.stderr)
    lacks = " has no xxhash" if not MISSING_CODEC else f" has neither xxhash nor {MISSING_CODEC[0]}"
    assert f"its python3 {stock_version()}{lacks}" in line
    assert f"to install them there: {INSTALL} (details" in line
    assert f"ckptsync doctor --host {STOCK} --remote-dir {server_tree} --local-dir {dest}" in line

    again = run_cli("backup", "--host", STOCK, *args)
    assert again.returncode == 0 and note_lines(again.stderr) == []
    full = run_cli("backup", "--host", FULL_ALIAS, "--remote-dir", server_tree, "--local-dir", tmp_path / "c")
    assert full.returncode == 0 and "has no" not in full.stderr


@pytest.mark.parametrize("managed, apt, root, command", [
    # A distribution's python3 (Debian 12, Ubuntu 24.04) refuses pip: its own packages.
    (True, True, True, "apt-get install python3-xxhash python3-zstandard"),
    (True, True, False, "sudo apt-get install python3-xxhash python3-zstandard"),
    (True, False, False, "python3 -m pip install --user xxhash zstandard --break-system-packages"),
    (False, True, False, "python3 -m pip install --user xxhash zstandard (or: sudo apt-get install python3-xxhash "
                         "python3-zstandard)"),
    (False, False, False, "python3 -m pip install --user xxhash zstandard"),
])
def test_the_install_command_fits_the_server(managed, apt, root, command) -> None:
    hello = Hello(protocol=1, python="3.11.2", zstd=None, hashes=("sha1",), managed=managed, apt=apt, root=root)
    [xxhash, zstandard] = missing(hello)
    assert xxhash.fix == zstandard.fix == command
    assert zstandard.piece == "zstandard" and "byte lanes with zlib" in zstandard.meaning
