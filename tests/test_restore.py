"""`ckptsync restore` end to end: back up the fixture tree, then restore it onto a fresh "server"."""

from __future__ import annotations

import json
import re
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import HANG, REPO_ROOT, ROOT, Lines, cli_env, digest_diff, login_probe, name_best, run_cli, set_tree_mtime, tree_digest
from relay import Relay, relay_alias

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

EXTRA = ["../../config_full_dataset.json", "../../deepspeed_config.json"]
BIG = "zz_large_shard.bin"   # sorts last: every other file is staged before it
BIG_MB = 128


def write_config(where: Path) -> Path:
    path = where / "ckptsync.yaml"
    path.write_text(json.dumps({"extra_files": EXTRA, "settle_seconds": 60}))  # JSON is valid YAML
    return path


def backup(cfg: Path, server: Path, dest: Path, *, ssh: bool = True) -> None:
    via = ["--instance", "1"] if ssh else []
    res = run_cli("backup", *via, "--config", cfg, "--remote-dir", server, "--local-dir", dest, "--all")
    assert res.returncode == 0, res.stderr


def restore(cfg: Path, fresh: Path, dest: Path, *args: str, ssh: bool = True,
            extras_to: str | None = "../..") -> subprocess.CompletedProcess[str]:
    """Restore into `fresh`, a new run directory: the extra files go to the same place relative to it."""
    via = ["--instance", "1"] if ssh else []
    to = ["--extra-files-to", extras_to] if extras_to and "--no-extra-files" not in args else []
    return run_cli("restore", *via, "--config", cfg, "--remote-dir", fresh, "--local-dir", dest, *to, *args)


def assert_same(a: Path, b: Path) -> None:
    diff = digest_diff(tree_digest(a), tree_digest(b))
    assert not diff, diff
    assert tree_digest(a), f"{a} is empty"


def staging(fresh: Path, name: str = "checkpoint-12") -> Path:
    return fresh / f".ckptsync-staging-{name}"


@pytest.fixture
def setup(ssh_home, server_tree, tmp_path):
    """The fixture tree backed up over SSH; `fresh` is where a new server's run directory would be."""
    cfg = write_config(ssh_home)
    dest = tmp_path / "backups" / "instance-0"
    backup(cfg, server_tree, dest)
    fresh = tmp_path / "new-server" / "socrates-training" / "models" / "socrates-qwen-full-dataset"
    return server_tree, dest, fresh, cfg


def add_big_file(server: Path, mb: int = BIG_MB) -> None:
    """A large, poorly compressible file, so a transfer lasts long enough to interrupt."""
    block = os.urandom(1 << 20)
    path = server / "checkpoint-12" / BIG
    with open(path, "wb") as f:
        for i in range(mb):
            f.write(block[i % 7:] + block[: i % 7])
    old = time.time() - 1200
    os.utime(path, (old, old))


@pytest.fixture
def big_setup(ssh_home, server_tree, tmp_path):
    add_big_file(server_tree)
    cfg = write_config(ssh_home)
    dest = tmp_path / "backups" / "instance-0"
    res = run_cli("backup", "--config", cfg, "--remote-dir", server_tree, "--local-dir", dest,
                  "--checkpoint", "checkpoint-12", "--no-extra-files")
    assert res.returncode == 0, res.stderr
    fresh = tmp_path / "new-server" / "run"
    return server_tree, dest, fresh, cfg


# ------------------------------------------------------------ the main story


def test_restore_over_ssh_is_identical_and_says_how_to_resume(setup):
    server, dest, fresh, cfg = setup
    res = restore(cfg, fresh, dest)
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(fresh)) == ["checkpoint-12"]      # newest resumable; no staging or trash left
    assert_same(server / "checkpoint-12", fresh / "checkpoint-12")
    for name in ("config_full_dataset.json", "deepspeed_config.json"):
        assert tree_digest(fresh.parent.parent)[name] == tree_digest(server.parent.parent)[name]
    assert "restored checkpoint-12 to" in res.stdout
    assert f"--resume-from-checkpoint {fresh / 'checkpoint-12'}" in res.stdout
    assert "best_model_checkpoint" not in res.stderr          # checkpoint-12 is its own best
    assert "warning" not in res.stderr


