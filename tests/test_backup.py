"""`ckptsync list` and `ckptsync backup` end to end, through a real sshd."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import HANG, REPO_ROOT, ROOT, Lines, cli_env, file_sha256, open_for_writing, run_cli, tree_digest
from relay import Relay, relay_alias

EXTRA = ["../../config_full_dataset.json", "../../deepspeed_config.json"]


def write_config(home: Path, remote_dir: Path, local_dir: Path, **extra) -> Path:
    cfg = {
        "local_dir": str(local_dir),
        "remote_dir": str(remote_dir),
        "extra_files": EXTRA,
        "settle_seconds": 60,
        **extra,
    }
    path = home / "ckptsync.yaml"
    path.write_text(json.dumps(cfg))  # JSON is valid YAML
    return path


def manifest(dest: Path, name: str) -> dict:
    return json.loads((dest / ".ckptsync" / "manifests" / f"{name}.json").read_text())


def assert_same_as_server(server_ckpt: Path, local_ckpt: Path, man: dict, name: str) -> None:
    """Bytes and modes identical; mtimes identical to the server in the manifest, and on disk
    for files that are not hard-linked to another checkpoint's identical copy."""
    records = {r["path"]: r for r in man["files"]}
    server_files = sorted(p.relative_to(server_ckpt).as_posix() for p in server_ckpt.rglob("*") if p.is_file())
    assert sorted(k.split("/", 1)[1] for k in records) == server_files
    for rel in server_files:
        s, l = server_ckpt / rel, local_ckpt / rel
        st_s, st_l = s.stat(), l.stat()
        assert file_sha256(s) == file_sha256(l), rel
        assert (st_s.st_mode & 0o7777) == (st_l.st_mode & 0o7777), rel
        rec = records[f"{name}/{rel}"]
        assert rec["mtime_ns"] == st_s.st_mtime_ns, rel
        assert rec["size"] == st_s.st_size
        if st_l.st_nlink == 1:
            assert st_l.st_mtime_ns == st_s.st_mtime_ns, rel


@pytest.fixture
def setup(ssh_home, server_tree, tmp_path):
    dest = tmp_path / "backups"
    write_config(ssh_home, server_tree, dest)
    return server_tree, dest / "instance-1", ssh_home


def cfg_args(home: Path) -> list[str]:
    return ["--config", str(home / "ckptsync.yaml")]


def test_list_shows_fixture_checkpoints_over_ssh(setup):
    server, dest, home = setup
    res = run_cli("list", "--instance", "1", *cfg_args(home), "--json")
    assert res.returncode == 0, res.stderr
    rows = {r["name"]: r for r in json.loads(res.stdout)["checkpoints"]}
    assert set(rows) == {"checkpoint-4", "checkpoint-8", "checkpoint-12"}
    assert [r["name"] for r in json.loads(res.stdout)["checkpoints"]] == ["checkpoint-12", "checkpoint-8", "checkpoint-4"]
    assert rows["checkpoint-12"]["step"] == 12 and rows["checkpoint-12"]["is_best"]
    assert all(r["complete"] and r["resumable"] and r["backup"] == "no" for r in rows.values())
    assert rows["checkpoint-4"]["kind"] == "rolling"

    human = run_cli("list", "--instance", "1", *cfg_args(home))
    assert human.returncode == 0
    assert "checkpoint-12" in human.stdout and "* best checkpoint" in human.stdout
    assert "on the server: 3," in human.stdout


def test_list_marks_in_progress(setup):
    server, dest, home = setup
    (server / "checkpoint-12" / "trainer_state.json").unlink()
    touched = time.time() - 1   # a second ago: nothing writes it
    os.utime(server / "checkpoint-4" / "optimizer.pt", (touched, touched))
    with open_for_writing(server / "checkpoint-8" / "optimizer.pt"):
        listed = run_cli("list", "-i", "1", *cfg_args(home), "--json")
    rows = {r["name"]: r for r in json.loads(listed.stdout)["checkpoints"]}
    assert rows["checkpoint-12"]["complete"] is False
    assert "trainer_state.json" in rows["checkpoint-12"]["reason"]
    assert rows["checkpoint-8"]["complete"] is False
    assert "optimizer.pt is open for writing" in rows["checkpoint-8"]["reason"]
    assert rows["checkpoint-4"]["complete"] is True   # where writers are seen, settle_seconds is not waited for


