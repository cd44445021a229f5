"""Core entry points driven with the in-process server (`connect=`): what a user would check,
and a fault put at a known point of the run."""

from __future__ import annotations

import os
import shutil
from functools import partial

import pytest

from ckptsync.adopt import SAME, run_adopt
from ckptsync.backup import BackupOptions, run_backup
from ckptsync.config import Target
from ckptsync.details import show_server
from ckptsync.doctor import run_doctor
from ckptsync.errors import CONNECT, INTEGRITY, IO, PARTIAL, CkptsyncError
from ckptsync.prune import PruneOptions, run_prune
from ckptsync.repair import run_repair
from ckptsync.restore import RestoreOptions
from ckptsync.restore_all import FAILED, RESTORED, SKIPPED, run_restore_all
from ckptsync.retention import Policy
from ckptsync.server.inprocess import Hooks, InProcessServer
from ckptsync.verify import run_verify
from helpers import tree_digest


def target_of(remote_dir, local_dir) -> Target:
    return Target(label="instance-0", transport=None, remote_dir=str(remote_dir), local_dir=local_dir)


def backed_up(server_tree, tmp_path, names=("checkpoint-12",)) -> Target:
    t = target_of(server_tree, tmp_path / "b")
    result = run_backup(t, BackupOptions(names=list(names)), connect=InProcessServer)
    assert result.exit_code == 0 and sorted(result.fetched) == sorted(names)
    return t


def test_remote_verify_finds_a_file_the_server_changed(server_tree, tmp_path):
    t = backed_up(server_tree, tmp_path)
    assert run_verify(t, [], remote=True, connect=InProcessServer).exit_code == 0
    (server_tree / "checkpoint-12" / "trainer_state.json").write_text("{}")
    result = run_verify(t, ["checkpoint-12"], remote=True, connect=InProcessServer)
    assert result.exit_code != 0 and result.remote
    assert [e.name for e in result.failed] == ["checkpoint-12"]
    assert any(p.path.endswith("trainer_state.json") for p in result.failed[0].problems)


def test_remote_verify_with_the_link_cut_while_hashing_is_a_connection_error(server_tree, tmp_path):
    t = backed_up(server_tree, tmp_path)
    before = tree_digest(t.local_dir)
    hooks = Hooks()
    server = InProcessServer(hooks)
    hooks.on_before("hash", lambda _args: server.cut_after(0), times=1)
    with pytest.raises(CkptsyncError) as info:
        run_verify(t, ["checkpoint-12"], remote=True, connect=lambda: server)
    assert info.value.exit_code == CONNECT
    assert server.link.process.cut  # the link was cut while the server was hashing
    assert tree_digest(t.local_dir) == before  # the backup is as it was
    assert run_verify(t, ["checkpoint-12"], remote=True, connect=InProcessServer).exit_code == 0


def test_remote_prune_removes_from_the_server_only_what_is_backed_up(server_tree, tmp_path):
    t = backed_up(server_tree, tmp_path, ("checkpoint-4", "checkpoint-8", "checkpoint-12"))
    opts = PruneOptions(policy=Policy(keep_last=1), remote=True, keep_best=False)
    result = run_prune(t, opts, connect=InProcessServer)
    assert result.exit_code == 0 and result.side == "server"
    assert sorted(result.removed) == ["checkpoint-4", "checkpoint-8"]
    assert not (server_tree / "checkpoint-4").exists() and not (server_tree / "checkpoint-8").exists()
    assert (server_tree / "checkpoint-12").is_dir()
    assert (t.local_dir / "checkpoint-4").is_dir()  # the backups are untouched


def test_doctor_reports_what_the_server_has(server_tree, tmp_path):
    result = run_doctor(target_of(server_tree, tmp_path / "b"), connect=InProcessServer)
    assert result.python and result.hash and result.hash_rate > 0
    assert result.free_bytes > 0 and result.remote_dir == str(server_tree)


def test_show_server_says_whether_the_backup_is_current(server_tree, tmp_path):
    t = backed_up(server_tree, tmp_path)
    shown = show_server(t, "checkpoint-12", connect=InProcessServer)
    assert (shown.source, shown.name, shown.backup) == ("server", "checkpoint-12", "yes")
    assert shown.step == 12
    assert show_server(t, "checkpoint-8", connect=InProcessServer).backup == "no"


def test_repair_fetches_a_damaged_file_again(server_tree, tmp_path):
    t = backed_up(server_tree, tmp_path)
    damaged = t.local_dir / "checkpoint-12" / "optimizer.pt"
    data = bytearray(damaged.read_bytes())
    data[0] ^= 0xFF
    damaged.chmod(0o644)
    damaged.write_bytes(bytes(data))
    assert run_verify(t, ["checkpoint-12"]).exit_code == INTEGRITY
    result = run_repair(t, ["checkpoint-12"], connect=InProcessServer)
    assert result.exit_code == 0
    assert result.repaired == {"checkpoint-12": ["checkpoint-12/optimizer.pt"]}
    assert damaged.read_bytes() == (server_tree / "checkpoint-12" / "optimizer.pt").read_bytes()


def test_restore_all_puts_every_backup_back_and_skips_what_is_there(server_tree, tmp_path):
    t = backed_up(server_tree, tmp_path, ("checkpoint-8", "checkpoint-12"))
    want = tree_digest(server_tree / "checkpoint-8")
    shutil.rmtree(server_tree / "checkpoint-8")
    result = run_restore_all(t, RestoreOptions(), connect=InProcessServer)
    assert result.exit_code == 0
    assert {i.checkpoint: i.outcome for i in result.items} == {"checkpoint-8": RESTORED, "checkpoint-12": SKIPPED}
    assert tree_digest(server_tree / "checkpoint-8") == want


def test_adopt_compares_the_adopted_copy_with_the_server(server_tree, tmp_path):
    dest = tmp_path / "b"
    dest.mkdir()
    shutil.copytree(server_tree / "checkpoint-12", dest / "checkpoint-12")
    result = run_adopt(target_of(server_tree, dest), connect=partial(InProcessServer, Hooks()))
    assert [(a.name, a.server) for a in result.adopted] == [("checkpoint-12", SAME)]
    assert (dest / ".ckptsync" / "manifests" / "checkpoint-12.json").is_file()
    assert os.path.isdir(dest / "checkpoint-12")


def test_restore_all_goes_on_after_a_checkpoint_the_server_cannot_commit(server_tree, tmp_path):
    t = backed_up(server_tree, tmp_path, ("checkpoint-8", "checkpoint-12"))
    want = tree_digest(server_tree / "checkpoint-8")
    shutil.rmtree(server_tree / "checkpoint-8")
    shutil.rmtree(server_tree / "checkpoint-12")
    hooks = Hooks()
    hooks.fail("commit", "no_space", "No space left on device", str(server_tree))  # the first commit, newest first
    result = run_restore_all(t, RestoreOptions(), connect=partial(InProcessServer, hooks))
    outcome = {i.checkpoint: (i.outcome, i.exit_code) for i in result.items}
    assert outcome == {"checkpoint-12": (FAILED, IO), "checkpoint-8": (RESTORED, 0)}
    assert result.exit_code == PARTIAL
    assert not (server_tree / "checkpoint-12").exists()  # never under its final name, half there
    assert tree_digest(server_tree / "checkpoint-8") == want
