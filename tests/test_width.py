"""80 columns: the restore dry run, prune and the help fit, piped with COLUMNS=80 and on a real
80-column terminal, with whole names and no spaces padding a line's end."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import cli_env, run_cli

WIDTH = 80
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture
def backed_up(server_tree: Path, reachable_tmp: Path) -> tuple[Path, Path, Path]:
    """The run under a short path (so no path is longer than a line), backed up with its extra
    files: -> (the run, the backup directory, a new run directory to restore into)."""
    top = reachable_tmp / "t"
    shutil.copytree(server_tree.parents[1], top, symlinks=True)
    run = top / "models" / server_tree.name
    backups = reachable_tmp / "b"
    res = run_cli("backup", "--all", "--remote-dir", run, "--local-dir", backups,
                  "--extra-file", "../../config_full_dataset.json", "--extra-file", "../../deepspeed_config.json")
    assert res.returncode == 0, res.stderr
    return run, backups, reachable_tmp / "new" / "run"


def commands(backed: tuple[Path, Path, Path]) -> dict[str, list]:
    run, backups, fresh = backed
    return {
        "restore --dry-run": ["restore", "--dry-run", "--remote-dir", fresh, "--local-dir", backups],
        "prune --dry-run": ["prune", "--dry-run", "--keep-last", "1", "--local-dir", backups],
        "restore --help": ["restore", "--help"],
        "prune --help": ["prune", "--help"],
    }


def check_lines(what: str, text: str) -> None:
    for line in text.splitlines():
        assert len(line) <= WIDTH, (what, len(line), line)
        assert line == line.rstrip(), (what, line)
        assert not re.search(r"[\w/~]-$", line), (what, "a word broken at a hyphen", line)
    assert "\u2026" not in text and "..." not in text, (what, text)


def test_piped_with_columns_80_every_line_fits(backed_up):
    for what, args in commands(backed_up).items():
        res = run_cli(*args, env={"COLUMNS": str(WIDTH)})
        assert res.returncode == 0, (what, res.stderr)
        check_lines(what, res.stdout)
    res = run_cli(*commands(backed_up)["restore --dry-run"], env={"COLUMNS": str(WIDTH)})
    assert "checkpoint-12/adapter_model.safetensors" in res.stdout
    assert "kept at" in res.stdout   # the extra files left out, each on a line of its own
    _run, backups, fresh = backed_up
    res = run_cli("restore", "--remote-dir", fresh, "--local-dir", backups, env={"COLUMNS": str(WIDTH)})
    assert res.returncode == 0, res.stderr
    check_lines("restore", res.stdout)
    # what to paste stays whole on its line: the option with its path
    assert any(line.strip() == f"--resume-from-checkpoint {fresh}/checkpoint-12" or
               line == f"resume with: --resume-from-checkpoint {fresh}/checkpoint-12"
               for line in res.stdout.splitlines()), res.stdout


def test_off_a_terminal_rows_are_plain(backed_up):
    for what in ("restore --dry-run", "prune --dry-run"):
        res = run_cli(*commands(backed_up)[what], env={"COLUMNS": None})
        assert res.returncode == 0, res.stderr
        assert all(line == line.rstrip() for line in res.stdout.splitlines()), res.stdout
    rows = [line.split() for line in res.stdout.splitlines() if "checkpoint-" in line]
    # prune: action, name, step, size, modified, then why: one word a cell up to the last
    assert [r[:2] for r in rows] == [["keep", "checkpoint-12"], ["remove", "checkpoint-8"], ["remove", "checkpoint-4"]]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d", r[4]) for r in rows), rows


def on_a_terminal(args: list, columns: int) -> str:
    """What `ckptsync ARGS` shows on a pty `columns` wide (no $COLUMNS)."""
    import fcntl
    import pty
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    chunks = []
    try:
        proc = subprocess.Popen([sys.executable, "-m", "ckptsync", *map(str, args)], stdin=subprocess.DEVNULL,
                                stdout=slave, stderr=subprocess.DEVNULL,
                                env=cli_env({"COLUMNS": None, "LINES": None, "TERM": "xterm"}))
        os.close(slave)
        slave = -1
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:   # EIO: the child has closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(timeout=120) == 0
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    return ANSI.sub("", b"".join(chunks).decode("utf-8", "replace")).replace("\r\n", "\n")


def test_on_an_80_column_terminal_no_name_is_cut(backed_up):
    run, backups, _fresh = backed_up
    for what, args in commands(backed_up).items():
        check_lines(what, on_a_terminal(args, WIDTH))
    shown = on_a_terminal(commands(backed_up)["restore --dry-run"], WIDTH)
    for path in sorted((backups / "checkpoint-12").iterdir()):
        assert f"checkpoint-12/{path.name}" in shown, shown
    assert f"kept at {backups}/extra-files/config_full_dataset.json" in shown.replace("\n    ", " "), shown


def test_the_resume_option_and_its_path_are_never_split(backed_up):
    _run, backups, fresh = backed_up
    res = run_cli("restore", "--remote-dir", fresh, "--local-dir", backups, env={"COLUMNS": "40"})
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    at = lines.index("resume with:")   # too wide for 40 columns: the line to paste follows, whole
    assert lines[at + 1] == f"  --resume-from-checkpoint {fresh}/checkpoint-12", res.stdout
