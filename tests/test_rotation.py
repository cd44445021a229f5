"""A trainer's checkpoint rotation against backup: what was read whole is committed, what changed
while read is not, and no complete checkpoint is left out without being named.

Faults are put at known points of the stream through the in-process server's hooks: the end of a
send (every file read), a member's header (the server has the file open and is reading it; with
files of 24 MiB it cannot have read more than the few MiB of frames in flight), a member's
checksum record (the server has finished reading it). Through sshd, the real agent is wrapped to
delete the checkpoint right after its send.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from ckptsync.backup import BackupOptions, run_backup
from ckptsync.cli.cmd_backup import show_backup
from ckptsync.errors import OK, PARTIAL, Interrupted
from ckptsync.output import Output
from ckptsync.server.inprocess import Hooks, InProcessServer
from ckptsync.dedup import place_copy
from ckptsync.stores.directory import DirectoryStore
from helpers import run_cli, set_tree_mtime, tree_digest
from test_parallel import add_big, parallel_target, small_split  # noqa: F401 (a fixture)
from test_partial import StopAt
from test_server_boundary import PACKAGE, always, make_target

MB = 1 << 20
ONLY_COPY = "deleted on the server after it was copied: the backup is now the only copy"


def add_checkpoint(run: Path, step: int, age: int) -> Path:
    """checkpoint-<step>: checkpoint-12's files with their own step and optimizer bytes, saved `age` s ago."""
    d = run / f"checkpoint-{step}"
    shutil.copytree(run / "checkpoint-12", d)
    state = json.loads((d / "trainer_state.json").read_text())
    state["global_step"] = step
    (d / "trainer_state.json").write_text(json.dumps(state))
    opt = bytearray((d / "optimizer.pt").read_bytes())
    opt[100:108] = step.to_bytes(8, "little")
    (d / "optimizer.pt").write_bytes(bytes(opt))
    written = time.time() - age
    set_tree_mtime(d, written)
    os.utime(d / "trainer_state.json", (written + 2, written + 2))
    return d


def add_shard(checkpoint: Path, size: int = 24 * MB) -> Path:
    """An incompressible file with the checkpoint's own mtime."""
    shard = checkpoint / "shard.bin"
    shard.write_bytes(os.urandom(size))
    st = (checkpoint / "optimizer.pt").stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    return shard


def rewrite_same_size(path: Path, keep_mtime: bool) -> None:
    """New bytes, same size; with keep_mtime the old mtime is put back (as `cp -p` or rsync -t would)."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.write(os.urandom(st.st_size))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_checkpoint_the_server_deletes_right_after_it_was_read_is_committed(server_tree, tmp_path, capsys):
    victim = server_tree / "checkpoint-12"
    before = tree_digest(victim)
    rotated = []

    def rotate(value: dict) -> None:
        members = [m for _src, m in value["args"]["pairs"]]
        if victim.exists() and any(m.startswith("checkpoint-12/") for m in members):
            rotated.append(members)
            shutil.rmtree(victim)   # the trainer's save_total_limit, the moment the stream has ended

    hooks = Hooks()
    hooks.on_after("send", rotate)
    dest = tmp_path / "b"
    result = run_backup(make_target(server_tree, dest), BackupOptions(), connect=always(InProcessServer(hooks)))
    assert rotated and not victim.exists()   # deleted after the send that read it, before the run ended
    assert result.exit_code == OK, result.failed
    assert result.fetched == ["checkpoint-12", "checkpoint-8"] and result.failed == {}
    assert result.deleted_on_server == ["checkpoint-12"]
    assert tree_digest(dest / "checkpoint-12") == before   # the bytes the server had
    status = json.loads((dest / ".ckptsync" / "status.json").read_text())
    assert status["exit_code"] == 0 and status["deleted_on_server"] == ["checkpoint-12"]
    show_backup(Output(), result)
    assert f"checkpoint-12: {ONLY_COPY}" in capsys.readouterr().out


def test_a_file_rewritten_while_read_fails_its_checkpoint(server_tree, tmp_path):
    """Same size, new bytes, even the old mtime put back: the open file's ctime still tells."""
    shard = add_shard(server_tree / "checkpoint-12")
    records, rewritten = {}, []

    def rewrite(value: dict) -> None:
        if value["member"] == "checkpoint-12/shard.bin":
            rewrite_same_size(shard, keep_mtime=True)
            rewritten.append(True)

    hooks = Hooks()
    hooks.on_after("send_member", rewrite)
    hooks.on_after("send_record", lambda value: records.update({value["record"].member: value["record"]}))
    dest = tmp_path / "b"
    result = run_backup(make_target(server_tree, dest),
                        BackupOptions(names=["checkpoint-12", "checkpoint-8"], compress="off"),
                        connect=always(InProcessServer(hooks)))
    assert rewritten
    # opened as listed, different at the end of the read: the change came while it was read
    assert records["checkpoint-12/shard.bin"].changed == "modified while being read"
    assert result.exit_code == PARTIAL
    assert "checkpoint-12/shard.bin: modified while being read" in result.failed["checkpoint-12"]
    assert not (dest / "checkpoint-12").exists()
    assert result.fetched == ["checkpoint-8"]
    assert tree_digest(dest / "checkpoint-8") == tree_digest(server_tree / "checkpoint-8")
    assert result.not_backed_up == ["checkpoint-12", "checkpoint-4"]


