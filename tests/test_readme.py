"""Every ckptsync command shown in the README's bash blocks runs, in order, against a real sshd."""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import time
from pathlib import Path

from helpers import REPO_ROOT, run_cli, set_tree_mtime

README = REPO_ROOT / "README.md"
SERVER_DIR = "socrates-training/models/socrates-qwen-full-dataset"   # relative to the server's home


def readme_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("ckptsync "):
                commands.append(line)
    return commands


def fake_crontab(tmp_path: Path) -> Path:
    table = tmp_path / "crontab.txt"
    script = tmp_path / "crontab"
    script.write_text(f"""#!/bin/sh
if [ "$1" = "-l" ]; then [ -f {table} ] && cat {table} && exit 0; echo "no crontab for you" >&2; exit 1; fi
if [ "$1" = "-" ]; then cat > {table}; exit 0; fi
exit 2
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_readme_lists_enough_commands():
    cmds = readme_commands()
    assert len(cmds) >= 25
    for verb in ("list", "backup", "restore", "verify", "prune", "show", "compare", "archive", "checklist", "cron"):
        assert any(c.startswith(f"ckptsync {verb}") for c in cmds), verb


def test_every_readme_command_runs(ssh_home, server_tree, tmp_path):
    # A run that stopped training an hour ago, so the checklist can pass.
    set_tree_mtime(server_tree.parent.parent, time.time() - 9000)
    for age, name in ((7200, "checkpoint-12"), (8400, "checkpoint-8"), (9600, "checkpoint-4")):
        set_tree_mtime(server_tree / name, time.time() - age)
    fresh = tmp_path / "new-server" / "socrates-training" / "models" / "socrates-qwen-full-dataset"
    cfg_dir = ssh_home / ".config" / "ckptsync"
    cfg_dir.mkdir(parents=True)
    (cfg_dir / "config.yaml").write_text(json.dumps({
        "local_dir": "~/ckpt-backups",
        "remote_dir": str(server_tree),
        "extra_files": ["../../config_full_dataset.json", "../../deepspeed_config.json"],
        "instances": {"1": {"host": "tnr-1", "remote_dir": str(fresh)}},
    }))
    env = {"CKPTSYNC_CRONTAB": str(fake_crontab(tmp_path))}
    ran = []
    import pwd

    # tnr-0 logs in as this user, whose home on the server is the passwd one, not the test's $HOME:
    # the README's relative path, pointed at the fixture from that home.
    server_home = pwd.getpwuid(os.getuid()).pw_dir
    assert server_home != os.environ["HOME"]
    for line in readme_commands():
        line = line.replace(SERVER_DIR, os.path.relpath(server_tree, server_home))
        args = [os.path.expanduser(a) if a.startswith("~") else a for a in shlex.split(line)[1:]]
        res = run_cli(*args, env=env, timeout=180)
        assert res.returncode == 0, f"README command failed: {line}\n{res.stdout}\n{res.stderr}"
        assert "Traceback" not in res.stderr
        ran.append(line)
    assert (fresh / "checkpoint-12" / "optimizer.pt").read_bytes() == \
        (server_tree / "checkpoint-12" / "optimizer.pt").read_bytes()
    assert len(ran) == len(readme_commands())


def bash_blocks() -> list[list[str]]:
    """The README's bash blocks, as lists of command lines (continuations joined, comments dropped)."""
    text = README.read_text(encoding="utf-8")
    return [[line.split(" #", 1)[0].strip() for line in block.replace("\\\n", " ").splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
            for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_install_lines_work_where_the_system_python_is_externally_managed(tmp_path):
    """Debian 12 and Ubuntu 24.04 refuse `pip install` into the system's Python (PEP 668)."""
    lines = [line for block in bash_blocks() for line in block]
    quick_start = next(block for block in bash_blocks() if any(line.startswith("ckptsync list") for line in block))
    assert quick_start[0] == "pipx install ."
    for line in lines:
        for command in re.split(r"\s*(?:&&|;|\|\|)\s*", line):
            words = shlex.split(command)
            if words[:2] in (["pip", "install"], ["pip3", "install"]) or words[:4] == ["python3", "-m", "pip", "install"]:
                raise AssertionError(f"installs into the system's Python: {line}")
    # The venv alternative: a pip of its own, and the command linked onto PATH; each line pastes alone.
    venv = next(block for block in bash_blocks() if any("-m venv ~/" in line for line in block))
    assert any(re.search(r"~/\S+/bin/pip install \.", line) for line in venv)
    assert any(re.search(r"ln -sf ~/\S+/bin/ckptsync ~/.local/bin/ckptsync", line) for line in venv)
    for line in venv:
        assert subprocess.run(["bash", "-n", "-c", line]).returncode == 0, line
