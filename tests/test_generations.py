"""The seed trainers' habits, through a real sshd and the real CLI: reused names (latest.pt,
latest_backup.pt, best_model.pt), files that only look unchanged, and runs that move.

The CheckpointManager of seeds 001 and 004 renames latest.pt to latest_backup.pt and writes a
new latest.pt at every save; torch.save of same-shaped tensors gives files of the same size, and
a fast loop writes them within one mtime tick. The tests replay exactly that: same sizes, same
mtimes, different bytes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import time
from pathlib import Path

import pytest

from ckptsync.policy import CHANGED, CHECK, CURRENT, quick_check
from ckptsync.runs import newer_runs
from ckptsync.server import FileStat
from ckptsync.stores.manifest import FileRecord
from helpers import FIXTURES, file_sha256, run_cli, set_tree_mtime

SEED_STYLE = FIXTURES / "seed-style"
DATA_OFFSET = 10_400   # inside latest/data/0 of the fixture's torch zip: same size, other bytes
# Every file is written this long before the test runs: far past settle_seconds (60).
WRITTEN_AGO = 3600


def variant(src: Path, dest: Path, k: int, mtime_ns: int) -> None:
    """dest = src with a few tensor bytes changed (same size), with the given mtime."""
    data = bytearray(src.read_bytes())
    for i in range(16):
        data[DATA_OFFSET + i] = (data[DATA_OFFSET + i] + k) % 256
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_bytes(bytes(data))
    os.utime(tmp, ns=(mtime_ns, mtime_ns))
    os.replace(tmp, dest)


def rotate(run: Path, k: int, mtime_ns: int, new_best: bool) -> None:
    """One save of the seed manager: latest.pt -> latest_backup.pt, a new latest.pt; on a new best,
    best_model.pt -> best_model_previous.pt and a new best_model.pt."""
    os.replace(run / "latest.pt", run / "latest_backup.pt")
    variant(SEED_STYLE / "single_file" / "latest.pt", run / "latest.pt", k, mtime_ns)
    if new_best:
        os.replace(run / "best_model.pt", run / "best_model_previous.pt")
        variant(SEED_STYLE / "single_file" / "best_model.pt", run / "best_model.pt", k, mtime_ns)


def replayed(run: Path, tick: int, history: list[str]):
    """Three saves of the manager, all within one mtime tick (a new best at the 1st and 3rd);
    yields after each, with the new latest.pt's hash appended to history."""
    for k in (1, 2, 3):
        rotate(run, k, tick, new_best=k != 2)
        os.utime(run / "latest_backup.pt", ns=(tick, tick))
        history.append(file_sha256(run / "latest.pt"))
        yield k


def write_config(home: Path, remote_dir: Path, local_dir: Path, **extra) -> None:
    cfg = {"local_dir": str(local_dir), "remote_dir": str(remote_dir), "settle_seconds": 60, **extra}
    (home / "ckptsync.yaml").write_text(json.dumps(cfg))


def cli(home: Path, *args: str):
    return run_cli(*args, "-i", "1", "--config", str(home / "ckptsync.yaml"))


def cli_json(home: Path, *args: str) -> dict:
    res = cli(home, *args, "--json")
    assert res.returncode in (0, 3), res.stdout + res.stderr
    return json.loads(res.stdout)


def seed_tree(tmp_path: Path) -> Path:
    """A copy of the seed-style single-file run, written well before now."""
    run = tmp_path / "server" / "project" / "checkpoints"
    shutil.copytree(SEED_STYLE / "single_file", run)
    for p in run.iterdir():
        os.chmod(p, 0o644)
    set_tree_mtime(run, time.time() - WRITTEN_AGO)
    return run


@pytest.fixture
def seed_run(ssh_home: Path, tmp_path: Path):
    """The seed-style single-file run on the server, and its backup directory."""
    run = seed_tree(tmp_path)
    dest = tmp_path / "backups"
    write_config(ssh_home, run, dest)
    return run, dest / "instance-1", ssh_home


def entries(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir() if not p.name.startswith("."))