def test_backup_newest_two_plus_extras_then_noop(setup):
    server, dest, home = setup
    res = run_cli("backup", "--instance", "1", *cfg_args(home))
    assert res.returncode == 0, res.stderr + res.stdout
    assert "fetched 3" in res.stdout
    assert sorted(p.name for p in dest.iterdir()) == [".ckptsync", "checkpoint-12", "checkpoint-8", "extra-files"]
    for name in ("checkpoint-12", "checkpoint-8"):
        assert_same_as_server(server / name, dest / name, manifest(dest, name), name)
    run_root = server.parent.parent
    for cfg in ("config_full_dataset.json", "deepspeed_config.json"):
        assert (dest / "extra-files" / cfg).read_bytes() == (run_root / cfg).read_bytes()
    m = manifest(dest, "checkpoint-12")
    assert m["resumable"] and m["step"] == 12 and "checkpoint-12/optimizer.pt" in m["resume_files"]
    status = json.loads((dest / ".ckptsync" / "status.json").read_text())
    assert status["ok"] and status["fetched"] == ["checkpoint-12", "checkpoint-8", "extra-files"]

    before = tree_digest(dest / "checkpoint-12")
    again = run_cli("backup", "--instance", "1", *cfg_args(home))
    assert again.returncode == 0
    assert again.stdout.startswith("up to date: checkpoint-12, checkpoint-8, extra-files")
    status = json.loads((dest / ".ckptsync" / "status.json").read_text())
    assert status["fetched"] == [] and status["raw_bytes"] == 0   # nothing was sent again
    assert tree_digest(dest / "checkpoint-12") == before

    listed = {r["name"]: r for r in json.loads(run_cli("list", "-i", "1", *cfg_args(home), "--json").stdout)["checkpoints"]}
    assert listed["checkpoint-12"]["backup"] == "yes" and listed["checkpoint-4"]["backup"] == "no"
    local = {r["name"]: r for r in json.loads(run_cli("list", "-i", "1", "--local", *cfg_args(home), "--json").stdout)["checkpoints"]}
    assert set(local) == {"checkpoint-12", "checkpoint-8"}


def test_backup_skips_in_progress_and_says_why(setup):
    """A file a process holds open for writing keeps its checkpoint back, however old it is."""
    server, dest, home = setup
    with open_for_writing(server / "checkpoint-12" / "optimizer.pt"):
        res = run_cli("backup", "-i", "1", *cfg_args(home), "--json")
    assert res.returncode == 0
    out = json.loads(res.stdout)
    assert out["fetched"] == ["checkpoint-8", "checkpoint-4", "extra-files"]
    skipped = [p for p in out["plan"] if p["action"] == "skip"]
    assert skipped[0]["name"] == "checkpoint-12" and "optimizer.pt is open for writing" in skipped[0]["reason"]
    assert not (dest / "checkpoint-12").exists()


def test_dry_run_changes_nothing(setup):
    server, dest, home = setup
    res = run_cli("backup", "-i", "1", *cfg_args(home), "--dry-run")
    assert res.returncode == 0
    assert "would fetch checkpoint-12" in res.stdout and "nothing was changed" in res.stdout
    assert not dest.exists()
    run_cli("backup", "-i", "1", *cfg_args(home), "--checkpoint", "checkpoint-4")
    before = tree_digest(dest)
    res = run_cli("backup", "-i", "1", *cfg_args(home), "--all", "--dry-run", "--json")
    plan = {p["name"]: p["action"] for p in json.loads(res.stdout)["plan"]}
    assert plan == {"checkpoint-12": "fetch", "checkpoint-8": "fetch", "checkpoint-4": "up-to-date",
                    "extra-files": "up-to-date"}
    assert tree_digest(dest) == before


