"""Fault injection: hostile servers, awkward file names, a disk that fills up mid-backup."""

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

from helpers import HANG, ROOT, Gate, Lines, cli_env, run_cli, tree_digest, until
from sshd import process_tree, read_stat

HOSTILE = Path(__file__).resolve().parent / "hostile_agent.py"


def hostile_config(tmp_path: Path, mode: str) -> Path:
    cfg = tmp_path / f"hostile-{mode}.yaml"
    cfg.write_text(json.dumps({"remote_dir": "/srv", "local_dir": str(tmp_path / "backups"),
                               "instances": {"6": {"command": [sys.executable, str(HOSTILE), mode]}}}))
    return cfg


@pytest.mark.parametrize("mode,code,needle", [
    ("dotdot", 20, "unexpected tar member '../../evil.txt'"),
    ("absolute", 20, "unexpected tar member"),
    ("symlink", 20, "unexpected tar member"),
    ("device", 20, "unexpected tar member"),
    ("unexpected", 20, "unexpected tar member 'checkpoint-5/extra.bin'"),
    ("duplicate", 20, "unexpected tar member"),
    ("wronghash", 30, "does not match the server's checksum"),
    ("truncated", 20, "connection closed during transfer (checkpoint-5: 0 verified files kept"),  # cut inside a.bin
    ("garbage-frame", 20, "unexpected frame"),
    ("unsafe-scan", 20, "unsafe path"),
])
def test_hostile_server_is_refused_and_nothing_lands(tmp_path, mode, code, needle):
    target = tmp_path / "absolute-target"
    cfg = hostile_config(tmp_path, mode)
    res = run_cli("backup", "-i", "6", "--config", cfg, "--no-extra-files",
                  env={"HOSTILE_TARGET": str(target)}, timeout=60)
    assert res.returncode == code, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and needle in res.stderr
    dest = tmp_path / "backups" / "instance-6"
    assert not (dest / "checkpoint-5").exists()
    assert not target.exists()
    assert not list(tmp_path.rglob("evil.txt"))
    leftovers = [p for p in dest.rglob("*") if p.is_file() and p.suffix == ".part"] if dest.exists() else []
    assert leftovers == []


@pytest.mark.parametrize("mode,needle", [
    ("scan-stall", "no data from the server for 1 s"),      # a reply frame cut short, the link left open
    ("stall-send", "no data from the server for 1 s"),      # part of a file, then silence
    ("huge-frame", "frame of 2147483648 bytes is larger than allowed"),
    ("endless-data", "went on after the end of its tar data"),
    ("endless-records", "came twice"),
    ("still-beating", "a heartbeat that reports no progress"),
    ("scan-shape", "malformed reply to scan"),
])
def test_a_server_that_stalls_or_never_ends_its_reply_is_exit_20(tmp_path, mode, needle):
    # Each hostile server here keeps its end of the connection open forever (or talks forever):
    # only the client's checks (the stall limit, the size and shape limits) end the run.
    cfg = hostile_config(tmp_path, mode)
    res = run_cli("backup", "-i", "6", "--config", cfg, "--no-extra-files",
                  env={"CKPTSYNC_STALL_TIMEOUT": "1"}, timeout=60)
    assert res.returncode == 20, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and needle in res.stderr, res.stderr
    dest = tmp_path / "backups" / "instance-6"
    assert not (dest / "checkpoint-5").exists()


def test_the_stall_limit_comes_from_the_config_too(tmp_path):
    cfg = hostile_config(tmp_path, "stall-send")
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "stall_timeout": 1}))
    res = run_cli("backup", "-i", "6", "--config", cfg, "--no-extra-files", env={"CKPTSYNC_STALL_TIMEOUT": None},
                  timeout=60)
    assert res.returncode == 20 and "no data from the server for 1 s" in res.stderr, (res.stdout, res.stderr)


AWKWARD = ["sp ace.bin", "quote'\"d.bin", "semi;colon.bin", "$(touch pwned).bin", "new\nline.bin",
           "ünïcödé-名前.json", "back\\slash.bin", "-dash-first.bin"]


