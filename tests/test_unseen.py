"""What the server cannot list or read is never absent and never complete.

Symlinks (followed: their targets' bytes are backed up under the links' names), a dangling
link, a directory or file the login user may not read, a tree nested too deep to walk and a
listing cut at its limit: each fails its checkpoint (or the run) in `backup` with exit 3, shows
as `unreadable` in `list`, and makes `checklist` NOT SAFE with the reason. Through the real CLI
and the test sshd; the listing limit through the in-process server, whose hook lowers it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from functools import partial
from pathlib import Path

import pytest

from ckptsync.agent.scan import MAX_DEPTH, op_scan
from ckptsync.backup import BackupOptions, run_backup
from ckptsync.checklist import run_checklist
from ckptsync.config import Target
from ckptsync.listing import run_list
from ckptsync.output import Output
from ckptsync.server.inprocess import Hooks, InProcessServer
from conftest import OtherUser
from helpers import digest_diff, run_cli, set_mtime, tree_digest

PARTIAL = 3
READ = "everything on the server read"


def on_server(command: str, run: Path, dest: Path, *args: str, instance: str = "1") -> subprocess.CompletedProcess[str]:
    return run_cli(command, "--instance", instance, "--remote-dir", run, "--local-dir", dest, *args)


def ended(res: subprocess.CompletedProcess[str], code: int) -> subprocess.CompletedProcess[str]:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and "unexpected" not in res.stderr, res.stderr
    return res


def warnings(res: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.startswith("warning: ")]


def rows(res: subprocess.CompletedProcess[str]) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads(ended(res, 0).stdout)["checkpoints"]}


def checks(res: subprocess.CompletedProcess[str]) -> dict[str, dict]:
    out = json.loads(ended(res, PARTIAL).stdout)
    assert not out["safe"]
    return {c["name"]: c for c in out["checks"]}


def age_tree(root: Path, seconds: float) -> None:
    """Every mtime under root moved back, so the trainer has plainly stopped."""
    for p in [root, *root.rglob("*")]:
        st = p.lstat()
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns - int(seconds * 1e9)), follow_symlinks=False)


def entries(store: Path) -> set[str]:
    return {p.name for p in store.iterdir() if not p.name.startswith(".")} if store.exists() else set()


def assert_reported(run: Path, dest: Path, name: str, why: str, instance: str = "1",
                    backed_up: tuple[str, ...] = ()) -> None:
    """backup exits 3 naming the checkpoint and why, and stores the others; list shows it
    unreadable with the reason; checklist is NOT SAFE with the reason."""
    res = ended(on_server("backup", run, dest, "--all", "--no-extra-files", instance=instance), PARTIAL)
    line = f"warning: {name}: could not be read on the server ({why}); not recorded"
    assert line in warnings(res), res.stderr
    assert entries(dest) == set(backed_up), entries(dest)
    for other in backed_up:
        assert not digest_diff(tree_digest(run / other), tree_digest(dest / other)), other

    row = rows(on_server("list", run, dest, "--json", instance=instance))[name]
    assert (row["state"], row["complete"], row["unreadable"]) == ("unreadable", False, True), row
    assert row["reason"] == f"could not be read on the server ({why})", row
    human = ended(on_server("list", run, dest, instance=instance), 0)
    # Off a terminal a long line is folded at the width: compare the words.
    expected = f"{name} (unreadable): could not be read on the server ({why})"
    assert " ".join(expected.split()) in " ".join(human.stdout.split()), human.stdout

    found = checks(on_server("checklist", run, dest, "--json", instance=instance))
    assert not found[READ]["ok"] and f"{name}: could not be read on the server ({why})" in found[READ]["detail"]
    human = ended(on_server("checklist", run, dest, instance=instance), PARTIAL)
    assert "NOT SAFE" in human.stdout and f"[FAIL] {READ}: " in human.stdout, human.stdout


# ------------------------------------------------------------ symlinks


def test_a_symlinked_newest_checkpoint_is_backed_up_and_restored_as_its_bytes(ssh_home, server_tree, tmp_path):
    age_tree(server_tree, 3600)
    target = tmp_path / "disk2" / "checkpoint-12"   # the newest checkpoint, kept on another disk
    target.parent.mkdir()
    (server_tree / "checkpoint-12").rename(target)
    (server_tree / "checkpoint-12").symlink_to(target)
    dest = tmp_path / "b"

    assert rows(on_server("list", server_tree, dest, "--json"))["checkpoint-12"]["state"] == "complete"
    res = ended(on_server("backup", server_tree, dest, "-k", "1", "--no-extra-files"), 0)
    assert "fetched 1 (checkpoint-12)" in res.stdout, res.stdout
    assert not (dest / "checkpoint-12").is_symlink()
    assert not digest_diff(tree_digest(target), tree_digest(dest / "checkpoint-12"))
    safe = ended(on_server("checklist", server_tree, dest, "--json"), 0)
    assert json.loads(safe.stdout)["safe"], safe.stdout

    fresh = tmp_path / "fresh" / "run"
    ended(on_server("restore", fresh, dest, "--checkpoint", "checkpoint-12"), 0)
    assert not (fresh / "checkpoint-12").is_symlink()
    assert not digest_diff(tree_digest(target), tree_digest(fresh / "checkpoint-12"))


def test_a_dangling_symlinked_newest_checkpoint_is_never_absent(ssh_home, server_tree, tmp_path):
    age_tree(server_tree, 3600)
    gone = tmp_path / "unmounted" / "checkpoint-12"
    shutil.rmtree(server_tree / "checkpoint-12")
    (server_tree / "checkpoint-12").symlink_to(gone)

    assert_reported(server_tree, tmp_path / "b", "checkpoint-12",
                    f"checkpoint-12: symlink to {gone}, which does not exist",
                    backed_up=("checkpoint-4", "checkpoint-8"))
    found = checks(on_server("checklist", server_tree, tmp_path / "b", "--json"))
    newest = found["newest checkpoint backed up"]
    assert not newest["ok"] and newest["detail"].startswith("checkpoint-12 could not be read on the server")
    compared = on_server("verify", server_tree, tmp_path / "b", "--remote", "--json")
    status = {e["name"]: e["status"] for e in json.loads(compared.stdout)["entries"]}
    assert status["checkpoint-12"] == "only on the server (not all readable)", compared.stdout


def test_a_symlinked_file_is_backed_up_and_restored_as_its_bytes(ssh_home, server_tree, tmp_path):
    ckpt = server_tree / "checkpoint-12"
    expected = tree_digest(ckpt)
    moved = tmp_path / "disk2" / "optimizer.pt"
    moved.parent.mkdir()
    (ckpt / "optimizer.pt").rename(moved)
    (ckpt / "optimizer.pt").symlink_to(moved)
    dest = tmp_path / "b"

    ended(on_server("backup", server_tree, dest, "-k", "1", "--no-extra-files"), 0)
    assert not (dest / "checkpoint-12" / "optimizer.pt").is_symlink()
    assert not digest_diff(expected, tree_digest(dest / "checkpoint-12"))
    fresh = tmp_path / "fresh" / "run"
    ended(on_server("restore", fresh, dest, "--checkpoint", "checkpoint-12"), 0)
    assert not (fresh / "checkpoint-12" / "optimizer.pt").is_symlink()
    assert not digest_diff(expected, tree_digest(fresh / "checkpoint-12"))


def test_a_dangling_symlinked_file_fails_its_checkpoint(ssh_home, server_tree, tmp_path):
    link = server_tree / "checkpoint-12" / "optimizer.pt"
    link.unlink()
    link.symlink_to(tmp_path / "unmounted" / "optimizer.pt")
    assert_reported(server_tree, tmp_path / "b", "checkpoint-12",
                    f"checkpoint-12/optimizer.pt: symlink to {tmp_path / 'unmounted' / 'optimizer.pt'}, "
                    "which does not exist", backed_up=("checkpoint-4", "checkpoint-8"))


def test_a_symlink_loop_inside_a_checkpoint_fails_it(ssh_home, server_tree, tmp_path):
    (server_tree / "checkpoint-8" / "again").symlink_to("..")
    assert_reported(server_tree, tmp_path / "b", "checkpoint-8",
                    "checkpoint-8/again: symlink to .., a directory that contains it (a loop)",
                    backed_up=("checkpoint-4", "checkpoint-12"))


# ------------------------------------------------------------ what the login user may not read


@pytest.mark.parametrize("locked", ["checkpoint-12", "checkpoint-12/shards", "checkpoint-12/optimizer.pt"],
                         ids=["checkpoint dir", "subdirectory", "file"])
def test_what_the_login_user_may_not_read_fails_its_checkpoint(other_user: OtherUser, other_user_tree: Path,
                                                               tmp_path: Path, locked: str) -> None:
    run = other_user_tree
    ckpt = run / "checkpoint-12"
    (ckpt / "shards").mkdir()
    (ckpt / "shards" / "a.bin").write_bytes(b"x" * 100)
    when = (ckpt / "README.md").stat().st_mtime
    for path in (ckpt / "shards" / "a.bin", ckpt / "shards", ckpt):
        os.chown(path, other_user.uid, other_user.gid)
        os.utime(path, (when, when))
    os.chmod(run / locked, 0o000)   # mode 000, still the user's own

    assert_reported(run, tmp_path / "b", "checkpoint-12", f"{locked}: Permission denied: {run / locked}",
                    instance=other_user.instance, backed_up=("checkpoint-4", "checkpoint-8"))


def test_an_extra_file_the_login_user_may_not_look_at_is_not_taken_as_missing(other_user: OtherUser,
                                                                              other_user_tree: Path,
                                                                              tmp_path: Path) -> None:
    locked = other_user_tree.parents[1] / "locked"
    locked.mkdir()
    (locked / "notes.json").write_text("{}")
    other_user.chown_tree(locked)
    os.chmod(locked, 0o000)
    cfg = tmp_path / "ck.yaml"
    cfg.write_text(json.dumps({"remote_dir": str(other_user_tree), "local_dir": str(tmp_path / "b"),
                               "extra_files": ["../../locked/notes.json"]}))
    why = f"../../locked/notes.json: Permission denied: {locked / 'notes.json'}"

    res = ended(run_cli("backup", "--instance", other_user.instance, "--config", cfg), PARTIAL)
    assert f"warning: extra-files: extra files could not be read on the server ({why}); not recorded" \
        in warnings(res), res.stderr
    assert "not found on the server" not in res.stderr, res.stderr
    found = checks(run_cli("checklist", "--instance", other_user.instance, "--config", cfg, "--json"))
    extras = found["extra files backed up"]
    assert not extras["ok"] and f"could not be read on the server (Permission denied: {locked / 'notes.json'})" \
        in extras["detail"], extras


# ------------------------------------------------------------ a tree nested too deep


@pytest.fixture
def deep_tree(server_tree: Path):
    """checkpoint-8/nested/d/d/... 1100 directories deep (far past the walk's limit, and past
    Python's recursion limit), removed one directory at a time afterwards (rmtree recurses)."""
    chain = [server_tree / "checkpoint-8" / "nested"]
    chain[0].mkdir()
    for _ in range(1100):
        chain.append(chain[-1] / "d")
        chain[-1].mkdir()
    bottom = chain[-1] / "weights.bin"
    bottom.write_bytes(b"w" * 10)
    set_mtime(bottom, (server_tree / "checkpoint-8" / "README.md").stat().st_mtime)
    yield chain[0]
    bottom.unlink()
    for path in reversed(chain):
        path.rmdir()


def test_a_tree_nested_too_deep_fails_only_its_checkpoint(ssh_home, server_tree, deep_tree, tmp_path):
    first_unseen = "checkpoint-8/nested" + "/d" * (MAX_DEPTH - 1)   # the first at depth MAX_DEPTH + 1
    assert_reported(server_tree, tmp_path / "b", "checkpoint-8",
                    f"{first_unseen}: more than {MAX_DEPTH} directories deep; not listed",
                    backed_up=("checkpoint-4", "checkpoint-12"))


# ------------------------------------------------------------ a listing cut at its limit


def make_target(remote_dir: Path, local_dir: Path) -> Target:
    return Target(label="instance-0", transport=None, remote_dir=str(remote_dir), local_dir=local_dir)


def test_a_listing_cut_at_its_limit_fails_what_it_did_not_reach(server_tree, tmp_path, capsys):
    age_tree(server_tree, 3600)
    limit = len(list((server_tree / "checkpoint-12").iterdir())) + 2   # stops inside checkpoint-4
    hooks = Hooks()
    hooks.on_before("scan", lambda args: args.update(max_files=limit))
    target, connect = make_target(server_tree, tmp_path / "b"), partial(InProcessServer, hooks)
    stopped = f"the listing stopped at {limit} files, the most one scan lists"

    result = run_backup(target, BackupOptions(all=True), connect=connect)
    assert result.exit_code == PARTIAL and result.fetched == ["checkpoint-12"], result.failed
    assert not digest_diff(tree_digest(server_tree / "checkpoint-12"), tree_digest(tmp_path / "b" / "checkpoint-12"))
    assert result.failed == {
        "checkpoint-4": f"could not be read on the server (checkpoint-4: not listed completely: {stopped}); "
                        "not recorded",
        "checkpoint-8": f"could not be read on the server (checkpoint-8: not listed: {stopped}); not recorded",
        str(server_tree): f"{stopped}; checkpoints past that point were not seen, nor backed up",
    }
    from ckptsync.cli.cmd_backup import show_backup

    show_backup(Output(), result)
    assert f"warning: {server_tree}: {stopped}; checkpoints past that point were not seen, nor backed up" \
        in capsys.readouterr().err.splitlines()

    listed = run_list(target, local_only=False, connect=connect)
    assert listed.stopped == stopped
    assert {r.name: r.state for r in listed.rows} == {"checkpoint-12": "complete", "checkpoint-4": "unreadable",
                                                      "checkpoint-8": "unreadable"}
    from ckptsync.cli.cmd_list import show_list

    show_list(Output(), listed, str(server_tree))
    assert f"warning: the server's listing is incomplete ({stopped}): checkpoints past that point are not shown" \
        in capsys.readouterr().err.splitlines()

    checked = run_checklist(target, connect=connect)
    assert not checked.safe and checked.exit_code == PARTIAL
    read = next(c for c in checked.checks if c.name == READ)
    assert not read.ok and f"{stopped}; checkpoints past that point were not seen" in read.detail


def test_a_newer_run_whose_newest_checkpoint_cannot_be_read_is_not_covered(server_tree, tmp_path):
    """A run the trainer moved on to, beside remote_dir: its newest complete checkpoint is backed
    up, but a newer one is a dangling link. It is not covered: list warns, checklist fails."""
    age_tree(server_tree, 3600)
    newer = server_tree.parent / f"{server_tree.name}_run_20991231_000000"
    newer.mkdir()
    shutil.copytree(server_tree / "checkpoint-4", newer / "checkpoint-4")
    (newer / "checkpoint-20").symlink_to(tmp_path / "unmounted")
    target = make_target(server_tree, tmp_path / "b").with_policy(follow_runs=True)
    run_backup(target, BackupOptions(all=True), connect=InProcessServer)
    assert (tmp_path / "b" / newer.name / "checkpoint-4").is_dir()

    why = f"checkpoint-20: could not be read on the server (checkpoint-20: symlink to {tmp_path / 'unmounted'}, " \
          "which does not exist)"
    listed = run_list(target.with_policy(follow_runs=False), local_only=False, connect=InProcessServer)
    (state,) = listed.runs
    assert not state.covered and state.problem == f"not all of it could be read on the server: {why}", state
    checked = run_checklist(target.with_policy(follow_runs=False), connect=InProcessServer)
    run = next(c for c in checked.checks if c.name == "newer run backed up")
    assert not checked.safe and not run.ok and run.detail == f"{newer}: not all of it could be read on the server: {why}"


# ------------------------------------------------------------ the agent's walk, one rule at a time


def scan(root: Path, **limits) -> dict:
    return op_scan({"root": str(root), **limits})


def test_the_walk_reports_each_kind_of_unseen_path(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint-1" / "sub").mkdir(parents=True)
    (run / "checkpoint-1" / "a.bin").write_bytes(b"a")
    (run / "checkpoint-1" / "loop").symlink_to("..")
    (run / "checkpoint-1" / "dangling").symlink_to(tmp_path / "nowhere")
    os.mkfifo(run / "checkpoint-1" / "pipe")
    (run / "checkpoint-1" / "sub" / "b.bin").write_bytes(b"b")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "c.bin").write_bytes(b"c")
    (run / "checkpoint-2").symlink_to(tmp_path / "elsewhere")

    reply = scan(run, max_depth=1)
    assert [f[0] for f in reply["files"]] == ["checkpoint-1/a.bin", "checkpoint-2/c.bin"]
    assert {path: why for path, why, _mtime in reply["unseen"]} == {
        "checkpoint-1/dangling": f"symlink to {tmp_path / 'nowhere'}, which does not exist",
        "checkpoint-1/loop": "symlink to .., a directory that contains it (a loop)",
        "checkpoint-1/pipe": "a named pipe, not a regular file",
        "checkpoint-1/sub": "more than 1 directories deep; not listed",
    }
    assert reply["stopped"] == ""


def test_a_listing_stopped_in_remote_dir_itself_names_every_entry_left(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("a.txt", "b.txt", "latest.pt"):
        (run / name).write_bytes(b"x")
    (run / "checkpoint-9").mkdir()
    (run / "checkpoint-9" / "x.bin").write_bytes(b"x")

    reply = scan(run, max_files=1)
    assert [f[0] for f in reply["files"]] == ["a.txt"]
    stopped = "the listing stopped at 1 files, the most one scan lists"
    assert reply["stopped"] == stopped
    assert {path: why for path, why, _mtime in reply["unseen"]} == {
        name: f"not listed: {stopped}" for name in ("b.txt", "checkpoint-9", "latest.pt")}

    by_size = scan(run, max_reply=1)
    assert by_size["stopped"] == "the listing stopped at 1 files, the most one reply holds"