def test_a_touch_of_every_file_sends_nothing_and_creates_no_entry(seed_run):
    run, dest, home = seed_run
    first = cli_json(home, "backup", "--all")
    assert first["exit_code"] == 0 and len(first["fetched"]) == 14
    before = entries(dest)
    later = time.time() - WRITTEN_AGO / 2
    for p in run.iterdir():
        os.utime(p, (later, later))

    second = cli_json(home, "backup", "--all")
    assert second["fetched"] == [] and second["raw_bytes"] == 0 and second["wire_bytes"] == 0
    assert sorted(second["restamped"]) == sorted(first["fetched"])
    assert entries(dest) == before          # no .replaced- copy, no new entry
    assert not (dest / ".ckptsync" / "generations").exists()
    for p in run.iterdir():                 # the local copies and the manifests take the new mtime
        man = json.loads((dest / ".ckptsync" / "manifests" / f"{p.name}.json").read_text())
        assert man["files"][0]["mtime_ns"] == p.stat().st_mtime_ns == (dest / p.name).stat().st_mtime_ns
    verify = cli_json(home, "verify")
    assert verify["exit_code"] == 0 and verify["warnings"] == []
    assert cli_json(home, "backup", "--all")["restamped"] == []   # and the next run has nothing to do


def test_rotations_keep_the_previous_generations_verified_listed_and_restorable(seed_run, tmp_path):
    run, dest, home = seed_run
    assert cli_json(home, "backup", "--all")["exit_code"] == 0
    # The manager writes within one mtime tick: sizes and mtimes of the rotated names never change.
    tick = (dest / "latest.pt").stat().st_mtime_ns
    history = [file_sha256(run / "latest.pt")]
    for k in replayed(run, tick, history):
        result = cli_json(home, "backup", "--all")
        assert result["exit_code"] == 0, result
        # The renamed file kept size and mtime of the old latest_backup.pt entry: only its inode
        # and ctime tell, and its bytes are stored, not "up to date".
        assert "latest_backup.pt" in result["fetched"]
        for name in ("latest.pt", "latest_backup.pt", "best_model.pt", "best_model_previous.pt"):
            assert file_sha256(dest / name) == file_sha256(run / name), (k, name)
    assert not [n for n in entries(dest) if ".replaced-" in n]

    listed = cli_json(home, "list", "--generations")
    gens = listed["generations"]
    assert [g["index"] for g in gens["latest.pt"]] == [1, 2]          # keep_generations: 2
    assert len(gens["best_model.pt"]) == 2
    text = cli(home, "list", "--generations")
    assert text.returncode == 0 and "earlier versions" in text.stdout and "latest.pt" in text.stdout
    verify = cli_json(home, "verify")
    names = [e["name"] for e in verify["entries"]]
    assert verify["exit_code"] == 0 and sum(n.startswith("latest.pt@") for n in names) == 2

    # Generation 1 of latest.pt is what the server had as latest.pt before the last rotation.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    res = run_cli("restore", "-i", "1", "--config", str(home / "ckptsync.yaml"), "--remote-dir", str(fresh),
                  "--checkpoint", "latest.pt", "--generation", "1", "--no-extra-files")
    assert res.returncode == 0, res.stdout + res.stderr
    assert file_sha256(fresh / "latest.pt") == history[-2]
    assert "generation" in res.stdout


def test_the_readme_commands_for_generations_work_as_pasted(seed_run):
    """The README's `sh` block on generations is about a seed-style run: run it on one, after a rotation."""
    run, dest, home = seed_run
    cli_json(home, "backup", "--all")
    rotate(run, 1, (run / "latest.pt").stat().st_mtime_ns, new_best=False)
    cli_json(home, "backup", "--all")
    before = file_sha256(dest / ".ckptsync" / "generations" / "latest.pt" /
                         next(p.name for p in (dest / ".ckptsync" / "generations" / "latest.pt").iterdir()
                              if p.is_dir()) / "latest.pt")
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = [ln.split(" #", 1)[0].strip() for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S)
             if "--generation" in block for ln in block.splitlines() if ln.startswith("ckptsync ")]
    assert len(lines) == 2
    for line in lines:
        args = [a for a in shlex.split(line)[1:]]
        args[args.index("-i") + 1] = "1"
        res = run_cli(*args, "--config", str(home / "ckptsync.yaml"))
        assert res.returncode == 0, f"{line}\n{res.stdout}\n{res.stderr}"
    assert file_sha256(run / "latest.pt") == before


