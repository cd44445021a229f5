"""Reading ahead: while a block is hashed, compressed and sent, the disk is already reading the
next ones, and the next file's first bytes, so a cold cache does not make each read wait."""

from __future__ import annotations

import os

import pytest

import ckptsync.agent.direct as direct
from ckptsync.agent.direct import READ_AHEAD, ahead_of, files_to_ask
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


@pytest.mark.parametrize("weights, most_bytes, most_files", [
    ([100] * 10, 250, 32), ([1] * 100, 1 << 30, 8), ([10 ** 9] * 3, 1 << 20, 32), ([0] * 5, 10, 2),
    ([5, 500, 5, 5, 5, 5], 20, 32), ([], 10, 10), ([7], 10, 10),
])
def test_the_files_ahead_are_each_asked_for_once_before_their_turn(weights, most_bytes, most_files):
    asked, calls = 0, []
    for reading in range(len(weights)):
        now = files_to_ask(weights, reading, asked, most_bytes, most_files)
        calls.append((reading, asked, now))
        assert now >= asked                                  # never asked for twice
        assert now == len(weights) or now > reading + 1      # the next file is asked for before its turn
        assert now - reading - 1 <= most_files                # no more files ahead than allowed
        ahead = sum(weights[reading + 1:now])
        assert ahead < most_bytes + max(weights[reading + 1:now], default=0), calls   # at most one file past the bound
        asked = now
    assert asked == len(weights) or not weights


@needs_fadvise
def test_a_batch_of_hashes_asks_for_the_files_ahead_of_their_turn(tmp_path, monkeypatch):
    """Many small files hashed from a cold cache: the disk is asked for the next ones together."""
    names = [f"f{i:03d}" for i in range(80)]
    for n in names:
        (tmp_path / n).write_bytes(os.urandom(3000))
    order: list[tuple[str, str]] = []
    real = os.posix_fadvise

    def record(fd, offset, length, advice):
        if advice == os.POSIX_FADV_WILLNEED:
            order.append(("asked", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        return real(fd, offset, length, advice)

    import ckptsync.agent.hashing as hashing
    from ckptsync.agent.scan import op_hash
    real_hash = hashing.hash_listed

    def hashed(path, *args, **kwargs):
        order.append(("read", os.path.basename(path)))
        return real_hash(path, *args, **kwargs)

    monkeypatch.setattr(direct, "_FADVISE", record)
    monkeypatch.setattr("ckptsync.agent.scan.hash_listed", hashed)
    stamps = {}
    for n in names:   # what a backup's listing gives: the sizes bound how far ahead it asks
        st = os.stat(tmp_path / n)
        stamps[n] = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
    got = op_hash({"root": str(tmp_path), "paths": names, "alg": "sha256", "stamps": stamps})
    assert sorted(got["hashes"]) == names and all(isinstance(h, str) for h in got["hashes"].values())
    reads = [n for what, n in order if what == "read"]
    assert reads == names
    for n in names[1:]:   # each file after the first was asked for before it was read, and once
        assert order.index(("asked", n)) < order.index(("read", n))
        assert order.count(("asked", n)) == 1
    first_read = order.index(("read", names[0]))
    assert sum(1 for what, _n in order[:first_read + 1] if what == "asked") >= direct.PREFETCH_FILES   # together
