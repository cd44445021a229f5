"""`ckptsync restore --all`: a whole run onto a new server, each checkpoint atomic and verified."""

from __future__ import annotations

import json
import os

import pytest

from helpers import run_cli, tree_digest
from test_restore import assert_same, flip_byte, restore, setup  # noqa: F401 (setup is a fixture)

NAMES = ["checkpoint-12", "checkpoint-8", "checkpoint-4"]


def test_all_checkpoints_are_restored_newest_first_and_a_rerun_skips_them(setup):
    server, dest, fresh, cfg = setup
    res = restore(cfg, fresh, dest, "--all", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert [i["checkpoint"] for i in out["items"]] == NAMES
    assert {i["outcome"] for i in out["items"]} == {"restored"}
    assert sorted(os.listdir(fresh)) == sorted(NAMES)  # no staging left behind
    for name in NAMES:
        assert_same(server / name, fresh / name)
    for name in ("config_full_dataset.json", "deepspeed_config.json"):
        assert tree_digest(fresh.parent.parent)[name] == tree_digest(server.parent.parent)[name]
    assert "best_model_checkpoint" not in res.stderr  # the best one is part of the same restore

    again = restore(cfg, fresh, dest, "--all")
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("skipped, already on the server") == 3
    assert "restored 0 of 3 checkpoints" in again.stdout


def test_a_damaged_checkpoint_fails_alone_with_exit_3_and_a_summary(setup):
    server, dest, fresh, cfg = setup
    flip_byte(dest / "checkpoint-8" / "optimizer.pt")
    res = restore(cfg, fresh, dest, "--all")
    assert res.returncode == 3, res.stderr
    assert "Traceback" not in res.stderr
    assert "checkpoint-8: the backup of checkpoint-8 is damaged" in res.stderr
    assert "restored 2 of 3 checkpoints" in res.stdout and "1 failed" in res.stdout
    # Nothing under checkpoint-8: what arrived whole of it is staged, with the command that drops it.
    assert sorted(os.listdir(fresh)) == [".ckptsync-staging-checkpoint-8", "checkpoint-12", "checkpoint-4"]
    assert "--checkpoint checkpoint-8 --discard-staged" in res.stderr
    assert_same(server / "checkpoint-4", fresh / "checkpoint-4")


def test_dry_run_lists_every_checkpoint_and_changes_nothing(setup):
    _server, dest, fresh, cfg = setup
    res = restore(cfg, fresh, dest, "--all", "--dry-run", ssh=False)
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if "would restore" in line]
    assert [next(n for n in NAMES if n in line) for line in lines[:3]] == NAMES
    assert "dry run: would restore 3 checkpoints" in res.stdout
    assert not fresh.exists()


@pytest.mark.parametrize("extra", [["--checkpoint", "checkpoint-8"], ["--discard-staged"], ["--extra-files-only"],
                                   ["--adapter-only"]])
def test_all_with_a_single_checkpoint_option_is_a_usage_error(tmp_path, extra):
    res = run_cli("restore", "--all", *extra, "--remote-dir", tmp_path / "run", "--local-dir", tmp_path / "b")
    assert res.returncode == 2, res.stderr
    assert f"cannot be combined with {extra[0]}" in res.stderr and "Traceback" not in res.stderr
