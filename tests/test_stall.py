"""A server that stops answering: the stall limit ends the run with exit 20, on every transport and in
both directions; and a run that holds a backup directory's lock without progress is reported.

Every stall here is real and unbounded: the agent is stopped with SIGSTOP (or blocked on an event
nobody sets until the end) and stays stopped until the test ends it. The limit (1 s) is the only
thing that can end the wait, so no outcome depends on how fast the machine is.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from ckptsync.errors import Stalled
from ckptsync.server.agent_server import AgentServer
from ckptsync.server.inprocess import InProcessServer
from ckptsync.transport import CommandTransport, LocalTransport, SshTarget, ssh_transport
from helpers import FAKE_CRONTAB, REPO_ROOT, run_cli, set_tree_mtime, tree_digest

LIMIT = 1.0
BIG = 48 << 20   # far more than the pipes, socket buffers and SSH windows hold between the two ends
MEMBER = "checkpoint-5/model.safetensors"
STOPPING = Path(__file__).resolve().parent / "stopping_agent.py"


def make_tree(root: Path, files: dict[str, int]) -> Path:
    """A run directory with checkpoint-5 holding `files` (name -> size) of random bytes, an hour old."""
    ckpt = root / "checkpoint-5"
    ckpt.mkdir(parents=True)
    for name, size in files.items():
        with open(ckpt / name, "wb") as f:
            for _ in range(size >> 20):
                f.write(os.urandom(1 << 20))
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 5, "log_history": []}))
    set_tree_mtime(root, time.time() - 3600)
    return root


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("stall") / "run", {"model.safetensors": BIG})


@contextlib.contextmanager
def stopped(pid: int):
    """The agent stopped as a SIGSTOP stops it; killed at the end (a stopped process takes SIGKILL)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(params=["local", "command", "openssh", "paramiko"])
def transport(request):
    kind = request.param
    if kind == "local":
        return LocalTransport()
    home = request.getfixturevalue("ssh_home")
    if kind == "command":
        return CommandTransport(["ssh", "-F", str(home / ".ssh" / "config"), "tnr-1"])
    return ssh_transport(SshTarget(host="tnr-1"), kind)


def test_a_stopped_agent_ends_a_download_with_exit_20(transport, big_tree):
    with AgentServer(transport, stall_timeout=LIMIT) as server:
        dl = server.send(str(big_tree), [(MEMBER, MEMBER)], compress="off")
        assert dl.read(1 << 20)  # the transfer is under way
        with stopped(server.hello.pid), pytest.raises(Stalled) as caught:
            while dl.read(1 << 20):
                pass
    assert caught.value.exit_code == 20
    assert caught.value.message.startswith(
        f"no data from the server for 1 s; ended the connection to {transport.describe()}")


def test_a_stopped_agent_ends_an_upload_with_exit_20(transport, big_tree, tmp_path):
    source = big_tree / MEMBER
    with AgentServer(transport, stall_timeout=LIMIT) as server:
        up = server.receive(str(tmp_path), "checkpoint-5", compress="off")  # the server said it is ready
        with stopped(server.hello.pid), open(source, "rb") as f, pytest.raises(Stalled) as caught:
            up.add(MEMBER, f, BIG, source.stat().st_mtime_ns, 0o644)
            up.finish()
    assert caught.value.message.startswith("the server took no data for 1 s")
    assert not (tmp_path / "checkpoint-5").exists()


def test_an_agent_blocked_on_the_server_ends_the_in_process_twin_too(server_tree, monkeypatch):
    # The in-process agent cannot be stopped with a signal: its hash operation waits on an event
    # instead, which only the end of the test sets.
    from ckptsync.agent import serve

    release = threading.Event()
    entered = threading.Event()

    def hung_hash(req):
        entered.set()
        release.wait()
        return {"hashes": {}}

    monkeypatch.setitem(serve.SIMPLE, "hash", hung_hash)
    server = InProcessServer(stall_timeout=LIMIT)
    try:
        with server, pytest.raises(Stalled) as caught:
            server.hash(str(server_tree), ["checkpoint-12/optimizer.pt"])
    finally:
        release.set()
    assert entered.is_set() and "no data from the server for 1 s" in caught.value.message


