"""`ckptsync checklist`: the pre-shutdown checklist through a real sshd."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import time

from ckptsync.layout import Checkpoint
from ckptsync.settle import mark_abandoned, save_interval
from ckptsync.scan import ServerView
from ckptsync.server import Procs
from ckptsync.training import judge_training
from helpers import name_best, run_cli


def config(home, server, dest, **extra):
    cfg = {"remote_dir": str(server), "local_dir": str(dest),
           "extra_files": ["../../config_full_dataset.json", "../../deepspeed_config.json"], **extra}
    path = home / "ck.yaml"
    path.write_text(json.dumps(cfg))
    return path


def checks(res) -> dict:
    return {c["name"]: c for c in json.loads(res.stdout)["checks"]}


def test_still_training_then_stopped_and_backed_up(ssh_home, server_tree, tmp_path):
    cfg = config(ssh_home, server_tree, tmp_path / "b", settle_seconds=300)
    # the trainer is writing checkpoint-16 right now (within settle_seconds, with a margin)
    shutil.copytree(server_tree / "checkpoint-12", server_tree / "checkpoint-16")
    (server_tree / "checkpoint-16" / "trainer_state.json").unlink()
    for p in (server_tree / "checkpoint-16").iterdir():
        os.utime(p)
    res = run_cli("checklist", "-i", "1", "--config", cfg, "--json")
    assert res.returncode == 3, res.stderr
    c = checks(res)
    assert c["server reachable"]["ok"]
    assert not c["training stopped"]["ok"] and "checkpoint-16 is still being written" in c["training stopped"]["detail"]
    assert not c["newest checkpoint backed up"]["ok"] and "checkpoint-12" in c["newest checkpoint backed up"]["detail"]
    assert not c["last backup succeeded"]["ok"]

    human = run_cli("checklist", "-i", "1", "--config", cfg)
    assert human.returncode == 3 and "NOT SAFE" in human.stdout and "fix: ckptsync backup --instance 1" in human.stdout

    # the trainer stopped: the half-written checkpoint is gone with it, and the last
    # complete one is far older than the save interval (saves were 20 min apart)
    shutil.rmtree(server_tree / "checkpoint-16")
    stopped = time.time() - 3000  # 2.5 save intervals: well past the 1.5 margin
    for p in (server_tree / "checkpoint-12").iterdir():
        os.utime(p, (stopped, stopped))
    res = run_cli("checklist", "-i", "1", "--config", cfg, "--backup", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads(res.stdout)
    assert out["safe"] and out["backup_ran"]
    assert all(c["ok"] for c in out["checks"])
    assert "every file re-read" in checks(res)["backup verifies"]["detail"]


def age_tree(root, seconds):
    """Move every mtime under root back, so the trainer has plainly stopped (not one interval ago)."""
    for p in [root, *root.rglob("*")]:
        st = p.stat()
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns - int(seconds * 1e9)))


def test_corrupt_backup_and_changed_extra_file_fail(ssh_home, server_tree, tmp_path):
    age_tree(server_tree, 3600)
    cfg = config(ssh_home, server_tree, tmp_path / "b")
    assert run_cli("backup", "-i", "1", "--config", cfg, "-k", "1").returncode == 0
    assert run_cli("checklist", "-i", "1", "--config", cfg).returncode == 0
    victim = tmp_path / "b" / "instance-1" / "checkpoint-12" / "optimizer.pt"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    os.chmod(victim, 0o644)
    victim.write_bytes(bytes(data))
    (server_tree.parent.parent / "config_full_dataset.json").write_text("{}")
    res = run_cli("checklist", "-i", "1", "--config", cfg, "--json")
    assert res.returncode == 3
    c = checks(res)
    assert not c["backup verifies"]["ok"] and "optimizer.pt" in c["backup verifies"]["detail"]
    fix = c["backup verifies"]["fix"]
    assert fix.startswith("ckptsync verify --repair checkpoint-12 --instance 1 --config ")
    repaired = run_cli(*shlex.split(fix.split("   (")[0])[1:])  # the printed command, pasted
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "repaired checkpoint-12: checkpoint-12/optimizer.pt" in repaired.stdout
    assert not c["extra files backed up"]["ok"] and "changed since the backup" in c["extra files backed up"]["detail"]


def test_unreachable_server_is_not_safe(ssh_home, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"remote_dir": "/x", "instances": {"3": {"host": "127.0.0.1", "port": 1}}}))
    res = run_cli("checklist", "-i", "3", "--config", cfg, "--json")
    assert res.returncode == 3
    c = checks(res)
    assert not c["server reachable"]["ok"] and "cannot connect" in c["server reachable"]["detail"]


def ckpt(name, mtime, complete=True):
    return Checkpoint(name=name, layout="trainer", kind="rolling", step=int(name.split("-")[1]), files=(),
                      size=1, mtime=mtime, complete=complete, reason="" if complete else "x", content="full",
                      resumable=complete, missing=(), is_best=False, state={}, meta_error=None)


def procs(**kw) -> Procs:
    base = dict(processes=[], writing=[], gpu=None, blind=[])
    base.update(kw)
    return Procs(**base)


UNSEEN = ["no /proc on this server: its processes cannot be seen"]


def test_the_save_cadence_stands_in_only_where_processes_cannot_be_seen():
    now = 10_000.0
    cps = [ckpt("checkpoint-3", now - 100), ckpt("checkpoint-2", now - 700), ckpt("checkpoint-1", now - 1300)]
    assert save_interval(cps) == 600
    view = ServerView(root="/r", checkpoints=cps, exact={}, now=now, errors=[])

    def at(when, blind=UNSEEN):
        return judge_training(ServerView(root="/r", checkpoints=cps, exact={}, now=when, errors=[]),
                              procs(blind=blind), 60)

    assert at(now).running == ["a checkpoint is saved every ~10 min; the next one is due in ~8 min"]
    assert "could not see: no /proc on this server" in at(now).detail
    # Late by less than the margin (1.5 intervals): the trainer may still be running.
    assert "due now" in at(now + 600).running[0]
    assert "due now" in at(now + 700).running[0]
    assert at(now + 1000).stopped
    # Processes seen, none of this run's: stopped, whatever the cadence says.
    seen = judge_training(view, procs(), 60)
    assert seen.stopped and seen.detail == "no process of this run, no GPU in use by one, nothing written in the last 1 min"
    old = ServerView(root="/r", checkpoints=[ckpt("checkpoint-1", now - 5000)], exact={}, now=now, errors=[])
    assert judge_training(old, procs(blind=UNSEEN), 60).stopped


def test_a_fast_saver_reads_in_seconds():
    now = 10_000.0
    cps = [ckpt(f"checkpoint-{i}", now - 10 - 40 * (5 - i)) for i in range(5, 0, -1)]
    view = ServerView(root="/r", checkpoints=cps, exact={}, now=now, errors=[])
    assert judge_training(view, procs(blind=UNSEEN), 5).running == [
        "a checkpoint is saved every ~40 s; the next one is due in ~30 s"]


def test_abandoned_checkpoint_does_not_block_after_the_margin():
    now = 100_000.0
    done = [ckpt("checkpoint-3", now - 4000), ckpt("checkpoint-2", now - 4600), ckpt("checkpoint-1", now - 5200)]
    fresh = ckpt("checkpoint-4", now - 900, complete=False)
    stale = ckpt("checkpoint-4", now - 2000, complete=False)
    marked = mark_abandoned(done + [fresh], now)
    assert not marked[-1].abandoned  # 900 s: under max(3 x 600 s, 30 min)
    unseen = judge_training(ServerView(root="/r", checkpoints=marked, exact={}, now=now, errors=[]),
                            procs(blind=UNSEEN), 60)
    assert unseen.running == ["checkpoint-4 is still being written (x)"]
    marked = mark_abandoned(done + [stale], now)
    assert marked[-1].abandoned
    view = ServerView(root="/r", checkpoints=marked, exact={}, now=now, errors=[])
    assert judge_training(view, procs(blind=UNSEEN), 60).stopped


def test_best_checkpoint_pruned_from_the_backups_is_not_safe(ssh_home, server_tree, tmp_path):
    age_tree(server_tree, 3600)
    name_best(server_tree, "checkpoint-8")
    cfg = config(ssh_home, server_tree, tmp_path / "b")
    assert run_cli("backup", "-i", "1", "--config", cfg, "--all").returncode == 0
    assert run_cli("checklist", "-i", "1", "--config", cfg).returncode == 0
    pruned = run_cli("prune", "-i", "1", "--config", cfg, "--keep-last", "1", "--no-keep-best")
    assert pruned.returncode == 0 and not (tmp_path / "b" / "instance-1" / "checkpoint-8").exists()
    res = run_cli("checklist", "-i", "1", "--config", cfg, "--json")
    assert res.returncode == 3
    c = checks(res)
    assert not c["best checkpoint backed up"]["ok"] and "checkpoint-8" in c["best checkpoint backed up"]["detail"]


def test_prune_keeps_the_best_checkpoint_by_default_and_says_why(ssh_home, server_tree, tmp_path):
    age_tree(server_tree, 3600)
    name_best(server_tree, "checkpoint-8")
    cfg = config(ssh_home, server_tree, tmp_path / "b")
    assert run_cli("backup", "-i", "1", "--config", cfg, "--all").returncode == 0
    dry = run_cli("prune", "-i", "1", "--config", cfg, "--remote", "--keep-last", "1", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "kept checkpoint-8: it is the best checkpoint" in dry.stderr and "--no-keep-best" in dry.stderr
    res = run_cli("prune", "-i", "1", "--config", cfg, "--remote", "--keep-last", "1")
    assert res.returncode == 0, res.stderr
    assert (server_tree / "checkpoint-8").is_dir() and not (server_tree / "checkpoint-4").exists()


def test_wrong_remote_dir_names_the_real_cause(ssh_home, server_tree, tmp_path):
    cfg = config(ssh_home, server_tree / "no-such-run", tmp_path / "b")
    res = run_cli("checklist", "-i", "1", "--config", cfg, "--json")
    assert res.returncode == 3
    c = checks(res)
    assert c["server reachable"]["ok"]
    assert not c["remote directory exists"]["ok"] and "no-such-run" in c["remote directory exists"]["detail"]


# ---------------------------------------------------------------- clocks


class Shifted:
    """The time module as a process whose clock is `by` seconds off sees it (as under libfaketime)."""

    def __init__(self, by: float) -> None:
        self.by = by

    def __getattr__(self, name):
        return getattr(time, name)

    def time(self) -> float:
        return time.time() + self.by


def in_process_target(server_tree, dest, hooks=None):
    """A target, and the connect (see open_server) that gives it a new in-process server."""
    from ckptsync.config import Target
    from ckptsync.server.inprocess import InProcessServer

    return (Target(label="instance-0", transport=None, remote_dir=str(server_tree), local_dir=dest),
            lambda: InProcessServer(hooks))


def test_a_server_clock_hours_behind_is_reported_and_decides_nothing(server_tree, tmp_path, monkeypatch):
    from ckptsync.agent import scan as agent_scan, serve as agent_serve
    from ckptsync.backup import BackupOptions, run_backup
    from ckptsync.checklist import run_checklist

    age_tree(server_tree, 3600)
    behind = Shifted(-3 * 3600)
    monkeypatch.setattr(agent_serve, "time", behind)   # the agent's clock: hello, and (before) the scan
    monkeypatch.setattr(agent_scan, "time", behind)
    target, connect = in_process_target(server_tree, tmp_path / "b")
    backed = run_backup(target, BackupOptions(all=True), connect=connect)
    assert sorted(backed.fetched) == ["checkpoint-12", "checkpoint-4", "checkpoint-8"], backed.plan
    result = run_checklist(target, connect=connect)
    assert result.safe, result.checks
    assert -3 * 3600 - 60 < result.clock_offset < -3 * 3600 + 60
    assert any(w.startswith("the server's clock is 3.0 h behind this computer's") for w in result.warnings)


def test_files_dated_after_the_servers_clock_are_judged_by_their_markers(server_tree, tmp_path):
    """A listing whose clock is 3 hours behind its files (a filesystem with its own clock)."""
    from ckptsync.backup import BackupOptions, run_backup
    from ckptsync.checklist import run_checklist
    from ckptsync.server.inprocess import Hooks

    age_tree(server_tree, 3600)
    hooks = Hooks()
    moved = []

    def behind(value):
        value["reply"]["now"] -= 3 * 3600
        moved.append(value["reply"]["now"])
    hooks.on_after("scan", behind)
    target, connect = in_process_target(server_tree, tmp_path / "b", hooks)
    backed = run_backup(target, BackupOptions(all=True), connect=connect)
    assert moved and sorted(backed.fetched) == ["checkpoint-12", "checkpoint-4", "checkpoint-8"], backed.plan
    assert any("dated up to" in w and "after the server's clock" in w for w in backed.warnings)
    result = run_checklist(target, connect=connect)
    assert result.safe, result.checks
    assert any("dated up to" in w for w in result.warnings)


# ---------------------------------------------------------------- extra files, by content


def backed_up_with_extras(ssh_home, server_tree, tmp_path):
    age_tree(server_tree, 3600)
    cfg = config(ssh_home, server_tree, tmp_path / "b")
    assert run_cli("backup", "-i", "1", "--config", cfg).returncode == 0
    assert run_cli("checklist", "-i", "1", "--config", cfg).returncode == 0
    return cfg


def test_local_copies_of_extra_files_are_read_again(ssh_home, server_tree, tmp_path):
    cfg = backed_up_with_extras(ssh_home, server_tree, tmp_path)
    extras = tmp_path / "b" / "instance-1" / "extra-files"
    (extras / "config_full_dataset.json").unlink()
    flipped = extras / "deepspeed_config.json"
    data = bytearray(flipped.read_bytes())
    data[3] ^= 0x01
    os.chmod(flipped, 0o644)
    flipped.write_bytes(bytes(data))
    res = run_cli("checklist", "-i", "1", "--config", cfg, "--json")
    c = checks(res)
    assert res.returncode == 3 and not c["extra files verify"]["ok"], res.stdout
    assert "config_full_dataset.json" in c["extra files verify"]["detail"]
    assert "deepspeed_config.json" in c["extra files verify"]["detail"]
    fix = c["extra files verify"]["fix"]
    assert fix.startswith("ckptsync verify --repair extra-files --instance 1")
    assert run_cli(*shlex.split(fix.split("   (")[0])[1:]).returncode == 0   # pasted, it fetches them again
    assert run_cli("checklist", "-i", "1", "--config", cfg).returncode == 0


def test_the_servers_extra_file_is_compared_by_content(ssh_home, server_tree, tmp_path):
    cfg = backed_up_with_extras(ssh_home, server_tree, tmp_path)
    # rewritten in place: same size, same mtime, other bytes
    on_server = server_tree.parent.parent / "deepspeed_config.json"
    st = on_server.stat()
    data = bytearray(on_server.read_bytes())
    data[3] ^= 0x01
    with open(on_server, "r+b") as f:
        f.write(bytes(data))
    os.utime(on_server, ns=(st.st_atime_ns, st.st_mtime_ns))
    res = run_cli("checklist", "-i", "1", "--config", cfg, "--json")
    c = checks(res)
    assert res.returncode == 3 and not c["extra files backed up"]["ok"]
    assert "deepspeed_config.json: changed since the backup" in c["extra files backed up"]["detail"]


def test_where_processes_cannot_be_seen_the_checklist_says_so_and_the_cadence_stands_in(
        server_tree, tmp_path, monkeypatch):
    from ckptsync.agent import procs as agent_procs
    from ckptsync.backup import BackupOptions, run_backup
    from ckptsync.checklist import run_checklist

    age_tree(server_tree, -600)   # newest 10 min old, saves every 20: the next one is due in ~10 min
    monkeypatch.setattr(agent_procs, "process_ids", lambda: None)   # a server without /proc
    target, connect = in_process_target(server_tree, tmp_path / "b")
    assert run_backup(target, BackupOptions(), connect=connect).exit_code == 0
    result = run_checklist(target, connect=connect)
    training = next(c for c in result.checks if c.name == "training stopped")
    assert not training.ok and not result.safe
    assert training.detail.startswith("a checkpoint is saved every ~20 min; the next one is due in ~")
    assert training.detail.endswith("could not see: no /proc on this server: its processes cannot be seen")
    assert "--training-stopped" in training.fix
    stated = run_checklist(target, training_stopped=True, connect=connect)
    assert stated.safe, stated.checks
