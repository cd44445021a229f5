"""The typed Server interface, through the in-process twin: faults put at a known point of a run."""

from __future__ import annotations

import ast
import contextlib
import json
import os
import shutil
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from ckptsync.backup import BackupOptions, run_backup
from ckptsync.config import Target
from ckptsync.errors import CONNECT, IO, NOT_FOUND, PARTIAL, CkptsyncError, ProtocolError
from ckptsync.progress import QUIET
from ckptsync.server import RemoteDirMissing, ServerDiskFull, Stat
from ckptsync.server.inprocess import Hooks, InProcessServer, InProcessTransport, ThreadProcess
from ckptsync.transport.base import MARKER
from ckptsync.server.transfer import DiskWriter, _write_member
from helpers import name_best, run_cli, tree_digest

PACKAGE = Path(__file__).resolve().parents[1] / "ckptsync"


def make_target(remote_dir: Path, local_dir: Path) -> Target:
    return Target(label="instance-0", transport=None, remote_dir=str(remote_dir), local_dir=local_dir)


def always(server):
    """A connect (see open_server) that gives this one server for every connection."""
    return lambda: server


def test_typed_answers(server_tree):
    with InProcessServer() as server:
        listing = server.scan(str(server_tree))
        assert listing.root == str(server_tree)
        paths = {f.path for f in listing.files}
        assert "checkpoint-12/optimizer.pt" in paths
        st = server.stat(str(server_tree), ["checkpoint-12", "checkpoint-12/optimizer.pt", "nope"])
        assert st["checkpoint-12"].is_dir and st["nope"] is None
        on_disk = (server_tree / "checkpoint-12" / "optimizer.pt").stat()
        assert st["checkpoint-12/optimizer.pt"] == Stat(on_disk.st_size, on_disk.st_mtime_ns, 0o644, False,
                                                        on_disk.st_ctime_ns, on_disk.st_ino)
        listed = next(f for f in listing.files if f.path == "checkpoint-12/optimizer.pt")
        assert (listed.ctime_ns, listed.inode) == (on_disk.st_ctime_ns, on_disk.st_ino)
        hashes = server.hash(str(server_tree), ["checkpoint-12/optimizer.pt", "gone.bin"])
        assert set(hashes.values) == {"checkpoint-12/optimizer.pt"}
        assert "gone.bin" in hashes.errors  # a missing file is an entry, never a dict where a hash belongs
        assert server.df(str(server_tree)).free > 0


def test_missing_remote_dir_is_its_own_error(tmp_path):
    with InProcessServer() as server:
        with pytest.raises(RemoteDirMissing) as info:
            server.scan(str(tmp_path / "no-such-run"))
    assert info.value.exit_code == NOT_FOUND
    assert "remote directory does not exist" in info.value.message and "no-such-run" in info.value.message


def test_error_replies_become_exceptions_by_kind(server_tree):
    hooks = Hooks()
    hooks.fail("df", "no_space", "No space left on device: /data", "/data")
    with InProcessServer(hooks) as server:
        with pytest.raises(ServerDiskFull) as info:
            server.df(str(server_tree))
        assert info.value.exit_code == IO and info.value.path == "/data"
        assert server.df(str(server_tree)).free > 0  # the fault was for one call only


def test_backup_finishes_the_others_when_a_checkpoint_vanishes_after_the_scan(server_tree, tmp_path):
    hooks = Hooks()
    victim = server_tree / "checkpoint-8"
    seen = []

    def rotate(value: dict) -> None:
        listed = {f[0].split("/")[0] for f in value["reply"]["files"]}
        seen.append("checkpoint-8" in listed)
        shutil.rmtree(victim)  # what the Trainer's save_total_limit does between our scan and our read

    hooks.on_after("scan", rotate, times=1)
    dest = tmp_path / "b"
    result = run_backup(make_target(server_tree, dest), BackupOptions(all=True), connect=always(InProcessServer(hooks)))
    assert seen == [True]  # the fault happened after checkpoint-8 was listed
    assert result.exit_code == PARTIAL
    assert sorted(result.fetched) == ["checkpoint-12", "checkpoint-4"]
    assert "vanished from the server" in result.failed["checkpoint-8"]
    assert not (dest / "checkpoint-8").exists()
    assert tree_digest(dest / "checkpoint-12") == tree_digest(server_tree / "checkpoint-12")
    status = (dest / ".ckptsync" / "status.json").read_text()
    assert '"exit_code": 3' in status and "checkpoint-8" in status


