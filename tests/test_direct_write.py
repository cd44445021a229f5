"""New files are written past the page cache where the filesystem allows it (agent/direct.py),
byte for byte what was given; a refusal falls back to ordinary writes."""

from __future__ import annotations

import errno
import fcntl
import os
import sys

import pytest

from ckptsync.agent import direct
from ckptsync.agent.direct import BLOCK, NewFile, direct_buffer
from ckptsync.transport.local import LocalTransport

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="O_DIRECT and pipe sizes are Linux's")
SIZES = [0, 1, 4095, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 12345]


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
            assert fcntl.fcntl(f.fileno(), fcntl.F_GETFL) & os.O_DIRECT   # the disk reads from the buffer
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


@linux
def test_a_refused_direct_write_continues_the_ordinary_way(tmp_path, monkeypatch):
    real = os.write
    refused = []

    def refuse_direct(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
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
            assert not fcntl.fcntl(f.fileno(), fcntl.F_GETFL) & os.O_DIRECT
        write_in_pieces(f, data)
    assert (tmp_path / "f.part").read_bytes() == data


@linux
def test_the_agents_pipes_hold_a_whole_frame():
    proc = LocalTransport().start()
    try:
        for pipe in (proc.proc.stdin, proc.proc.stdout):
            assert fcntl.fcntl(pipe.fileno(), 1032) >= 1 << 20   # F_GETPIPE_SZ: a 1 MiB frame in one read
    finally:
        proc.kill()
        proc.close()
