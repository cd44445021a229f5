"""Has training stopped? Real processes with chosen command lines and working directories, the
agent's reading of them, and the checklist's verdict through the real CLI on this machine.

The checklist here runs against "this machine" (no --instance), so its agent sees the processes
this test starts, whatever namespace a test sshd runs in. Only processes that belong to the
test's own run directory can change a verdict, so other processes on the machine do not.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ckptsync.agent.procs import is_ckptsync, is_trainer, op_procs
from ckptsync.scan import ServerView
from ckptsync.server import FileStat, Process, Procs
from ckptsync.training import judge_training, temporary_save
from ckptsync.transport.base import STAGE1
from helpers import exec_done, run_cli

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc")

SLEEPER = "import time\ntime.sleep(600)\n"


class Children:
    """Processes started with a chosen argv and working directory; all killed at the end.
    Each is returned once its exec has finished: its command line, working directory and
    inherited descriptors are in /proc before anything looks."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.bin.mkdir(parents=True, exist_ok=True)
        self.started: list[subprocess.Popen] = []

    def program(self, name: str) -> Path:
        """An executable named `name` that sleeps: run as `#!python3 PATH ARGS`, as entry points are."""
        path = self.bin / name
        path.write_text(f"#!{sys.executable}\n{SLEEPER}")
        path.chmod(0o755)
        return path

    def start(self, argv: list[str], cwd: Path | str, **kw) -> subprocess.Popen:
        child = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, **kw)
        self.started.append(child)
        exec_done(child.pid)
        return child

    def stop(self, child: subprocess.Popen) -> None:
        child.kill()
        child.wait()

    def close(self) -> None:
        for child in self.started:
            if child.poll() is None:
                self.stop(child)


@pytest.fixture
def children(tmp_path):
    kids = Children(tmp_path / "bin")
    try:
        yield kids
    finally:
        kids.close()


def age_tree(root: Path, seconds: float) -> None:
    """Move every mtime under root back by seconds (forward when negative)."""
    for p in [root, *root.rglob("*")] if root.is_dir() else [root]:
        st = p.stat()
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns - int(seconds * 1e9)))


def local_config(tmp_path: Path, server: Path, **extra) -> list[str]:
    """The options of a target on this machine (--remote-dir, no instance): the agent runs here
    and sees these processes."""
    cfg = tmp_path / "ck.yaml"
    cfg.write_text(json.dumps({"local_dir": str(tmp_path / "backups"), "settle_seconds": 120, **extra}))
    return ["--config", str(cfg), "--remote-dir", str(server)]


def checklist(target: list[str], *args: str, env: dict | None = None) -> tuple[int, dict]:
    res = run_cli("checklist", *target, "--json", *args, env=env)
    assert res.stdout, res.stderr
    return res.returncode, json.loads(res.stdout)


def check(out: dict, name: str) -> dict:
    return next(c for c in out["checks"] if c["name"] == name)


# ---------------------------------------------------------------- what looks like training


@pytest.mark.parametrize("argv,expected", [
    (["python3", "train.py", "--lr", "1e-4"], True),
    (["/usr/bin/python3", "-u", "-W", "ignore", "finetune_lora.py"], True),
    (["python", "-m", "torch.distributed.run", "--nproc_per_node", "8", "run.py"], True),
    (["python3", "-um", "trl.scripts.sft", "--model", "x"], True),
    (["python3", "-m", "llamafactory.cli", "train", "qwen.yaml"], True),
    (["torchrun", "--nproc_per_node", "8", "run.py"], True),
    (["/venv/bin/python", "/venv/bin/torchrun", "--standalone", "run.py"], True),
    (["/venv/bin/python3", "/venv/bin/accelerate", "launch", "run.py"], True),
    (["/venv/bin/python3", "/venv/bin/accelerate", "config"], False),
    (["deepspeed", "--num_gpus", "8", "run.py"], True),
    (["/venv/bin/python3", "/venv/bin/llamafactory-cli", "train", "qwen.yaml"], True),
    (["/venv/bin/python3", "/venv/bin/axolotl", "train", "cfg.yml"], True),
    (["tune", "run", "lora_finetune_single_device", "--config", "x"], True),
    (["./train_gpt2cu", "-i", "data"], True),
    (["python3", "train.py", "--run-name", "ckptsync-agent"], True),
    (["python3", "eval.py", "--data", "/home/me/socrates-training/data"], False),
    (["python3", "check_constraints.py"], False),
    (["python3", "-m", "pytest", "tests/test_train.py"], False),
    (["bash", "train.sh"], False),
])
def test_what_looks_like_training(argv, expected):
    assert is_trainer(argv) is expected


