"""An interrupted large file keeps the bytes that arrived; the next run sends only the rest."""

from __future__ import annotations

import os
import threading

import pytest

from ckptsync.backup import BackupOptions, run_backup
from ckptsync.errors import CONNECT, CkptsyncError, Interrupted
from ckptsync.progress import Reporter
from ckptsync.restore import RestoreOptions, run_restore
from ckptsync.server import remote
from ckptsync.server.inprocess import Hooks, InProcessServer, ThreadProcess
from ckptsync.server.transfer import KEEP_PREFIX_MIN
from helpers import HANG, run_cli, tree_digest
from test_server_boundary import always, make_target

MB = 1 << 20
BIG = 48 * MB
CUT = 20 * MB            # link bytes from the agent before the cut: inside big.bin
OVERHEAD = 512 * 1024    # frames, tar headers and the small files of the checkpoint
PART = ".ckptsync/staging/checkpoint-12/checkpoint-12/big.bin.part"


def add_big(server_tree):
    big = server_tree / "checkpoint-12" / "big.bin"
    big.write_bytes(os.urandom(BIG))
    old = (server_tree / "checkpoint-12" / "optimizer.pt").stat().st_mtime
    os.utime(big, (old, old))
    return big


def cut_backup(server_tree, dest):
    """A backup of checkpoint-12 whose link drops after CUT bytes; returns the kept prefix's size."""
    hooks = Hooks()
    server = InProcessServer(hooks)
    hooks.on_before("send", lambda _args: server.cut_after(CUT), times=1)
    with pytest.raises(CkptsyncError) as info:
        run_backup(make_target(server_tree, dest), BackupOptions(names=["checkpoint-12"], compress="off"),
                   connect=always(server))
    assert info.value.exit_code == CONNECT and server.link.process.cut
    assert not (dest / "checkpoint-12").exists()
    return (dest / PART).stat().st_size


def test_the_rerun_sends_only_the_rest_of_the_interrupted_file(server_tree, tmp_path):
    big = add_big(server_tree)
    dest = tmp_path / "b"
    kept = cut_backup(server_tree, dest)
    assert CUT - MB - OVERHEAD < kept <= CUT  # the frame the cut fell into is lost whole
    assert (dest / PART).read_bytes() == big.read_bytes()[:kept]  # what arrived, byte for byte

    offered = []
    hooks = Hooks()
    hooks.on_before("send", lambda args: offered.append(args["resume"]))
    again = run_backup(make_target(server_tree, dest),
                       BackupOptions(names=["checkpoint-12"], compress="off"), connect=always(InProcessServer(hooks)))
    assert again.exit_code == 0 and again.fetched == ["checkpoint-12"]
    assert [{m: size for m, (size, _h) in o.items()} for o in offered] == [{"checkpoint-12/big.bin": kept}]
    assert again.resumed_bytes == kept
    assert BIG - kept <= again.raw_bytes <= BIG - kept + OVERHEAD
    assert BIG - kept <= again.wire_bytes <= BIG - kept + OVERHEAD
    assert tree_digest(dest / "checkpoint-12") == tree_digest(server_tree / "checkpoint-12")
    assert not list(dest.rglob("*.part"))


