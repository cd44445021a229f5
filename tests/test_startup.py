"""Start-up: building the CLI imports no command's core, and a run imports what its command uses.

Measured the way docs/performance.md does: `python -X importtime -m ckptsync ...` lists every
module a run imports.
"""

from __future__ import annotations

import subprocess
import sys

from helpers import cli_env

# What the app itself may import: the command declarations and the few light modules they use
# at the top (errors, output without rich, policy's formatting, ratelimit's help text).
APP_MODULES = {"ckptsync", "ckptsync.__main__", "ckptsync.errors", "ckptsync.notify", "ckptsync.output",
               "ckptsync.policy", "ckptsync.progress", "ckptsync.ratelimit"}
# Never needed by a backup over OpenSSH.
NOT_FOR_AN_OPENSSH_BACKUP = {
    "paramiko", "boto3", "ckptsync.transport.ssh", "ckptsync.s3", "ckptsync.archive", "ckptsync.archive_read",
    "ckptsync.restore", "ckptsync.restore_choice", "ckptsync.restore_send", "ckptsync.restore_all", "ckptsync.prune", "ckptsync.cron", "ckptsync.checklist", "ckptsync.training",
    "ckptsync.details", "ckptsync.plot", "ckptsync.demo", "ckptsync.listing", "ckptsync.repair", "ckptsync.agent.serve",
    "ckptsync.agent.http", "ckptsync.agent.scan", "ckptsync.agent.fileops", "ckptsync.server.inprocess",
    "ckptsync.progress_bar", "rich.progress", "rich.table",
}


def imports(*args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, set[str]]:
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "ckptsync", *args], env=cli_env(env),
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    names = {line.rsplit("|", 1)[1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")}
    return res, names


def test_help_imports_only_the_command_declarations():
    for args in (["--help"], ["backup", "--help"], ["cron", "install", "--help"]):
        res, names = imports(*args)
        assert res.returncode == 0, res.stderr[-2000:]
        ours = {n for n in names if n.split(".")[0] == "ckptsync" and not n.startswith("ckptsync.cli")}
        assert ours <= APP_MODULES, (args, sorted(ours - APP_MODULES))
        assert not names & {"rich", "yaml", "paramiko", "boto3", "zstandard", "xxhash"}, args


def test_a_noop_backup_over_openssh_imports_neither_paramiko_nor_other_commands(ssh_home, sshd, server_tree,
                                                                                 tmp_path):
    logins = sshd.log_path.read_text(errors="replace").count("Accepted publickey")
    args = ["backup", "--ssh", "openssh", "--host", "testhost", "--remote-dir", str(server_tree),
            "--local-dir", str(tmp_path / "b")]
    for run in ("first", "no-op"):
        res, names = imports(*args)
        assert res.returncode == 0, res.stderr[-2000:]
        assert {"ckptsync.backup", "ckptsync.transport.openssh"} <= names
        assert not names & NOT_FOR_AN_OPENSSH_BACKUP, (run, sorted(names & NOT_FOR_AN_OPENSSH_BACKUP))
    assert "up to date" in res.stdout
    # Both runs went through one login: the second reused the first's shared connection.
    assert sshd.log_path.read_text(errors="replace").count("Accepted publickey") - logins == 1
