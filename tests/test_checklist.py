"""`ckptsync checklist`: the pre-shutdown checklist through a real sshd."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import time

import pytest

from ckptsync.checklist import looks_like_trainer, save_interval, training_signals
from ckptsync.layout import Checkpoint, mark_abandoned
from ckptsync.scan import ServerView
from ckptsync.server import Procs
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
    cfg = config(ssh_home, server_tree, tmp_path / "b")
    # the trainer is writing checkpoint-16 right now
    shutil.copytree(server_tree / "checkpoint-12", server_tree / "checkpoint-16")
    (server_tree / "checkpoint-16" / "trainer_state.json").unlink()
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
    base = dict(matched=[], gpu=None, open_under=[], open_checked=True, open_error="", trainers=[])
    base.update(kw)
    return Procs(**base)


def test_training_signals_table():
    now = 10_000.0
    cps = [ckpt("checkpoint-3", now - 100), ckpt("checkpoint-2", now - 700), ckpt("checkpoint-1", now - 1300)]
    assert save_interval(cps) == 600
    view = ServerView(root="/r", checkpoints=cps, exact={}, now=now, errors=[])
    assert "next one is due in ~8 min" in training_signals(view, procs(), None, now)[0]
    # Late by less than the margin (1.5 intervals): the trainer may still be running.
    assert "due now" in training_signals(view, procs(), None, now + 600)[0]
    assert "due now" in training_signals(view, procs(), None, now + 700)[0]
    assert training_signals(view, procs(), None, now + 1000) == []
    old = ServerView(root="/r", checkpoints=[ckpt("checkpoint-1", now - 5000)], exact={}, now=now, errors=[])
    assert training_signals(old, procs(), None, now) == []
    assert "GPU process" in training_signals(old, procs(gpu=["123, python, 30000 MiB"]), None, now)[0]
    assert "pid 9" in training_signals(old, procs(matched=[(9, "python train.py")]), "train.py", now)[0]
    assert "has /r/checkpoint-2/x.pt open" in training_signals(
        old, procs(open_under=[(7, "python3 loop.py", "/r/checkpoint-2/x.pt")]), None, now)[0]
    assert "training process" in training_signals(old, procs(trainers=[(8, "python3 train.py")]), None, now)[0]


def test_abandoned_checkpoint_does_not_block_after_the_margin():
    now = 100_000.0
    done = [ckpt("checkpoint-3", now - 4000), ckpt("checkpoint-2", now - 4600), ckpt("checkpoint-1", now - 5200)]
    fresh = ckpt("checkpoint-4", now - 900, complete=False)
    stale = ckpt("checkpoint-4", now - 2000, complete=False)
    marked = mark_abandoned(done + [fresh], now)
    assert not marked[-1].abandoned  # 900 s: under max(3 x 600 s, 30 min)
    marked = mark_abandoned(done + [stale], now)
    assert marked[-1].abandoned
    view = ServerView(root="/r", checkpoints=marked, exact={}, now=now, errors=[])
    assert training_signals(view, procs(), None, now) == []


@pytest.mark.parametrize("cmd,expected", [
    ("python3 train.py --lr 1e-4", True),
    ("/usr/bin/python3 -u finetune_train_lora.py", True),
    ("python -m trl.scripts.train --x", True),
    ("torchrun --nproc_per_node 8 run.py", True),
    ("/opt/venv/bin/accelerate launch run.py", True),
    ("deepspeed run.py", True),
    ("python3 eval.py --data /home/me/socrates-training/data", False),
    ("python3 -m ckptsync checklist -i 0", False),
    ("bash train.sh", False),
    ("", False),
])
def test_looks_like_trainer(cmd, expected):
    assert looks_like_trainer(cmd) is expected


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