def test_named_checkpoint_in_progress_exits_3(setup):
    server, dest, home = setup
    (server / "checkpoint-12" / "trainer_state.json").unlink()
    res = run_cli("backup", "-i", "1", *cfg_args(home), "--checkpoint", "checkpoint-12", "--checkpoint", "checkpoint-8")
    assert res.returncode == 3, res.stderr
    assert "checkpoint-12: in progress: trainer_state.json not written yet" in res.stderr
    assert (dest / "checkpoint-8").is_dir() and not (dest / "checkpoint-12").exists()


def test_named_checkpoint_missing_exits_10(setup):
    server, dest, home = setup
    res = run_cli("backup", "-i", "1", *cfg_args(home), "--checkpoint", "checkpoint-99")
    assert res.returncode == 10
    assert "checkpoint-99" in res.stderr and "checkpoint-12" in res.stderr


def test_second_run_exits_11_while_locked_and_wait_works(setup):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ckptsync.stores.directory import DirectoryStore

    server, dest, home = setup
    store = DirectoryStore(dest)
    with store.lock("ckptsync backup (test holder)"):
        res = run_cli("backup", "-i", "1", *cfg_args(home))
        assert res.returncode == 11
        assert "in use by 'ckptsync backup (test holder)'" in res.stderr
        waiting = subprocess.Popen(
            [sys.executable, "-m", "ckptsync", "backup", "-i", "1", *cfg_args(home), "--wait"],
            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = Lines(waiting.stdout), Lines(waiting.stderr)
        try:
            # It says so just before it blocks on the lock this test holds: it cannot have gone on.
            assert "waiting for 'ckptsync backup (test holder)'" in err.wait_for("waiting for")
            assert waiting.poll() is None and not (dest / "checkpoint-12").exists()
        except BaseException:
            waiting.kill()
            raise
    assert waiting.wait(HANG) == 0, err.text()
    assert "fetched" in out.text() and (dest / "checkpoint-12").is_dir()


def big_checkpoint(server: Path, mb: int = 160) -> None:
    """Add a large, poorly compressible file so a transfer takes long enough to interrupt."""
    block = os.urandom(1 << 20)
    with open(server / "checkpoint-12" / "zz_large_shard.bin", "wb") as f:
        for i in range(mb):
            f.write(block[i % 7:] + block[: i % 7])
    old = time.time() - 1200
    os.utime(server / "checkpoint-12" / "zz_large_shard.bin", (old, old))


def test_dropped_connection_then_resume(setup, sshd):
    server, dest, home = setup
    big_checkpoint(server)   # 160 MiB, last in the checkpoint: the link breaks 64 MiB into it
    link = Relay(sshd.port, 64 << 20)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "ckptsync", "backup", "--host", relay_alias(home, sshd, link), *cfg_args(home),
             "--remote-dir", str(server), "--local-dir", str(dest), "--checkpoint", "checkpoint-12",
             "--compress", "off", "--parallel", "1"],
            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        link.close()
    err = proc.stderr
    progress = dest / ".ckptsync" / "staging" / "checkpoint-12.progress.json"
    part = dest / ".ckptsync/staging/checkpoint-12/checkpoint-12/zz_large_shard.bin.part"
    assert link.cut and part.exists()   # the fault happened, during the large shard
    assert proc.returncode == 20, err
    assert "verified files kept" in err
    assert not (dest / "checkpoint-12").exists()
    kept = json.loads(progress.read_text())
    assert kept and "checkpoint-12/zz_large_shard.bin" not in kept

    again = run_cli("backup", "-i", "1", *cfg_args(home), "--checkpoint", "checkpoint-12", "--json")
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    plan = {p["name"]: p for p in result["plan"]}
    assert plan["checkpoint-12"]["files"] == 9 - len(kept)
    assert result["raw_bytes"] < sum(p.stat().st_size for p in (server / "checkpoint-12").iterdir())
    assert_same_as_server(server / "checkpoint-12", dest / "checkpoint-12", manifest(dest, "checkpoint-12"),
                          "checkpoint-12")
    assert not (dest / ".ckptsync" / "staging" / "checkpoint-12").exists()


