"""Answers a new user and a live run must be able to trust: a remote_dir one level too high, a
new instance whose home is another, an adapter-only restore in the run directory, a restore run
twice, a typo, the order and marks of list, and the numbers printed along the way."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import time
from functools import partial
from pathlib import Path

import pytest

from helpers import name_best, run_cli, set_mtime, tree_digest

RUN = "models/socrates-qwen-full-dataset"
EXTRA = ["../../config_full_dataset.json", "../../deepspeed_config.json"]


def local_env(tmp_path: Path) -> dict:
    return {"HOME": str(tmp_path), "CKPTSYNC_CONFIG": None, "CKPTSYNC_SCHEDULED": None}


def status_bytes(dest: Path) -> bytes | None:
    path = dest / ".ckptsync" / "status.json"
    return path.read_bytes() if path.exists() else None


# -------------------------------------------------- a remote_dir without checkpoints


def test_backup_of_a_directory_above_the_run_exits_10_with_the_command_for_the_run(server_tree, tmp_path):
    env = local_env(tmp_path)
    models, dest = server_tree.parent, tmp_path / "b"
    res = run_cli("backup", "--remote-dir", models, "--local-dir", dest, env=env)
    assert res.returncode == 10, (res.stdout, res.stderr)
    assert f"error: no checkpoints in {models}" in res.stderr and "up to date" not in res.stdout
    hint = re.search(r"has checkpoints further down \((.+?)\): (ckptsync backup .+)$", res.stderr, re.M)
    assert hint and "socrates-qwen-full-dataset" in hint.group(1), res.stderr
    assert status_bytes(dest) is None          # refused before it wrote anything: no result recorded
    pasted = run_cli(*shlex.split(hint.group(2))[1:], env=env)
    assert pasted.returncode == 0, pasted.stderr
    assert (dest / "checkpoint-12" / "trainer_state.json").is_file()


def test_an_empty_remote_dir_is_a_warning_while_new_and_an_error_once_old(server_tree, tmp_path):
    env = local_env(tmp_path)
    fresh, dest = tmp_path / "new-run", tmp_path / "b"
    fresh.mkdir()        # the trainer made it a moment ago: its first save may be half an hour away
    res = run_cli("backup", "--remote-dir", fresh, "--local-dir", dest, env=env)
    assert res.returncode == 0, res.stderr
    assert f"warning: no checkpoints in {fresh} yet" in res.stderr

    set_mtime(fresh, time.time() - 3 * 3600)   # hours later, still nothing: not the trainer's directory
    res = run_cli("backup", "--remote-dir", fresh, "--local-dir", dest, env=env)
    assert res.returncode == 10, res.stderr
    assert f"error: no checkpoints in {fresh}" in res.stderr and f"{fresh} is empty on the server" in res.stderr

    # where checkpoints were backed up before, an empty directory is rotation or a finished run: no error
    assert run_cli("backup", "--remote-dir", server_tree, "--local-dir", dest, env=env).returncode == 0
    res = run_cli("backup", "--remote-dir", fresh, "--local-dir", dest, env=env)
    assert res.returncode == 0 and "error" not in res.stderr, res.stderr


def test_checklist_of_a_directory_above_the_run_says_where_the_checkpoints_are(server_tree, tmp_path):
    env = local_env(tmp_path)
    models = server_tree.parent
    res = run_cli("checklist", "--remote-dir", models, "--local-dir", tmp_path / "b", "--json", env=env)
    assert res.returncode == 3, res.stderr
    check = {c["name"]: c for c in json.loads(res.stdout)["checks"]}["newest checkpoint backed up"]
    assert check["detail"].startswith(f"no checkpoints in {models}: {models} has checkpoints further down")
    words = shlex.split(check["fix"])
    assert words[:2] == ["ckptsync", "checklist"] and str(server_tree) in words


# -------------------------------------------------- a typo is not a backup result


def test_a_refused_manual_run_leaves_the_last_result_as_it_was(server_tree, tmp_path):
    env = local_env(tmp_path)
    dest = tmp_path / "b"
    assert run_cli("backup", "--remote-dir", server_tree, "--local-dir", dest, env=env).returncode == 0
    before = status_bytes(dest)
    typo = run_cli("backup", "--remote-dir", server_tree, "--local-dir", dest, "--checkpoint", "checkpoint-1234", env=env)
    assert typo.returncode == 10 and "not on the server: checkpoint-1234" in typo.stderr
    assert status_bytes(dest) == before
    listed = run_cli("list", "--local", "--local-dir", dest, env=env)
    assert re.search(r"last backup: .*, ok, ", listed.stdout), listed.stdout

    # cron's runs are recorded whatever happened: an entry that keeps failing must show
    scheduled = run_cli("backup", "--remote-dir", server_tree, "--local-dir", dest, "--checkpoint",
                        "checkpoint-1234", env={**env, "CKPTSYNC_SCHEDULED": "1"})
    assert scheduled.returncode == 10
    assert json.loads(status_bytes(dest))["exit_code"] == 10


# -------------------------------------------------- list: one best, newest first


def test_list_marks_one_best_and_orders_server_and_backup_rows_newest_first(server_tree, tmp_path):
    env = local_env(tmp_path)
    dest = tmp_path / "b"
    name_best(server_tree, "checkpoint-8")          # checkpoint-12's state: the best is checkpoint-8
    assert run_cli("backup", "--all", "--remote-dir", server_tree, "--local-dir", dest, env=env).returncode == 0
    name_best(server_tree, "checkpoint-12")         # a later evaluation: now checkpoint-12 is
    assert run_cli("backup", "--all", "--remote-dir", server_tree, "--local-dir", dest, env=env).returncode == 0
    local = run_cli("list", "--local", "--local-dir", dest, env=env)
    assert local.returncode == 0, local.stderr
    starred = re.findall(r"^\*\s+(checkpoint-\d+)\s", local.stdout, re.M)
    assert starred == ["checkpoint-12"], local.stdout
    assert [c["name"] for c in json.loads(run_cli("list", "--local", "--local-dir", dest, "--json",
                                                  env=env).stdout)["checkpoints"] if c["is_best"]] == ["checkpoint-12"]

    # rotation left only the oldest on the server: the backup-only rows are newer and come first
    for name in ("checkpoint-8", "checkpoint-12"):
        shutil.rmtree(server_tree / name)
    res = run_cli("list", "--remote-dir", server_tree, "--local-dir", dest, "--json", env=env)
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)["checkpoints"]
    assert [(r["name"], r["on_server"]) for r in rows] == [
        ("checkpoint-12", False), ("checkpoint-8", False), ("checkpoint-4", True)]


# -------------------------------------------------- restore: adapter only, twice, identical


def test_an_adapter_only_restore_in_the_run_directory_is_never_waited_for(server_tree, tmp_path):
    env = local_env(tmp_path)
    dest = tmp_path / "b"
    assert run_cli("backup", "--all", "--remote-dir", server_tree, "--local-dir", dest, env=env).returncode == 0
    shutil.rmtree(server_tree / "checkpoint-12")    # gone from the server; its weights are wanted back
    args = ("--remote-dir", server_tree, "--local-dir", dest, "--checkpoint", "checkpoint-12", "--adapter-only",
            "--no-extra-files")
    res = run_cli("restore", *args, env=env)
    assert res.returncode == 0, res.stderr

    listed = run_cli("list", "--remote-dir", server_tree, "--local-dir", dest, "--json", env=env)
    row = next(r for r in json.loads(listed.stdout)["checkpoints"] if r["name"] == "checkpoint-12")
    assert row["state"] == "restored" and row["reason"] == "adapter only, restored", row
    human = run_cli("list", "--remote-dir", server_tree, "--local-dir", dest, env=env).stdout
    assert "checkpoint-12 (restored): adapter only, restored" in human and "writing" not in human

    res = run_cli("checklist", "--remote-dir", server_tree, "--local-dir", dest, "--json", env=env)
    stopped = {c["name"]: c for c in json.loads(res.stdout)["checks"]}["training stopped"]
    assert "checkpoint-12" not in stopped["detail"], stopped
    backup = run_cli("backup", "--remote-dir", server_tree, "--local-dir", dest, env=env)
    assert backup.returncode == 0 and "checkpoint-12" not in backup.stderr, backup.stderr

    again = run_cli("restore", *args, "--json", env=env)   # the same restore again: nothing to do
    assert again.returncode == 0, again.stderr
    out = json.loads(again.stdout)
    assert out["identical"] and out["sent_files"] == 0 and out["wire_bytes"] == 0


def test_restoring_a_checkpoint_that_is_there_with_the_same_bytes_sends_nothing(ssh_home, server_tree, tmp_path):
    dest = tmp_path / "b"
    args = ("-i", "1", "--remote-dir", server_tree, "--local-dir", dest)
    assert run_cli("backup", *args).returncode == 0
    before = tree_digest(server_tree)
    dry = run_cli("restore", *args, "--dry-run")
    assert dry.returncode == 0 and "checkpoint-12 (step 12, full) is already there, identical" in dry.stdout, dry.stderr
    res = run_cli("restore", *args)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("already there, identical: checkpoint-12 at ") and " sent," not in res.stdout
    assert tree_digest(server_tree) == before

    # a different copy under the name is still refused without --force
    path = server_tree / "checkpoint-12" / "optimizer.pt"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    st = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    res = run_cli("restore", *args)
    assert res.returncode == 2 and "checkpoint-12 already exists" in res.stderr and "--force" in res.stderr


# -------------------------------------------------- a new instance whose home is another


@pytest.fixture
def run_in_other_home(other_user, server_tree, tmp_path):
    """The fixture run in the home of the server's user of tnr-7: -> its path relative to that home,
    the same path under the home of tnr-1's user (where a restore writes), and that home."""
    name = f"ckptsync-test-{os.getpid()}-{tmp_path.name}"
    top = other_user.home / name
    shutil.copytree(server_tree.parents[1], top, symlinks=True, copy_function=shutil.copy2)
    other_user.chown_tree(top)
    import pwd  # POSIX only, like sshd: the module stays importable on any laptop

    home = Path(pwd.getpwuid(os.getuid()).pw_dir)     # tnr-1 logs in as the user running the tests
    try:
        yield f"{name}/{RUN}", home / name
    finally:
        shutil.rmtree(top, ignore_errors=True)
        shutil.rmtree(home / name, ignore_errors=True)