def test_existing_checkpoint_is_refused_without_force_and_replaced_with_it(setup):
    server, dest, fresh, cfg = setup
    fresh.mkdir(parents=True)
    shutil.copytree(server / "checkpoint-4", fresh / "checkpoint-12")
    (fresh / "checkpoint-12" / "stale.txt").write_text("from another run")
    run_root = fresh.parent.parent
    (run_root / "config_full_dataset.json").write_text("{}")
    shutil.copy2(server.parent.parent / "deepspeed_config.json", run_root / "deepspeed_config.json")
    before = tree_digest(run_root)

    res = restore(cfg, fresh, dest)
    assert res.returncode == 2, res.stderr
    assert "checkpoint-12 already exists" in res.stderr and "nothing was sent" in res.stderr
    assert "--force" in res.stderr
    assert tree_digest(run_root) == before
    assert not staging(fresh).exists()

    res = restore(cfg, fresh, dest, "--force", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["replaced"] is True
    assert {e["source"]: e["action"] for e in out["extras"]} == {
        "../../config_full_dataset.json": "replace", "../../deepspeed_config.json": "already there"}
    assert sorted(os.listdir(fresh)) == ["checkpoint-12"]
    assert_same(server / "checkpoint-12", fresh / "checkpoint-12")
    assert (run_root / "config_full_dataset.json").read_bytes() == \
        (server.parent.parent / "config_full_dataset.json").read_bytes()


def test_differing_extra_file_is_kept_without_force(setup):
    server, dest, fresh, cfg = setup
    run_root = fresh.parent.parent
    run_root.mkdir(parents=True)
    (run_root / "config_full_dataset.json").write_text('{"edited": "on the new server"}')
    res = restore(cfg, fresh, dest)
    assert res.returncode == 0, res.stderr
    assert "kept existing ../../config_full_dataset.json (differs" in res.stderr
    assert (run_root / "config_full_dataset.json").read_text() == '{"edited": "on the new server"}'
    assert tree_digest(run_root)["deepspeed_config.json"] == tree_digest(server.parent.parent)["deepspeed_config.json"]
    assert_same(server / "checkpoint-12", fresh / "checkpoint-12")
    assert not staging(fresh).exists()


def test_damaged_backup_is_refused_and_an_older_one_suggested(setup):
    server, dest, fresh, cfg = setup
    damaged = dest / "checkpoint-12" / "optimizer.pt"
    assert damaged.stat().st_nlink == 1
    flip_byte(damaged)
    res = restore(cfg, fresh, dest)
    assert res.returncode == 30, res.stderr
    # Found as it was sent (the bytes are read once): nothing in place, the older one suggested,
    # and what arrived whole staged, with the command that drops it.
    assert "checkpoint-12/optimizer.pt (its bytes no longer match the manifest)" in res.stderr
    assert "nothing was put in place" in res.stderr and "--checkpoint checkpoint-8" in res.stderr
    assert sorted(os.listdir(fresh)) == [staging(fresh).name]
    drop = re.search(r"to drop them: (.+?)\)\n", res.stderr).group(1)
    assert shlex.split(drop)[0] == "ckptsync" and "--discard-staged" in drop
    res = run_cli(*shlex.split(drop)[1:])   # pasted
    assert res.returncode == 0, res.stderr
    assert os.listdir(fresh) == []

    res = restore(cfg, fresh, dest, "--checkpoint", "checkpoint-8")
    assert res.returncode == 0, res.stderr
    assert_same(server / "checkpoint-8", fresh / "checkpoint-8")


def flip_byte(path: Path, at: int = 1000) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x01]))