def test_parallel_backup_over_ssh(setup):
    """Two channels over one login: big enough that the large shard is split into two ranges."""
    server, dest, home = setup
    big_checkpoint(server, mb=80)
    res = run_cli("backup", "-i", "1", *cfg_args(home), "--checkpoint", "checkpoint-12", "--parallel", "2",
                  "--json")
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert result["channels"] == 2 and result["fetched"] == ["checkpoint-12", "extra-files"]
    assert_same_as_server(server / "checkpoint-12", dest / "checkpoint-12", manifest(dest, "checkpoint-12"),
                          "checkpoint-12")
    assert not list(dest.rglob("*.part"))

    fresh = server.parent / "restored"
    res = run_cli("restore", "-i", "1", *cfg_args(home), "--remote-dir", fresh, "--checkpoint", "checkpoint-12",
                  "--no-extra-files", "--parallel", "2", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["channels"] == 2
    assert tree_digest(fresh / "checkpoint-12") == tree_digest(server / "checkpoint-12")

    res = run_cli("backup", "-i", "1", *cfg_args(home), "--parallel", "17")
    assert res.returncode == 2 and "--parallel" in res.stderr and "16" in res.stderr


HELD_AT = 64 << 20   # bytes from the server: inside the large shard, far from either end of it
SHARD_PART = ".ckptsync/staging/checkpoint-12/checkpoint-12/zz_large_shard.bin.part"


@contextlib.contextmanager
def held_backup(setup, sshd, *args: str):
    """A backup over one channel whose link holds once HELD_AT bytes have come from the server: yields
    (relay, process, its stdout, its stderr) while it is held there; the test releases it."""
    server, dest, home = setup
    relay = Relay(sshd.port, HELD_AT, hold=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckptsync", "backup", "--host", relay_alias(home, sshd, relay), *cfg_args(home),
         "--remote-dir", str(server), "--local-dir", str(dest), "--compress", "off", "--parallel", "1", *args],
        env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = Lines(proc.stdout), Lines(proc.stderr)
        relay.wait(proc)
        yield relay, proc, out, err
    finally:
        relay.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_with_130(setup, sshd, sig):
    from ckptsync.server.transfer import KEEP_PREFIX_MIN

    server, dest, home = setup
    big_checkpoint(server, mb=160)
    with held_backup(setup, sshd, "--checkpoint", "checkpoint-12") as (relay, proc, _out, err):
        proc.send_signal(sig)   # while the large shard is under way
        relay.release()
        code = proc.wait(HANG)
    assert code == 130, err.text()
    assert "interrupted" in err.text() and "verified files kept" in err.text()
    assert not (dest / "checkpoint-12").exists()
    assert KEEP_PREFIX_MIN <= (dest / SHARD_PART).stat().st_size <= HELD_AT   # the shard's prefix is kept
    assert json.loads((dest / ".ckptsync" / "status.json").read_text())["exit_code"] == 130


def test_checkpoint_deleted_mid_backup_is_not_recorded(setup, sshd):
    server, dest, home = setup
    big_checkpoint(server, mb=160)
    with held_backup(setup, sshd, "--all", "--json") as (relay, proc, out, err):
        # rotation: the trainer deletes the checkpoint being read
        for p in sorted((server / "checkpoint-12").iterdir()):
            p.unlink()
        (server / "checkpoint-12").rmdir()
        relay.release()
        code = proc.wait(HANG)
    assert code == 3, err.text()
    result = json.loads(out.text())
    assert "checkpoint-12" in result["failed"] and "checkpoint-12" not in result["fetched"]
    assert "checkpoint-8" in result["fetched"] and "checkpoint-4" in result["fetched"]
    assert not (dest / "checkpoint-12").exists()


@pytest.mark.skipif(not ROOT, reason="mounting a small tmpfs needs root")
def test_disk_too_small_fails_before_writing(setup, tmp_path):
    server, _dest, home = setup
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.fail(f"could not mount a tmpfs: {mounted.stderr!r}")
    try:
        res = run_cli("backup", "-i", "1", *cfg_args(home), "--local-dir", str(small / "b"))
        assert res.returncode == 5, res.stderr
        assert "not enough space" in res.stderr and "nothing was written" in res.stderr
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)])


