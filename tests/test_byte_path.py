"""The byte path's own parts: new files written past the page cache where the filesystem allows it
(agent/direct.py), byte for byte what was given, a refusal falling back to ordinary writes; large
frames read in place; pipes to the agent that hold a whole frame."""

from __future__ import annotations

import errno
import io
import os
import sys

import pytest

from ckptsync.agent import HEADER, Channel, Failure, direct
from ckptsync.agent.direct import BLOCK, NewFile, direct_buffer
from ckptsync.server.remote import _Pipe
from ckptsync.server.watchdog import Watchdog
from ckptsync.transport.base import Process
from ckptsync.transport.local import LocalTransport

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="O_DIRECT and pipe sizes are Linux's")
SIZES = [0, 1, 4095, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 12345]


def fd_flags(fd: int) -> int:
    import fcntl   # here: the test modules import on a system without it (test_laptop.py)

    return fcntl.fcntl(fd, fcntl.F_GETFL)


def pipe_size(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, 1032)   # F_GETPIPE_SZ


def pattern(size: int) -> bytes:
    return (bytes(range(251)) * (size // 251 + 1))[:size]


def write_in_pieces(f, data: bytes) -> None:
    pos, step = 0, 1
    while pos < len(data):  # pieces of uneven sizes, none aligned to the buffer
        f.write(data[pos:pos + step * 7919])
        pos += step * 7919
        step = step % 300 + 37


@linux
@pytest.mark.parametrize("size", SIZES)
def test_new_file_holds_exactly_the_bytes_written(tmp_path, size):
    data = pattern(size)
    path = tmp_path / "f.part"
    path.write_bytes(b"x" * (size + 5000))   # an earlier try's leftover: emptied first
    buf = direct_buffer()
    with NewFile(str(path), buf) as f:
        if size >= BLOCK:
            assert fd_flags(f.fileno()) & os.O_DIRECT   # the disk reads from the buffer
        write_in_pieces(f, data)
    assert path.read_bytes() == data


@linux
def test_one_buffer_serves_files_one_after_another(tmp_path):
    buf = direct_buffer()
    for i, size in enumerate(SIZES):
        with NewFile(str(tmp_path / f"{i}.part"), buf) as f:
            write_in_pieces(f, pattern(size)[::-1])
    for i, size in enumerate(SIZES):
        assert (tmp_path / f"{i}.part").read_bytes() == pattern(size)[::-1]


MOUNTINFO = """\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
30 25 0:27 / /dev/shm rw,relatime - tmpfs tmpfs rw,size=24683772k
41 27 0:52 / /mnt/team rw,relatime shared:7 master:1 - nfs4 nas:/export rw,vers=4.2
42 27 259:3 /sub /data rw - xfs /dev/nvme0n1p3 rw
"""


def test_filesystem_kinds_come_from_mountinfo():
    assert direct.filesystem_kinds(MOUNTINFO) == {
        (254, 0): "ext4", (0, 27): "tmpfs", (0, 52): "nfs4", (259, 3): "xfs"}
    assert direct.filesystem_kinds("garbage\n\n1 2\n") == {}


@linux
@pytest.mark.parametrize("kind, direct_io", [("ext4", True), ("xfs", True), ("nfs4", False), ("tmpfs", False),
                                              ("fuse.sshfs", False)])
def test_only_local_disk_filesystems_are_written_past_the_cache(tmp_path, monkeypatch, kind, direct_io):
    dev = os.stat(tmp_path).st_dev
    info = tmp_path / "mountinfo"
    info.write_text(f"27 1 {os.major(dev)}:{os.minor(dev)} / / rw - {kind} /dev/x rw\n")
    monkeypatch.setattr(direct, "MOUNTINFO", str(info))
    data = pattern(BLOCK + 5)
    with NewFile(str(tmp_path / "f.part"), direct_buffer()) as f:
        assert bool(fd_flags(f.fileno()) & os.O_DIRECT) == direct_io
        write_in_pieces(f, data)
    assert (tmp_path / "f.part").read_bytes() == data


@linux
def test_a_refused_direct_write_continues_the_ordinary_way(tmp_path, monkeypatch):
    real = os.write
    refused = []

    def refuse_direct(fd, data):
        if fd_flags(fd) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data)

    monkeypatch.setattr(direct.os, "write", refuse_direct)
    data = pattern(2 * BLOCK + 999)
    with NewFile(str(tmp_path / "f.part"), direct_buffer()) as f:
        write_in_pieces(f, data)
    assert refused, "the direct write was never tried"
    assert (tmp_path / "f.part").read_bytes() == data


def test_without_a_buffer_writes_are_ordinary(tmp_path):
    data = pattern(BLOCK + 3)
    with NewFile(str(tmp_path / "f.part")) as f:
        if hasattr(os, "O_DIRECT"):
            assert not fd_flags(f.fileno()) & os.O_DIRECT
        write_in_pieces(f, data)
    assert (tmp_path / "f.part").read_bytes() == data


@linux
def test_the_agents_pipes_hold_a_whole_frame():
    proc = LocalTransport().start()
    try:
        for pipe in (proc.proc.stdin, proc.proc.stdout):
            assert pipe_size(pipe.fileno()) >= 1 << 20   # a 1 MiB frame in one read
    finally:
        proc.kill()
        proc.close()


class Trickle(io.RawIOBase):
    """A link that delivers at most 4 KiB per call, as a pipe fed by ssh does; counts the calls."""

    def __init__(self, data: bytes) -> None:
        self.src = io.BytesIO(data)
        self.calls = {"read": 0, "readinto": 0}

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        self.calls["read"] += 1
        return self.src.read(min(n, 4096))

    def readinto(self, buf) -> int:
        self.calls["readinto"] += 1
        data = self.src.read(min(len(buf), 4096))
        buf[:len(data)] = data
        return len(data)


def test_a_large_frame_arrives_whole_and_is_read_in_place():
    body = pattern(3 << 20 | 77)
    link = Trickle(HEADER.pack(b"D", len(body)) + body + HEADER.pack(b"J", 2) + b"{}")
    chan = Channel(link, None)
    kind, got = chan.recv()
    assert (kind, bytes(got)) == (b"D", body)
    assert link.calls["read"] == 1   # the header; the body went into its own buffer, never joined
    assert chan.recv() == (b"J", b"{}")   # small frames as before


def test_a_large_frame_cut_short_is_a_protocol_error():
    body = pattern(1 << 20)
    chan = Channel(Trickle(HEADER.pack(b"D", len(body)) + body[:-1]), None)
    with pytest.raises(Failure, match="closed mid-frame"):
        chan.recv()


@linux
@pytest.mark.parametrize("size, direct_io", [(0, False), (4096, False), (BLOCK - 1, False), (BLOCK, True),
                                             (3 * BLOCK, True), (None, True)])
def test_a_file_smaller_than_a_block_is_opened_the_ordinary_way(tmp_path, monkeypatch, size, direct_io):
    """It has no whole block to write past the cache: its direct open would only be closed again."""
    dev = os.stat(tmp_path).st_dev
    info = tmp_path / "mountinfo"
    info.write_text(f"27 1 {os.major(dev)}:{os.minor(dev)} / / rw - ext4 /dev/x rw\n")
    monkeypatch.setattr(direct, "MOUNTINFO", str(info))
    data = pattern(BLOCK + 5 if size is None else size)
    with NewFile(str(tmp_path / "f.part"), direct_buffer(), size) as f:
        assert bool(fd_flags(f.fileno()) & os.O_DIRECT) == direct_io
        write_in_pieces(f, data)
    assert (tmp_path / "f.part").read_bytes() == data


class CountingProcess(Process):
    """A process whose output is `data`, delivered in pieces of at most `most` bytes; counts its reads."""

    def __init__(self, data: bytes, most: int = 65536) -> None:
        self.src = io.BytesIO(data)
        self.most = most
        self.reads = 0

    def read(self, n: int) -> bytes:
        self.reads += 1
        return self.src.read(min(n, self.most))

    def write(self, data: bytes) -> None:
        raise AssertionError("nothing is written here")

    def close(self) -> None:
        pass


def pipe_over(proc: Process) -> _Pipe:
    return _Pipe(proc, None, Watchdog(60, lambda: None), lambda: AssertionError("stalled"))


def test_small_frames_are_read_a_block_at_a_time():
    """Each small frame is a header and a body: read from the link a block at a time, 500 frames
    cost a few reads of the process, not two each."""
    frames = [(b"H", b"x" * (i % 40)) for i in range(500)]
    data = b"".join(HEADER.pack(kind, len(body)) + body for kind, body in frames)
    proc = CountingProcess(data)
    chan = Channel(pipe_over(proc), None)
    got = [chan.recv() for _ in frames]
    assert [(kind, bytes(body)) for kind, body in got] == frames
    assert chan.recv() == (None, None)
    assert proc.reads <= len(data) // 65536 + 3, proc.reads


def test_bytes_read_past_the_marker_come_first_and_a_large_read_goes_straight_through():
    body = pattern(2 << 20)
    proc = CountingProcess(HEADER.pack(b"J", 2) + b"{}" + HEADER.pack(b"D", len(body)) + body, most=4096)
    pipe = pipe_over(proc)
    pipe.push(b"early")
    assert pipe.read(2) == b"ea" and pipe.read(100) == b"rly"
    chan = Channel(pipe, None)
    assert chan.recv() == (b"J", b"{}")
    kind, got = chan.recv()
    assert (kind, bytes(got)) == (b"D", body)