def test_only_ckptsyncs_own_programs_are_passed_over():
    assert is_ckptsync(["python3", "-c", STAGE1])
    assert is_ckptsync(["/usr/bin/python3", "-m", "ckptsync", "backup", "-i", "0"])
    assert is_ckptsync(["/home/me/.local/bin/python3", "/home/me/.local/bin/ckptsync", "checklist"])
    assert not is_ckptsync(["python3", "train.py", "--run-name", "ckptsync-agent"])
    assert not is_ckptsync(["python3", "-c", "print('CKPTSYNC-AGENT-READY')", "ckptsync-agent"])
    assert not is_ckptsync(["python3", "-c", STAGE1 + ";train()"])


@pytest.mark.parametrize("path,save", [
    ("tmp-checkpoint-16/model.safetensors", "tmp-checkpoint-16/"),
    ("tmp-checkpoint-16/global_step16/mp_rank_00_model_states.pt", "tmp-checkpoint-16/"),
    ("latest.pt.tmp", "latest.pt.tmp"),
    ("checkpoint-12/model.safetensors.part", "checkpoint-12/model.safetensors.part"),
    (".tmp_ckpt_8fa2", ".tmp_ckpt_8fa2"),
    ("tmpa1b2c3d4.pt", "tmpa1b2c3d4.pt"),
    ("model.safetensors.incomplete", "model.safetensors.incomplete"),
    ("checkpoint-12/model.safetensors", None),
    ("latest.pt", None),
    ("tmp_notes.txt", None),
    ("runs/events.out.tfevents.1.host", None),
])
def test_temporary_saves_are_named(path, save):
    assert temporary_save(path) == save


# ---------------------------------------------------------------- the verdict, as a table

NOW = 100_000.0


def view_with(files: dict[str, float]) -> ServerView:
    exact = {p: FileStat(p, 10, int(m * 1e9), 0o644) for p, m in files.items()}
    return ServerView(root="/run", checkpoints=[], exact=exact, now=NOW, errors=[])


def procs_with(*processes: Process, blind: list[str] | None = None, writing=()) -> Procs:
    return Procs(processes=list(processes), writing=list(writing), gpu=None, blind=blind or [])


def proc(pid, cmd, run="", trainer=True, python=True, mine=True, gpu=False, seen=True) -> Process:
    return Process(pid, cmd, mine, run, trainer, python, gpu, seen)


def test_the_verdict_reads_this_runs_processes_and_lists_the_others():
    quiet = view_with({"checkpoint-1/a": NOW - 3000})
    theirs = proc(7, "python3 train.py", mine=False)
    mine_elsewhere = proc(8, "torchrun run.py")
    v = judge_training(quiet, procs_with(theirs, mine_elsewhere), 60)
    assert v.stopped and not v.unseen
    assert v.notes == ["pid 7 (python3 train.py), another user's, is training; it is not this run's",
                       "pid 8 (torchrun run.py), this user's, is training; it is not this run's "
                       "(if it is this run's, set train_process in the config)"]
    ours = proc(9, "python3 run.py", run="works in /run", trainer=False)
    v = judge_training(quiet, procs_with(ours), 60)
    assert v.stopped and v.unseen[0].startswith("pid 9 (python3 run.py) works in /run but does not look like training")
    gpu = proc(10, "python3 run.py", run="works in /run", trainer=False, gpu=True)
    assert judge_training(quiet, procs_with(gpu), 60).running == [
        "pid 10 (python3 run.py) is running; it works in /run and uses a GPU"]
    unattributable = proc(11, "python3 train.py", mine=False, seen=False)
    assert "cannot be told" in judge_training(quiet, procs_with(unattributable), 60).unseen[0]


def test_saves_in_progress_and_the_statement_that_training_stopped():
    fresh = view_with({"tmp-checkpoint-16/model.safetensors": NOW - 5, "checkpoint-12/x": NOW - 3000})
    v = judge_training(fresh, procs_with(), 60)
    assert v.writing == ["tmp-checkpoint-16/ is a save in progress (modified 5 s ago)"]
    # a file being written now is not set aside by --training-stopped
    assert not judge_training(fresh, procs_with(), 60, stated=True).stopped
    left = view_with({"latest.pt.tmp": NOW - 600, "checkpoint-12/x": NOW - 3000})
    v = judge_training(left, procs_with(), 60)
    assert v.stopped and v.stale == ["latest.pt.tmp is left from a save that did not finish (untouched for 10 min)"]
    v = judge_training(left, procs_with(blind=["no /proc on this server"]), 60)
    assert v.running == ["latest.pt.tmp is a save in progress (modified 10 min ago)"]
    trainer = proc(5, "torchrun run.py", run="works in /run")
    v = judge_training(left, procs_with(trainer, blind=["no /proc on this server"]), 60, stated=True)
    assert v.stopped and "stated with --training-stopped" in v.detail and "pid 5 (torchrun run.py)" in v.detail
    written = procs_with(writing=[(6, "python3 run.py", "/run/log.txt")])
    assert judge_training(left, written, 60, stated=True).writing == ["pid 6 (python3 run.py) is writing /run/log.txt"]


