"""Commits on their own thread: the stream is read while earlier checkpoints are made durable,
and a failed or interrupted run leaves only whole checkpoints under their names."""

from __future__ import annotations

import errno
import threading

import pytest

import ckptsync.stores.directory as store_mod
from ckptsync.backup import Backup, BackupOptions, run_backup
from ckptsync.backup_status import run_job
from ckptsync.errors import OK, DiskFull, Interrupted
from ckptsync.progress import Reporter
from ckptsync.server.inprocess import Hooks, InProcessServer
from helpers import HANG, tree_digest
from test_batches import checkpoints, many  # noqa: F401 - the fixture
from test_server_boundary import always, make_target

FAILSAFE = 120   # seconds: only a broken build waits this long; a passing run never does


def job_for(tree, dest, group: int, rep: Reporter | None = None, server: InProcessServer | None = None) -> Backup:
    job = Backup(make_target(tree, dest), BackupOptions(all=True, compress="off"), rep or Reporter(),
                 connect=always(server or InProcessServer()))
    job.commit_group = group
    return job


def whole_or_absent(tree, dest, names) -> list[str]:
    """The checkpoints under their final names, each checked to be the server's bytes."""
    there = [n for n in names if (dest / n).exists()]
    for n in there:
        assert tree_digest(dest / n) == tree_digest(tree / n), n
    return there


def test_the_stream_is_read_while_a_commit_is_held(many, tmp_path):  # noqa: F811
    dest = tmp_path / "b"
    names = checkpoints(many)
    held: list[str] = []
    on_thread: list[bool] = []
    arrived_meanwhile: list[str] = []
    later = threading.Event()

    def before_commit(group: list[str]) -> None:
        on_thread.append(threading.current_thread() is not threading.main_thread())
        if not held:
            held.extend(group)
            assert later.wait(FAILSAFE), "no file arrived while the first commit was held"

    def on_member(args: dict) -> None:   # its tar header has arrived: the stream is being read
        member = args["member"]
        owner = next((n for n in names if member.startswith(n + "/")), "")
        if held and not later.is_set() and owner and owner not in held:
            assert not any((dest / n).exists() for n in held)   # that commit has not finished
            arrived_meanwhile.append(member)
            later.set()

    hooks = Hooks()
    hooks.on_after("send_member", on_member)
    job = job_for(many, dest, 4, server=InProcessServer(hooks=hooks))
    job.before_commit = before_commit
    result = run_job(job)
    assert result.exit_code == OK and sorted(result.fetched) == names
    assert held and arrived_meanwhile and all(on_thread)
    assert whole_or_absent(many, dest, names) == names


def test_a_disk_full_commit_on_the_thread_stops_the_backup_and_leaves_no_half_checkpoint(many, tmp_path,  # noqa: F811
                                                                                      monkeypatch):
    dest = tmp_path / "b"
    names = checkpoints(many)
    real = store_mod.sync_trees
    calls: list[bool] = []

    def sync_trees(paths):
        calls.append(threading.current_thread() is not threading.main_thread())
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(paths[0]))
        real(paths)

    groups: list[list[str]] = []
    monkeypatch.setattr(store_mod, "sync_trees", sync_trees)
    job = job_for(many, dest, 4)
    job.before_commit = groups.append
    with pytest.raises(DiskFull) as caught:
        run_job(job)
    monkeypatch.undo()
    assert calls == [True, True]   # the fault was on the committer's thread, and no later commit started
    assert caught.value.exit_code == DiskFull.exit_code
    assert caught.value.message.startswith(f"no space left on the device while moving {', '.join(groups[1])} into place")
    assert "\n" not in caught.value.message
    assert whole_or_absent(many, dest, names) == sorted(groups[0])
    again = run_backup(make_target(many, dest), BackupOptions(all=True, compress="off"),
                       connect=always(InProcessServer()))
    assert again.exit_code == OK and sorted(again.fetched) == sorted(set(names) - set(groups[0]))
    assert whole_or_absent(many, dest, names) == names


class CutWhileHeld(Reporter):
    """Ctrl+C a third into the transfer, while the first commit is held on its thread; the commit
    is let go as the interrupt is raised."""

    def __init__(self, holding: threading.Event, release: threading.Event) -> None:
        self.at, self.done, self.holding, self.release = 0.0, 0, holding, release

    def start(self, label: str, total: int) -> None:
        self.at, self.done = (total // 3 if not self.at else self.at), 0

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if self.done >= self.at:
            self.at = float("inf")
            assert self.holding.wait(FAILSAFE), "no commit was under way at the interrupt"
            self.release.set()
            raise KeyboardInterrupt


def test_ctrl_c_while_commits_are_queued_leaves_only_whole_checkpoints(many, tmp_path):  # noqa: F811
    dest = tmp_path / "b"
    names = checkpoints(many)
    holding, release = threading.Event(), threading.Event()
    groups: list[list[str]] = []

    def before_commit(group: list[str]) -> None:
        groups.append(group)
        if len(groups) == 1:
            holding.set()
            assert release.wait(FAILSAFE)

    job = job_for(many, dest, 8, CutWhileHeld(holding, release))
    job.before_commit = before_commit
    with pytest.raises(Interrupted) as caught:
        run_job(job)
    committed = [n for g in groups for n in g]
    assert committed == groups[0]   # the held group, finished before the run said so
    assert f"committed {', '.join(committed)};" in caught.value.message
    assert whole_or_absent(many, dest, names) == sorted(committed)
    assert not threading.enumerate()[1:] or all(t.name != "ckptsync-commit" for t in threading.enumerate())
    again = run_backup(make_target(many, dest), BackupOptions(all=True, compress="off"),
                       connect=always(InProcessServer()))
    assert again.exit_code == OK and sorted(again.fetched) == sorted(set(names) - set(committed))
    assert whole_or_absent(many, dest, names) == names


def test_the_fsyncs_of_a_commit_run_together_and_a_failure_is_raised_after_all(tmp_path, monkeypatch):
    """Filesystems commit fsyncs issued together as one; a failed one still leaves none untried."""
    import ckptsync.disk as disk

    files = []
    for i in range(disk.FSYNC_THREADS):
        (tmp_path / f"f{i}").write_bytes(b"x")
        files.append(str(tmp_path / f"f{i}"))
    together = threading.Barrier(disk.FSYNC_THREADS, timeout=HANG)
    done = []

    def fsync_file(path):
        together.wait()   # one after another, the first would wait here alone until the barrier broke
        done.append(path)
        if path.endswith("f3"):
            raise OSError(errno.EIO, "Input/output error", path)

    monkeypatch.setattr(disk, "fsync_file", fsync_file)
    with pytest.raises(OSError) as info:
        disk.fsync_many(files, [str(tmp_path)])
    assert info.value.errno == errno.EIO and sorted(done) == sorted(files)