@pytest.mark.parametrize("via", ["local", "ssh"])
def test_awkward_file_names_round_trip(tmp_path, server_tree, request, via):
    ckpt = server_tree / "checkpoint-12"
    for i, name in enumerate(AWKWARD):
        (ckpt / name).write_bytes(os.urandom(1000 + i))
    old = time.time() - 1000
    for p in ckpt.iterdir():
        os.utime(p, (old, old))
    dest = tmp_path / "b"
    args = ["backup", "--remote-dir", server_tree, "--local-dir", dest, "--checkpoint", "checkpoint-12"]
    if via == "ssh":
        request.getfixturevalue("ssh_home")
        args += ["--host", "tnr-1"]
    res = run_cli(*args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert tree_digest(dest / "checkpoint-12").keys() == tree_digest(ckpt).keys()
    for name in AWKWARD:
        assert (dest / "checkpoint-12" / name).read_bytes() == (ckpt / name).read_bytes()
    assert not list(tmp_path.rglob("pwned")) and not Path.home().joinpath("pwned").exists()


PAUSED = Path(__file__).resolve().parent / "paused_agent.py"
PAUSED_CLI = Path(__file__).resolve().parent / "paused_cli.py"
PAUSE_AT = 48 << 20   # bytes of file data from the server: inside big.bin, far from either end of it


def _state(pid: int) -> str:
    """The process's state letter (R, S, T ...)."""
    return read_stat(pid)[0]


def _blocked_writing_a_pipe(pid: int) -> bool:
    """Whether a thread of the process sleeps inside a write to a pipe (a full one)."""
    return any((t / "wchan").read_text().endswith("pipe_write") for t in Path(f"/proc/{pid}/task").iterdir())


def _stopped_mid_write(argv: list[str], gate: Gate, writer: str) -> tuple[int, str]:
    """Run the CLI (argv) to the gate, then cut a pipe write of `writer` ("agent" or "client") short:
    the other end stops reading, the writer fills the pipe and blocks in its write, and a stop and
    continue makes that write return part done. The exit code and stderr of the run."""
    proc = subprocess.Popen(argv, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = {"client": proc.pid}
    try:
        err = Lines(proc.stderr)
        Lines(proc.stdout)
        gate.reached()
        kids = process_tree(proc.pid)
        assert len(kids) == 1, kids   # the agent
        pids["agent"] = kids[0]
        wrote, read = pids[writer], pids["agent" if writer == "client" else "client"]
        os.kill(read, signal.SIGSTOP)
        until("the reading end never stopped", lambda: _state(read) == "T")
        gate.release()
        until("the writer never blocked on a full pipe", lambda: _blocked_writing_a_pipe(wrote))
        os.kill(wrote, signal.SIGSTOP)
        until("the writing end never stopped", lambda: _state(wrote) == "T")
        os.kill(wrote, signal.SIGCONT)
        os.kill(read, signal.SIGCONT)
        return proc.wait(HANG), err.text()
    finally:
        gate.release()
        if proc.poll() is None:
            for pid in pids.values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            proc.kill()
            proc.wait()


def _with_big_file(server_tree: Path) -> Path:
    big = server_tree / "checkpoint-12" / "big.bin"
    with open(big, "wb") as f:
        f.write(os.urandom(24 << 20))
    old = time.time() - 1000
    os.utime(big, (old, old))
    return big


@pytest.mark.skipif(not Path("/proc/self/wchan").exists(), reason="needs /proc/PID/wchan (Linux)")
def test_a_server_stopped_in_the_middle_of_a_write_loses_no_bytes(tmp_path, server_tree):
    """A stop and continue (kill -STOP, a frozen cgroup, a suspend) cuts a blocked pipe write short.
    The agent goes on from where the write stopped; the backup is whole."""
    big = _with_big_file(server_tree)
    gate = Gate(tmp_path / "gate")   # the agent waits once 4 MiB of the 24 are out
    cfg = tmp_path / "paused.yaml"
    cfg.write_text(json.dumps({"instances": {"7": {"command": [
        sys.executable, str(PAUSED), str(Path(__file__).resolve().parents[1]), str(gate.dir), str(4 << 20)]}}}))
    dest = tmp_path / "b"
    code, err = _stopped_mid_write(
        [sys.executable, "-m", "ckptsync", "backup", "--remote-dir", str(server_tree), "--local-dir", str(dest),
         "-i", "7", "--config", str(cfg), "--checkpoint", "checkpoint-12", "--compress", "off", "--parallel", "1"],
        gate, "agent")
    assert code == 0, err
    assert (dest / "checkpoint-12" / "big.bin").read_bytes() == big.read_bytes()
    assert tree_digest(dest / "checkpoint-12") == tree_digest(server_tree / "checkpoint-12")


@pytest.mark.skipif(not Path("/proc/self/wchan").exists(), reason="needs /proc/PID/wchan (Linux)")
def test_a_client_stopped_in_the_middle_of_a_write_loses_no_bytes(tmp_path, server_tree):
    """The other direction: a restore's own write to the server, cut short by a stop (Ctrl-Z, then fg)."""
    big = _with_big_file(server_tree)
    store = tmp_path / "b"
    made = run_cli("backup", "--remote-dir", server_tree, "--local-dir", store, "--checkpoint", "checkpoint-12")
    assert made.returncode == 0, made.stderr
    fresh = tmp_path / "fresh-server"
    gate = Gate(tmp_path / "gate")   # the client waits before it sends big.bin
    code, err = _stopped_mid_write(
        [sys.executable, str(PAUSED_CLI), "ckptsync.server.remote:Upload.add", "big.bin", str(gate.dir),
         "restore", "--remote-dir", str(fresh), "--local-dir", str(store), "--checkpoint", "checkpoint-12",
         "--compress", "off", "--parallel", "1"],
        gate, "client")
    assert code == 0, err
    assert (fresh / "checkpoint-12" / "big.bin").read_bytes() == big.read_bytes()
    assert tree_digest(fresh / "checkpoint-12") == tree_digest(server_tree / "checkpoint-12")


@pytest.mark.skipif(not ROOT, reason="mounting a small tmpfs needs root")
def test_disk_full_mid_backup_keeps_earlier_backups_and_resumes(tmp_path, server_tree):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160m", "tmpfs", str(small)], check=True)
    try:
        dest = small / "b"
        base = ["backup", "--remote-dir", server_tree, "--local-dir", dest, "--no-extra-files"]
        assert run_cli(*base, "--checkpoint", "checkpoint-4").returncode == 0
        with open(server_tree / "checkpoint-12" / "big.bin", "wb") as f:
            for i in range(90):
                f.write(os.urandom(1 << 20))
        old = time.time() - 1000
        os.utime(server_tree / "checkpoint-12" / "big.bin", (old, old))
        # The agent stops sending once PAUSE_AT bytes are out, until the disk is full.
        gate = Gate(tmp_path / "gate")
        cfg = tmp_path / "paused.yaml"
        cfg.write_text(json.dumps({"instances": {"7": {"command": [
            sys.executable, str(PAUSED), str(Path(__file__).resolve().parents[1]), str(gate.dir), str(PAUSE_AT)]}}}))
        proc = subprocess.Popen([sys.executable, "-m", "ckptsync", *map(str, base), "-i", "7", "--config", str(cfg),
                                 "--checkpoint", "checkpoint-12", "--compress", "off", "--parallel", "1"],
                                env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = Lines(proc.stdout), Lines(proc.stderr)
            assert int(gate.reached()) >= PAUSE_AT, err.text(0)
            part = dest / ".ckptsync/staging/checkpoint-12/checkpoint-12/big.bin.part"
            assert part.exists()   # big.bin is under way
            filler = small / "filler"
            with open(filler, "wb") as f:
                try:
                    while True:
                        f.write(bytes(1 << 20))
                        f.flush()
                except OSError:
                    pass
            gate.release()
            code = proc.wait(HANG)
        finally:
            gate.release()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert code == 5, err.text()
        assert "no space left" in err.text() and "Traceback" not in err.text()
        assert not (dest / "checkpoint-12").exists()
        verify = run_cli("list", "--local", "--local-dir", dest, "--json")
        assert [r["name"] for r in json.loads(verify.stdout)["checkpoints"]] == ["checkpoint-4"]
        filler.unlink()
        again = run_cli(*base, "--checkpoint", "checkpoint-12")
        assert again.returncode == 0, again.stderr
        assert (dest / "checkpoint-12" / "big.bin").read_bytes() == (server_tree / "checkpoint-12" / "big.bin").read_bytes()
    finally:
        subprocess.run(["umount", "-l", str(small)])