def test_in_one_batch_the_newest_deleted_after_its_read_is_committed_and_an_older_one_modified_is_named(
        server_tree, tmp_path):
    newest = server_tree / "checkpoint-12"
    before = tree_digest(newest)
    shard = add_shard(server_tree / "checkpoint-8")   # 24 MiB: the three still travel as one batch
    sends: list[list[str]] = []
    got: set[str] = set()
    deleted, rewritten = [], []

    def on_record(value: dict) -> None:
        got.add(value["record"].member)
        mine = [m for m in sends[0] if m.startswith("checkpoint-12/")]
        if newest.exists() and mine and all(m in got for m in mine):
            shutil.rmtree(newest)   # its last record is in: the server has read every file of it
            deleted.append(len(got))

    def on_member(value: dict) -> None:
        if value["member"] == "checkpoint-8/shard.bin":
            rewrite_same_size(shard, keep_mtime=False)
            rewritten.append(True)

    hooks = Hooks()
    hooks.on_before("send", lambda args: sends.append([m for _src, m in args["pairs"]]))
    hooks.on_after("send_record", on_record)
    hooks.on_after("send_member", on_member)
    dest = tmp_path / "b"
    result = run_backup(make_target(server_tree, dest),
                        BackupOptions(all=True, compress="off"), connect=always(InProcessServer(hooks)))
    assert {m.split("/")[0] for m in sends[0]} == {"checkpoint-4", "checkpoint-8", "checkpoint-12"}
    assert deleted and rewritten and not newest.exists()
    assert result.exit_code == PARTIAL
    assert result.fetched == ["checkpoint-12", "checkpoint-4"]   # the newest committed first
    assert result.deleted_on_server == ["checkpoint-12"]
    assert tree_digest(dest / "checkpoint-12") == before
    assert tree_digest(dest / "checkpoint-4") == tree_digest(server_tree / "checkpoint-4")
    assert "checkpoint-8/shard.bin: modified while being read" in result.failed["checkpoint-8"]
    assert not (dest / "checkpoint-8").exists()
    assert result.not_backed_up == ["checkpoint-8"]
    status = json.loads((dest / ".ckptsync" / "status.json").read_text())
    assert status["not_backed_up"] == ["checkpoint-8"] and status["deleted_on_server"] == ["checkpoint-12"]