@pytest.mark.parametrize("recorded_home", [True, False], ids=["home-recorded", "older-backup"])
def test_the_same_relative_remote_dir_on_another_home_gets_the_extra_files(ssh_home, other_user, run_in_other_home,
                                                                         server_tree, tmp_path, recorded_home):
    rel, new_top = run_in_other_home
    cfg = ssh_home / "ckptsync.yaml"
    cfg.write_text(json.dumps({"extra_files": EXTRA}))
    dest = tmp_path / "ckpt-backups" / "instance-0"
    res = run_cli("backup", "-i", other_user.instance, "--config", cfg, "--remote-dir", rel, "--local-dir", dest)
    assert res.returncode == 0, res.stderr
    if not recorded_home:   # as a backup made before the server's home was recorded
        path = dest / ".ckptsync" / "manifests" / "extra-files.json"
        manifest = json.loads(path.read_text())
        manifest["source"].pop("home", None)
        path.write_text(json.dumps(manifest))
    res = run_cli("restore", "-i", "1", "--config", cfg, "--remote-dir", rel, "--local-dir", dest, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["warnings"] == [] and {e["action"] for e in out["extras"]} == {"send"}
    for name in ("config_full_dataset.json", "deepspeed_config.json"):
        assert (new_top / name).read_bytes() == (server_tree.parents[1] / name).read_bytes()
    assert tree_digest(new_top / RUN / "checkpoint-12") == tree_digest(server_tree / "checkpoint-12")


def test_a_dry_run_names_the_paths_the_restore_will_print(ssh_home, other_user, run_in_other_home, tmp_path):
    rel, new_top = run_in_other_home
    dest = tmp_path / "b"
    assert run_cli("backup", "-i", other_user.instance, "--remote-dir", rel, "--local-dir", dest).returncode == 0
    args = ("restore", "-i", "1", "--remote-dir", rel, "--local-dir", dest)
    dry = run_cli(*args, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    real = run_cli(*args)
    assert real.returncode == 0, real.stderr
    resume = f"resume with: --resume-from-checkpoint {new_top / RUN / 'checkpoint-12'}"
    assert f"then: {resume}" in dry.stdout.splitlines() and resume in real.stdout.splitlines()
    assert f"{new_top / RUN} does not exist yet and would be created" in dry.stdout


# -------------------------------------------------- the numbers a backup prints


def test_files_placed_from_the_backup_are_not_called_kept_from_an_interrupted_run(server_tree, tmp_path):
    env = local_env(tmp_path)
    dest = tmp_path / "b"
    args = ("backup", "--remote-dir", server_tree, "--local-dir", dest, "--no-extra-files")
    assert run_cli(*args, "--checkpoint", "checkpoint-8", env=env).returncode == 0
    res = run_cli(*args, "--checkpoint", "checkpoint-12", env=env)
    assert res.returncode == 0, res.stderr
    line = next(line for line in res.stderr.splitlines() if "checkpoint-12: fetching" in line)
    assert re.search(r"\(\d+ placed from the backup\)$", line) and "interrupted" not in line, line


# -------------------------------------------------- checklist beside a running backup


def test_a_checklist_beside_a_backup_judges_the_manifest_it_names(server_tree, tmp_path):
    from ckptsync.backup import BackupOptions, run_backup
    from ckptsync.checklist import run_checklist
    from ckptsync.config import Target
    from ckptsync.server.inprocess import Hooks, InProcessServer

    dest = tmp_path / "b"
    target = Target(label="instance-0", transport=None, remote_dir=str(server_tree), local_dir=dest)
    committed = []

    def backup_now(_args) -> None:  # cron's backup commits after the checklist read the manifests
        committed.append(run_backup(target, BackupOptions(max_checkpoints=1), connect=InProcessServer).fetched)

    hooks = Hooks()
    hooks.on_before("glob", backup_now, times=1)   # the look for newer runs, after the manifests were judged
    result = run_checklist(target, connect=partial(InProcessServer, hooks=hooks))
    assert committed == [["checkpoint-12"]]
    check = {c.name: c for c in result.checks}["newest checkpoint backed up"]
    assert check.ok and check.detail.startswith("checkpoint-12 (step 12)"), check.detail


@pytest.mark.parametrize("source, root, home, same", [
    ({"remote_dir": "/home/a/run/models/x", "home": "/home/a"}, "/root/run/models/x", "/root", True),
    ({"remote_dir": "/home/a/run/models/x", "home": "/home/a"}, "/root/other/models/x", "/root", False),
    ({"remote_dir": "/home/a/run/models/x"}, "/root/run/models/x", "/root", True),      # no home recorded
    ({"remote_dir": "/data/run/models/x", "home": "/home/a"}, "/root/run/models/x", "/root", False),
    ({"remote_dir": "/data/run"}, "/data/run", "/root", True),                          # the same path
    ({"remote_dir": "/data/run"}, "/srv/run", "/", False),                               # no home to go by
    ({}, "/root/run", "/root", False),
])
def test_the_same_place_is_the_same_path_or_the_same_path_below_each_home(source, root, home, same):
    from ckptsync.destination import same_place

    assert same_place(source, root, home) is same
