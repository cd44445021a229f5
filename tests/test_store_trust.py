"""The backup directory is checked before it is trusted: prune re-reads the copy it keeps, a
damaged manifest is an integrity error everywhere, and nothing of the store is followed through
a symlink out of it. Real CLI runs on real files; the "server" is a directory on this machine."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from helpers import run_cli, tree_digest

CKPTS = ("checkpoint-12", "checkpoint-8", "checkpoint-4")


@pytest.fixture
def store(tmp_path: Path, server_tree: Path) -> Path:
    dest = tmp_path / "backups"
    res = run_cli("backup", "--remote-dir", server_tree, "--local-dir", dest, "--all")
    assert res.returncode == 0, res.stdout + res.stderr
    return dest


def flip_byte(path: Path, at: int = 100) -> None:
    """One bit changed in place; size and mtime kept, as silent disk corruption would leave it."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def entries(store: Path) -> set[str]:
    return {p.name for p in store.iterdir() if not p.name.startswith(".")}


def row(stdout: str, name: str) -> str:
    lines = [line.strip() for line in stdout.splitlines() if f" {name} " in line]
    assert len(lines) == 1, stdout
    return lines[0]


def cut_manifest(store: Path, name: str) -> Path:
    """The manifest cut short, as a full disk or a copy interrupted midway leaves it."""
    path = store / ".ckptsync" / "manifests" / f"{name}.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    return path


# ------------------------------------------------------------------ prune verifies what it keeps


def test_prune_keeps_the_newest_backup_that_verifies_when_the_newest_is_corrupt(store: Path) -> None:
    flip_byte(store / "checkpoint-12" / "adapter_model.safetensors")
    good = tree_digest(store / "checkpoint-8")

    res = run_cli("prune", "--local-dir", store, "--keep-last", "1")

    assert res.returncode == 30, res.stdout + res.stderr
    assert entries(store) == {"checkpoint-12", "checkpoint-8"}
    assert "newest verified backup" not in row(res.stdout, "checkpoint-12")
    assert row(res.stdout, "checkpoint-8").startswith("keep") and row(res.stdout, "checkpoint-8").endswith(
        "newest verified backup")
    assert row(res.stdout, "checkpoint-4").startswith("removed")
    assert ("checkpoint-12 fails verification (checkpoint-12/adapter_model.safetensors: corrupt "
            "(content differs from the backup's checksum))") in res.stderr
    assert "kept checkpoint-8: the newest backup that verifies" in res.stderr
    assert tree_digest(store / "checkpoint-8") == good
    assert run_cli("verify", "--local-dir", store, "checkpoint-8").returncode == 0


def test_prune_removes_nothing_when_no_backup_verifies(store: Path) -> None:
    for name in CKPTS:
        flip_byte(store / name / "optimizer.pt")
    before = {name: tree_digest(store / name) for name in CKPTS}

    res = run_cli("prune", "--local-dir", store, "--keep-last", "1", "--json")

    assert res.returncode == 30, res.stdout + res.stderr
    data = json.loads(res.stdout)
    assert sorted(data["damaged"]) == sorted(CKPTS)
    assert all(e["keep"] and "no backup verifies" in e["reasons"] and not e["verified"] for e in data["entries"])
    assert data["removed"] == [] and "no backup verifies: nothing is removed" in data["warnings"]
    assert {name: tree_digest(store / name) for name in CKPTS} == before


# ------------------------------------------------------------------ a damaged manifest


def test_a_manifest_cut_short_fails_verify_and_is_listed_as_damaged(store: Path, server_tree: Path) -> None:
    path = cut_manifest(store, "checkpoint-12")

    res = run_cli("verify", "--local-dir", store)
    assert res.returncode == 30, res.stdout + res.stderr
    assert "FAILED  checkpoint-12: damaged manifest" in res.stdout
    assert "damaged manifest: .ckptsync/manifests/checkpoint-12.json (cut short: not valid JSON" in res.stdout
    assert "not made by ckptsync" not in res.stderr
    named = run_cli("verify", "--local-dir", store, "checkpoint-12")
    assert named.returncode == 30 and "damaged manifest" in named.stdout

    listed = run_cli("list", "--local", "--local-dir", store)
    assert listed.returncode == 0, listed.stderr
    assert row(listed.stdout, "checkpoint-12").endswith("damaged")
    assert f"checkpoint-12: its manifest {path} is damaged (cut short" in listed.stderr
    data = json.loads(run_cli("list", "--local", "--local-dir", store, "--json").stdout)
    rows = {r["name"]: r for r in data["checkpoints"]}
    assert rows["checkpoint-12"]["backup"] == "damaged" and str(path) in data["damaged"]["checkpoint-12"]
    assert data["unmanaged"] == []

    # The warning of a list that saw the server carries the command that backs it up again.
    seen = run_cli("list", "--remote-dir", server_tree, "--local-dir", store)
    assert row(seen.stdout, "checkpoint-12").endswith("damaged")
    hint = seen.stderr.split("to back it up again while the server has it: ", 1)[1].splitlines()[0]
    again = run_cli(*shlex.split(hint)[1:])
    assert again.returncode == 0, again.stdout + again.stderr
    assert run_cli("verify", "--local-dir", store).returncode == 0


