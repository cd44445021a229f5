"""Reading ahead: while a block is hashed, compressed and sent, the disk is already reading the
next ones, and the next file's first bytes, so a cold cache does not make each read wait."""

from __future__ import annotations

import os

import pytest

import ckptsync.agent.direct as direct
from ckptsync.agent.direct import READ_AHEAD, ahead_of
from ckptsync.agent.frames import CHUNK
from ckptsync.backup import BackupOptions, run_backup
from ckptsync.server.inprocess import InProcessServer
from helpers import tree_digest
from test_server_boundary import always, make_target

needs_fadvise = pytest.mark.skipif(not hasattr(os, "posix_fadvise") or not os.path.isdir("/proc/self/fd"),
                                   reason="needs posix_fadvise and /proc (Linux)")


def requests_for(total: int, block: int = CHUNK, window: int = READ_AHEAD) -> list[tuple[int, int, int]]:
    """(bytes read when asked, offset, length) of every request a reader of `total` bytes makes."""
    asked = [(0, 0, min(total, window))] if total else []
    done = 0
    while done < total:
        done += min(block, total - done)
        more = ahead_of(done, block, total, window)
        if more is not None:
            asked.append((done, *more))
    return asked


@pytest.mark.parametrize("total", [0, 1, CHUNK - 1, CHUNK, READ_AHEAD, READ_AHEAD + 1, 5 * CHUNK + 3,
                                   3 * READ_AHEAD + CHUNK // 2])
def test_the_requests_cover_the_file_once_and_stay_ahead_of_the_reader(total):
    asked = requests_for(total)
    covered = 0
    for done, offset, length in asked:
        assert offset == covered, asked          # no gap, no byte asked for twice
        assert length > 0
        assert offset + length <= total
        assert offset >= done or offset == 0     # never behind what was read already
        covered = offset + length
    assert covered == total


def test_a_small_file_is_asked_for_whole_at_once():
    assert requests_for(100_000) == [(0, 0, 100_000)]


@needs_fadvise
def test_a_backup_asks_for_each_file_ahead_of_its_read(server_tree, tmp_path, monkeypatch):
    big = server_tree / "checkpoint-12" / "big.bin"
    big.write_bytes(os.urandom(3 * READ_AHEAD + 12345))
    asked: dict[str, list[tuple[int, int]]] = {}
    real = os.posix_fadvise

    def record(fd, offset, length, advice):
        if advice == os.POSIX_FADV_WILLNEED:
            path = os.readlink(f"/proc/self/fd/{fd}")
            asked.setdefault(path, []).append((offset, length))
        return real(fd, offset, length, advice)

    monkeypatch.setattr(direct, "_FADVISE", record)
    dest = tmp_path / "b"
    res = run_backup(make_target(server_tree, dest), BackupOptions(all=True, compress="off"),
                     connect=always(InProcessServer()))
    assert res.exit_code == 0
    assert tree_digest(dest / "checkpoint-12") == tree_digest(server_tree / "checkpoint-12")

    # The large file: one request per block past the first window, together all of it.
    spans = sorted(asked[str(big)])
    covered = 0
    for offset, length in spans:
        assert offset <= covered
        covered = max(covered, offset + length)
    assert covered == big.stat().st_size
    # Every other file sent was asked for before its turn (as the next file, or at its start).
    sent = [p for p in (server_tree / "checkpoint-12").rglob("*") if p.is_file() and p != big]
    assert sent and all(str(p) in asked for p in sent), sorted(set(map(str, sent)) - set(asked))