def test_a_damaged_generation_fails_verify(seed_run):
    run, dest, home = seed_run
    cli_json(home, "backup", "--all")
    rotate(run, 1, (run / "latest.pt").stat().st_mtime_ns, new_best=False)
    cli_json(home, "backup", "--all")
    [kept] = (dest / ".ckptsync" / "generations" / "latest.pt").glob("*/latest.pt")
    data = bytearray(kept.read_bytes())
    data[DATA_OFFSET] ^= 0xFF
    os.chmod(kept, 0o644)
    kept.write_bytes(bytes(data))
    res = cli(home, "verify")
    assert res.returncode == 30 and "latest.pt@" in res.stdout + res.stderr


def test_replaced_copies_of_older_versions_are_adopted_as_generations(seed_run):
    run, dest, home = seed_run
    cli_json(home, "backup", "--all")
    old = dest / "latest.pt.replaced-20260101-120000"
    shutil.copy2(dest / "latest.pt", old)
    warned = cli(home, "list")
    assert "not made by ckptsync" in warned.stdout + warned.stderr
    rotate(run, 1, (run / "latest.pt").stat().st_mtime_ns, new_best=False)
    res = cli(home, "backup", "--all")
    assert res.returncode == 0 and "adopted 1 older copies" in res.stdout + res.stderr
    assert not old.exists()
    listed = cli_json(home, "list", "--generations")
    assert listed["unmanaged"] == []
    ids = [g["id"] for g in listed["generations"]["latest.pt"]]
    assert len(ids) == 2 and any(i.startswith("20260101") or i.startswith("20251231") for i in ids)


def test_prune_keep_generations(seed_run):
    run, dest, home = seed_run
    cli_json(home, "backup", "--all")
    tick = (run / "latest.pt").stat().st_mtime_ns
    for k in (1, 2):
        rotate(run, k, tick, new_best=False)
        cli_json(home, "backup", "--all")
    dry = cli_json(home, "prune", "--keep-generations", "1", "--dry-run")
    assert dry["dry_run"] and len([g for g in dry["generations"] if g.startswith("latest.pt@")]) == 1
    assert len(cli_json(home, "list", "--generations")["generations"]["latest.pt"]) == 2
    done = cli_json(home, "prune", "--keep-generations", "1")
    assert done["exit_code"] == 0 and done["freed_bytes"] > 0
    assert len(cli_json(home, "list", "--generations")["generations"]["latest.pt"]) == 1
    assert entries(dest) == sorted(p.name for p in run.iterdir())   # no entry was touched


def test_a_run_moved_to_a_new_directory_is_named_checked_and_followed(ssh_home, tmp_path):
    project = tmp_path / "server" / "project"
    old, new = project / "checkpoints", project / "checkpoints_run_20261201_101500"
    shutil.copytree(SEED_STYLE / "step_dirs", old)
    shutil.copytree(SEED_STYLE / "step_dirs", new)
    for d in (old, new):
        for p in d.rglob("*"):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        set_tree_mtime(d, time.time() - WRITTEN_AGO)
    dest = tmp_path / "backups"
    write_config(ssh_home, old, dest)
    assert cli_json(ssh_home, "backup", "--all")["exit_code"] == 0

    listed = cli(ssh_home, "list")
    assert listed.returncode == 0
    assert str(new) in listed.stdout + listed.stderr and "--follow-runs" in listed.stdout + listed.stderr
    runs = cli_json(ssh_home, "list")["runs"]
    assert [r["name"] for r in runs] == [new.name] and not runs[0]["covered"]

    check = cli_json(ssh_home, "checklist")
    failing = [c for c in check["checks"] if not c["ok"]]
    run_check = next(c for c in failing if c["name"] == "newer run backed up")
    assert "--follow-runs" in run_check["fix"] and check["exit_code"] != 0

    followed = cli_json(ssh_home, "backup", "--follow-runs")
    assert followed["exit_code"] == 0 and followed["runs"] and followed["runs"][0]["fetched"]
    sub = dest / "instance-1" / new.name
    assert (sub / ".ckptsync" / "manifests").is_dir()
    for name in followed["runs"][0]["fetched"]:
        assert (sub / name).is_dir()
    check = cli_json(ssh_home, "checklist")
    assert all(c["ok"] for c in check["checks"] if "newer run" in c["name"])
    assert cli_json(ssh_home, "list")["unmanaged"] == []   # the run's own store is not a stray entry