def test_a_stream_cut_mid_transfer_is_a_connection_error_and_a_rerun_completes(server_tree, tmp_path):
    big = server_tree / "checkpoint-12" / "big.bin"
    big.write_bytes(os.urandom(24 << 20))  # incompressible: the cut comes mid-file
    old = (server_tree / "checkpoint-12" / "optimizer.pt").stat().st_mtime
    os.utime(big, (old, old))
    hooks = Hooks()
    server = InProcessServer(hooks)
    hooks.on_before("send", lambda _args: server.cut_after(4 << 20), times=1)
    dest = tmp_path / "b"
    target = make_target(server_tree, dest)
    with pytest.raises(CkptsyncError) as info:
        run_backup(target, BackupOptions(names=["checkpoint-12"]), connect=always(server))
    assert info.value.exit_code == CONNECT
    assert server.link.process.cut  # the link really was cut, mid-stream
    assert not (dest / "checkpoint-12").exists()
    again = run_backup(make_target(server_tree, dest), BackupOptions(names=["checkpoint-12"]),
                       connect=always(InProcessServer()))
    assert again.exit_code == 0 and again.fetched == ["checkpoint-12"]
    assert tree_digest(dest / "checkpoint-12") == tree_digest(server_tree / "checkpoint-12")


# Core modules may use these helpers of the agent package (they are plain file functions);
# everything else of the wire stays inside the server boundary (ckptsync/server/).
ALLOWED_FROM_AGENT = {"hash_file", "fsync_dir", "fsync_file", "safe_member", "cpu_aes"}


def test_no_module_outside_the_boundary_touches_the_wire():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith(("server/", "agent/", "transport/")):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module in ("ckptsync.server.remote", "ckptsync.server.agent_server"):
                    offenders.append(f"{rel}: imports {node.module}")
                if node.module.startswith("ckptsync.agent"):
                    bad = {a.name for a in node.names} - ALLOWED_FROM_AGENT
                    if bad:
                        offenders.append(f"{rel}: imports {sorted(bad)} from {node.module}")
                if node.module == "ckptsync" and any(a.name == "agent" for a in node.names):
                    offenders.append(f"{rel}: imports the agent package")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "call":
                offenders.append(f"{rel}:{node.lineno}: calls .call(...)")
    assert offenders == []


def test_through_sshd_a_checkpoint_deleted_after_the_scan_fails_alone(ssh_home, server_tree, tmp_path):
    victim = server_tree / "checkpoint-8"
    script = Path(__file__).resolve().parent / "rotating_agent.py"
    remote = f"{sys.executable} {script} {PACKAGE.parent} {victim} #"  # '#': the launcher after it is ignored
    cfg = tmp_path / "rot.yaml"
    cfg.write_text(json.dumps({"remote_dir": str(server_tree), "local_dir": str(tmp_path / "b"),
                               "instances": {"1": {"command": ["ssh", "-F", str(ssh_home / ".ssh" / "config"),
                                                               "tnr-1", remote]}}}))
    res = run_cli("backup", "-i", "1", "--config", cfg, "--all", "--json")
    assert not victim.exists()  # the rotation really ran, on the server, during the run
    assert res.returncode == PARTIAL, res.stderr
    out = json.loads(res.stdout)
    assert sorted(out["fetched"]) == ["checkpoint-12", "checkpoint-4"]
    assert "vanished from the server" in out["failed"]["checkpoint-8"]
    assert "Traceback" not in res.stderr and "unexpected" not in res.stderr
    dest = tmp_path / "b" / "instance-1"
    assert not (dest / "checkpoint-8").exists()
    assert tree_digest(dest / "checkpoint-4") == tree_digest(server_tree / "checkpoint-4")