def test_a_split_file_rewritten_while_its_ranges_are_read_fails_its_checkpoint(server_tree, tmp_path, small_split):
    """Over three channels each byte range is checked against the listing at the end of its read."""
    big = add_big(server_tree, 48 * MB)   # three ranges of 16 MiB
    lock, rewritten = threading.Lock(), []

    def rewrite(value: dict) -> None:
        with lock:
            if value["member"] == "checkpoint-12/big.bin" and not rewritten:
                rewrite_same_size(big, keep_mtime=True)
                rewritten.append(True)

    hooks = Hooks()
    hooks.on_after("send_member", rewrite)
    t, servers = parallel_target(server_tree, tmp_path / "b", 3, lambda _i: hooks)
    result = run_backup(t, BackupOptions(names=["checkpoint-12"], compress="off"), connect=servers)
    assert rewritten and result.channels == 3
    assert result.exit_code == PARTIAL
    assert "checkpoint-12/big.bin: modified while being read" in result.failed["checkpoint-12"]
    assert not (tmp_path / "b" / "checkpoint-12").exists()


def test_a_checkpoint_deleted_before_its_read_still_fails(server_tree, tmp_path):
    """Deleted before the read is not deleted after it: nothing of it was copied."""
    hooks = Hooks()
    hooks.on_before("send", lambda _args: shutil.rmtree(server_tree / "checkpoint-12"), times=1)
    dest = tmp_path / "b"
    result = run_backup(make_target(server_tree, dest), BackupOptions(), connect=always(InProcessServer(hooks)))
    assert result.exit_code == PARTIAL
    assert "vanished from the server after the listing" in result.failed["checkpoint-12"]
    assert result.deleted_on_server == [] and not (dest / "checkpoint-12").exists()
    assert result.fetched == ["checkpoint-8"]


def test_the_default_takes_every_checkpoint_newer_than_the_newest_backup(server_tree, tmp_path):
    add_checkpoint(server_tree, 16, age=900)
    add_checkpoint(server_tree, 20, age=600)
    dest = tmp_path / "b"
    first = run_backup(make_target(server_tree, dest),
                       BackupOptions(names=["checkpoint-4", "checkpoint-8"]), connect=always(InProcessServer()))
    assert first.exit_code == OK and sorted(first.fetched) == ["checkpoint-4", "checkpoint-8"]
    again = run_backup(make_target(server_tree, dest), BackupOptions(), connect=always(InProcessServer()))
    assert again.exit_code == OK, again.failed
    assert again.fetched == ["checkpoint-20", "checkpoint-16", "checkpoint-12"]
    assert again.not_backed_up == [] and not any("not backed up" in w for w in again.warnings)
    for n in ("checkpoint-12", "checkpoint-16", "checkpoint-20"):
        assert tree_digest(dest / n) == tree_digest(server_tree / n)


def _item(name: str, step: int | None, mtime: float) -> SimpleNamespace:
    return SimpleNamespace(name=name, step=step, mtime=mtime)


@pytest.mark.parametrize("server, stored, newer", [
    # nothing backed up: a first run, which takes the --max-checkpoints newest instead
    ([("c-30", 30, 3), ("c-20", 20, 2), ("c-10", 10, 1)], [], []),
    ([("c-30", 30, 3), ("c-20", 20, 2), ("c-10", 10, 1)], [("c-10", 10, 1)], ["c-30", "c-20"]),
    # the newest backup was rotated away on the server: newer than it still counts
    ([("c-50", 50, 5), ("c-40", 40, 4)], [("c-30", 30, 3), ("c-10", 10, 1)], ["c-50", "c-40"]),
    ([("c-50", 50, 5), ("c-40", 40, 4)], [("c-50", 50, 5)], []),
    # reused names without steps: the one name itself is never newer than its own backup
    ([("latest.pt", None, 9), ("latest_backup.pt", None, 8)], [("latest.pt", None, 5)], []),
])
def test_new_since_the_newest_backup(server, stored, newer):
    from ckptsync.selection import new_since

    got = new_since([_item(*s) for s in server], [_item(*s) for s in stored])
    assert [c.name for c in got] == newer