# -------------------------------------------------- through the CLI: backup, --parallel, restore


def stopping_instance(tmp_path: Path, home: Path, remote_dir: Path, op: str, after: int) -> tuple[Path, Path]:
    """A config whose instance 1 runs the real agent through sshd, stopped after `after` bytes of `op`."""
    pids = tmp_path / "stopped.pids"
    remote = f"{shlex.quote(sys.executable)} {STOPPING} {REPO_ROOT} {pids} {op} {after} #"
    cfg = tmp_path / "stopping.yaml"
    cfg.write_text(json.dumps({"remote_dir": str(remote_dir), "local_dir": str(tmp_path / "b"),
                               "instances": {"1": {"command": ["ssh", "-F", str(home / ".ssh" / "config"),
                                                               "tnr-1", remote]}}}))
    return cfg, pids


def kill_stopped(pids: Path) -> list[int]:
    found = [int(x) for x in pids.read_text().split()] if pids.exists() else []
    for pid in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return found


@pytest.mark.parametrize("parallel", ["1", "2"])
def test_a_backup_whose_agent_stops_mid_transfer_exits_20_and_a_rerun_completes(ssh_home, tmp_path, parallel):
    run = make_tree(tmp_path / "run", {"a.bin": 24 << 20, "b.bin": 24 << 20})
    cfg, pids = stopping_instance(tmp_path, ssh_home, run, "send", 1 << 20)
    try:
        res = run_cli("backup", "-i", "1", "--config", cfg, "--parallel", parallel, "--compress", "off",
                      env={"CKPTSYNC_STALL_TIMEOUT": "1"}, timeout=120)
    finally:
        stopped_pids = kill_stopped(pids)
    assert stopped_pids, "the agent never stopped: the stall did not happen during the transfer"
    assert res.returncode == 20, (res.stdout, res.stderr)
    assert "no data from the server for 1 s" in res.stderr and "rerun to resume" in res.stderr
    assert "Traceback" not in res.stderr
    dest = tmp_path / "b" / "instance-1"
    assert not (dest / "checkpoint-5").exists()
    plain = tmp_path / "plain.yaml"
    plain.write_text(json.dumps({"remote_dir": str(run), "local_dir": str(tmp_path / "b")}))
    res = run_cli("backup", "-i", "1", "--config", plain, "--parallel", parallel, timeout=120)
    assert res.returncode == 0, res.stderr
    assert tree_digest(dest / "checkpoint-5") == tree_digest(run / "checkpoint-5")


def test_a_restore_whose_agent_stops_mid_upload_exits_20_and_puts_nothing_in_place(ssh_home, tmp_path):
    run = make_tree(tmp_path / "run", {"model.safetensors": 32 << 20})
    dest = tmp_path / "b" / "instance-1"
    res = run_cli("backup", "-i", "1", "--remote-dir", run, "--local-dir", dest, timeout=120)
    assert res.returncode == 0, res.stderr
    fresh = tmp_path / "fresh"
    cfg, pids = stopping_instance(tmp_path, ssh_home, fresh, "receive", 1 << 20)
    try:
        res = run_cli("restore", "-i", "1", "--config", cfg, "--local-dir", dest, "--checkpoint", "checkpoint-5",
                      "--compress", "off",
                      env={"CKPTSYNC_STALL_TIMEOUT": "1"}, timeout=120)
    finally:
        stopped_pids = kill_stopped(pids)
    assert stopped_pids, ("the agent never stopped: the stall did not happen during the upload", res.stderr)
    assert res.returncode == 20, (res.stdout, res.stderr)
    assert "the server took no data for 1 s" in res.stderr and "Traceback" not in res.stderr
    assert not (fresh / "checkpoint-5").exists()
    res = run_cli("restore", "-i", "1", "--remote-dir", fresh, "--local-dir", dest, "--checkpoint", "checkpoint-5",
                  timeout=120)
    assert res.returncode == 0, res.stderr
    assert tree_digest(fresh / "checkpoint-5") == tree_digest(run / "checkpoint-5")


# -------------------------------------------------- a lock holder without progress


