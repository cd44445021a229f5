"""The CLI's output contract: global options in either position, one JSON object per failure
(on stdout, with --json), the final error in the log file, one exit code per path, and a
closed stdout that never costs a run its work."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import FAKE_CRONTAB, HANG, cli_env, release_fifo, run_cli, wait_fifo

ERROR_KEYS = {"message", "hint", "exit_code", "kind"}
PIPE_BUFFER = 64 * 1024  # Linux's default pipe capacity


def isolated(tmp_path: Path) -> dict[str, str | None]:
    """An environment with no config and a HOME whose ~/.ssh is empty."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, exist_ok=True)
    return {"HOME": str(home), "CKPTSYNC_CONFIG": None, "XDG_CONFIG_HOME": None, "SSH_AUTH_SOCK": None,
            "CKPTSYNC_DEBUG": None}


def json_error(res, code: int, kind: str) -> dict:
    """The one JSON object on stdout of a failed --json run; the human line is on stderr."""
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    data = json.loads(res.stdout)  # the whole of stdout: exactly one JSON document
    assert set(data) == {"error", "exit_code"}
    assert set(data["error"]) == ERROR_KEYS
    assert data["exit_code"] == data["error"]["exit_code"] == code
    assert data["error"]["kind"] == kind
    assert isinstance(data["error"]["message"], str) and data["error"]["message"]
    assert res.stderr.startswith(f"error: {data['error']['message']}"), res.stderr
    return data


def log_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def bad_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("remote_dir: /x\nbogus: 1\n")
    return cfg


# -------------------------------------------------- one test per exit code


def test_success_json_is_the_same_before_and_after_the_command(tmp_path):
    env = isolated(tmp_path)
    before = run_cli("--json", "list", "--local", "--local-dir", tmp_path / "b", env=env, cwd=tmp_path)
    after = run_cli("list", "--local", "--local-dir", tmp_path / "b", "--json", env=env, cwd=tmp_path)
    assert before.returncode == after.returncode == 0, (before.stderr, after.stderr)
    assert json.loads(before.stdout) == json.loads(after.stdout)
    assert json.loads(before.stdout)["checkpoints"] == []


@pytest.mark.parametrize("args", [
    ["--json", "list", "--bogus"],       # --json on the root: known before the bad word
    ["list", "--json", "--bogus"],       # --json on the command, before the bad word
    ["list", "--bogus", "--json"],       # and after it
    ["--json", "--bogus", "list"],       # the root's own parse fails
])
def test_usage_error_exit_2(tmp_path, args):
    res = run_cli(*args, env=isolated(tmp_path), cwd=tmp_path)
    data = json_error(res, 2, "usage")
    assert "--bogus" in data["error"]["message"]
    assert data["error"]["hint"].startswith("see 'ckptsync")


def test_usage_error_in_a_value_exit_2(tmp_path):
    res = run_cli("--json", "backup", "--max-checkpoints", "x", env=isolated(tmp_path), cwd=tmp_path)
    assert "--max-checkpoints" in json_error(res, 2, "usage")["error"]["message"]


def test_usage_error_human_keeps_stdout_empty(tmp_path):
    res = run_cli("list", "--bogus", env=isolated(tmp_path), cwd=tmp_path)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("error: No such option: --bogus")
    assert res.stderr.splitlines()[-1] == "  see 'ckptsync list --help'"


def test_config_error_exit_4_same_before_and_after(tmp_path):
    cfg = bad_config(tmp_path)
    env = isolated(tmp_path)
    before = run_cli("--json", "list", "-i", "1", "--config", cfg, env=env, cwd=tmp_path)
    after = run_cli("list", "-i", "1", "--config", cfg, "--json", env=env, cwd=tmp_path)
    data = json_error(before, 4, "config")
    assert json_error(after, 4, "config") == data
    assert str(cfg) in data["error"]["message"] and "unknown key 'bogus'" in data["error"]["message"]


