"""ckptsync prune: retention applied to the backup directory and, with --remote, to the server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import HANG, Gate, Lines, cli_env, run_cli, tree_digest

CKPTS = ("checkpoint-12", "checkpoint-8", "checkpoint-4")


def backup(source: Path, dest: Path, *args: str) -> Path:
    result = run_cli("backup", "--remote-dir", source, "--local-dir", dest, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return dest


@pytest.fixture
def store(tmp_path: Path, server_tree: Path) -> Path:
    return backup(server_tree, tmp_path / "backups", "--all")


def prune(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("prune", "--local-dir", store, *args)


def row(stdout: str, name: str) -> str:
    """The table line of one checkpoint."""
    lines = [line.strip() for line in stdout.splitlines() if f" {name} " in line]
    assert len(lines) == 1, stdout
    return lines[0]


def entries(store: Path) -> set[str]:
    return {p.name for p in store.iterdir() if not p.name.startswith(".")}


def manifests(store: Path) -> set[str]:
    return {p.stem for p in (store / ".ckptsync" / "manifests").glob("*.json")}


def snapshot(root: Path, *, lock: bool = True) -> tuple[dict, list[str]]:
    """Every file's bytes, mode and mtime, and every directory (the lock file's mtime optionally not)."""
    files = tree_digest(root)
    if not lock:
        files.pop(".ckptsync/lock", None)
    dirs = sorted(os.path.relpath(d, root) for d, _sub, _files in os.walk(root))
    return files, dirs


def test_keep_last_1_removes_older_with_reasons(store: Path) -> None:
    kept = tree_digest(store / "checkpoint-12")

    result = prune(store, "--keep-last", "1")

    assert result.returncode == 0, result.stdout + result.stderr
    assert row(result.stdout, "checkpoint-12").split()[0] == "keep"
    # checkpoint-12 is also the best (trainer_state.json): kept by default for that reason too
    assert row(result.stdout, "checkpoint-12").endswith("last 1; best; newest verified backup")
    for name in ("checkpoint-8", "checkpoint-4"):
        line = row(result.stdout, name)
        assert line.startswith("removed") and line.endswith("not matched by any rule")
    assert "removed 2 of 3 (checkpoint-4, checkpoint-8), kept 1; freed" in result.stdout
    assert entries(store) == {"checkpoint-12"}
    assert manifests(store) == {"checkpoint-12"}
    assert not (store / ".ckptsync" / "trash").exists()
    assert tree_digest(store / "checkpoint-12") == kept
    assert run_cli("verify", "--local-dir", store).returncode == 0


@pytest.mark.parametrize("args, kept", [
    (["--keep-last", "2"], {"checkpoint-12", "checkpoint-8"}),
    (["--keep-every", "8"], {"checkpoint-12", "checkpoint-8"}),
    (["--keep-within", "30m"], {"checkpoint-12"}),
    (["--keep-within", "45m", "--keep-best"], {"checkpoint-12", "checkpoint-8"}),
    (["--keep-last", "5"], set(CKPTS)),
])
def test_rules(store: Path, args: list[str], kept: set[str]) -> None:
    result = prune(store, *args, "--json")

    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {e["name"] for e in data["entries"] if e["keep"]} == kept
    assert sorted(data["removed"]) == sorted(set(CKPTS) - kept)
    assert entries(store) == kept


def test_reasons_in_json(store: Path) -> None:
    data = json.loads(prune(store, "--keep-every", "8", "--keep-best", "--json").stdout)
    reasons = {e["name"]: e["reasons"] for e in data["entries"]}
    assert reasons == {
        "checkpoint-12": ["best", "newest verified backup"],
        "checkpoint-8": ["milestone 8"],
        "checkpoint-4": ["not matched by any rule"],
    }
    assert data["side"] == "backups" and data["dry_run"] is False and data["exit_code"] == 0


def test_dry_run_changes_nothing(store: Path) -> None:
    before = snapshot(store)

    result = prune(store, "--keep-last", "1", "--dry-run")

    assert result.returncode == 0, result.stderr
    assert row(result.stdout, "checkpoint-4").split()[0] == "remove"
    assert "dry run: would remove 2 of 3 and keep 1, freeing" in result.stdout
    assert "nothing was changed" in result.stdout
    assert snapshot(store) == before


def test_extra_files_are_never_pruned(tmp_path: Path, server_tree: Path) -> None:
    config = tmp_path / "ckptsync.yaml"
    config.write_text("extra_files: [../../config_full_dataset.json]\n")
    dest = backup(server_tree, tmp_path / "backups", "--all", "--config", str(config))

    result = prune(dest, "--keep-last", "1", "--json")

    assert result.returncode == 0
    assert "extra-files" not in {e["name"] for e in json.loads(result.stdout)["entries"]}
    assert entries(dest) == {"checkpoint-12", "extra-files"}


def test_empty_policy_and_bad_duration_exit_2(store: Path) -> None:
    before = snapshot(store)
    empty = prune(store)
    assert empty.returncode == 2
    assert "refusing to prune with an empty policy" in empty.stderr
    bad = prune(store, "--keep-within", "7")
    assert bad.returncode == 2
    assert "has no unit" in bad.stderr
    assert snapshot(store) == before


def test_locked_store_exits_11(store: Path) -> None:
    import fcntl

    with open(store / ".ckptsync" / "lock", "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        result = prune(store, "--keep-last", "1")
    assert result.returncode == 11
    assert entries(store) == set(CKPTS)


def test_wait_waits_for_the_run_holding_the_lock(store: Path) -> None:
    import fcntl

    with open(store / ".ckptsync" / "lock", "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps({"pid": os.getpid(), "host": "test", "command": "ckptsync backup", "since": time.time()}))
        f.flush()
        proc = subprocess.Popen([sys.executable, "-m", "ckptsync", "prune", "--local-dir", str(store),
                                 "--keep-last", "1", "--wait"], env=cli_env(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = proc.stderr.readline()   # said once it found the lock taken, before blocking on it
        assert "waiting for 'ckptsync backup' (pid" in first, first
        assert entries(store) == set(CKPTS)
        fcntl.flock(f, fcntl.LOCK_UN)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    assert entries(store) == {"checkpoint-12"}


def test_leftovers_of_an_interrupted_prune(store: Path) -> None:
    """Moved to trash, manifest still there (or not): invisible, verifies, cleaned by the next run."""
    trash = store / ".ckptsync" / "trash"
    trash.mkdir()
    os.rename(store / "checkpoint-4", trash / "checkpoint-4.1")
    os.rename(store / "checkpoint-8", trash / "checkpoint-8.2")
    (store / ".ckptsync" / "manifests" / "checkpoint-8.json").unlink()
    (trash / "checkpoint-8.2" / "optimizer.pt").unlink()  # half deleted

    verify = run_cli("verify", "--local-dir", store)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "checkpoint-4" not in verify.stdout and "checkpoint-8" not in verify.stdout

    result = prune(store, "--keep-last", "5")
    assert result.returncode == 0, result.stderr
    assert not trash.exists()
    assert manifests(store) == {"checkpoint-12"}
    assert entries(store) == {"checkpoint-12"}


CLONES = 3  # later checkpoints, still there when a prune of the oldest is stopped


def add_clones(store: Path, count: int = CLONES) -> list[str]:
    """Back up `count` more checkpoints (checkpoint-100 ...): hard links of checkpoint-4's files
    under new names, each with its own manifest. Returns their names, oldest first."""
    template = json.loads((store / ".ckptsync" / "manifests" / "checkpoint-4.json").read_text())
    prefix = "checkpoint-4/"
    names = []
    for step in range(100, 100 + count):
        name = f"checkpoint-{step}"
        shutil.copytree(store / "checkpoint-4", store / name, copy_function=os.link)
        data = dict(template, name=name, step=step, is_best=False)
        data["files"] = [dict(f, path=name + "/" + f["path"][len(prefix):]) for f in template["files"]]
        data["resume_files"] = [name + "/" + r[len(prefix):] for r in template["resume_files"]]
        (store / ".ckptsync" / "manifests" / f"{name}.json").write_text(json.dumps(data))
        names.append(name)
    return names


PAUSED_CLI = Path(__file__).resolve().parent / "paused_cli.py"


def interrupt_at(where: str, match: str, sig: int, tmp: Path, *args: str | Path) -> tuple[int, str, str]:
    """Run the CLI held at the first call of `where` (module:function) on an argument containing
    `match`, send `sig` there, then let it go on; the exit code, stderr and where it was held."""
    gate = Gate(tmp / "gate")
    proc = subprocess.Popen([sys.executable, str(PAUSED_CLI), where, match, str(gate.dir), *map(str, args)],
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        err = Lines(proc.stderr)
        at = gate.reached().strip()
        proc.send_signal(sig)
        gate.release()
        proc.wait(timeout=HANG)
    finally:
        gate.release()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err.text(), at


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_prune_leaves_a_consistent_store(store: Path, tmp_path: Path, sig: int) -> None:
    clones = add_clones(store)
    whole = {name: tree_digest(store / name) for name in entries(store)}
    trash = store / ".ckptsync" / "trash"

    # The signal comes as checkpoint-4, the oldest, has been renamed into the trash and its files
    # are about to go; every later deletion is still to come.
    code, err, at = interrupt_at("ckptsync.stores.directory:remove_tree", "checkpoint-4", sig, tmp_path,
                                 "prune", "--local-dir", store, "--keep-last", "1")

    assert Path(at).parent == trash, at
    assert code == 130, err
    assert "Traceback" not in err
    stopped = [line for line in err.splitlines() if "prune interrupted: " in line]
    assert len(stopped) == 1 and "checkpoint-4" in stopped[0], err
    assert "was removed (what is left of it is cleaned by the next run)" in stopped[0]
    left = entries(store)
    assert left == {"checkpoint-12", "checkpoint-8", *clones}
    for name in left:   # what is visible is whole and recorded
        assert tree_digest(store / name) == whole[name], name
    assert left <= manifests(store)
    assert run_cli("verify", "--local-dir", store).returncode == 0

    again = prune(store, "--keep-last", "1")
    assert again.returncode == 0, again.stderr
    assert entries(store) == manifests(store) == {"checkpoint-12", clones[-1]}
    assert not trash.exists()


# ------------------------------------------------------------------ --remote


def remote_prune(server_tree: Path, dest: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("prune", "--remote", "--instance", "1", "--remote-dir", server_tree,
                   "--local-dir", dest, *args)


def test_remote_keeps_unbacked_checkpoints_unless_forced(ssh_home: Path, server_tree: Path,
                                                         tmp_path: Path) -> None:
    dest = backup(server_tree, tmp_path / "backups", "--instance", "1",
                  "--checkpoint", "checkpoint-12", "--checkpoint", "checkpoint-8")
    local = snapshot(dest, lock=False)
    before = snapshot(server_tree)

    dry = remote_prune(server_tree, dest, "--keep-last", "1", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert snapshot(server_tree) == before

    result = remote_prune(server_tree, dest, "--keep-last", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert row(result.stdout, "checkpoint-4").split()[0] == "keep"
    assert row(result.stdout, "checkpoint-4").endswith("no verified local backup")
    assert row(result.stdout, "checkpoint-8").startswith("removed")
    assert "kept without a verified local backup: checkpoint-4" in result.stderr
    assert sorted(p.name for p in server_tree.iterdir()) == ["checkpoint-12", "checkpoint-4"]
    assert snapshot(dest, lock=False) == local, "a remote prune must not change the backups"

    forced = remote_prune(server_tree, dest, "--keep-last", "1", "--force")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert row(forced.stdout, "checkpoint-4").startswith("removed")
    assert sorted(p.name for p in server_tree.iterdir()) == ["checkpoint-12"]


def test_remote_outdated_backup_is_not_verified(ssh_home: Path, server_tree: Path, tmp_path: Path) -> None:
    dest = backup(server_tree, tmp_path / "backups", "--instance", "1", "--all")
    scheduler = server_tree / "checkpoint-8" / "scheduler.pt"
    st = scheduler.stat()
    data = bytearray(scheduler.read_bytes())   # other bytes, same size and mtime: only the hash tells
    data[0] ^= 0xFF
    scheduler.write_bytes(bytes(data))
    os.utime(scheduler, ns=(st.st_atime_ns, st.st_mtime_ns))

    result = remote_prune(server_tree, dest, "--keep-last", "1", "--json")

    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["removed"] == ["checkpoint-4"]
    reasons = {e["name"]: e["reasons"] for e in data["entries"]}
    assert reasons["checkpoint-8"] == ["no verified local backup"]
    assert (server_tree / "checkpoint-8").is_dir() and not (server_tree / "checkpoint-4").exists()


def test_remote_never_deletes_a_checkpoint_in_progress(ssh_home: Path, server_tree: Path,
                                                       tmp_path: Path) -> None:
    dest = backup(server_tree, tmp_path / "backups", "--instance", "1", "--all")
    os.utime(server_tree / "checkpoint-4" / "README.md")   # written just now

    result = remote_prune(server_tree, dest, "--keep-last", "1", "--force")

    assert result.returncode == 0, result.stdout + result.stderr
    assert row(result.stdout, "checkpoint-4").endswith("in progress")
    assert row(result.stdout, "checkpoint-8").startswith("removed")
    assert sorted(p.name for p in server_tree.iterdir()) == ["checkpoint-12", "checkpoint-4"]
    assert not [p for p in server_tree.iterdir() if p.name.startswith(".ckptsync")]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_remote_signal_mid_prune_leaves_whole_checkpoints_and_a_rerun_finishes(
        ssh_home: Path, server_tree: Path, tmp_path: Path, sig: int) -> None:
    dest = backup(server_tree, tmp_path / "backups", "--instance", "1", "--all")
    # More checkpoints on the server (hard links of checkpoint-12's files, mtimes kept), not
    # backed up, hence --force.
    clones = [f"checkpoint-{step}" for step in range(100, 100 + CLONES)]
    for name in clones:
        shutil.copytree(server_tree / "checkpoint-12", server_tree / name, copy_function=os.link)
    complete = {p.name: tree_digest(p) for p in server_tree.iterdir()}

    # The signal comes as the agent is about to be asked to remove checkpoint-8: checkpoint-4, the
    # oldest, is gone; every later deletion is still to come.
    code, err, at = interrupt_at("ckptsync.server.agent_server:AgentServer.remove", "checkpoint-8", sig, tmp_path,
                                 "prune", "--remote", "--instance", "1", "--remote-dir", server_tree,
                                 "--local-dir", dest, "--keep-last", "1", "--force")

    assert at == "['checkpoint-8']"
    assert code == 130, err
    assert "prune interrupted: " in err and "Traceback" not in err
    visible = {p.name for p in server_tree.iterdir() if not p.name.startswith(".")}
    assert visible == {"checkpoint-8", "checkpoint-12", *clones}
    for name in visible:   # whatever is still visible under a checkpoint's name is whole
        assert tree_digest(server_tree / name) == complete[name], name
    assert run_cli("verify", "--local-dir", dest).returncode == 0

    again = remote_prune(server_tree, dest, "--keep-last", "1", "--force")
    assert again.returncode == 0, again.stdout + again.stderr
    assert {p.name for p in server_tree.iterdir()} == {"checkpoint-12", clones[-1]}  # no leftovers