def test_the_login_starts_before_the_restores_code_loads(setup):
    """ssh and the server's Python start while the restore's own modules load, and that launcher
    is the connection the restore uses."""
    server, dest, fresh, cfg = setup
    probe = login_probe({"ckptsync.restore", "ckptsync.stores.directory", "ckptsync.server", "ckptsync.agent.codec"})
    res = subprocess.run([sys.executable, "-c", probe, "restore", "--instance", "1", "--config", str(cfg),
                          "--remote-dir", str(fresh), "--local-dir", str(dest), "--no-extra-files"],
                         env=cli_env(), capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    assert "loaded when ssh started: [[]]" in res.stderr   # one launcher, started ahead of the restore's code
    assert_same(server / "checkpoint-12", fresh / "checkpoint-12")


def test_file_damaged_after_the_check_is_caught_while_sending(setup, monkeypatch):
    from ckptsync import restore as core
    from ckptsync.config import Config, resolve_target
    from ckptsync.errors import IntegrityError

    server, dest, fresh, cfg = setup
    damaged = dest / "checkpoint-12" / "optimizer.pt"
    flip_byte(damaged)
    monkeypatch.setattr(core, "verify_files", lambda *args, **kw: [])  # it rots after the check
    target = resolve_target(Config(), instance="1", remote_dir=str(fresh), local_dir=str(dest))
    with pytest.raises(IntegrityError, match="checkpoint-12/optimizer.pt") as caught:
        core.run_restore(target, core.RestoreOptions(extra_files=False))
    assert "nothing was put in place" in caught.value.message
    assert sorted(os.listdir(fresh)) == [staging(fresh).name]

    # Repaired: the rerun finds the bad copy in staging by its hash on the server and sends it again.
    flip_byte(damaged)
    res = restore(cfg, fresh, dest, "--no-extra-files", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["sent_files"] == 1 and out["resumed_files"] == 7
    assert_same(server / "checkpoint-12", fresh / "checkpoint-12")


def test_locked_backup_directory_exits_11(setup):
    from ckptsync.stores.directory import DirectoryStore

    server, dest, fresh, cfg = setup
    with DirectoryStore(dest).lock("ckptsync backup (test holder)"):
        res = restore(cfg, fresh, dest)
    assert res.returncode == 11
    assert "in use by 'ckptsync backup (test holder)'" in res.stderr
    assert not fresh.exists()


def test_unknown_checkpoint_exits_10_and_lists_the_backups(setup):
    server, dest, fresh, cfg = setup
    res = restore(cfg, fresh, dest, "--checkpoint", "checkpoint-99")
    assert res.returncode == 10
    assert "checkpoint-99" in res.stderr and "checkpoint-12, checkpoint-8, checkpoint-4" in res.stderr
    assert not fresh.exists()


def test_no_backups_points_at_sibling_backup_directories(setup):
    server, dest, fresh, cfg = setup
    res = restore(cfg, fresh, dest.parent / "instance-1")
    assert res.returncode == 10
    assert "no checkpoint backups" in res.stderr and str(dest) in res.stderr


def test_dry_run_changes_nothing_and_shows_sizes(setup):
    server, dest, fresh, cfg = setup
    before = tree_digest(dest)
    res = restore(cfg, fresh, dest, "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "would restore checkpoint-12" in res.stdout and "nothing was changed" in res.stdout
    assert "checkpoint-12/optimizer.pt" in res.stdout and re.search(r"145.0 ?KB", res.stdout)
    assert "would be created" in res.stdout
    assert not fresh.parent.parent.exists()
    assert tree_digest(dest) == before

    res = restore(cfg, fresh, dest, "--dry-run", "--json")
    out = json.loads(res.stdout)
    assert out["dry_run"] and out["checkpoint"] == "checkpoint-12"
    assert {f["action"] for f in out["files"]} == {"send"}
    assert out["send_bytes"] == sum(p.stat().st_size for p in (server / "checkpoint-12").iterdir()) + sum(
        (server.parent.parent / n).stat().st_size for n in ("config_full_dataset.json", "deepspeed_config.json"))
    assert not fresh.parent.parent.exists()


def test_adapter_only_sends_weights_and_configs_only(setup):
    server, dest, fresh, cfg = setup
    res = restore(cfg, fresh, dest, "--adapter-only", "--no-extra-files", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert sorted(os.listdir(fresh / "checkpoint-12")) == [".ckptsync-restored", "adapter_config.json",
                                                           "adapter_model.safetensors"]
    original = tree_digest(server / "checkpoint-12")
    restored = tree_digest(fresh / "checkpoint-12")
    assert restored.pop(".ckptsync-restored")  # says what the directory is: adapter only, restored
    assert restored == {k: original[k] for k in ("adapter_config.json", "adapter_model.safetensors")}
    assert not out["exact_resume"] and "cannot be resumed exactly" in " ".join(out["warnings"])
    assert "--resume-from-checkpoint" not in out["resume_hint"]
    assert not (fresh.parent.parent / "config_full_dataset.json").exists()


def test_checkpoint_without_optimizer_is_skipped_by_default_and_warned_about(ssh_home, server_tree, tmp_path):
    (server_tree / "checkpoint-12" / "optimizer.pt").unlink()
    cfg = write_config(ssh_home)
    dest = tmp_path / "backups"
    backup(cfg, server_tree, dest)
    fresh = tmp_path / "new"
    res = restore(cfg, fresh, dest, "--no-extra-files")
    assert res.returncode == 0, res.stderr
    assert "restored checkpoint-8" in res.stdout and "checkpoint-12 (adapter-only)" in res.stderr

    res = restore(cfg, fresh, dest, "--checkpoint", "checkpoint-12", "--no-extra-files")
    assert res.returncode == 0, res.stderr
    assert "fine-tune from these weights" in res.stderr and "cannot be resumed exactly" in res.stderr
    assert "--resume-from-checkpoint" not in res.stdout
    assert_same(server_tree / "checkpoint-12", fresh / "checkpoint-12")


def test_missing_best_checkpoint_is_pointed_out(ssh_home, server_tree, tmp_path):
    state = server_tree / "checkpoint-12" / "trainer_state.json"
    st = state.stat()
    data = json.loads(state.read_text())
    data["best_model_checkpoint"] = "models/socrates-qwen-full-dataset/checkpoint-8"
    state.write_text(json.dumps(data))
    os.utime(state, ns=(st.st_atime_ns, st.st_mtime_ns))
    cfg = write_config(ssh_home)
    dest = tmp_path / "backups"
    backup(cfg, server_tree, dest)
    fresh = tmp_path / "new"
    res = restore(cfg, fresh, dest, "--no-extra-files")
    assert res.returncode == 0, res.stderr
    assert "best_model_checkpoint" in res.stderr and "checkpoint-8 is not in" in res.stderr
    assert "ckptsync restore --checkpoint checkpoint-8" in res.stderr
    res = restore(cfg, fresh, dest, "--no-extra-files", "--checkpoint", "checkpoint-8")
    assert res.returncode == 0 and "best_model_checkpoint" not in res.stderr


@pytest.mark.skipif(not ROOT, reason="mounting a small tmpfs needs root")
def test_too_little_space_on_the_server_fails_before_sending(setup, tmp_path):
    server, dest, _fresh, cfg = setup
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.fail(f"could not mount a tmpfs: {mounted.stderr!r}")
    try:
        res = restore(cfg, small / "run", dest)
        assert res.returncode == 5, res.stderr
        assert "not enough space" in res.stderr and "nothing was sent" in res.stderr
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)])


# ------------------------------------------------------------ interruptions


def debian_instance(home: Path, host: str = "tnr-1") -> list[str]:
    """The OpenSSH client, with the server's PATH cut down to the system python (sha1, zstd binary)."""
    return ["ssh", "-F", str(home / ".ssh" / "config"), host, "PATH=/usr/bin:/bin;"]


AT = 64 << 20   # bytes to the server: inside the large file, which comes last, far from either end of it


@pytest.mark.parametrize("via", ["paramiko", "ssh-binary-system-python"])
def test_dropped_connection_leaves_nothing_visible_and_a_rerun_resumes(big_setup, sshd, ssh_home, via):
    from ckptsync.server.transfer import KEEP_PREFIX_MIN

    server, dest, fresh, cfg = big_setup
    link = Relay(sshd.port, AT, upload=True)   # the link drops there, then passes every later byte
    alias = relay_alias(ssh_home, sshd, link)
    if via == "paramiko":
        cfg.write_text(json.dumps({"ssh": "paramiko", "instances": {"1": {"host": alias}}}))
    else:
        cfg.write_text(json.dumps({"instances": {"1": {"command": debian_instance(ssh_home, alias)}}}))
    # One channel: the large file goes whole, so what arrived of it is a prefix the rerun keeps.
    argv = ["restore", "-i", "1", "--config", str(cfg), "--remote-dir", str(fresh), "--local-dir", str(dest),
            "--parallel", "1"]
    try:
        res = run_cli(*argv, timeout=HANG)
        assert link.cut, res.stderr   # the fault happened, inside the large file
        assert res.returncode == 20, res.stderr
        assert "nothing was put in place" in res.stderr and "run the same restore again" in res.stderr
        assert not (fresh / "checkpoint-12").exists()
        assert sorted(os.listdir(fresh)) == [staging(fresh).name]
        assert sshd.wait_idle()   # the server's end of the dropped link is gone: it wrote all that reached it

        again = run_cli(*argv, "--json")
    finally:
        link.close()
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert result["resumed_files"] == 8 and result["sent_files"] == 1
    assert KEEP_PREFIX_MIN <= result["resumed_bytes"] <= AT   # what had arrived of the large file
    assert result["sent_bytes"] + result["resumed_bytes"] == BIG_MB << 20
    assert_same(server / "checkpoint-12", fresh / "checkpoint-12")
    assert sorted(os.listdir(fresh)) == ["checkpoint-12"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_exits_130_keeps_only_the_staging_dir_and_a_rerun_completes(big_setup, sshd, ssh_home, sig):
    server, dest, fresh, cfg = big_setup
    argv = [sys.executable, "-m", "ckptsync", "restore", "-i", "1", "--config", str(cfg), "--remote-dir", str(fresh),
            "--local-dir", str(dest), "--parallel", "1"]
    relay = Relay(sshd.port, AT, upload=True, hold=True)
    proc = subprocess.Popen([*argv[:4], "--host", relay_alias(ssh_home, sshd, relay), *argv[6:]], env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = Lines(proc.stdout), Lines(proc.stderr)
        relay.wait(proc)
        proc.send_signal(sig)   # while the large file is under way
        relay.release()
        code = proc.wait(HANG)
    finally:
        relay.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 130, err.text()
    assert "interrupted while sending checkpoint-12" in err.text() and "kept in" in err.text()
    assert not (fresh / "checkpoint-12").exists()
    staged = sorted(p.name for p in (staging(fresh) / "checkpoint-12").iterdir())
    assert "optimizer.pt" in staged and BIG not in staged

    again = subprocess.run(argv, env=cli_env(), capture_output=True, text=True, timeout=HANG)
    assert again.returncode == 0, again.stderr
    assert_same(server / "checkpoint-12", fresh / "checkpoint-12")
    assert not staging(fresh).exists()


# ------------------------------------------------------------ local transport


def test_local_restore_of_a_full_finetune(fixtures_dir, tmp_path):
    server = tmp_path / "server" / "output"
    shutil.copytree(fixtures_dir / "full-finetune" / "output", server)
    for p in server.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    set_tree_mtime(server, time.time() - 3600)
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("{}")
    dest = tmp_path / "backups"
    backup(cfg, server, dest, ssh=False)
    fresh = tmp_path / "new" / "output"

    res = restore(cfg, fresh, dest, ssh=False)
    assert res.returncode == 0, res.stderr
    assert_same(server / "checkpoint-6", fresh / "checkpoint-6")
    assert f"--resume-from-checkpoint {fresh / 'checkpoint-6'}" in res.stdout

    res = restore(cfg, fresh, dest, "--checkpoint", "checkpoint-3", "--adapter-only", "--json", ssh=False)
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(fresh / "checkpoint-3")) == [".ckptsync-restored", "config.json", "generation_config.json",
                                                          "model.safetensors"]
    assert json.loads(res.stdout)["exact_resume"] is False


def test_extra_files_outside_a_new_run_dir_are_skipped_and_said_where_they_are(setup):
    server, dest, fresh, cfg = setup
    dry = restore(cfg, fresh, dest, "--dry-run", extras_to=None)
    assert dry.returncode == 0, dry.stderr
    kept = dest / "extra-files"
    assert dry.stderr.count("not restored: ") == 1   # one line for all of them
    assert "not restored: ../../config_full_dataset.json, ../../deepspeed_config.json" in dry.stderr
    assert f"kept in {kept})" in dry.stderr
    assert "--extra-files-only --extra-files-to ../.." in dry.stderr
    assert str(fresh / "checkpoint-12") in dry.stdout  # every path the run would write is shown
    res = restore(cfg, fresh, dest, "--json", extras_to=None)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert {e["action"] for e in out["extras"]} == {"skipped (outside the new run's directory)"}
    assert sorted(os.listdir(fresh.parent.parent)) == ["models"]  # nothing written above the run's tree
    assert not (fresh.parent.parent.parent / "config_full_dataset.json").exists()
    # The printed command puts them at the same place relative to the new run, when pasted.
    hint = next(w for w in out["warnings"] if "relative to this run" in w).split("relative to this run: ")[1]
    pasted = run_cli(*shlex.split(hint)[1:])
    assert pasted.returncode == 0, pasted.stderr
    assert "config_full_dataset.json: restored" in pasted.stdout
    for name in ("config_full_dataset.json", "deepspeed_config.json"):
        assert (fresh.parent.parent / name).read_bytes() == (server.parent.parent / name).read_bytes()
    assert_same(server / "checkpoint-12", fresh / "checkpoint-12")  # the checkpoint was left as it was


def test_extra_files_go_back_where_they_came_from_into_the_same_remote_dir(setup):
    server, dest, _fresh, cfg = setup
    shutil.rmtree(server / "checkpoint-12")
    original = server.parent.parent / "config_full_dataset.json"
    data = original.read_bytes()
    original.unlink()
    res = restore(cfg, server, dest, "--json", extras_to=None)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert {e["source"]: e["action"] for e in out["extras"]}["../../config_full_dataset.json"] == "send"
    assert original.read_bytes() == data


def test_printed_restore_hint_targets_the_same_server_when_pasted(ssh_home, server_tree, tmp_path):
    name_best(server_tree, "checkpoint-8")
    cfg = write_config(ssh_home)
    dest = tmp_path / "backups" / "instance-0"
    backup(cfg, server_tree, dest)
    fresh = tmp_path / "new-server" / "run"
    res = restore(cfg, fresh, dest, "--checkpoint", "checkpoint-12")
    assert res.returncode == 0, res.stderr
    hint = res.stderr.split("restore it too: ")[1].splitlines()[0]
    argv = shlex.split(hint)
    assert argv[:4] == ["ckptsync", "restore", "--checkpoint", "checkpoint-8"] and "--instance" in argv
    pasted = run_cli(*argv[1:])
    assert pasted.returncode == 0, pasted.stderr
    assert_same(server_tree / "checkpoint-8", fresh / "checkpoint-8")


# ------------------------------------------------------------ two runs writing into one server directory


def test_a_restore_refused_by_the_servers_lock_exits_11_and_changes_nothing(setup):
    import fcntl

    server, dest, _fresh, cfg = setup
    flip_byte(server / "checkpoint-12" / "optimizer.pt")  # the server's copy went bad: restore the backup over it
    args = ("restore", "-i", "1", "--config", cfg, "--remote-dir", server, "--local-dir", dest,
            "--checkpoint", "checkpoint-12", "--force", "--no-extra-files")
    lock = server / ".ckptsync-lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another restore, writing into the same directory
        os.pwrite(fd, json.dumps({"pid": 4242, "host": "other-laptop", "command": "ckptsync restore",
                                  "since": time.time()}).encode(), 0)
        before = tree_digest(server.parent)
        res = run_cli(*args)
        assert res.returncode == 11, (res.stdout, res.stderr)
        assert f"another restore into {server} holds the server's lock (pid 4242 on other-laptop, since " in res.stderr
        assert "nothing was sent" in res.stderr and "Traceback" not in res.stderr
        assert tree_digest(server.parent) == before
        assert not staging(server).exists()
    finally:
        os.close(fd)  # the other restore is done
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    assert_same(dest / "checkpoint-12", server / "checkpoint-12")
    assert not lock.exists()  # let go of, and removed, at the end of the run
