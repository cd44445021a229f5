"""Fault injection: hostile servers, awkward file names, a disk that fills up mid-backup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, cli_env, run_cli, tree_digest

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
        # level 19 on random bytes is slow: the transfer is still running when the disk fills
        proc = subprocess.Popen([sys.executable, "-m", "ckptsync", *map(str, base), "--checkpoint", "checkpoint-12",
                                 "--compress", "19"], env=cli_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        part = dest / ".ckptsync/staging/checkpoint-12/checkpoint-12/big.bin.part"
        end = time.monotonic() + 30
        while not part.exists() and time.monotonic() < end:
            time.sleep(0.002)
        filler = small / "filler"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(bytes(1 << 20))
                    f.flush()
            except OSError:
                pass
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 5, err
        assert "no space left" in err and "Traceback" not in err
        assert not (dest / "checkpoint-12").exists()
        verify = run_cli("list", "--local", "--local-dir", dest, "--json")
        assert [r["name"] for r in json.loads(verify.stdout)["checkpoints"]] == ["checkpoint-4"]
        filler.unlink()
        again = run_cli(*base, "--checkpoint", "checkpoint-12")
        assert again.returncode == 0, again.stderr
        assert (dest / "checkpoint-12" / "big.bin").read_bytes() == (server_tree / "checkpoint-12" / "big.bin").read_bytes()
    finally:
        subprocess.run(["umount", "-l", str(small)])
