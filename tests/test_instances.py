"""Several instances in one command: -i 0 -i 1 -i 2 and --all-instances, over the real sshd."""

from __future__ import annotations

import json
import shutil

import pytest

from ckptsync.stores.directory import DirectoryStore
from helpers import run_cli, tree_digest
from test_cron import cli as cron_cli, fake  # noqa: F401 (fake is a fixture)


@pytest.fixture
def three(ssh_home, server_tree, tmp_path):
    """Instances 0 and 1 (tnr-0, tnr-1) each with a run of its own; instance 2's remote_dir does not exist."""
    other = tmp_path / "server-1" / "run"
    shutil.copytree(server_tree, other, copy_function=shutil.copy2)
    shutil.rmtree(other / "checkpoint-12")
    cfg = ssh_home / "ckptsync.yaml"
    cfg.write_text(json.dumps({
        "local_dir": str(tmp_path / "backups"), "settle_seconds": 60,
        "instances": {"0": {"host": "tnr-0", "remote_dir": str(server_tree)},
                      "1": {"host": "tnr-1", "remote_dir": str(other)},
                      "2": {"host": "tnr-2", "remote_dir": str(tmp_path / "gone")}}}))
    return cfg, server_tree, other, tmp_path / "backups"


def test_backup_of_three_instances_is_one_table_and_the_worst_exit_code(three):
    cfg, run0, run1, backups = three
    res = run_cli("backup", "-i", "0", "-i", "1", "-i", "2", "--config", cfg)
    assert res.returncode == 10, res.stderr  # instance 2's missing remote directory
    assert "Traceback" not in res.stderr
    assert tree_digest(backups / "instance-0" / "checkpoint-12") == tree_digest(run0 / "checkpoint-12")
    assert tree_digest(backups / "instance-1" / "checkpoint-8") == tree_digest(run1 / "checkpoint-8")
    assert not (backups / "instance-1" / "checkpoint-12").exists()
    rows = [line.split() for line in res.stdout.splitlines() if line.startswith("instance-")]
    assert [(r[0], r[1]) for r in rows] == [("instance-0", "0"), ("instance-1", "0"), ("instance-2", "10")]
    assert "instance-2: remote directory does not exist" in res.stderr
    for n in ("0", "1"):  # each its own status, as a single run would record it
        assert DirectoryStore(backups / f"instance-{n}").status().exit_code == 0


def test_all_instances_as_json_and_a_held_lock_is_that_instance_only(three):
    cfg, _run0, _run1, backups = three
    data = json.loads(cfg.read_text())
    del data["instances"]["2"]
    cfg.write_text(json.dumps(data))
    (backups / "instance-1").mkdir(parents=True)
    with DirectoryStore(backups / "instance-1").lock("another backup"):
        res = run_cli("backup", "--all-instances", "--config", cfg, "--json")
        assert res.returncode == 11, res.stderr
        out = json.loads(res.stdout)
        assert [(t["target"], t["exit_code"]) for t in out["targets"]] == [("instance-0", 0), ("instance-1", 11)]
        assert out["exit_code"] == 11 and out["targets"][1]["error"]["kind"] == "locked"
        assert out["targets"][0]["result"]["fetched"] == ["checkpoint-12", "checkpoint-8"]
        skipped = run_cli("backup", "--all-instances", "--config", cfg, "--skip-if-locked")
        assert skipped.returncode == 0, skipped.stderr
        assert "skipped (locked)" in skipped.stdout


def test_list_of_several_instances_shows_each_under_its_name(three):
    cfg, *_ = three
    res = run_cli("list", "-i", "0", "-i", "1", "--config", cfg)
    assert res.returncode == 0, res.stderr
    first, second = res.stdout.index("== instance-0 =="), res.stdout.index("== instance-1 ==")
    assert first < second
    assert "checkpoint-12" in res.stdout[first:second] and "checkpoint-12" not in res.stdout[second:]
    res = run_cli("list", "--all-instances", "--config", cfg, "--json")
    assert res.returncode == 10
    assert [t["exit_code"] for t in json.loads(res.stdout)["targets"]] == [0, 0, 10]


@pytest.mark.parametrize("args,needle", [
    (["-i", "0", "-i", "1", "--local-dir", "/tmp/x"], "--local-dir is the backup directory of one instance"),
    (["-i", "0", "--all-instances"], "not both"),
    (["-i", "0", "-i", "1", "--host", "tnr-0"], "--host names one server"),
    (["-i", "0", "-i", "1", "--discard-staged"], "--discard-staged clears one backup directory"),
])
def test_combinations_that_name_one_target_are_usage_errors(three, args, needle):
    cfg, *_ = three
    res = run_cli("backup", "--config", cfg, *args)
    assert res.returncode == 2 and needle in res.stderr, res.stderr


def test_all_instances_without_instances_in_the_config_is_a_usage_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("remote_dir: /srv/run\n")
    res = run_cli("list", "--all-instances", "--config", cfg)
    assert res.returncode == 2 and "no instances in" in res.stderr, res.stderr



def test_cron_install_of_two_instances_adds_one_entry_each(fake):
    env, table = fake
    res = cron_cli(env, "install", "-i", "1", "-i", "2", "--remote-dir", "runs/x")
    assert res.returncode == 0, res.stderr
    assert "== instance-1 ==" in res.stdout and "== instance-2 ==" in res.stdout
    text = table.read_text()
    for n in (1, 2):
        assert f"# ckptsync backup instance-{n} -> {env['HOME']}/ckpt-backups/instance-{n}" in text
        assert f"--instance {n}" in text
    assert text.count("-m ckptsync backup") == 2


def test_checklist_of_two_instances_is_each_ones_checklist_and_the_worst_exit(three):
    cfg, *_ = three
    assert run_cli("backup", "-i", "0", "-i", "1", "--config", cfg).returncode == 0
    alone = [run_cli("checklist", "-i", n, "--config", cfg).returncode for n in ("0", "1")]
    res = run_cli("checklist", "-i", "0", "-i", "1", "--config", cfg)
    assert res.returncode == max(alone), res.stderr
    assert res.stdout.count("pre-shutdown checklist") == 2
    verdicts = [line for line in res.stdout.splitlines() if line.startswith("instance-")]
    assert [v.split(":")[0] for v in verdicts] == ["instance-0", "instance-1"]
    assert all(v.endswith(("SAFE", "NOT SAFE")) for v in verdicts)
