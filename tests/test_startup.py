"""Start-up: building the CLI imports no command's core, and a run imports what its command uses.

Measured the way docs/performance.md does: `python -X importtime -m ckptsync ...` lists every
module a run imports.
"""

from __future__ import annotations

import subprocess
import sys

from helpers import cli_env, login_probe

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
    "pydantic",   # typer 0.29 checks option values with it; ckptsync's plain ones are checked without it
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
        assert not names & {"rich", "yaml", "paramiko", "boto3", "zstandard", "xxhash", "pydantic"}, args


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


# The code of the work itself: it loads while the login and the server's Python start.
LOADS_DURING_LOGIN = {"ckptsync.backup", "ckptsync.server", "ckptsync.server.remote", "ckptsync.stores.directory",
                      "ckptsync.agent.codec", "ckptsync.agent.tar", "ckptsync.disk", "rich"}


def test_a_backup_starts_the_login_before_its_own_code_and_a_quiet_no_op_loads_no_rich(ssh_home, sshd, server_tree,
                                                                                       tmp_path):
    probe = login_probe(LOADS_DURING_LOGIN)
    args = ["backup", "--ssh", "openssh", "--host", "testhost", "--remote-dir", str(server_tree),
            "--local-dir", str(tmp_path / "b"), "--all"]
    for run in ("first", "no-op"):
        res = subprocess.run([sys.executable, "-c", probe, *args, "--quiet"], env=cli_env(), capture_output=True,
                             text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "loaded when ssh started: [[]]" in res.stderr, (run, res.stderr[-2000:])   # one launcher, ahead
    res, names = imports(*args, "--quiet")
    assert res.returncode == 0 and res.stdout == "", res.stderr[-2000:]
    assert not [line for line in res.stderr.splitlines() if not line.startswith("import time:")]
    assert "rich" not in names   # a cron run with nothing new prints nothing: no console is made


def test_option_values_convert_as_typer_converts_them():
    """What ckptsync converts without pydantic (cli/coerce.py) is what typer's own conversion
    gives; a value it leaves to typer (out of range, not a number) keeps typer's message."""
    import typer.main
    from typer._coercion import build_runtime_param

    from ckptsync.cli import coerce
    from ckptsync.cli.app import app

    samples = {str: ["a b", "", "-k"], bool: [True, False], int: ["3", "0", "-1", "17", "400", 5],
               float: ["0.5", "2", "300", 3, 2.5], "list": [("a", "b c"), ()]}
    compared = 0
    stack = [typer.main.get_command(app)]
    while stack:
        command = stack.pop()
        stack.extend(getattr(command, "commands", {}).values())
        for param in command.params:
            d = getattr(param, "type_descriptor", None)
            if d is None or not coerce.handled(d):
                continue
            for value in samples["list" if d.annotation == list[str] else d.annotation]:
                ours = coerce.plain(d.annotation, d.parameter_info, value)
                if ours is None:
                    continue
                theirs = build_runtime_param(d)._coerce_value(value, param=param, ctx=None)
                assert (ours, type(ours)) == (theirs, type(theirs)), (command.name, param.name, value)
                compared += 1
    assert compared > 300
    res, names = imports("backup", "--remote-dir", "/nonexistent", "--local-dir", "/nonexistent", "-k", "0")
    assert res.returncode == 2 and "Input should be greater than or equal to 1" in res.stderr
