"""Large files that could share a stored file's bytes are compared by their first MiB before the
server reads them whole: a training run's optimizer state has the same size at every save, and
reading it twice (once to compare, once to send) used to cost a full read of every checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

from ckptsync.backup import BackupOptions, run_backup
from ckptsync.placement import SAMPLE
from ckptsync.server.inprocess import InProcessServer
from helpers import tree_digest
from test_server_boundary import always, make_target

BIG = 3 * SAMPLE + 12345


class CountingServer(InProcessServer):
    """The in-process server, recording each batch of hashes it is asked for: (limit, paths)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[tuple[int | None, list[str]]] = []

    def hash(self, root, paths, alg=None, listed=None, limit=None):
        paths = list(paths)
        self.asked.append((limit, paths))
        return super().hash(root, paths, alg, listed=listed, limit=limit)


def checkpoint(root: Path, name: str, files: dict[str, bytes]) -> None:
    """A Trainer-style checkpoint (its trainer_state.json names the step) of these files."""
    d = root / name
    d.mkdir(parents=True)
    step = int(name.rsplit("-", 1)[1])
    files = {**files, "trainer_state.json": b'{"global_step": %d, "log_history": []}' % step}
    for f, data in files.items():
        (d / f).write_bytes(data)
        os.utime(d / f, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))


def backup(run: Path, dest: Path) -> tuple:
    server = CountingServer()
    res = run_backup(make_target(run, dest), BackupOptions(all=True, compress="off"), connect=always(server))
    assert res.exit_code == 0, res
    return res, server


def read_whole(server: CountingServer) -> set[str]:
    return {p for limit, paths in server.asked if limit is None for p in paths}


def test_a_large_file_with_a_stored_files_size_is_not_read_to_compare_it(tmp_path):
    run, dest = tmp_path / "run", tmp_path / "backups"
    state = os.urandom(BIG)
    checkpoint(run, "checkpoint-1", {"optimizer.pt": state, "config.json": b"{}"})
    backup(run, dest)
    # The next save: the same size, other bytes from the first one on (a training step later).
    checkpoint(run, "checkpoint-2", {"optimizer.pt": os.urandom(BIG), "config.json": b"{}"})
    res, server = backup(run, dest)
    assert res.fetched == ["checkpoint-2"]
    assert tree_digest(dest / "checkpoint-2") == tree_digest(run / "checkpoint-2")
    assert [limit for limit, _paths in server.asked] == [SAMPLE]          # one batch, first MiBs only
    assert "checkpoint-2/optimizer.pt" in server.asked[0][1]
    assert read_whole(server) == set()


def test_a_copy_of_a_stored_large_file_is_still_placed_and_a_lookalike_is_fetched(tmp_path):
    run, dest = tmp_path / "run", tmp_path / "backups"
    state = os.urandom(BIG)
    checkpoint(run, "checkpoint-1", {"optimizer.pt": state})
    backup(run, dest)
    checkpoint(run, "checkpoint-3", {"optimizer.pt": state})                    # the same bytes: placed
    lookalike = bytearray(state)
    lookalike[-5] ^= 0xFF                                                      # the same first MiB, not the same file
    checkpoint(run, "checkpoint-2", {"optimizer.pt": bytes(lookalike)})
    res, server = backup(run, dest)
    assert sorted(res.fetched) == ["checkpoint-2", "checkpoint-3"]
    assert tree_digest(dest / "checkpoint-3") == tree_digest(run / "checkpoint-3")
    assert tree_digest(dest / "checkpoint-2") == tree_digest(run / "checkpoint-2")
    stored = dest / "checkpoint-1" / "optimizer.pt"
    assert res.linked_bytes + res.reflinked_bytes >= BIG   # a hard link, or a reflink where the filesystem has them
    assert res.raw_bytes < 2 * BIG                          # the lookalike crossed the link, the copy did not
    assert (dest / "checkpoint-2" / "optimizer.pt").stat().st_ino != stored.stat().st_ino
    assert read_whole(server) == {"checkpoint-3/optimizer.pt", "checkpoint-2/optimizer.pt"}


def test_twins_of_one_transfer_larger_than_the_sample_are_fetched_once(tmp_path):
    run, dest = tmp_path / "run", tmp_path / "backups"
    frozen = os.urandom(BIG)
    for step in (1, 2, 3):
        checkpoint(run, f"checkpoint-{step}", {"base.bin": frozen, "optimizer.pt": os.urandom(BIG)})
    res, server = backup(run, dest)
    assert sorted(res.fetched) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    for step in (1, 2, 3):
        assert tree_digest(dest / f"checkpoint-{step}") == tree_digest(run / f"checkpoint-{step}")
    assert read_whole(server) == {f"checkpoint-{s}/base.bin" for s in (1, 2, 3)}   # the optimizer states: first MiB only
    assert res.linked_files + res.reflinked_files + res.copied_files >= 2
    assert res.raw_bytes < 5 * BIG                          # base.bin crossed the link once
