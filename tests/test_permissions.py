"""Permission denied on the server: the real CLI, logged in to the test sshd as an unprivileged user.

The trees live under ``reachable_tmp`` (pytest's tmp_path is inside a 0700 directory) and belong
to that user, except for what a test gives back to root to lock the user out.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import OtherUser
from helpers import digest_diff, run_cli, tree_digest

CKPTS = {"checkpoint-4", "checkpoint-8", "checkpoint-12"}
IO, PARTIAL = 5, 3


def one_line(res: subprocess.CompletedProcess[str], code: int) -> str:
    """The only line on stderr, after checking the exit code and that nothing crashed."""
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and "unexpected" not in res.stderr, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


def give_to_root(path: Path, mode: int) -> None:
    os.chown(path, 0, 0)
    os.chmod(path, mode)


def entries(store: Path) -> set[str]:
    return {p.name for p in store.iterdir() if not p.name.startswith(".")} if store.exists() else set()


def manifests(store: Path) -> set[str]:
    return {p.stem for p in (store / ".ckptsync" / "manifests").glob("*.json")}


def staging_leftovers(store: Path) -> list[Path]:
    staging = store / ".ckptsync" / "staging"
    return [p for p in staging.rglob("*") if p.is_file()] if staging.exists() else []


def remote(user: OtherUser, command: str, run: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return run_cli(command, "-q", "--instance", user.instance, "--remote-dir", run, *args)


# ------------------------------------------------------------ remote_dir unreadable


@pytest.mark.parametrize("command", ["list", "backup"])
@pytest.mark.parametrize("locked", ["remote_dir", "its parent"])
def test_unreadable_remote_dir_exits_5_naming_it(other_user: OtherUser, other_user_tree: Path,
                                                 tmp_path: Path, command: str, locked: str) -> None:
    run = other_user_tree
    blocker = run if locked == "remote_dir" else run.parent
    give_to_root(blocker, 0o700)
    dest = tmp_path / "backups"

    line = one_line(remote(other_user, command, run, "--local-dir", dest), IO)

    assert line.startswith(f"error: on {other_user.alias} ("), line
    if locked == "remote_dir":
        assert line.endswith(f": permission denied: {run}"), line
    else:
        # Not "does not exist": the directory is there, a parent hides it.
        assert line.endswith(f": permission denied: {run} (cannot enter {blocker})"), line
    assert entries(dest) == set() and staging_leftovers(dest) == []


# ------------------------------------------------------------ one unreadable file


@pytest.fixture
def unreadable_file(other_user_tree: Path) -> Path:
    """checkpoint-8/optimizer.pt, given to root with mode 0600."""
    path = other_user_tree / "checkpoint-8" / "optimizer.pt"
    give_to_root(path, 0o600)
    return path


def test_unreadable_file_fails_only_its_checkpoint(other_user: OtherUser, other_user_tree: Path,
                                                   unreadable_file: Path, tmp_path: Path) -> None:
    run = other_user_tree
    dest = tmp_path / "backups"

    line = one_line(remote(other_user, "backup", run, "--local-dir", dest, "--all", "--no-extra-files"),
                    PARTIAL)

    assert line.startswith("warning: checkpoint-8: "), line
    assert f"checkpoint-8/optimizer.pt: Permission denied: {unreadable_file}" in line, line
    assert line.endswith("; not recorded"), line
    assert entries(dest) == manifests(dest) == {"checkpoint-4", "checkpoint-12"}
    for name in ("checkpoint-4", "checkpoint-12"):
        assert not digest_diff(tree_digest(run / name), tree_digest(dest / name)), name
    listed = run_cli("list", "--local", "--local-dir", dest, "--json")
    assert {r["name"] for r in json.loads(listed.stdout)["checkpoints"]} == {"checkpoint-4", "checkpoint-12"}
    assert run_cli("verify", "--local-dir", dest).returncode == 0


def test_unreadable_file_is_not_called_a_change(other_user: OtherUser, other_user_tree: Path,
                                                unreadable_file: Path, tmp_path: Path) -> None:
    res = remote(other_user, "backup", other_user_tree, "--local-dir", tmp_path / "b", "--all",
                 "--no-extra-files")
    line = one_line(res, PARTIAL)
    assert "changed on the server" not in line and "could not be read" in line, line


# ------------------------------------------------------------ unreadable subdirectory


def add_locked_subdir(run: Path, mode: int) -> Path:
    """checkpoint-8/shards/a.bin, with shards given to root (0700: not listable; 0744: listable,
    but its files cannot be looked at)."""
    ckpt = run / "checkpoint-8"
    shards = ckpt / "shards"
    shards.mkdir()
    (shards / "a.bin").write_bytes(b"x" * 100)
    when = (ckpt / "README.md").stat().st_mtime
    for path in (shards / "a.bin", shards, ckpt):
        os.utime(path, (when, when))
    give_to_root(shards, mode)
    return shards


@pytest.mark.parametrize("mode", [0o700, 0o744], ids=["0700", "0744"])
def test_unreadable_subdirectory_is_named(other_user: OtherUser, other_user_tree: Path,
                                          tmp_path: Path, mode: int) -> None:
    shards = add_locked_subdir(other_user_tree, mode)
    res = remote(other_user, "backup", other_user_tree, "--local-dir", tmp_path / "b", "--all",
                 "--no-extra-files")
    assert "Traceback" not in res.stderr and "unexpected" not in res.stderr, res.stderr
    named = [line for line in res.stderr.splitlines() if str(shards) in line]
    assert len(named) == 1 and "Permission denied" in named[0], res.stderr


@pytest.mark.parametrize("mode", [0o700, 0o744], ids=["0700", "0744"])
def test_unreadable_subdirectory_fails_its_checkpoint(other_user: OtherUser, other_user_tree: Path,
                                                      tmp_path: Path, mode: int) -> None:
    add_locked_subdir(other_user_tree, mode)
    dest = tmp_path / "b"
    res = remote(other_user, "backup", other_user_tree, "--local-dir", dest, "--all", "--no-extra-files")
    assert res.returncode == PARTIAL, res.stderr
    assert entries(dest) == manifests(dest) == {"checkpoint-4", "checkpoint-12"}


# ------------------------------------------------------------ restore into an unwritable directory


@pytest.mark.parametrize("where", ["new run dir in it", "the dir itself"])
def test_restore_into_unwritable_dir_exits_5_and_leaves_nothing(other_user: OtherUser, server_tree: Path,
                                                                reachable_tmp: Path, tmp_path: Path,
                                                                where: str) -> None:
    store = tmp_path / "backups"
    backed = run_cli("backup", "-q", "--remote-dir", server_tree, "--local-dir", store, "--all",
                     "--no-extra-files")
    assert backed.returncode == 0, backed.stderr
    before = {name: tree_digest(store / name) for name in CKPTS}
    before_manifests = tree_digest(store / ".ckptsync" / "manifests")
    closed = reachable_tmp / "root-owned"
    closed.mkdir()
    give_to_root(closed, 0o755)
    run = closed / "run" if where == "new run dir in it" else closed
    failed = run / ".ckptsync-lock" if run == closed else run  # the server lock is the first write

    line = one_line(remote(other_user, "restore", run, "--local-dir", store, "--checkpoint", "checkpoint-12"),
                    IO)

    assert line.startswith(f"error: on {other_user.alias} ("), line
    assert line.endswith(f"): Permission denied: {failed}"), line
    assert list(closed.iterdir()) == []    # no checkpoint, no staging the user could not remove
    assert {name: tree_digest(store / name) for name in CKPTS} == before
    assert tree_digest(store / ".ckptsync" / "manifests") == before_manifests


def test_fixtures_give_the_tree_to_the_user(other_user: OtherUser, other_user_tree: Path) -> None:
    root = other_user_tree.parents[1]
    for dirpath, dirnames, filenames in os.walk(root):
        for path in [dirpath] + [os.path.join(dirpath, n) for n in filenames]:
            assert os.stat(path).st_uid == other_user.uid, path
    for parent in root.parents:
        assert os.stat(parent).st_mode & 0o001, f"{parent} is not searchable by others"
    listed = remote(other_user, "list", other_user_tree, "--json")
    assert listed.returncode == 0, listed.stderr
    assert {r["name"] for r in json.loads(listed.stdout)["checkpoints"]} == CKPTS


def test_alias_logs_in_as_the_unprivileged_user(other_user: OtherUser, ssh_home: Path, sshd) -> None:
    config = ssh_home / ".ssh" / "config"
    assert f"Host {other_user.alias}\n" in config.read_text()
    res = subprocess.run(["ssh", "-F", str(config), other_user.alias, "id -u; echo $HOME"],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr + sshd.log_tail()
    assert res.stdout.split() == [str(other_user.uid), str(other_user.home)]
    assert other_user.uid != 0


def test_why_another_user_cannot_log_in() -> None:
    from sshd import other_user_problem

    assert "needs sshd to run as root" in other_user_problem("someone", is_root=False, use_pam=False)
    missing = other_user_problem("ckptsync-no-such-user", is_root=True, use_pam=False)
    assert "does not exist" in missing and "useradd" in missing