@pytest.mark.parametrize("where", ["before", "after"])
def test_log_file_gets_the_error_line(tmp_path, where):
    log = tmp_path / "run.log"
    log.write_text("2024-01-01 00:00:00 INFO an earlier run\n")
    opts = ["--json", "--log-file", str(log)]
    args = ["list", "-i", "1", "--config", str(bad_config(tmp_path))]
    argv = opts + args if where == "before" else args + opts
    data = json_error(run_cli(*argv, env=isolated(tmp_path), cwd=tmp_path), 4, "config")
    lines = log_lines(log)
    assert lines[0] == "2024-01-01 00:00:00 INFO an earlier run"  # appended, not replaced
    assert len(lines) == 2 and lines[1].endswith(f" ERROR {data['error']['message']}")


def test_log_file_gets_a_usage_error(tmp_path):
    log = tmp_path / "run.log"
    res = run_cli("--log-file", log, "list", "--bogus", env=isolated(tmp_path), cwd=tmp_path)
    assert res.returncode == 2 and res.stdout == ""
    [line] = log_lines(log)
    assert " ERROR No such option: --bogus" in line and "(see 'ckptsync list --help')" in line


def test_unopenable_log_file_is_a_usage_error(tmp_path):
    log = tmp_path / "no-such-dir" / "run.log"
    res = run_cli("--json", "--log-file", log, "list", "--local", "--local-dir", tmp_path / "b",
                  env=isolated(tmp_path), cwd=tmp_path)
    data = json_error(res, 2, "usage")
    assert data["error"]["message"].startswith(f"--log-file {log}:")
    assert not log.parent.exists()