def test_file_rewritten_while_read_is_not_recorded(setup, sshd):
    """The trainer rewrites a file of the checkpoint being read: not recorded, exit 3; later it is."""
    server, dest, home = setup
    big_checkpoint(server, mb=160)
    with held_backup(setup, sshd, "--checkpoint", "checkpoint-12", "--json") as (relay, proc, out, err):
        # far past what the server has read: the held link stops it within a few MiB of HELD_AT
        with open(server / "checkpoint-12" / "zz_large_shard.bin", "r+b") as f:
            f.seek(150 << 20)
            f.write(b"rewritten by the trainer")
        # and the trainer starts its next checkpoint meanwhile
        (server / "checkpoint-16").mkdir()
        (server / "checkpoint-16" / "optimizer.pt").write_bytes(b"partial")
        relay.release()
        code = proc.wait(HANG)
    assert code == 3, err.text()
    result = json.loads(out.text())
    assert "changed on the server while it was read" in result["failed"]["checkpoint-12"]
    assert not (dest / "checkpoint-12").exists()
    old = time.time() - 600
    os.utime(server / "checkpoint-12" / "zz_large_shard.bin", (old, old))
    again = run_cli("backup", "-i", "1", *cfg_args(home), "--checkpoint", "checkpoint-12")
    assert again.returncode == 0, again.stderr
    assert (dest / "checkpoint-12" / "zz_large_shard.bin").read_bytes() == \
        (server / "checkpoint-12" / "zz_large_shard.bin").read_bytes()


BLIND = Path(__file__).resolve().parent / "blind_agent.py"


@pytest.mark.parametrize("marker", ["_SUCCESS", ".complete"])
def test_a_save_marker_is_backed_up_at_once_and_a_checkpoint_without_it_waits(server_tree, tmp_path, marker):
    """A server whose writers cannot be seen, a settle time no file is old enough for: the checkpoints
    whose writer put its marker down last are backed up (marker and all) and restored whole; the
    newest, still without its marker, is named as not finished."""
    server = server_tree
    for name in ("checkpoint-4", "checkpoint-8"):
        last = max(p.stat().st_mtime for p in (server / name).rglob("*") if p.is_file())
        (server / name / marker).write_bytes(b"")
        os.utime(server / name / marker, (last + 1, last + 1))
    cfg = tmp_path / "blind.yaml"
    cfg.write_text(json.dumps({"remote_dir": str(server), "local_dir": str(tmp_path / "b"), "settle_seconds": 100000,
                               "instances": {"1": {"command": [sys.executable, str(BLIND), str(REPO_ROOT)]}}}))
    waiting = f"no {marker} yet (the run's other checkpoints have one)"

    res = run_cli("backup", "-i", "1", "--config", cfg, "--no-extra-files", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["fetched"] == ["checkpoint-8", "checkpoint-4"]
    assert [(p["name"], p["reason"]) for p in out["plan"] if p["action"] == "skip"] == [
        ("checkpoint-12", f"in progress: {waiting}")]
    dest = tmp_path / "b" / "instance-1"
    for name in ("checkpoint-4", "checkpoint-8"):
        assert tree_digest(dest / name) == tree_digest(server / name) and (dest / name / marker).is_file()
    assert not (dest / "checkpoint-12").exists()

    listed = run_cli("list", "-i", "1", "--config", cfg, "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)["checkpoints"]}
    assert (rows["checkpoint-12"]["complete"], rows["checkpoint-12"]["reason"]) == (False, waiting)
    assert rows["checkpoint-8"]["backup"] == rows["checkpoint-4"]["backup"] == "yes"
    human = run_cli("list", "-i", "1", "--config", cfg, env={"COLUMNS": "200"})
    assert waiting in human.stdout, human.stdout

    fresh = tmp_path / "restored"
    res = run_cli("restore", "-i", "1", "--config", cfg, "--remote-dir", fresh, "--checkpoint", "checkpoint-8",
                  "--no-extra-files")
    assert res.returncode == 0, res.stderr
    assert tree_digest(fresh / "checkpoint-8") == tree_digest(server / "checkpoint-8")