def test_restore_says_which_checkpoint_it_skips_for_a_damaged_manifest(store: Path, tmp_path: Path) -> None:
    path = cut_manifest(store, "checkpoint-12")
    fresh = tmp_path / "new-server" / "run"

    res = run_cli("restore", "--remote-dir", fresh, "--local-dir", store)

    assert res.returncode == 0, res.stdout + res.stderr
    assert (f"skipped checkpoint-12: its manifest {path} is damaged (cut short: not valid JSON" in res.stderr
            and "restoring checkpoint-8" in res.stderr)
    assert tree_digest(fresh / "checkpoint-8") == tree_digest(store / "checkpoint-8")

    named = run_cli("restore", "--remote-dir", tmp_path / "other", "--local-dir", store,
                    "--checkpoint", "checkpoint-12")
    assert named.returncode == 30, named.stdout + named.stderr
    assert f"its manifest {path} is damaged" in named.stderr and "nothing was sent" in named.stderr
    assert not (tmp_path / "other").exists()


def test_prune_leaves_a_checkpoint_with_a_damaged_manifest_alone(store: Path) -> None:
    path = cut_manifest(store, "checkpoint-4")
    kept = tree_digest(store / "checkpoint-4")

    res = run_cli("prune", "--local-dir", store, "--keep-last", "1")

    assert res.returncode == 30, res.stdout + res.stderr
    assert f"checkpoint-4: left alone, its manifest {path} is damaged" in res.stderr
    assert entries(store) == {"checkpoint-12", "checkpoint-4"}
    assert tree_digest(store / "checkpoint-4") == kept


# ------------------------------------------------------------------ symlinks out of the store


def _outside(tmp_path: Path) -> Path:
    """A directory of someone else's files, named the way ckptsync names what it keeps in staging."""
    other = tmp_path / "someone-elses"
    for rel in ("checkpoint-12/precious.bin", "checkpoint-8/precious.bin", "extra-files/notes.txt", "top.txt"):
        (other / rel).parent.mkdir(parents=True, exist_ok=True)
        (other / rel).write_bytes(os.urandom(300))
    return other


@pytest.mark.parametrize("own", ["staging", "manifests", "history.jsonl"])
def test_a_bookkeeping_path_that_is_a_symlink_is_refused_and_nothing_outside_changes(
        server_tree: Path, tmp_path: Path, own: str) -> None:
    other = _outside(tmp_path)
    dest = tmp_path / "backups"
    (dest / ".ckptsync").mkdir(parents=True)
    (dest / ".ckptsync" / own).symlink_to(other / "top.txt" if own.endswith(".jsonl") else other)
    before = tree_digest(other)

    res = run_cli("backup", "--remote-dir", server_tree, "--local-dir", dest, "--all")

    assert res.returncode == 30, res.stdout + res.stderr
    assert f"{dest / '.ckptsync' / own} is a symlink (to {other}" in res.stderr
    assert "nothing was changed" in res.stderr
    assert tree_digest(other) == before
    assert entries(dest) == set()
    for args in (["backup", "--discard-staged", "--remote-dir", server_tree], ["verify"], ["list", "--local"],
                 ["prune", "--keep-last", "1"]):
        again = run_cli(*args, "--local-dir", dest)
        assert again.returncode == 30, (args, again.stdout + again.stderr)
        assert "is a symlink" in again.stderr and "deleted" not in again.stdout
    assert tree_digest(other) == before


def test_a_checkpoint_replaced_by_a_symlink_fails_verify_and_restore(store: Path, tmp_path: Path) -> None:
    moved = tmp_path / "bigger-disk" / "checkpoint-8"
    moved.parent.mkdir()
    os.rename(store / "checkpoint-8", moved)
    (store / "checkpoint-8").symlink_to(moved)
    before = tree_digest(moved)

    res = run_cli("verify", "--local-dir", store)

    assert res.returncode == 30, res.stdout + res.stderr
    assert f"corrupt: checkpoint-8 (a symlink to {moved}, not a directory of the backup" in res.stdout
    assert "ok      checkpoint-12" in res.stdout and "ok      checkpoint-4" in res.stdout
    restored = run_cli("restore", "--remote-dir", tmp_path / "fresh", "--local-dir", store,
                       "--checkpoint", "checkpoint-8")
    assert restored.returncode == 30, restored.stdout + restored.stderr
    assert "a symlink" in restored.stderr and not (tmp_path / "fresh" / "checkpoint-8").exists()

    # prune removes the link it does not keep, never what the link points to
    pruned = run_cli("prune", "--local-dir", store, "--keep-last", "1")
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    assert entries(store) == {"checkpoint-12"}
    assert tree_digest(moved) == before


def test_archive_keeps_a_checkpoint_with_a_damaged_manifest_and_says_so(store: Path, tmp_path: Path) -> None:
    path = cut_manifest(store, "checkpoint-8")
    kept = tree_digest(store / "checkpoint-8")
    archive = tmp_path / "run.tar.zst"

    res = run_cli("archive", "--local-dir", store, "--output", archive, "--remove")

    assert res.returncode == 0, res.stdout + res.stderr
    assert f"checkpoint-8: archived as it is but not verified, its manifest {path} is damaged" in res.stderr
    assert entries(store) == {"checkpoint-8"} and tree_digest(store / "checkpoint-8") == kept
    listed = run_cli("list", "--local", "--local-dir", archive, "--json")
    assert {r["name"] for r in json.loads(listed.stdout)["checkpoints"]} == {"checkpoint-12", "checkpoint-4"}
