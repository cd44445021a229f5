"""Backups made by the scripts ckptsync replaces: plain checkpoint-N/ directories and the config
files beside them (the seed guide's backups/socrates-checkpoints/), taken over by `adopt`."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from helpers import run_cli, set_tree_mtime, tree_digest

CONFIGS = ("config_full_dataset.json", "deepspeed_config.json")
EXTRAS = [f"../../{name}" for name in CONFIGS]


@pytest.fixture
def old_backups(server_tree: Path, tmp_path: Path) -> Path:
    """What the old backup script left: two checkpoints (times kept, as tar keeps them), one the
    server no longer has, one whose optimizer.pt was cut short, and the configs at the top."""
    old = tmp_path / "old-backups" / "socrates-checkpoints"
    old.mkdir(parents=True)
    for name in ("checkpoint-8", "checkpoint-12"):
        shutil.copytree(server_tree / name, old / name, copy_function=shutil.copy2)
    shutil.copytree(server_tree / "checkpoint-4", old / "checkpoint-2", copy_function=shutil.copy2)
    state = json.loads((old / "checkpoint-2" / "trainer_state.json").read_text())
    state["global_step"] = 2
    (old / "checkpoint-2" / "trainer_state.json").write_text(json.dumps(state))
    cut = old / "checkpoint-8" / "optimizer.pt"
    st = cut.stat()
    with open(cut, "r+b") as f:
        f.truncate(st.st_size // 2)
    for name in CONFIGS:
        shutil.copy2(server_tree.parents[1] / name, old / name)
    for path in (old / "checkpoint-2", cut):   # written an hour ago, as old copies are
        set_tree_mtime(path, time.time() - 3600)
    return old


def test_list_before_adopting_says_what_to_run(old_backups):
    res = run_cli("list", "--local", "--local-dir", old_backups)
    assert res.returncode == 0, res.stderr
    assert "no checkpoints found" not in res.stdout
    assert (f"warning: 3 directories look like checkpoints made without ckptsync (checkpoint-12, checkpoint-2, "
            f"checkpoint-8): run ckptsync adopt {old_backups}") in res.stderr


def test_adopt_checks_against_the_server_and_the_next_backup_fetches_only_what_differs(
        ssh_home, server_tree, old_backups):
    target = ("--host", "tnr-1", "--remote-dir", server_tree)
    extras = [w for e in EXTRAS for w in ("--extra-file", e)]
    dry = run_cli("adopt", old_backups, *target, *extras, "--dry-run")
    assert dry.returncode == 3, dry.stderr
    assert not (old_backups / ".ckptsync" / "manifests").exists()

    res = run_cli("--json", "adopt", old_backups, *target, *extras)
    assert res.returncode == 3, res.stderr   # a copy differs from the server's
    data = json.loads(res.stdout)
    server = {a["name"]: (a["server"], a["differs"]) for a in data["adopted"]}
    assert server == {"checkpoint-12": ("same", []), "checkpoint-8": ("differs", ["checkpoint-8/optimizer.pt"]),
                      "checkpoint-2": ("not on the server", [])}
    assert sorted(data["extra_files"]) == EXTRAS
    assert sorted(p.name for p in (old_backups / "extra-files").iterdir()) == list(CONFIGS)

    listed = json.loads(run_cli("--json", "list", "--local", "--local-dir", old_backups).stdout)
    assert [r["name"] for r in listed["checkpoints"]] == ["checkpoint-12", "checkpoint-8", "checkpoint-2"]
    assert listed["unmanaged"] == []
    assert run_cli("verify", "--local-dir", old_backups).returncode == 0   # the manifests hold what is there

    kept = tree_digest(old_backups / "checkpoint-12")
    backup = run_cli("--json", "backup", "--all", *target, "--local-dir", old_backups, *extras)
    assert backup.returncode == 0, backup.stderr
    done = json.loads(backup.stdout)
    # the copy that differed, and the checkpoint the old backups never had; nothing they held
    assert sorted(done["fetched"]) == ["checkpoint-4", "checkpoint-8"]
    actions = {p["name"]: p["action"] for p in done["plan"]}
    assert actions["checkpoint-12"] in ("up-to-date", "restamp") and actions["extra-files"] in ("up-to-date", "restamp")
    assert tree_digest(old_backups / "checkpoint-12") == kept
    assert (old_backups / "checkpoint-8" / "optimizer.pt").read_bytes() == \
        (server_tree / "checkpoint-8" / "optimizer.pt").read_bytes()
    gens = json.loads(run_cli("--json", "list", "--local", "--generations", "--local-dir", old_backups).stdout)
    assert list(gens["generations"]) == ["checkpoint-8"]   # the adopted copy, kept


def test_adopt_without_a_server_only_hashes(old_backups):
    res = run_cli("adopt", old_backups, env={"COLUMNS": "80"})
    assert res.returncode == 0, res.stderr
    assert "adopted 3 checkpoint(s)" in res.stdout
    again = run_cli("adopt", old_backups)
    assert again.returncode == 0 and "nothing to adopt" in again.stdout