def test_not_found_exit_10(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run_cli("--json", "verify", "--local-dir", empty, "nope", env=isolated(tmp_path), cwd=tmp_path)
    data = json_error(res, 10, "not_found")
    assert "nope" in data["error"]["message"]
    # there is no --checkpoint option on verify: that is a usage error
    assert run_cli("verify", "--local-dir", empty, "--checkpoint", "nope", env=isolated(tmp_path)).returncode == 2


def test_locked_exit_11_and_skip_if_locked(tmp_path, server_tree):
    import fcntl

    dest = tmp_path / "b"
    (dest / ".ckptsync").mkdir(parents=True)
    with open(dest / ".ckptsync" / "lock", "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        holder.write(json.dumps({"pid": os.getpid(), "host": "test", "command": "test", "since": time.time()}))
        holder.flush()
        args = ["backup", "--remote-dir", server_tree, "--local-dir", dest]
        res = run_cli("--json", *args, env=isolated(tmp_path), cwd=tmp_path)
        data = json_error(res, 11, "locked")
        assert data["error"]["hint"] == "use --wait to wait for it"
        skipped = run_cli(*args, "--skip-if-locked", "--json", env=isolated(tmp_path), cwd=tmp_path)
        assert skipped.returncode == 0, skipped.stderr
        assert json.loads(skipped.stdout) == {"target": "local", "dest": str(dest), "exit_code": 0,
                                              "skipped": data["error"]["message"]}


@contextlib.contextmanager
def lock_held(dest: Path):
    """The backup directory's lock, held by this process as another run would hold it."""
    import fcntl

    (dest / ".ckptsync").mkdir(parents=True, exist_ok=True)
    with open(dest / ".ckptsync" / "lock", "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        holder.write(json.dumps({"pid": os.getpid(), "host": "test", "command": "test", "since": time.time()}))
        holder.flush()
        yield


def test_a_lock_message_names_only_flags_the_command_has(tmp_path, server_tree):
    dest = tmp_path / "b"
    res = run_cli("backup", "--all", "--remote-dir", server_tree, "--local-dir", dest, env=isolated(tmp_path))
    assert res.returncode == 0, res.stderr
    damaged = dest / "checkpoint-4" / "optimizer.pt"
    damaged.write_bytes(b"damaged")   # so that verify --repair gets as far as the lock
    shutil.rmtree(dest / "checkpoint-8")   # and backup has something to fetch
    (dest / ".ckptsync" / "manifests" / "checkpoint-8.json").unlink()
    where = ["--remote-dir", server_tree, "--local-dir", dest]
    commands = {
        "backup": ["backup", "--all", *where],
        "backup --discard-staged": ["backup", "--discard-staged", *where],
        "prune": ["prune", "--keep-last", "1", "--local-dir", dest],
        "prune --remote": ["prune", "--remote", "--keep-last", "1", *where],
        "archive": ["archive", "--local-dir", dest, "--output", tmp_path / "run.tar.zst"],
        "restore": ["restore", "--checkpoint", "checkpoint-12", "--remote-dir", tmp_path / "new", "--local-dir", dest],
        "verify --repair": ["verify", "--repair", *where],
    }
    (dest / ".ckptsync" / "staging" / "x").mkdir(parents=True)   # something for --discard-staged to delete
    with lock_held(dest):
        for what, args in commands.items():
            res = run_cli("--json", *args, env=isolated(tmp_path), cwd=tmp_path)
            error = json_error(res, 11, "locked")["error"]
            assert "in use by 'test' (pid" in error["message"], what
            flags = set(re.findall(r"--[a-z][a-z-]+", error["message"] + " " + error["hint"]))
            helps = run_cli(args[0], "--help", env={**isolated(tmp_path), "COLUMNS": "200"}).stdout
            assert not [f for f in flags if f not in helps], (what, error)
    assert (dest / ".ckptsync" / "staging" / "x").is_dir()


def test_connect_exit_20(tmp_path):
    log = tmp_path / "run.log"
    res = run_cli("list", "--host", "127.0.0.1:1", "--remote-dir", "/data", "--local-dir", tmp_path / "b",
                  "--json", "--log-file", log, env=isolated(tmp_path), cwd=tmp_path, timeout=60)
    data = json_error(res, 20, "connect")
    assert "cannot connect" in data["error"]["message"] and "127.0.0.1:1" in data["error"]["message"]
    [line] = log_lines(log)
    assert line.endswith(f"ERROR {data['error']['message']}")


def test_unexpected_exit_1(tmp_path):
    """A bug in core code: one line, exit 1, kind unexpected, and a traceback only with --debug."""
    code = ("import sys\n"
            "import ckptsync.listing as listing\n"
            "def boom(*a, **k): raise RuntimeError('kaboom')\n"
            "listing.run_list = boom\n"
            "from ckptsync.cli import main\n"
            "main(sys.argv[1:])\n")
    argv = [sys.executable, "-c", code, "--json", "list", "--local", "--local-dir", str(tmp_path / "b")]
    env = cli_env(isolated(tmp_path))
    res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    data = json_error(res, 1, "unexpected")
    assert data["error"]["message"] == "unexpected RuntimeError: kaboom"
    assert "--debug" in data["error"]["hint"]
    debug = subprocess.run(argv + ["--debug"], capture_output=True, text=True, env=env, timeout=60)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "kaboom" in debug.stderr
    assert json.loads(debug.stdout)["error"]["kind"] == "unexpected"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_exit_130(tmp_path, signum):
    """SIGTERM or Ctrl+C while waiting for the agent: exit 130, the JSON error, and the log line."""
    started, go = tmp_path / "started", tmp_path / "go"
    os.mkfifo(started)
    os.mkfifo(go)
    cfg = tmp_path / "c.yaml"
    # A "server" that starts, says so to the test, then sends nothing until the test lets it end.
    script = f"echo up > {shlex.quote(str(started))}; cat {shlex.quote(str(go))} >/dev/null"
    cfg.write_text(json.dumps({"remote_dir": "/tmp", "local_dir": str(tmp_path / "b"), "instances": {
        "5": {"command": ["sh", "-c", script, "x"]}}}))
    log = tmp_path / "run.log"
    proc = subprocess.Popen([sys.executable, "-m", "ckptsync", "--json", "--log-file", str(log),
                             "list", "-i", "5", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(isolated(tmp_path)), cwd=tmp_path)
    try:
        assert wait_fifo(started) == "up\n"   # the run has started the server and waits for its agent
        proc.send_signal(signum)
        release_fifo(go)   # the server ends: a signal that came just before the run's read is handled then
        out, err = proc.communicate(timeout=HANG)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    data = json_error(res, 130, "interrupted")
    assert data["error"]["message"] == "interrupted"
    assert log_lines(log)[-1].endswith(" ERROR interrupted")


# -------------------------------------------------- global options


@pytest.mark.parametrize("words, expected", [
    (["--json", "list"], {"json": True}),
    (["list", "-q", "--log-file", "a.log", "--debug"], {"quiet": True, "log_file": "a.log", "debug": True}),
    (["--log-file=b.log", "backup", "--quiet"], {"log_file": "b.log", "quiet": True}),
    (["show", "--", "--json"], {}),          # after --, an operand
    (["list", "--jsonx"], {}),
])
def test_scan_global_options(words, expected):
    from ckptsync.cli.context import scan_global_options

    assert scan_global_options(words) == expected


def test_every_command_takes_the_global_options():
    import typer

    from ckptsync.cli.app import app

    def options(cmd) -> set[str]:
        return {o for p in cmd.params for o in getattr(p, "opts", [])}

    def leaves(cmd, path):
        subs = getattr(cmd, "commands", None)
        if subs is None:
            yield " ".join(path), cmd
        for name, sub in (subs or {}).items():
            if not getattr(sub, "hidden", False):  # the completion scripts' helper
                yield from leaves(sub, path + [name])

    root = typer.main.get_command(app)
    wanted = {"--json", "--quiet", "-q", "--log-file", "--debug"}
    assert wanted <= options(root)
    found = dict(leaves(root, []))
    assert set(found) == {"list", "backup", "watch", "restore", "verify", "prune", "show", "compare", "archive", "adopt",
                          "checklist", "doctor", "demo", "cron install", "cron show", "cron remove"}
    for path, cmd in found.items():
        assert wanted <= options(cmd), path


def test_a_broken_command_module_is_not_hidden(tmp_path):
    code = "import sys; sys.modules['ckptsync.cli.cmd_demo'] = None; import ckptsync.cli"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=60)
    assert res.returncode == 1, res.stderr
    last = res.stderr.rstrip().splitlines()[-1]
    assert last.startswith(("ImportError", "ModuleNotFoundError")) and "cmd_demo" in last


@pytest.mark.parametrize("where", ["before", "after"])
def test_cron_install_log_file_means_the_same_in_both_places(tmp_path, where):
    table, script = tmp_path / "crontab.txt", tmp_path / "crontab"
    script.write_text(FAKE_CRONTAB.format(table=shlex.quote(str(table))))
    script.chmod(0o755)
    log = tmp_path / "logs" / "cron.log"   # install makes the directory
    args = ["cron", "install", "--remote-dir", tmp_path / "server", "--local-dir", tmp_path / "b"]
    argv = ["--log-file", log, *args] if where == "before" else [*args, "--log-file", log]
    res = run_cli(*argv, env={**isolated(tmp_path), "CKPTSYNC_CRONTAB": str(script)}, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"--log-file {log}" in table.read_text()         # the entry's runs log there
    assert any(" INFO installed: cron entry" in line for line in log_lines(log))  # and so did this run


def test_quiet_before_the_command(tmp_path, server_tree):
    res = run_cli("-q", "backup", "--remote-dir", server_tree, "--local-dir", tmp_path / "b",
                  env=isolated(tmp_path), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and "fetching" not in res.stderr


# -------------------------------------------------- a closed stdout


def many_backups(dest: Path, n: int) -> None:
    """A backup directory with n entries (empty checkpoints with a manifest each)."""
    manifests = dest / ".ckptsync" / "manifests"
    manifests.mkdir(parents=True)
    now = time.time_ns()
    for i in range(n):
        name = f"checkpoint-{i * 10}"
        (dest / name).mkdir()
        (manifests / f"{name}.json").write_text(json.dumps({
            "name": name, "layout": "hf-trainer", "kind": "checkpoint", "step": i * 10,
            "files": [{"path": f"{name}/model.safetensors", "size": 1000 + i, "mode": 0o644,
                       "mtime_ns": now - i * 10**9, "xxh3_128": "0" * 32}]}))


def no_complaints(stderr: str) -> None:
    for word in ("Traceback", "BrokenPipe", "Exception ignored", "error:"):
        assert word not in stderr, stderr


def test_output_cut_short_by_a_closed_reader(tmp_path):
    """`ckptsync list ... | head -1`: the reader goes away with most of the output unwritten."""
    dest = tmp_path / "b"
    many_backups(dest, 3000)
    args = [sys.executable, "-m", "ckptsync", "list", "--local", "--local-dir", str(dest)]
    env = cli_env(isolated(tmp_path))
    whole = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert whole.returncode == 0, whole.stderr
    assert len(whole.stdout.encode()) > 3 * PIPE_BUFFER  # it cannot all sit in the pipe

    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        first = proc.stdout.readline()
        proc.stdout.close()
        err = proc.stderr.read().decode()
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert first.decode() == whole.stdout.splitlines(keepends=True)[0]
    assert code == 0
    no_complaints(err)


def test_demo_with_stdout_closed_before_it_starts(tmp_path):
    """Every write to stdout fails (EPIPE) from the first: the demo still does all of its work,
    its child commands too, and exits 0."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    demo = tmp_path / "demo"
    try:
        res = subprocess.run([sys.executable, "-m", "ckptsync", "demo", "--dir", str(demo)], stdout=write_end,
                             stderr=subprocess.PIPE, text=True, env=cli_env(isolated(tmp_path)), timeout=300)
    finally:
        os.close(write_end)
    assert res.returncode == 0, res.stderr
    no_complaints(res.stderr)
    restored = demo / "new-server" / "socrates-training" / "models" / "socrates-qwen-full-dataset"
    assert (restored / "checkpoint-300" / "trainer_state.json").is_file()  # the last step ran


def test_json_with_stdout_closed(tmp_path, server_tree):
    """The backup is done and recorded even though its JSON cannot be delivered."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    dest = tmp_path / "b"
    try:
        res = subprocess.run([sys.executable, "-m", "ckptsync", "--json", "backup", "--remote-dir", str(server_tree),
                              "--local-dir", str(dest)], stdout=write_end, stderr=subprocess.PIPE, text=True,
                             env=cli_env(isolated(tmp_path)), timeout=120)
    finally:
        os.close(write_end)
    assert res.returncode == 0, res.stderr
    no_complaints(res.stderr)
    status = json.loads((dest / ".ckptsync" / "status.json").read_text())
    assert status["ok"] is True and status["fetched"]


# -------------------------------------------------- laid out for 80 columns


def fits(text: str, width: int = 80) -> list[str]:
    """The lines wider than `width`; a single word (a long path) alone on its line may be,
    continued with a backslash in a command."""
    return [line for line in text.splitlines()
            if len(line) > width and len(line.removesuffix(" \\").split()) > 1]


def narrow(tmp_path: Path, columns: int | None = 80) -> dict[str, str | None]:
    return {**isolated(tmp_path), "COLUMNS": None if columns is None else str(columns)}


@pytest.fixture
def busy_run(tmp_path: Path, server_tree: Path) -> tuple[Path, Path]:
    """checkpoint-4 and -8 backed up, checkpoint-12 still being written (no trainer_state.json)."""
    dest = tmp_path / "b"
    res = run_cli("backup", "--all", "--remote-dir", server_tree, "--local-dir", dest,
                  env=isolated(tmp_path), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    (server_tree / "checkpoint-12" / "trainer_state.json").unlink()
    changed = server_tree / "checkpoint-8" / "optimizer.pt"
    before = changed.stat()
    changed.write_bytes(b"changed")   # the backup is now outdated; the checkpoint stays settled
    os.utime(changed, ns=(before.st_atime_ns, before.st_mtime_ns))
    return server_tree, dest


def test_list_at_80_columns(tmp_path, busy_run):
    server, dest = busy_run
    res = run_cli("list", "--remote-dir", server, "--local-dir", dest, env=narrow(tmp_path), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert fits(res.stdout) == [] and "…" not in res.stdout
    rows = {m[1]: m[0].split() for m in re.finditer(r"^[ *]  (checkpoint-\d+) .*$", res.stdout, re.M)}
    # One line a checkpoint, whole words: no wrapped cells.
    assert rows["checkpoint-12"][-3:] == ["writing", "partial", "old"]   # backed up before it was rewritten
    assert rows["checkpoint-8"][-3:] == ["complete", "exact", "old"]
    assert rows["checkpoint-4"][-3:] == ["complete", "exact", "yes"]
    # The reason on its own line below the table, and a legend for the short words on screen.
    assert re.search(r"^checkpoint-12 \(writing\): trainer_state\.json not written yet$", res.stdout, re.M)
    assert "state: writing = still being written" in res.stdout
    assert "old = backed up, but the server's copy changed since" in res.stdout
    assert "abandoned =" not in res.stdout   # only the words on the screen are explained


def test_list_uses_a_wide_terminal_and_plain_rows_off_one(tmp_path, busy_run):
    server, dest = busy_run
    args = ["list", "--remote-dir", server, "--local-dir", dest]
    wide = run_cli(*args, env=narrow(tmp_path, 160), cwd=tmp_path)
    header = next(line for line in wide.stdout.splitlines() if "name" in line.split())
    assert header.split() == ["name", "step", "kind", "size", "modified", "state", "contents", "backup"]
    assert re.search(r"^\s+checkpoint-4 .* \d{4}-\d\d-\d\d \d\d:\d\d  complete", wide.stdout, re.M)

    plain = run_cli(*args, env=narrow(tmp_path, None), cwd=tmp_path)   # a pipe, no $COLUMNS
    lines = plain.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("best "))
    table = lines[start:start + 4]
    assert table[0].split() == ["best", "name", "step", "kind", "size", "modified", "state", "contents", "backup"]
    for line in table[1:]:   # one word a cell, so `awk '{print $2}'` reads the names
        assert len(line.split()) == 9, line
    assert [line.split()[1] for line in table[1:]] == ["checkpoint-12", "checkpoint-8", "checkpoint-4"]
    assert table[3].split()[0] == "-" and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d", table[3].split()[5])


def test_list_local_says_the_server_was_not_checked(tmp_path, busy_run):
    _server, dest = busy_run
    res = run_cli("list", "--local", "--local-dir", dest, "--json", env=isolated(tmp_path), cwd=tmp_path)
    data = json.loads(res.stdout)
    assert data["server"] is None and data["server_checked"] is False
    assert {r["on_server"] for r in data["checkpoints"]} == {None}
    assert {r["state"] for r in data["checkpoints"]} == {None}
    assert data["totals"]["on_server"] is None and data["totals"]["backed_up"] == 3
    human = run_cli("list", "--local", "--local-dir", dest, env=narrow(tmp_path), cwd=tmp_path)
    assert "state" not in human.stdout.split() and "server:" not in human.stdout


def test_checklist_at_80_columns_keeps_its_commands_pasteable(tmp_path, busy_run):
    server, dest = busy_run
    args = ["checklist", "--remote-dir", server, "--local-dir", tmp_path / "never-backed-up"]
    res = run_cli(*args, env=narrow(tmp_path), cwd=tmp_path)
    assert res.returncode == 3, res.stderr
    assert fits(res.stdout) == [] and "…" not in res.stdout
    plain = run_cli(*args, env=narrow(tmp_path, None), cwd=tmp_path)
    whole = [line.split("fix: ", 1)[1] for line in plain.stdout.splitlines() if "fix: ckptsync" in line]
    assert whole
    # The same commands, continued with backslashes: joined, they are the words of the whole one.
    joined = re.sub(r" \\\n\s+", " ", res.stdout)
    laid_out = [line.split("fix: ", 1)[1] for line in joined.splitlines() if "fix: ckptsync" in line]
    assert [shlex.split(c) for c in laid_out] == [shlex.split(c) for c in whole]
    assert any(line.endswith(" \\") for line in res.stdout.splitlines())


def test_show_and_compare_at_80_columns(tmp_path, busy_run):
    _server, dest = busy_run
    for args in (["show", "checkpoint-8"], ["compare", "checkpoint-4", "checkpoint-8"]):
        res = run_cli(*args, "--local-dir", dest, env=narrow(tmp_path), cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert fits(res.stdout) == [] and "…" not in res.stdout, args
    show = run_cli("show", "checkpoint-8", "--local-dir", dest, env=narrow(tmp_path), cwd=tmp_path)
    assert re.search(r"^  resume        resumable: exact resume \(weights, optimizer, scheduler and RNG\n"
                     r" {16}state present\)$", show.stdout, re.M)


def test_demo_at_80_columns(tmp_path):
    res = run_cli("demo", "--dir", tmp_path / "demo", env=narrow(tmp_path), cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    # Its own narration and commands fit; the commands it runs are checked above.
    own = [line for line in lines if line.startswith(("$ ", "    ", "What is", "Back up", "That is"))]
    assert own and fits("\n".join(own)) == []
    first = re.sub(r" \\\n\s+", " ", res.stdout).splitlines()
    command = next(line for line in first if line.startswith("$ ckptsync list"))
    assert shlex.split(command)[1:4] == ["ckptsync", "list", "--remote-dir"]


# -------------------------------------------------- names from the server reach the terminal escaped

# A colour, a window title (OSC ... BEL) and a right-to-left override, in one file name.
HOSTILE = "\x1b[31mred\x1b]0;pwned\x07\u202eevil"
RAW = ("\x1b", "\x07", "\u202e")


@pytest.fixture
def hostile_names(tmp_path: Path, server_tree: Path) -> tuple[Path, Path]:
    """checkpoint-8 and -12 each hold a file with escape sequences in its name; the backup of the one in
    checkpoint-12 is then damaged, so that verify, checklist and restore name it too."""
    for ckpt in ("checkpoint-8", "checkpoint-12"):
        path = server_tree / ckpt / f"{HOSTILE}.txt"
        path.write_bytes(b"x" * 64)
        st = (server_tree / ckpt / "optimizer.pt").stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    dest = tmp_path / "b"
    res = run_cli("backup", "--all", "--remote-dir", server_tree, "--local-dir", dest,
                  env=isolated(tmp_path), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    damaged = dest / "checkpoint-12" / f"{HOSTILE}.txt"
    st = damaged.stat()
    damaged.write_bytes(b"y" * 64)
    os.utime(damaged, ns=(st.st_atime_ns, st.st_mtime_ns))
    return server_tree, dest


def test_file_names_from_the_server_are_printed_escaped(tmp_path, hostile_names):
    server, dest = hostile_names
    log = tmp_path / "run.log"
    runs = {
        "show": (["show", "checkpoint-12", "--local-dir", dest], 0),
        "show --remote": (["show", "--remote", "checkpoint-8", "--remote-dir", server, "--local-dir", dest], 0),
        "verify": (["verify", "--local-dir", dest, "--log-file", log], 30),
        "checklist": (["checklist", "--remote-dir", server, "--local-dir", dest], 3),
        "restore": (["restore", "--dry-run", "--checkpoint", "checkpoint-8", "--remote-dir", tmp_path / "new",
                     "--local-dir", dest], 0),
        "restore refused": (["restore", "--checkpoint", "checkpoint-12", "--remote-dir", tmp_path / "new",
                             "--local-dir", dest], 30),
    }
    for what, (args, code) in runs.items():
        res = run_cli(*args, env=isolated(tmp_path), cwd=tmp_path)
        shown = res.stdout + res.stderr
        assert res.returncode == code, (what, shown)
        assert not [c for c in RAW if c in shown], (what, shown)
        assert "\\x1b[31mred\\x1b]0;pwned\\x07\\u202eevil.txt" in shown, (what, shown)
    assert not [c for c in RAW if c in log.read_text(encoding="utf-8")]
    # JSON keeps the exact name.
    data = json.loads(run_cli("verify", "--json", "--local-dir", dest, env=isolated(tmp_path)).stdout)
    paths = [p["path"] for e in data["entries"] for p in e["problems"]]
    assert paths == [f"checkpoint-12/{HOSTILE}.txt"]


def test_on_a_terminal_a_file_name_cannot_set_the_title_or_ring(tmp_path, hostile_names):
    import pty

    _server, dest = hostile_names
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "ckptsync", "verify", "--local-dir", str(dest)],
                                stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                                env=cli_env({**isolated(tmp_path), "COLUMNS": "200", "TERM": "xterm"}))
        os.close(slave)
        slave = -1
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:   # EIO: every writer has closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(timeout=60) == 30
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    shown = b"".join(chunks).decode("utf-8", "replace")
    assert "\x1b]" not in shown and "\x07" not in shown and "\u202e" not in shown, shown
    assert "\\x1b]0;pwned\\x07" in shown, shown
