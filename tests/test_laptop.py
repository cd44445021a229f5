"""The laptop side without the POSIX-only parts of Python.

Every command here runs in a Python that has no fcntl, pwd, grp, termios or resource and no
os.getuid (tests/without_posix/sitecustomize.py takes them away), with no XDG_RUNTIME_DIR and
with /proc hidden ($CKPTSYNC_PROC names an empty place): on Linux that stands in for a Windows
laptop. The local transport's agent is started the same way, since it inherits PYTHONPATH.
The whole module carries the `laptop` marker, so the macOS and Windows jobs of
.github/workflows/ci.yml run it natively too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO_ROOT, cli_env, run_cli, tree_digest

pytestmark = pytest.mark.laptop

WITHOUT_POSIX = Path(__file__).resolve().parent / "without_posix"

# Takes the backup directory's lock, says so, and keeps it until its stdin closes.
HOLD_LOCK = (
    "import sys; from ckptsync.stores.directory import DirectoryStore\n"
    "with DirectoryStore(sys.argv[1]).lock('test holder'):\n"
    "    print('held', flush=True)\n"
    "    sys.stdin.read()\n"
)


@pytest.fixture
def laptop(tmp_path: Path) -> dict[str, str | None]:
    """The environment of a laptop without the POSIX-only modules (a value of None unsets)."""
    home = tmp_path / "home"
    home.mkdir()
    return {
        "PYTHONPATH": os.pathsep.join([str(WITHOUT_POSIX), str(REPO_ROOT)]),
        "CKPTSYNC_PROC": str(tmp_path / "no-proc"),
        "XDG_RUNTIME_DIR": None,
        "HOME": str(home),
        "USERPROFILE": str(home),
        "XDG_CONFIG_HOME": None,
        "XDG_STATE_HOME": None,
        "CKPTSYNC_CONFIG": None,
        "CKPTSYNC_SSH": None,
        "COLUMNS": "200",
    }


def python(env: dict, *args: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], env=cli_env(env), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120, **kw)


def ok(res: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert res.returncode == 0, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    return res


def test_the_wrapper_takes_the_posix_modules_away(laptop):
    res = python(laptop, "-c", "import importlib, os\n"
                 "for name in ('fcntl', 'pwd', 'grp', 'termios', 'resource'):\n"
                 "    try:\n"
                 "        importlib.import_module(name)\n"
                 "    except ImportError:\n"
                 "        print(name, 'missing')\n"
                 "print('getuid', hasattr(os, 'getuid'))\n")
    assert res.stdout.split("\n") == ["fcntl missing", "pwd missing", "grp missing", "termios missing",
                                      "resource missing", "getuid False", ""], res.stderr


def test_help_of_the_app_and_of_every_command(laptop):
    res = ok(run_cli("--help", env=laptop))
    commands = ["backup", "list", "show", "verify", "restore", "prune", "compare", "checklist", "archive", "cron"]
    for name in commands:
        assert name in res.stdout
    for name in commands:
        assert "Usage: ckptsync " + name in ok(run_cli(name, "--help", env=laptop)).stdout


def test_backup_list_show_verify_prune_and_restore_through_the_local_agent(laptop, server_tree, tmp_path):
    backups = tmp_path / "backups"
    ok(run_cli("backup", "--all", "--remote-dir", server_tree, "--local-dir", backups, env=laptop))
    for name in ("checkpoint-4", "checkpoint-8", "checkpoint-12"):
        assert tree_digest(backups / name) == tree_digest(server_tree / name), name
        assert (backups / ".ckptsync" / "manifests" / f"{name}.json").is_file()

    listed = json.loads(ok(run_cli("list", "--local", "--local-dir", backups, "--json", env=laptop)).stdout)
    assert "checkpoint-12" in json.dumps(listed)
    shown = ok(run_cli("show", "--local-dir", backups, "checkpoint-12", env=laptop))
    assert "checkpoint-12" in shown.stdout
    verified = json.loads(ok(run_cli("verify", "--local-dir", backups, "--json", env=laptop)).stdout)
    assert {e["name"]: e["status"] for e in verified["entries"]} == {
        "checkpoint-4": "ok", "checkpoint-8": "ok", "checkpoint-12": "ok"}, verified

    before = tree_digest(backups)
    pruned = ok(run_cli("prune", "--local-dir", backups, "--keep-last", "1", "--dry-run", env=laptop))
    assert "checkpoint-4" in pruned.stdout
    assert tree_digest(backups) == before

    new_server = tmp_path / "new-server"
    new_server.mkdir()
    ok(run_cli("restore", "--remote-dir", new_server, "--local-dir", backups, "--checkpoint", "checkpoint-12",
               "--no-extra-files", env=laptop))
    assert tree_digest(new_server / "checkpoint-12") == tree_digest(server_tree / "checkpoint-12")


def hold_lock(laptop: dict, backups: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(backups)], env=cli_env(laptop),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_a_second_run_is_refused_while_the_lock_is_held_and_waits_for_it_with_wait(laptop, server_tree,
                                                                                    tmp_path):
    backups = tmp_path / "backups"
    args = ["backup", "--remote-dir", server_tree, "--local-dir", backups]
    holder = hold_lock(laptop, backups)
    try:
        refused = run_cli(*args, env=laptop)
        assert refused.returncode == 11, (refused.stdout, refused.stderr)
        assert "in use by 'test holder'" in refused.stderr
        assert not (backups / "checkpoint-12").exists()

        waiter = subprocess.Popen([sys.executable, "-m", "ckptsync", *map(str, args), "--wait"],
                                  env=cli_env(laptop), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        seen = []
        for line in waiter.stderr:   # the run says it waits before it blocks on the lock
            seen.append(line)
            if "waiting for 'test holder'" in line:
                break
        assert seen and "waiting for 'test holder'" in seen[-1], seen
        assert not (backups / "checkpoint-12").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    out, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, (out, err)
    assert tree_digest(backups / "checkpoint-12") == tree_digest(server_tree / "checkpoint-12")


def test_the_lock_of_a_killed_run_does_not_block_the_next(laptop, server_tree, tmp_path):
    backups = tmp_path / "backups"
    holder = hold_lock(laptop, backups)
    holder.kill()
    holder.wait(timeout=60)
    holder.stdin.close()
    holder.stdout.close()
    ok(run_cli("backup", "--remote-dir", server_tree, "--local-dir", backups, env=laptop))
    assert tree_digest(backups / "checkpoint-12") == tree_digest(server_tree / "checkpoint-12")


@pytest.mark.skipif(shutil.which("ssh") is None, reason="no ssh client on PATH")
def test_an_openssh_target_that_does_not_resolve_is_one_line_and_exit_20(laptop, tmp_path):
    # Builds the OpenSSH transport (its config and socket directory, the home ssh reads)
    # without reaching any server.
    res = run_cli("backup", "--ssh", "openssh", "--host", "nosuchhost.invalid", "--remote-dir", "/x",
                  "--local-dir", tmp_path / "b", env=laptop)
    assert res.returncode == 20, (res.stdout, res.stderr)
    assert "nosuchhost.invalid" in res.stderr
    assert "Traceback" not in res.stderr


def test_every_test_module_imports_without_the_posix_modules(laptop):
    """What the macOS and Windows jobs collect: no test module may need a POSIX-only module
    just to be imported."""
    res = python(laptop, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                 "-m", "laptop", str(REPO_ROOT / "tests"), cwd=REPO_ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "test_laptop.py::test_the_wrapper_takes_the_posix_modules_away" in res.stdout