def test_a_first_run_names_every_complete_checkpoint_it_does_not_take(server_tree, tmp_path):
    add_checkpoint(server_tree, 16, age=900)
    add_checkpoint(server_tree, 20, age=600)
    left = ["checkpoint-12", "checkpoint-8", "checkpoint-4"]
    dest = tmp_path / "b"
    res = run_cli("backup", "--remote-dir", server_tree, "--local-dir", dest)
    assert res.returncode == 0, res.stderr
    line = ("complete on the server but not backed up (a first run takes the --max-checkpoints newest: "
            + ", ".join(left) + "); back them up with: ckptsync backup --all")
    assert line in res.stderr
    assert sorted(p.name for p in dest.iterdir() if not p.name.startswith(".")) == ["checkpoint-16", "checkpoint-20"]
    status = json.loads((dest / ".ckptsync" / "status.json").read_text())
    assert status["not_backed_up"] == left
    shown = run_cli("list", "--remote-dir", server_tree, "--local-dir", dest)
    words = " ".join  # off a terminal a long line is folded: compare the words
    assert "not backed up: " + ", ".join(left) in words(shown.stdout.split())
    as_json = run_cli("backup", "--json", "--remote-dir", server_tree, "--local-dir", tmp_path / "other")
    assert as_json.returncode == 0, as_json.stderr
    out = json.loads(as_json.stdout)
    assert out["not_backed_up"] == left and any(w.startswith("complete on the server") for w in out["warnings"])
    check = run_cli("checklist", "--remote-dir", server_tree, "--local-dir", dest)
    assert "complete on the server but not backed up: " + ", ".join(left) in words(check.stderr.split())
    assert "deleting the instance loses them" in words(check.stderr.split())


def _interrupt_commit_of(name: str, monkeypatch) -> None:
    """Stop the run at the start of `name`'s commit, as a kill there would."""
    real = DirectoryStore.commit_all

    def commit_all(self, ms):
        if any(m.name == name for m in ms):
            monkeypatch.setattr(DirectoryStore, "commit_all", real)
            raise KeyboardInterrupt
        return real(self, ms)
    monkeypatch.setattr(DirectoryStore, "commit_all", commit_all)


def test_staging_of_a_checkpoint_the_server_deleted_is_committed_when_whole(server_tree, tmp_path, monkeypatch):
    victim = server_tree / "checkpoint-12"
    before = tree_digest(victim)
    dest = tmp_path / "b"
    _interrupt_commit_of("checkpoint-12", monkeypatch)
    with pytest.raises((Interrupted, KeyboardInterrupt)):
        run_backup(make_target(server_tree, dest), BackupOptions(names=["checkpoint-12"]),
                   connect=always(InProcessServer()))
    assert not (dest / "checkpoint-12").exists()
    shown = run_cli("list", "--remote-dir", server_tree, "--local-dir", dest)
    assert "staging holds" in shown.stderr and "(checkpoint-12)" in shown.stderr
    assert "ckptsync backup --discard-staged" in shown.stderr
    listed = json.loads(run_cli("list", "--json", "--remote-dir", server_tree, "--local-dir", dest).stdout)
    assert listed["staged"] == ["checkpoint-12"] and listed["staged_bytes"] > 0
    check = run_cli("checklist", "--remote-dir", server_tree, "--local-dir", dest)
    assert "staging holds" in check.stderr and "ckptsync backup --discard-staged" in check.stderr
    shutil.rmtree(victim)   # rotated away before the next run
    res = run_cli("backup", "--remote-dir", server_tree, "--local-dir", dest)
    assert res.returncode == 0, res.stderr
    assert f"checkpoint-12: {ONLY_COPY}" in res.stdout
    assert tree_digest(dest / "checkpoint-12") == before
    assert DirectoryStore(dest).staged_names() == []
    again = run_cli("list", "--remote-dir", server_tree, "--local-dir", dest)
    assert "staging holds" not in again.stderr