# ---------------------------------------------------------------- the pure rules


def rec(path, size=10, mtime=100, mode=0o644, ctime=0, inode=0):
    return FileRecord(path=path, size=size, mode=mode, mtime_ns=mtime, xxh3_128="x", ctime_ns=ctime, inode=inode)


@pytest.mark.parametrize("server,legacy,want", [
    ({"a": FileStat("a", 10, 100, 0o644, 5, 7)}, CURRENT, (CURRENT, [])),
    ({"a": FileStat("a", 11, 100, 0o644, 5, 7)}, CURRENT, (CHANGED, [])),        # size
    ({"b": FileStat("b", 10, 100, 0o644, 5, 7)}, CURRENT, (CHANGED, [])),        # another path
    ({"a": FileStat("a", 10, 200, 0o644, 5, 7)}, CURRENT, (CHECK, ["a"])),       # touch
    ({"a": FileStat("a", 10, 100, 0o600, 5, 7)}, CURRENT, (CHECK, ["a"])),       # chmod
    ({"a": FileStat("a", 10, 100, 0o644, 5, 8)}, CURRENT, (CHECK, ["a"])),       # renamed over
    ({"a": FileStat("a", 10, 100, 0o644, 6, 7)}, CURRENT, (CHECK, ["a"])),       # rewritten in place
])
def test_quick_check(server, legacy, want):
    assert quick_check([rec("a", ctime=5, inode=7)], server, legacy) == want


def test_quick_check_of_records_made_before_inodes_were_kept():
    server = {"a": FileStat("a", 10, 100, 0o644, 5, 7)}
    assert quick_check([rec("a")], server, CURRENT) == (CURRENT, [])
    assert quick_check([rec("a")], server, CHECK) == (CHECK, ["a"])
    assert quick_check(None, server) == (CHANGED, [])


def test_newer_runs():
    found = ["checkpoints", "checkpoints_run_20261201_101500", "checkpoints_run_20261101_000000",
             "other_run_20261201_101500", "extra"]
    assert newer_runs("checkpoints", found, []) == ["checkpoints_run_20261201_101500",
                                                    "checkpoints_run_20261101_000000"]
    assert newer_runs("checkpoints_run_20261101_000000", found, []) == ["checkpoints_run_20261201_101500"]
    assert newer_runs("checkpoints", found, ["extra"]) == ["checkpoints_run_20261201_101500",
                                                           "checkpoints_run_20261101_000000", "extra"]


def test_files_that_only_look_changed_are_hashed_once_per_run(tmp_path):
    """Backup plans twice (before and under the lock); the doubtful files are hashed on the server once."""
    from ckptsync.backup import BackupOptions, run_backup
    from ckptsync.server.inprocess import Hooks, InProcessServer
    from test_server_boundary import always, make_target

    run = tmp_path / "checkpoints"
    shutil.copytree(SEED_STYLE / "single_file", run)
    for p in run.iterdir():
        os.chmod(p, 0o644)
    set_tree_mtime(run, time.time() - WRITTEN_AGO)
    dest = tmp_path / "b"
    assert run_backup(make_target(run, dest), BackupOptions(all=True), connect=always(InProcessServer())).exit_code == 0
    later = time.time() - WRITTEN_AGO / 2
    for p in run.iterdir():
        os.utime(p, (later, later))
    hashed = []
    hooks = Hooks()
    hooks.on_before("hash", lambda args: hashed.extend(args["paths"]))
    result = run_backup(make_target(run, dest), BackupOptions(all=True), connect=always(InProcessServer(hooks)))
    assert result.exit_code == 0 and len(result.restamped) == 14 and result.raw_bytes == 0
    assert sorted(hashed) == sorted(p.name for p in run.iterdir())