# ---------------------------------------------------------------- the agent, real processes


def test_the_agent_tells_this_runs_processes_by_directory_open_files_and_command_line(tmp_path, children):
    run = tmp_path / "proj" / "models" / "run1"
    (run / "checkpoint-1").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    torch_pkg = tmp_path / "pkgs" / "torch" / "distributed"
    torch_pkg.mkdir(parents=True)
    for d in (torch_pkg.parent, torch_pkg):
        (d / "__init__.py").write_text("")
    (torch_pkg / "run.py").write_text(SLEEPER)
    py = sys.executable
    fd = os.open(run / "log.txt", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        started = {
            "torchrun": children.start([str(children.program("torchrun")), "--nproc_per_node", "2", "x.py"], run.parent),
            "module": children.start([py, "-m", "torch.distributed.run", "--nproc_per_node", "2", "x.py"], run,
                                     env={**os.environ, "PYTHONPATH": str(tmp_path / "pkgs")}),
            "accelerate": children.start([str(children.program("accelerate")), "launch", "x.py"], run.parent.parent),
            "llamafactory": children.start([str(children.program("llamafactory-cli")), "train", "q.yaml"], run),
            "axolotl": children.start([str(children.program("axolotl")), "train", "c.yml"], run),
            "tune": children.start([str(children.program("tune")), "run", "lora_finetune"], run),
            "marked": children.start([py, "-u", "-W", "ignore", str(children.program("train.py")),
                                      "--run-name", "ckptsync-agent"], run),
            "names": children.start([py, str(children.program("sft.py")), f"--output_dir={run}"], elsewhere),
            "other": children.start([py, str(children.program("train.py"))], elsewhere),
            "writer": children.start([py, str(children.program("logger.py"))], elsewhere, pass_fds=(fd,)),
            "shell": children.start(["sleep", "600"], run),
        }
    finally:
        os.close(fd)
    reply = op_procs({"root": str(run), "pattern": ""})
    seen = {p["pid"]: p for p in reply["processes"]}
    by_name = {name: seen.get(child.pid) for name, child in started.items()}
    for name in ("torchrun", "module", "accelerate", "llamafactory", "axolotl", "tune", "marked", "names"):
        assert by_name[name] and by_name[name]["trainer"] and by_name[name]["run"], (name, by_name[name])
    assert by_name["torchrun"]["run"] == f"works in {run.parent}, above the run's directory"
    assert by_name["names"]["run"] == f"names {run}"
    assert by_name["other"]["trainer"] and not by_name["other"]["run"]
    assert by_name["shell"]["run"] == f"works in {run}" and not by_name["shell"]["trainer"]
    assert by_name["writer"]["run"] == f"writes {run / 'log.txt'}" and not by_name["writer"]["trainer"]
    assert [started["writer"].pid, str(run / "log.txt")] == [reply["writing"][0][0], reply["writing"][0][2]]
    if os.geteuid() == 0:
        assert not reply["blind"]
    assert os.getpid() not in seen   # the agent's own process and its parents are not counted


# ---------------------------------------------------------------- the checklist, through the CLI


@pytest.fixture
def backed_up(server_tree, tmp_path):
    """A run whose newest checkpoint is 10 minutes old with saves every 20 (the next one due in
    ~10 min), backed up; the target is this machine."""
    age_tree(server_tree, -600)
    cfg = local_config(tmp_path, server_tree)
    res = run_cli("backup", *cfg)
    assert res.returncode == 0, res.stdout + res.stderr
    return cfg


def test_no_process_of_this_run_means_training_stopped_whatever_the_cadence(server_tree, backed_up, children):
    code, out = checklist(backed_up)
    assert code == 0, out
    assert check(out, "training stopped")["detail"].startswith("no process of this run, no GPU in use by one")

    trainer = children.start([str(children.program("torchrun")), "--nproc_per_node", "2", "x.py"],
                             server_tree.parent)
    code, out = checklist(backed_up)
    training = check(out, "training stopped")
    assert code == 3 and not training["ok"]
    assert f"pid {trainer.pid} (" in training["detail"] and "torchrun" in training["detail"]
    assert "--training-stopped" in training["fix"]

    code, out = checklist(backed_up, "--training-stopped")
    training = check(out, "training stopped")
    assert code == 0 and training["ok"], out
    assert "stated with --training-stopped" in training["detail"] and f"pid {trainer.pid}" in training["detail"]
    # Something written now is not set aside by the statement.
    (server_tree / "trainer_log.jsonl").write_text("{}\n")
    code, out = checklist(backed_up, "--training-stopped")
    assert code == 3 and "trainer_log.jsonl was modified" in check(out, "training stopped")["detail"]
    (server_tree / "trainer_log.jsonl").unlink()

    children.stop(trainer)
    code, out = checklist(backed_up)
    assert code == 0, out


def test_other_training_on_the_server_is_information(server_tree, tmp_path, children, reachable_tmp):
    age_tree(server_tree, -600)
    home = server_tree.parents[2]   # <tmp>/server: the run is under ~/socrates-training
    cfg = local_config(tmp_path, server_tree)
    env = {"HOME": str(home)}
    assert run_cli("backup", *cfg, env=env).returncode == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    mine = children.start([sys.executable, str(children.program("train.py"))], elsewhere)
    in_home = children.start([str(children.program("deepspeed")), "run.py"], home)
    at_root = children.start([str(children.program("accelerate")), "launch", "run.py"], "/")
    others = [mine, in_home, at_root]
    if os.geteuid() == 0 and os.path.exists("/usr/bin/python3"):
        script = reachable_tmp / "train.py"
        script.write_text(SLEEPER)
        others.append(children.start(["/usr/bin/python3", str(script)], reachable_tmp, user="nobody"))
    code, out = checklist(cfg, env=env)
    assert code == 0, out
    for child in others:
        assert any(f"pid {child.pid} (" in note for note in out["notes"]), (child.args, out["notes"])
    if len(others) == 4:
        assert any(f"pid {others[3].pid} (" in n and "another user's" in n for n in out["notes"])

    # below the home directory and above the run: this run's
    ours = children.start([str(children.program("deepspeed")), "run.py"], home / "socrates-training")
    code, out = checklist(cfg, env=env)
    assert code == 3 and f"pid {ours.pid} (" in check(out, "training stopped")["detail"]


def test_a_trainer_is_seen_whatever_its_arguments_say(server_tree, tmp_path, children):
    age_tree(server_tree, 3600)   # the cadence alone would say training stopped long ago
    cfg = local_config(tmp_path, server_tree)
    assert run_cli("backup", *cfg).returncode == 0
    trainer = children.start([sys.executable, str(children.program("train.py")), "--run-name", "ckptsync-agent"],
                             server_tree)
    code, out = checklist(cfg)
    assert code == 3 and f"pid {trainer.pid} (" in check(out, "training stopped")["detail"]


@pytest.mark.parametrize("layout", ["trainer staging", "single file", "no completion signal"])
def test_a_save_in_progress_in_any_form_is_training_still_writing(server_tree, tmp_path, layout):
    age_tree(server_tree, 3600)
    cfg = local_config(tmp_path, server_tree)
    assert run_cli("backup", *cfg).returncode == 0
    if layout == "trainer staging":
        shutil.copytree(server_tree / "checkpoint-12", server_tree / "tmp-checkpoint-16")
        fresh, expected = server_tree / "tmp-checkpoint-16", "tmp-checkpoint-16/ is a save in progress"
    elif layout == "single file":
        fresh, expected = server_tree / "latest.pt.tmp", "latest.pt.tmp is a save in progress"
        fresh.write_bytes(b"\0" * 4096)
    else:
        shutil.copytree(server_tree / "checkpoint-12", server_tree / "checkpoint-16")
        (server_tree / "checkpoint-16" / "trainer_state.json").unlink()
        fresh, expected = server_tree / "checkpoint-16", "checkpoint-16 is still being written"
    for p in [fresh, *fresh.rglob("*")]:
        os.utime(p)   # written now
    code, out = checklist(cfg)
    assert code == 3 and expected in check(out, "training stopped")["detail"], out

    # The same save, untouched for 10 minutes with nothing of this run left: it did not finish.
    age_tree(fresh, 600)
    code, out = checklist(cfg)
    assert code == 0, out
    assert any(fresh.name in w for w in out["warnings"])