def test_staging_of_a_checkpoint_the_server_deleted_is_dropped_when_not_whole(server_tree, tmp_path):
    add_shard(server_tree / "checkpoint-12")
    dest = tmp_path / "b"
    with pytest.raises(Interrupted):
        run_backup(make_target(server_tree, dest),
                   BackupOptions(names=["checkpoint-12"], compress="off"), StopAt("checkpoint-12", 12 * MB),
                   connect=always(InProcessServer()))
    assert DirectoryStore(dest).staged_names() == ["checkpoint-12"]
    shutil.rmtree(server_tree / "checkpoint-12")
    result = run_backup(make_target(server_tree, dest), BackupOptions(), connect=always(InProcessServer()))
    assert result.exit_code == OK
    assert any("dropped what was staged of checkpoint-12" in w for w in result.warnings)
    assert DirectoryStore(dest).staged_names() == [] and not (dest / "checkpoint-12").exists()
    assert "checkpoint-12" not in result.fetched and result.deleted_on_server == []


def test_placing_a_file_over_a_link_to_the_same_bytes_leaves_no_temporary(tmp_path):
    src = tmp_path / "stored.bin"
    src.write_bytes(b"x" * 4096)
    dest = tmp_path / "staged" / "file.bin"
    dest.parent.mkdir()
    os.link(src, dest)
    st = src.stat()
    place_copy(src, dest, st.st_mtime_ns, 0o644, "link")
    assert sorted(p.name for p in dest.parent.iterdir()) == ["file.bin"]
    assert dest.read_bytes() == src.read_bytes()


def test_the_server_hashes_a_listed_file_only_while_it_is_the_listed_one(server_tree):
    with InProcessServer() as server:
        listing = {f.path: f for f in server.scan(str(server_tree)).files}
        path = "checkpoint-12/optimizer.pt"
        rewrite_same_size(server_tree / path, keep_mtime=True)
        got = server.hash(str(server_tree), [path, "checkpoint-8/optimizer.pt"], "xxh3_128", listed=listing)
    assert path in got.errors and "changed since the listing" in got.errors[path]
    assert "checkpoint-8/optimizer.pt" in got.values


def test_through_sshd_a_checkpoint_deleted_right_after_its_send_is_committed(ssh_home, server_tree, tmp_path):
    victim = server_tree / "checkpoint-12"
    before = tree_digest(victim)
    script = Path(__file__).resolve().parent / "rotating_agent.py"
    remote = f"{sys.executable} {script} {PACKAGE.parent} {victim} send #"  # '#': the launcher after it is ignored
    cfg = tmp_path / "rot.yaml"
    cfg.write_text(json.dumps({"remote_dir": str(server_tree), "local_dir": str(tmp_path / "b"),
                               "instances": {"1": {"command": ["ssh", "-F", str(ssh_home / ".ssh" / "config"),
                                                               "tnr-1", remote]}}}))
    res = run_cli("backup", "-i", "1", "--config", cfg)
    assert not victim.exists()  # the rotation really ran, on the server, after the send
    assert res.returncode == 0, res.stderr
    assert f"checkpoint-12: {ONLY_COPY}" in res.stdout
    assert "Traceback" not in res.stderr
    dest = tmp_path / "b" / "instance-1"
    assert tree_digest(dest / "checkpoint-12") == before
    assert tree_digest(dest / "checkpoint-8") == tree_digest(server_tree / "checkpoint-8")
    status = json.loads((dest / ".ckptsync" / "status.json").read_text())
    assert status["deleted_on_server"] == ["checkpoint-12"] and status["not_backed_up"] == ["checkpoint-4"]