@contextlib.contextmanager
def held_lock(path: Path, info: dict):
    """The lock file taken and filled in as a run holding it would (this test process is the holder)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield
    finally:
        os.close(fd)


def holder(command: str, idle: float) -> dict:
    now = time.time()
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "since": now - idle - 60,
            "progress": now - idle}


def test_skip_if_locked_reports_a_holder_without_progress_for_longer_than_the_limit(server_tree, tmp_path):
    dest = tmp_path / "b"
    args = ("backup", "--remote-dir", server_tree, "--local-dir", dest, "--skip-if-locked")
    with held_lock(dest / ".ckptsync" / "lock", holder("ckptsync backup", idle=10)):  # busy: skipped quietly
        res = run_cli(*args, env={"CKPTSYNC_STALL_TIMEOUT": "300"})
    assert res.returncode == 0 and "skipped" in res.stderr, res.stderr
    with held_lock(dest / ".ckptsync" / "lock", holder("ckptsync backup", idle=3600)):  # an hour without progress
        res = run_cli(*args, env={"CKPTSYNC_STALL_TIMEOUT": "300"})
    assert res.returncode == 11, (res.stdout, res.stderr)
    assert f"'ckptsync backup' (pid {os.getpid()}" in res.stderr
    assert "has made no progress for 60 min, longer than the stall limit (300 s)" in res.stderr
    assert f"kill -CONT {os.getpid()}" in res.stderr
    assert not list(dest.glob("checkpoint-*"))


def test_cron_show_and_checklist_report_a_stuck_holder(server_tree, tmp_path):
    dest = tmp_path / "b"
    table = tmp_path / "crontab.txt"
    crontab = tmp_path / "fake-crontab"
    crontab.write_text(FAKE_CRONTAB.format(table=shlex.quote(str(table))))
    crontab.chmod(0o755)
    target = ("--remote-dir", server_tree, "--local-dir", dest)
    env = {"CKPTSYNC_CRONTAB": str(crontab), "CKPTSYNC_STALL_TIMEOUT": "300", "COLUMNS": None}
    with held_lock(dest / ".ckptsync" / "lock", holder("ckptsync backup", idle=3600)):
        show = run_cli("cron", "show", *target, env=env)
        checklist = run_cli("checklist", *target, env=env)
    for res in (show, checklist):
        assert "has made no progress for 60 min" in res.stdout + res.stderr, (res.stdout, res.stderr)
    assert show.returncode == 0, show.stderr
    with held_lock(dest / ".ckptsync" / "lock", holder("ckptsync backup", idle=10)):
        show = run_cli("cron", "show", *target, env=env)
    assert "no progress" not in show.stdout + show.stderr


def test_the_lock_file_records_the_holders_progress_every_few_seconds(tmp_path):
    from ckptsync import liveness

    clock = [1000.0]
    recorder = liveness.Recorder(clock=lambda: clock[0])
    path = tmp_path / "lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        recorder.hold(fd, {"pid": 1, "host": "h", "command": "ckptsync backup", "since": 1000.0, "progress": 1000.0})
        clock[0] = 1000.0 + liveness.EVERY / 2
        recorder.note()  # bytes arrived, but the file was written a moment ago
        assert liveness.read_holder(path)["progress"] == 1000.0
        clock[0] = 1000.0 + liveness.EVERY * 1.5
        recorder.note()
        assert liveness.read_holder(path)["progress"] == clock[0]
        recorder.drop(fd)
        clock[0] += liveness.EVERY * 10
        recorder.note()  # released: no longer written
        assert liveness.read_holder(path)["progress"] == 1000.0 + liveness.EVERY * 1.5
    finally:
        os.close(fd)


@pytest.mark.parametrize("info,alive,expect", [
    ({"host": "HERE", "pid": 5, "progress": 0.0}, True, 1000.0),        # live, idle far beyond the limit
    ({"host": "HERE", "pid": 5, "progress": 900.0}, True, None),        # busy
    ({"host": "HERE", "pid": 5, "progress": 0.0}, False, None),         # dead: its info is stale
    ({"host": "elsewhere", "pid": 5, "progress": 0.0}, False, 1000.0),  # not seen from here: counts as live
    ({"host": "HERE", "pid": 5, "since": 0.0}, True, None),             # an older holder records no progress
    (None, True, None),
])
def test_a_stuck_holder_is_a_live_one_idle_for_longer_than_the_limit(info, alive, expect):
    from ckptsync import liveness

    if info is not None and info["host"] == "HERE":
        info = {**info, "host": socket.gethostname()}
    assert liveness.stuck(info, now=1000.0, limit=300.0, alive=lambda pid: alive) == expect


# -------------------------------------------------- the pieces: watchdog, heartbeats


def test_the_watchdog_counts_only_time_spent_waiting_with_nothing_moving():
    from ckptsync.server.watchdog import READ, WRITE, Watchdog

    now = [0.0]
    dog = Watchdog(10.0, on_stall=lambda: None, clock=lambda: now[0])
    now[0] = 50.0
    dog.begin(READ)             # the 50 s before, spent here between calls, are not the server's
    assert not dog.check(59.0)
    now[0] = 59.5
    dog.end(READ, moved=True)   # a byte came: the clock starts again
    dog.begin(READ)
    assert not dog.check(69.0)
    dog.end(READ, moved=False)
    assert not dog.check(1000.0)  # nobody waits: no stall
    now[0] = 2000.0
    dog.begin(WRITE)
    assert not dog.check(2009.9)
    assert dog.check(2010.0) and dog.fired == WRITE
    assert not dog.check(2020.0)  # once


def test_the_agent_beats_only_while_its_work_advances():
    import io

    from ckptsync.agent.frames import BEAT, BEAT_COUNT, HEADER, Channel, Heartbeat, tick

    out = io.BytesIO()
    beat = Heartbeat(Channel(io.BytesIO(), out))
    assert beat.beat() and out.getvalue() == b""   # nothing done: nothing said (a hung disk stays silent)
    tick(3)
    assert beat.beat()
    kind, size = HEADER.unpack(out.getvalue()[:HEADER.size])
    assert kind == BEAT and size == BEAT_COUNT.size
    assert beat.beat() and len(out.getvalue()) == HEADER.size + BEAT_COUNT.size  # no new work, no new frame


def test_reading_and_hashing_on_the_server_count_as_work(tmp_path):
    from ckptsync.agent.frames import Work
    from ckptsync.agent.hashing import hash_file

    path = tmp_path / "f"
    path.write_bytes(os.urandom(3 << 20))
    before = Work.done
    hash_file(str(path), "sha1")
    assert Work.done - before >= 3


def test_heartbeats_keep_a_link_alive_and_one_without_progress_is_refused():
    import io

    from ckptsync.agent import BEAT, BEAT_COUNT, HEADER, Failure
    from ckptsync.server.remote import _Channel

    def frames(*counts):
        beats = b"".join(HEADER.pack(BEAT, BEAT_COUNT.size) + BEAT_COUNT.pack(c) for c in counts)
        return io.BytesIO(beats + HEADER.pack(b"J", 2) + b"{}")

    assert _Channel(frames(1, 2, 5), io.BytesIO()).recv() == (b"J", b"{}")
    with pytest.raises(Failure, match="no progress"):
        _Channel(frames(4, 4), io.BytesIO()).recv()


def test_a_backup_holds_its_lock_with_its_progress_time_in_it(server_tree, tmp_path):
    from ckptsync import liveness
    from ckptsync.backup import BackupOptions, run_backup
    from ckptsync.config import Target
    from ckptsync.server.inprocess import Hooks

    dest = tmp_path / "b"
    seen = []
    hooks = Hooks()
    hooks.on_before("send", lambda _args: seen.append(liveness.read_holder(dest / ".ckptsync" / "lock")), times=1)
    server = InProcessServer(hooks)
    target = Target(label="instance-0", transport=None, remote_dir=str(server_tree), local_dir=dest)
    before = time.time()
    assert run_backup(target, BackupOptions(names=["checkpoint-12"]), connect=lambda: server).exit_code == 0
    info = seen[0]  # read while the transfer was about to start, the lock held
    assert (info["pid"], info["command"]) == (os.getpid(), "ckptsync backup")
    assert before <= info["since"] <= info["progress"] <= time.time()
    assert liveness.read_holder(dest / ".ckptsync" / "lock") is None  # let go of at the end