class _PausedWriter(DiskWriter):
    """A DiskWriter whose thread has not got to its queue yet when the stream breaks."""

    def __init__(self) -> None:
        self.go = threading.Event()
        super().__init__()

    def _run(self) -> None:
        self.go.wait()
        super()._run()


def test_a_stream_broken_before_the_writer_opened_the_file_leaves_no_part(tmp_path):
    # The race behind an intermittent leftover "*.part": the file was unlinked before the writer
    # thread created it. Removal now goes through the writer's queue, after its "open".
    class Broken:
        def data(self, size):
            raise ProtocolError("the stream ended 10 bytes into a.bin")
            yield b""

    paused = _PausedWriter()
    member = tarfile.TarInfo("ck/a.bin")
    member.size = 10
    target = tmp_path / "ck" / "a.bin"
    with pytest.raises(ProtocolError):
        _write_member(Broken(), paused, member, target, "xxh3_128", QUIET)
    assert not target.with_name("a.bin.part").exists()  # the writer has not run yet
    paused.go.set()
    paused.stop()
    assert list((tmp_path / "ck").iterdir()) == []


def test_one_connection_at_a_time_holds_a_server_directory(tmp_path):
    from ckptsync.server import ServerLocked

    root = tmp_path / "run"
    root.mkdir()
    with InProcessServer() as a, InProcessServer() as b:
        assert a.lock(str(root), "ckptsync restore") is False
        a.lock(str(root), "ckptsync restore")  # the same connection again
        with pytest.raises(ServerLocked) as caught:
            b.lock(str(root), "ckptsync prune --remote")
        assert caught.value.exit_code == 11
        assert (caught.value.holder["pid"], caught.value.holder["command"]) == (os.getpid(), "ckptsync restore")
        assert f"another restore into {root} holds the server's lock (pid {os.getpid()} on " in caught.value.message
        assert a.scan(str(root)).files == []  # the lock file is not a checkpoint's
        a.unlock(str(root))
        assert not (root / ".ckptsync-lock").exists()
        b.lock(str(root), "ckptsync prune --remote")
    assert not (root / ".ckptsync-lock").exists()  # b's connection ended, and its lock with it

    new = tmp_path / "new" / "run"
    with InProcessServer() as c:
        assert c.lock(str(new), "ckptsync restore", create=True) is True
        assert new.is_dir()
    assert not (tmp_path / "new").exists()  # nothing was put there: what the lock made is gone


def test_a_no_op_backup_waits_for_the_server_once(server_tree, tmp_path):
    """The hello, the processes, the listing and the look for newer runs go out with the agent's
    source, and their answers follow its start: at 100 ms a round trip, each one more would cost 0.1 s."""
    dest = tmp_path / "b"
    first = run_backup(make_target(server_tree, dest), BackupOptions(all=True), connect=always(InProcessServer()))
    assert sorted(first.fetched) == ["checkpoint-12", "checkpoint-4", "checkpoint-8"]
    server = InProcessServer()
    again = run_backup(make_target(server_tree, dest), BackupOptions(all=True), connect=always(server))
    assert again.exit_code == 0 and again.fetched == []
    assert sorted(again.current) == ["checkpoint-12", "checkpoint-4", "checkpoint-8"]
    assert server.round_trips == 1


class MarkerAfterHello(ThreadProcess):
    """A server whose marker comes only once the agent's source and the hello are on its input: a
    client that waited for the marker before sending them would wait until the start times out."""

    hello_first: bool | None = None

    def _agent(self) -> None:
        from ckptsync.agent import Channel
        from ckptsync.agent.serve import serve

        p = self.pipes
        try:
            p.agent_in.read(int(p.agent_in.readline()))
            self.hello_first = bool(p.agent_in.peek(1))   # waits for the next bytes, or the end
            p.agent_out.write(b"\n" + MARKER + b"\n")
            p.agent_out.flush()
            serve(Channel(p.agent_in, p.agent_out))
        except (OSError, ValueError):
            pass
        finally:
            for f in (p.agent_in, p.agent_out):
                with contextlib.suppress(OSError):
                    f.close()


