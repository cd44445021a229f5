"""The shell completion scripts in completions/: up to date with the CLI, and working."""

from __future__ import annotations

import difflib
import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import REPO_ROOT, cli_env

COMPLETIONS = REPO_ROOT / "completions"
GENERATOR = REPO_ROOT / ".ci" / "make-completions"
SCRIPTS = ("ckptsync.bash", "_ckptsync", "ckptsync.fish")


def test_committed_scripts_match_the_cli(tmp_path):
    res = subprocess.run([sys.executable, str(GENERATOR), "--out", str(tmp_path)], env=cli_env(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    stale = []
    for name in SCRIPTS:
        fresh = (tmp_path / name).read_text(encoding="utf-8")
        committed_path = COMPLETIONS / name
        committed = committed_path.read_text(encoding="utf-8") if committed_path.exists() else ""
        if fresh != committed:
            diff = difflib.unified_diff(committed.splitlines(), fresh.splitlines(), f"completions/{name}",
                                        "generated now", lineterm="", n=1)
            stale.append("\n".join(list(diff)[:30]))
    assert not stale, ("completions/ is out of date with the CLI: run `python3 .ci/make-completions` "
                       "and commit the result\n\n" + "\n\n".join(stale))


def bash_complete(*words: str, cwd=None) -> list[str]:
    """COMPREPLY of the committed bash script for a command line whose last word is being completed."""
    script = (f'source "{COMPLETIONS / "ckptsync.bash"}"; COMP_WORDS=("$@"); '
              'COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 )); _ckptsync; printf "%s\\n" "${COMPREPLY[@]}"')
    res = subprocess.run(["bash", "-c", script, "bash", *words], capture_output=True, text=True,
                         timeout=30, cwd=cwd)
    assert res.returncode == 0, res.stderr
    return [line for line in res.stdout.splitlines() if line]


@pytest.mark.parametrize("words, expected", [
    (("ckptsync", "ba"), ["backup"]),
    (("ckptsync", "backup", "--max"), ["--max-checkpoints"]),
    (("ckptsync", "--debug", "cr"), ["cron"]),
    (("ckptsync", "cron", ""), ["install", "remove", "show"]),
    (("ckptsync", "cron", "install", "--ev"), ["--every"]),
    (("ckptsync", "cron", "show", "--js"), ["--json"]),
    (("ckptsync", "show", "--js"), ["--json"]),
    (("ckptsync", "backup", "--instance", ""), []),          # a value: nothing to offer
    (("ckptsync", "backup", "--instance", "show", "--qu"), ["--quiet"]),  # "show" was the value
    (("ckptsync", "zzz"), []),
])
def test_bash_completes_commands_and_options(words, expected):
    assert sorted(bash_complete(*words)) == expected


def test_bash_completes_paths(tmp_path):
    (tmp_path / "with space").mkdir()
    (tmp_path / "wide.yaml").write_text("{}")
    assert bash_complete("ckptsync", "backup", "--local-dir", "w", cwd=tmp_path) == ["with space"]
    assert sorted(bash_complete("ckptsync", "backup", "--config", "w", cwd=tmp_path)) == ["wide.yaml", "with space"]
    # --opt=value reaches the function as three words
    assert bash_complete("ckptsync", "backup", "--local-dir", "=", "w", cwd=tmp_path) == ["with space"]


def test_zsh_script_parses():
    if shutil.which("zsh") is None:
        pytest.skip("zsh is not installed")
    res = subprocess.run(["zsh", "-n", str(COMPLETIONS / "_ckptsync")], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("line, expected", [
    ("ckptsync ba", ["backup"]),
    ("ckptsync backup --max", ["--max-checkpoints"]),
    ("ckptsync cron ", ["install", "remove", "show"]),
    ("ckptsync backup --instance ", []),
])
def test_fish_completes(line, expected):
    if shutil.which("fish") is None:
        pytest.skip("fish is not installed")
    res = subprocess.run(["fish", "-N", "-c", f"source {COMPLETIONS / 'ckptsync.fish'}; complete -C '{line}'"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert sorted(c.split("\t")[0] for c in res.stdout.splitlines() if c) == expected


@pytest.fixture
def backups(tmp_path, monkeypatch):
    """A backup directory with two checkpoints, and `ckptsync` on PATH as this checkout's CLI."""
    root = tmp_path / "backups"
    meta = root / ".ckptsync" / "manifests"
    meta.mkdir(parents=True)
    for step in (1500, 3000):
        name = f"checkpoint-{step}"
        (root / name).mkdir()
        meta.joinpath(f"{name}.json").write_text(json.dumps({
            "name": name, "layout": "trainer", "kind": "rolling", "step": step, "files": []}))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "ckptsync"
    stub.write_text(f"#!/bin/sh\nexec {sys.executable} -m ckptsync \"$@\"\n")
    stub.chmod(0o755)
    for key, value in cli_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    (tmp_path / "laptop-dir").mkdir()
    return root


def test_bash_completes_checkpoint_names_from_the_backup_directory(backups):
    listed = ["checkpoint-3000", "checkpoint-1500"]
    assert bash_complete("ckptsync", "restore", "--local-dir", str(backups), "--checkpoint", "") == listed
    assert bash_complete("ckptsync", "backup", "-l", str(backups), "--checkpoint", "checkpoint-1") == ["checkpoint-1500"]
    assert bash_complete("ckptsync", "show", "-l", str(backups), "") == listed
    assert bash_complete("ckptsync", "compare", "-l", str(backups), "checkpoint-1500", "") == listed
    # A directory without backups, or a broken config: nothing, and nothing printed.
    assert bash_complete("ckptsync", "restore", "--local-dir", str(backups / "nope"), "--checkpoint", "") == []
    assert bash_complete("ckptsync", "-c", str(backups / "nope.yaml"), "show", "") == []


def test_remote_dir_completes_no_directory_of_this_machine(backups):
    here = backups.parent
    assert bash_complete("ckptsync", "backup", "--remote-dir", "l", cwd=here) == []
    assert bash_complete("ckptsync", "backup", "--local-dir", "l", cwd=here) == ["laptop-dir"]
    assert bash_complete("ckptsync", "adopt", "l", cwd=here) == ["laptop-dir"]   # DIR: on this machine


def test_fish_completes_checkpoint_names(backups):
    if shutil.which("fish") is None:
        pytest.skip("fish is not installed")
    line = f"ckptsync restore -l {backups} --checkpoint "
    res = subprocess.run(["fish", "-N", "-c", f"source {COMPLETIONS / 'ckptsync.fish'}; complete -C '{line}'"],
                         capture_output=True, text=True, timeout=60)
    assert sorted(c.split("\t")[0] for c in res.stdout.splitlines() if c) == ["checkpoint-1500", "checkpoint-3000"]
