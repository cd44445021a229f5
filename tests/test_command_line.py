"""What a user types: --config before the command, --extra-file, checkpoint names as shell
completion leaves them (`checkpoint-8/`) or as a bare step (`8`)."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

from helpers import run_cli

CONFIG = "../../config_full_dataset.json"
DEEPSPEED = "../../deepspeed_config.json"


def ok(res) -> None:
    assert res.returncode == 0, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr


def test_config_before_the_command_works_like_after_it(ssh_home, server_tree, tmp_path):
    cfg = tmp_path / "team.yaml"
    cfg.write_text(json.dumps({"local_dir": str(tmp_path / "backups"), "remote_dir": str(server_tree),
                               "instances": {"5": {"host": "tnr-1"}}}))
    res = run_cli("--config", cfg, "backup", "-i", "5", "--checkpoint", "checkpoint-12")
    ok(res)
    assert (tmp_path / "backups" / "instance-5" / "checkpoint-12" / "trainer_state.json").is_file()
    listed = run_cli("--config", cfg, "--json", "list", "-i", "5", "--local")
    ok(listed)
    assert [c["name"] for c in json.loads(listed.stdout)["checkpoints"]] == ["checkpoint-12"]


def test_extra_files_given_on_the_command_line(server_tree, tmp_path):
    backups = tmp_path / "backups"
    res = run_cli("backup", "--remote-dir", server_tree, "--local-dir", backups, "--checkpoint", "checkpoint-12",
                  "--extra-file", CONFIG, "--extra-file", DEEPSPEED)
    ok(res)
    top = server_tree.parents[1]
    for name in ("config_full_dataset.json", "deepspeed_config.json"):
        assert filecmp.cmp(backups / "extra-files" / name, top / name, shallow=False)
    # The checklist compares the extra files it is given with the backup's copies.
    check = run_cli("checklist", "--remote-dir", server_tree, "--local-dir", backups, "--training-stopped",
                    "--extra-file", DEEPSPEED)
    assert "[ok]   extra files backed up: 1 file(s)" in check.stdout, check.stdout
    (top / "deepspeed_config.json").write_text("{}")
    check = run_cli("checklist", "--remote-dir", server_tree, "--local-dir", backups, "--training-stopped",
                    "--extra-file", DEEPSPEED)
    said = " ".join(check.stdout.split())   # long lines fold at the width of the terminal, if any
    assert check.returncode == 3 and f"{DEEPSPEED}: changed since the backup" in said, check.stdout
    # A restore puts back only the extra files named.
    fresh = tmp_path / "fresh"
    res = run_cli("restore", "--remote-dir", fresh / "run", "--local-dir", backups,
                  "--extra-files-to", fresh / "configs", "--extra-file", "config_full_dataset.json")
    ok(res)
    assert sorted(p.name for p in (fresh / "configs").iterdir()) == ["config_full_dataset.json"]
    res = run_cli("restore", "--remote-dir", fresh / "other", "--local-dir", backups, "--extra-file", "nope.json")
    assert res.returncode == 10 and "no backed-up extra file nope.json" in res.stderr, res.stderr
    assert not (fresh / "other").exists()


def test_checkpoint_names_with_a_trailing_slash_or_as_a_step(server_tree, tmp_path):
    backups = tmp_path / "backups"
    ok(run_cli("backup", "--remote-dir", server_tree, "--local-dir", backups, "--checkpoint", "checkpoint-8/"))
    assert sorted(p.name for p in backups.iterdir() if not p.name.startswith(".")) == ["checkpoint-8"]
    ok(run_cli("backup", "--remote-dir", server_tree, "--local-dir", backups, "--checkpoint", "4"))
    assert (backups / "checkpoint-4").is_dir()
    shown = run_cli("show", "8", "--local-dir", backups)
    ok(shown)
    assert shown.stdout.startswith("checkpoint-8"), shown.stdout
    ok(run_cli("show", "checkpoint-8/", "--local-dir", backups))
    verified = run_cli("verify", "checkpoint-4/", "--local-dir", backups)
    remote = run_cli("verify", "--remote", "8", "--remote-dir", server_tree, "--local-dir", backups)
    assert remote.returncode == 0 and "checkpoint-8" in remote.stdout, (remote.stdout, remote.stderr)
    ok(verified)
    assert "checkpoint-4" in verified.stdout and "checkpoint-8" not in verified.stdout
    compared = run_cli("--json", "compare", "4", "checkpoint-8/", "--local-dir", backups)
    ok(compared)
    assert (json.loads(compared.stdout)["a"], json.loads(compared.stdout)["b"]) == ("checkpoint-4", "checkpoint-8")
    fresh = tmp_path / "fresh" / "run"
    ok(run_cli("restore", "--remote-dir", fresh, "--local-dir", backups, "--checkpoint", "checkpoint-4/"))
    assert (fresh / "checkpoint-4" / "trainer_state.json").is_file()
    # A step that names no checkpoint is still "not found", with the names there are.
    res = run_cli("show", "5", "--local-dir", backups)
    assert res.returncode == 10 and "5 is not in the backup directory" in res.stderr and "checkpoint-8" in res.stderr