def test_the_agent_and_the_hello_go_out_before_the_server_has_started(server_tree):
    """One round trip for a start, not two: at 100 ms each channel opened would wait 0.1 s more."""
    server = InProcessServer(link=InProcessTransport(MarkerAfterHello))
    server.expect([("scan", {"root": str(server_tree)})])
    with server:
        assert server.link.process.hello_first is True
        assert server.hello.protocol > 0 and server.round_trips == 1
        assert "checkpoint-12/optimizer.pt" in {f.path for f in server.scan(str(server_tree)).files}
        assert server.round_trips == 1   # the scan's answer came behind the hello's


def test_a_restore_asks_what_is_there_the_staging_the_space_and_the_directory_in_one_round_trip(server_tree,
                                                                                                 tmp_path):
    """The start, the lock, then the checkpoint, the best model, its staging, the free space and
    the directory's full path together, then the send: at 100 ms a round trip, each one more would
    cost 0.1 s."""
    from ckptsync.restore import RestoreOptions, run_restore

    name_best(server_tree, "checkpoint-8")
    dest = tmp_path / "b"
    assert run_backup(make_target(server_tree, dest), BackupOptions(all=True),
                      connect=always(InProcessServer())).exit_code == 0
    server = InProcessServer()
    asked = []
    real = server.remote.call
    server.remote.call = lambda op, **args: asked.append((op, server.round_trips)) or real(op, **args)
    fresh = tmp_path / "fresh"
    r = run_restore(make_target(fresh, dest), RestoreOptions(checkpoint="checkpoint-12", extra_files=False),
                    connect=always(server))
    assert r.exit_code == 0 and tree_digest(fresh / "checkpoint-12") == tree_digest(server_tree / "checkpoint-12")
    # the waits so far when each was called: the stat waited once; staged, df and mkdir found their answers there
    stat = next(i for i, (op, _w) in enumerate(asked) if op == "stat")
    assert [op for op, _w in asked[stat:stat + 4]] == ["stat", "staged", "df", "mkdir"], asked
    assert [w - asked[stat][1] for _op, w in asked[stat:stat + 4]] == [0, 1, 1, 1]
    assert [op for op, _w in asked].count("stat") == 1   # the best model's checkpoint was in that stat
    # the commit took the whole staging, so nothing is discarded; the unlock is not waited for, and
    # the close that follows it finds the lock let go of
    ops = [op for op, _w in asked]
    assert ops[ops.index("commit"):] == ["commit"] and not (fresh / ".ckptsync-lock").exists()
    assert any("best_model_checkpoint" in w and "checkpoint-8 is not in" in w for w in r.warnings), r.warnings


def test_requests_sent_ahead_answer_only_the_calls_they_were_sent_for(server_tree):
    root = str(server_tree)
    server = InProcessServer()
    server.expect([("scan", {"root": root}), ("dirs", {"root": str(server_tree.parent), "patterns": ["*"]})])
    with server:
        assert server.hello.protocol > 0
        assert server.round_trips == 1   # the start, with the hello's answer and theirs behind it
        # Another call first: what was sent ahead is read and dropped, and this one answered.
        assert server.stat(root, ["checkpoint-12"])["checkpoint-12"].is_dir
        assert server.round_trips == 2
        (server_tree / "checkpoint-12" / "new.bin").write_bytes(b"x")
        listing = server.scan(root)   # asked again, so it sees what changed since
        assert "checkpoint-12/new.bin" in {f.path for f in listing.files}
        assert server.round_trips == 3
        server.expect([("procs", {"pattern": "", "root": root}), ("scan", {"root": root})])
        server.expect([("procs", {"pattern": "", "root": root})])   # already on its way: not sent twice
        assert server.procs("", root).root and server.scan(root).root == root
        assert server.round_trips == 4
