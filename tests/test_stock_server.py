"""A stock server: the python3 a non-interactive SSH login finds on a rented GPU server, with the
standard library only (no xxhash, no zstandard). It is the sshd fixture's default (tnr-0..2); tnr-8
has both modules. Every feature gives the same answers on both: only speed and the wire ratio differ.
"""

from __future__ import annotations

import hashlib
import os
import json
import shutil
from pathlib import Path

import pytest

from ckptsync.server.agent_server import AgentServer
from ckptsync.transport import SshTarget, ssh_transport
from helpers import run_cli
from sshd import FULL_ALIAS, SshdServer

STOCK = "tnr-0"
SERVERS = pytest.mark.parametrize("host", [STOCK, FULL_ALIAS], ids=["stock-server", "server-with-modules"])


def cli(host: str, command: str, server: Path, dest: Path, *args: str):
    return run_cli(command, "--host", host, "--remote-dir", server, "--local-dir", dest, *args, "--json")


def ok(res) -> dict:
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(res.stdout)


def test_stock_server_has_the_standard_library_only(ssh_home: Path, sshd: SshdServer) -> None:
    for module in ("xxhash", "zstandard"):
        res = sshd.run_ssh(f"python3 -c 'import {module}'", host=STOCK)
        assert res.returncode == 1 and f"No module named '{module}'" in res.stderr, res.stderr
    with AgentServer(ssh_transport(SshTarget(host=STOCK))) as server:
        assert "xxh3_128" not in server.hashes and server.best_hash == "sha1"
        assert server.hello.zstd != "module"
    with AgentServer(ssh_transport(SshTarget(host=FULL_ALIAS))) as server:
        assert server.best_hash == "xxh3_128" and server.hello.zstd == "module"


@SERVERS
def test_a_copied_checkpoint_moves_nothing_on_the_wire(ssh_home: Path, server_tree: Path, tmp_path: Path,
                                                      host: str) -> None:
    dest = tmp_path / "b"
    ok(cli(host, "backup", server_tree, dest, "--all"))
    shutil.copytree(server_tree / "checkpoint-12", server_tree / "checkpoint-16", copy_function=shutil.copy2)

    got = ok(cli(host, "backup", server_tree, dest, "--checkpoint", "checkpoint-16"))
    assert got["fetched"] == ["checkpoint-16"]
    assert got["raw_bytes"] == 0 and got["wire_bytes"] == 0
    assert got["reflinked_files"] + got["linked_files"] + got["copied_files"] == len(
        list((server_tree / "checkpoint-16").iterdir()))
    assert ok(run_cli("verify", "--local-dir", dest, "checkpoint-16", "--json"))["exit_code"] == 0


def restored(host: str, server_tree: Path, dest: Path) -> None:
    """checkpoint-8 backed up, deleted on the server, restored: its files have new inodes and
    ctimes, so the quick check doubts them and the server's hash must settle it."""
    ok(cli(host, "backup", server_tree, dest, "--all"))
    shutil.rmtree(server_tree / "checkpoint-8")
    ok(cli(host, "restore", server_tree, dest, "--checkpoint", "checkpoint-8"))


@SERVERS
def test_a_restored_checkpoint_is_listed_as_backed_up(ssh_home: Path, server_tree: Path, tmp_path: Path,
                                                     host: str) -> None:
    restored(host, server_tree, tmp_path / "b")
    rows = {r["name"]: r["backup"] for r in ok(cli(host, "list", server_tree, tmp_path / "b"))["checkpoints"]}
    assert rows == {"checkpoint-12": "yes", "checkpoint-8": "yes", "checkpoint-4": "yes"}


@SERVERS
def test_verify_remote_and_prune_remote_agree_on_a_restored_checkpoint(ssh_home: Path, server_tree: Path,
                                                                      tmp_path: Path, host: str) -> None:
    dest = tmp_path / "b"
    restored(host, server_tree, dest)
    checks = {e["name"]: e["status"] for e in ok(cli(host, "verify", server_tree, dest, "--remote"))["entries"]}
    assert checks["checkpoint-8"] == "ok"
    pruned = ok(cli(host, "prune", server_tree, dest, "--remote", "--dry-run", "--keep-last", "1"))
    entry = next(e for e in pruned["entries"] if e["name"] == "checkpoint-8")
    assert entry["verified"] is True and entry["keep"] is False, entry


@SERVERS
def test_backing_up_a_restored_checkpoint_again_fetches_nothing(ssh_home: Path, server_tree: Path,
                                                               tmp_path: Path, host: str) -> None:
    dest = tmp_path / "b"
    restored(host, server_tree, dest)
    again = ok(cli(host, "backup", server_tree, dest, "--checkpoint", "checkpoint-8"))
    assert again["fetched"] == [] and again["generations"] == [] and again["raw_bytes"] == 0
    assert again["restamped"] == ["checkpoint-8"]   # the new inodes are recorded: the next check is quick
    assert not (dest / ".ckptsync" / "generations").exists()
    assert ok(cli(host, "backup", server_tree, dest, "--checkpoint", "checkpoint-8"))["restamped"] == []


def test_a_backup_made_with_xxhash_is_compared_in_sha1_once(ssh_home: Path, server_tree: Path,
                                                            tmp_path: Path) -> None:
    """A manifest holding xxh3-128 only, a stock server that doubts a file: the stored copy is
    hashed in sha1 once, and the value is recorded next to xxh3-128."""
    dest = tmp_path / "b"
    ok(cli(FULL_ALIAS, "backup", server_tree, dest, "--all"))
    manifest = dest / ".ckptsync" / "manifests" / "checkpoint-4.json"
    assert all("hashes" not in f for f in json.loads(manifest.read_text())["files"])
    moved = server_tree / "checkpoint-4"
    shutil.copytree(moved, tmp_path / "aside", copy_function=shutil.copy2)
    shutil.rmtree(moved)
    (tmp_path / "aside").rename(moved)   # new inodes, same bytes and mtimes

    rows = {r["name"]: r["backup"] for r in ok(cli(STOCK, "list", server_tree, dest))["checkpoints"]}
    assert rows["checkpoint-4"] == "yes"
    for f in json.loads(manifest.read_text())["files"]:
        want = hashlib.sha1((dest / f["path"]).read_bytes()).hexdigest()
        assert f["hashes"] == {"sha1": want}, f["path"]
    again = ok(cli(STOCK, "backup", server_tree, dest, "--checkpoint", "checkpoint-4"))
    assert again["fetched"] == [] and again["generations"] == [] and again["restamped"] == ["checkpoint-4"]


@SERVERS
def test_a_changed_file_is_found_with_either_hash(ssh_home: Path, server_tree: Path, tmp_path: Path,
                                                  host: str) -> None:
    """Same size and mtime, other bytes: both servers see the change, and the backup keeps the
    earlier version as a generation."""
    dest = tmp_path / "b"
    ok(cli(host, "backup", server_tree, dest, "--all"))
    target = server_tree / "checkpoint-8" / "scheduler.pt"
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))

    rows = {r["name"]: r["backup"] for r in ok(cli(host, "list", server_tree, dest))["checkpoints"]}
    assert rows["checkpoint-8"] == "outdated"
    again = ok(cli(host, "backup", server_tree, dest, "--checkpoint", "checkpoint-8"))
    assert again["fetched"] == ["checkpoint-8"] and len(again["generations"]) == 1