def test_a_prefix_that_differs_on_the_server_is_sent_again_whole(server_tree, tmp_path):
    big = add_big(server_tree)
    dest = tmp_path / "b"
    kept = cut_backup(server_tree, dest)
    st = big.stat()
    with open(big, "r+b") as f:  # rewritten inside the kept prefix, same size and mtime
        f.seek(kept // 2)
        byte = f.read(1)
        f.seek(kept // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = run_backup(make_target(server_tree, dest),
                       BackupOptions(names=["checkpoint-12"], compress="off"), connect=always(InProcessServer()))
    assert again.exit_code == 0 and again.resumed_bytes == 0
    assert again.raw_bytes >= BIG
    assert (dest / "checkpoint-12" / "big.bin").read_bytes() == big.read_bytes()


def test_a_small_partial_file_is_not_kept(server_tree, tmp_path):
    big = server_tree / "checkpoint-12" / "big.bin"
    big.write_bytes(os.urandom(KEEP_PREFIX_MIN // 2))
    old = (server_tree / "checkpoint-12" / "optimizer.pt").stat().st_mtime
    os.utime(big, (old, old))
    hooks = Hooks()
    server = InProcessServer(hooks)
    hooks.on_before("send", lambda _args: server.cut_after(KEEP_PREFIX_MIN // 4), times=1)
    dest = tmp_path / "b"
    with pytest.raises(CkptsyncError):
        run_backup(make_target(server_tree, dest), BackupOptions(names=["checkpoint-12"], compress="off"),
                   connect=always(server))
    assert not list(dest.rglob("*.part"))


def test_the_cli_summary_reports_the_bytes_not_sent_again(server_tree, tmp_path):
    add_big(server_tree)
    dest = tmp_path / "b"
    kept = cut_backup(server_tree, dest)
    res = run_cli("backup", "--remote-dir", server_tree, "--local-dir", dest, "--checkpoint", "checkpoint-12",
                  "--compress", "off", "--no-extra-files")
    assert res.returncode == 0, res.stderr
    from ckptsync.policy import human

    assert f"{human(kept)} of partly fetched files kept from an interrupted run, not sent again" in res.stdout
    assert tree_digest(dest / "checkpoint-12") == tree_digest(server_tree / "checkpoint-12")


class StopAt(Reporter):
    """Ctrl+C once `at` bytes of a transfer labelled `label...` have been handed on."""

    def __init__(self, label: str, at: int) -> None:
        self.label, self.at, self.current, self.done = label, at, "", 0

    def start(self, label: str, total: int) -> None:
        self.current, self.done = label, 0

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if self.current.startswith(self.label) and self.done >= self.at:
            self.at = float("inf")
            raise KeyboardInterrupt


def test_ctrl_c_during_a_backup_keeps_the_prefix_too(server_tree, tmp_path):
    big = add_big(server_tree)
    dest = tmp_path / "b"
    with pytest.raises(Interrupted):
        run_backup(make_target(server_tree, dest),
                   BackupOptions(names=["checkpoint-12"], compress="off"), StopAt("checkpoint-12", CUT),
                   connect=always(InProcessServer()))
    kept = (dest / PART).stat().st_size
    assert KEEP_PREFIX_MIN <= kept <= CUT + MB
    assert (dest / PART).read_bytes() == big.read_bytes()[:kept]
    again = run_backup(make_target(server_tree, dest),
                       BackupOptions(names=["checkpoint-12"], compress="off"), connect=always(InProcessServer()))
    assert again.exit_code == 0 and again.resumed_bytes == kept
    assert tree_digest(dest / "checkpoint-12") == tree_digest(server_tree / "checkpoint-12")


def backed_up_big(server_tree, tmp_path):
    """checkpoint-12 with big.bin backed up; (backup dir, an empty run dir, restore options for it)."""
    add_big(server_tree)
    dest = tmp_path / "b"
    assert run_backup(make_target(server_tree, dest),
                      BackupOptions(names=["checkpoint-12"]), connect=always(InProcessServer())).exit_code == 0
    opts = RestoreOptions(checkpoint="checkpoint-12", extra_files=False, compress="off")
    return dest, tmp_path / "fresh" / "run", opts


def test_an_interrupted_restore_keeps_the_prefix_on_the_server_and_sends_the_rest(server_tree, tmp_path):
    dest, fresh, opts = backed_up_big(server_tree, tmp_path)
    with pytest.raises(Interrupted):
        run_restore(make_target(fresh, dest), opts, StopAt("send", 32 * MB), connect=always(InProcessServer()))
    part = fresh / ".ckptsync-staging-checkpoint-12" / "checkpoint-12" / "big.bin.part"
    kept = part.stat().st_size
    assert KEEP_PREFIX_MIN <= kept <= 32 * MB
    assert not (fresh / "checkpoint-12").exists()

    again = run_restore(make_target(fresh, dest), opts, connect=always(InProcessServer()))
    assert again.resumed_bytes == kept
    assert again.sent_bytes <= BIG - kept + OVERHEAD
    assert BIG - kept <= again.wire_bytes <= BIG - kept + OVERHEAD
    assert tree_digest(fresh / "checkpoint-12") == tree_digest(server_tree / "checkpoint-12")
    assert sorted(os.listdir(fresh)) == ["checkpoint-12"]


def test_a_kept_prefix_never_ends_up_inside_a_checkpoint_placed_from_the_store(server_tree, tmp_path):
    """The rerun fetches nothing: every file of checkpoint-12, big.bin included, is already
    stored under another checkpoint and placed locally. The kept .part must not be committed."""
    import shutil

    add_big(server_tree)
    dest = tmp_path / "b"
    cut_backup(server_tree, dest)
    shutil.copytree(server_tree / "checkpoint-12", server_tree / "checkpoint-13")  # copy2: same mtimes
    first = run_backup(make_target(server_tree, dest),
                       BackupOptions(names=["checkpoint-13"], compress="off"), connect=always(InProcessServer()))
    assert first.exit_code == 0 and first.fetched == ["checkpoint-13"]
    assert (dest / PART).exists()   # still kept for checkpoint-12

    again = run_backup(make_target(server_tree, dest),
                       BackupOptions(names=["checkpoint-12"], compress="off"), connect=always(InProcessServer()))
    assert again.exit_code == 0 and again.fetched == ["checkpoint-12"] and again.raw_bytes == 0
    assert not list(dest.rglob("*.part"))
    assert tree_digest(dest / "checkpoint-12") == tree_digest(server_tree / "checkpoint-12")


class StalledLink(ThreadProcess):
    """A link that stops taking bytes once `after` have gone out: a write then ends only by kill()."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.after, self.sent = after, 0
        self.stalled, self.killed = threading.Event(), threading.Event()
        self.watch: threading.Thread | None = None
        self.writing_at_close: bool | None = None

    def write(self, data: bytes) -> None:
        if self.sent >= self.after:
            self.watch = threading.current_thread()   # the upload's writer
            self.stalled.set()
            self.killed.wait(HANG)
            raise CkptsyncError("connection lost: the link was killed")
        self.sent += len(data)
        super().write(data)

    def kill(self) -> None:
        self.killed.set()

    def close(self) -> None:
        self.writing_at_close = self.watch is not None and self.watch.is_alive()
        super().close()


class CtrlCOnStall(Reporter):
    """Ctrl+C once 2 MiB past the link's limit are handed on and the link has stalled: what was
    handed on before the current block is queued for the writer, which gets past the limit and
    sticks in its next write, while the upload's queue still has room for those 2 MiB."""

    def __init__(self, link: StalledLink) -> None:
        self.link, self.sending, self.done, self.fired = link, False, 0, False

    def start(self, label: str, total: int) -> None:
        self.sending, self.done = label.startswith("send"), 0   # not the check of the backup before it

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if self.sending and not self.fired and self.done >= self.link.after + 2 * MB:
            self.fired = True
            assert self.link.stalled.wait(HANG), "the writer never got past the link's limit"
            raise KeyboardInterrupt


def test_an_abandoned_upload_stops_writing_before_its_link_is_closed(server_tree, tmp_path, monkeypatch):
    """A frame still being written when the link closes could land in whatever file reuses the
    descriptor; the writer is stopped (the stalled peer killed) before anything is closed."""
    monkeypatch.setattr(remote, "ABORT_WAIT", 0.2)
    dest, fresh, opts = backed_up_big(server_tree, tmp_path)
    link = StalledLink(after=16 * MB)
    server = InProcessServer()
    server.link.start = lambda: link
    with pytest.raises(Interrupted):
        run_restore(make_target(fresh, dest), opts, CtrlCOnStall(link), connect=always(server))
    assert link.killed.is_set()            # the writer was stuck in a write when Ctrl+C came
    assert link.writing_at_close is False  # and had stopped before the link closed
    assert not (fresh / "checkpoint-12").exists()

    again = run_restore(make_target(fresh, dest), opts, connect=always(InProcessServer()))
    assert again.resumed_bytes > 0
    assert tree_digest(fresh / "checkpoint-12") == tree_digest(server_tree / "checkpoint-12")
