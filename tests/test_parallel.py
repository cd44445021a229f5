"""backup --parallel: several channels, each a share of the files, large files split into byte ranges."""

from __future__ import annotations

import collections
import json
import os
import threading

import pytest
import xxhash

from ckptsync.backup import Backup, BackupOptions, run_backup
from ckptsync.config import Link, Target
from ckptsync.errors import CONNECT, INTEGRITY, CkptsyncError, ConfigError, Interrupted
from ckptsync.server import open_server, shares
from ckptsync.server.inprocess import Hooks, InProcessServer, InProcessTransport, ThreadProcess
from ckptsync.progress import Reporter
from ckptsync.server.shares import Piece, plan
from ckptsync.server.transfer import KEEP_PREFIX_MIN
from ckptsync.transport import LocalTransport
from helpers import HANG, tree_digest
from test_partial import StopAt
from test_server_boundary import always, make_target

MB = 1 << 20
BIG = 48 * MB
PART = ".ckptsync/staging/checkpoint-12/checkpoint-12/big.bin.part"
NAMES = ["checkpoint-4", "checkpoint-8", "checkpoint-12"]


# ---------------------------------------------------------------- the shares, pure

def sizes(share: list[Piece], files: dict[str, int]) -> int:
    return sum(p.length if p.start is not None else files[p.member] for p in share)


@pytest.mark.parametrize("files, n, kept, expect", [
    # small files go whole, each to the share holding its middle
    ({"a": 10, "b": 10, "c": 10}, 3, {}, [["a"], ["b"], ["c"]]),
    ({"a": 10, "b": 10}, 4, {}, [[], ["a"], [], ["b"]]),
    # one channel: everything, in order
    ({"a": 10, "b": 200 * MB}, 1, {}, [["a", "b"]]),
    # a large file across the cuts: one range per share, end to end
    ({"big": 300 * MB}, 3, {}, [["big@0+100"], ["big@100+100"], ["big@200+100"]]),
    # cuts closer than RANGE_MIN to an end are dropped: fewer, longer ranges
    ({"big": 70 * MB}, 16, {}, [[]] * 3 + [["big@0+17.5"]] + [[]] * 3 + [["big@17.5+17.5"]]
     + [[]] * 3 + [["big@35+17.5"], ["big@52.5+17.5"]] + [[]] * 3),
    # a kept prefix is not counted, and rides with the first range
    ({"big": 200 * MB}, 3, {"big": 50 * MB}, [["big@0+100"], ["big@100+50"], ["big@150+50"]]),
    # below SPLIT_MIN a file is never split
    ({"a": 60 * MB, "b": 60 * MB}, 3, {}, [["a"], [], ["b"]]),
])
def test_shares_are_balanced_by_bytes(files, n, kept, expect):
    got = plan([(m, m, s) for m, s in files.items()], n, kept)

    def show(p: Piece) -> str:
        if p.start is None:
            return p.member
        return f"{p.member}@{p.start / MB:g}+{p.length / MB:g}"
    assert [[show(p) for p in share] for share in got] == expect


def test_the_ranges_of_a_file_cover_it_once_each_on_its_own_share():
    files = [("a", "a", 5 * MB), ("big", "big", 1000 * MB + 3), ("c", "c", 70 * MB), ("d", "d", 1)]
    got = plan(files, 7)
    assert [p for share in got for p in share if p.member == "c"] == [Piece("c", "c")]  # no cut crosses it
    for member, size in (("big", 1000 * MB + 3),):
        pieces = [(i, p) for i, share in enumerate(got) for p in share if p.member == member]
        assert len(pieces) == 7
        assert len({i for i, _p in pieces}) == len(pieces)
        spans = sorted((p.start, p.length) for _i, p in pieces)
        assert spans[0][0] == 0 and all(a + n == b for (a, n), (b, _m) in zip(spans, spans[1:]))
        assert spans[-1][0] + spans[-1][1] == size
    loads = [sizes(share, {m: s for _src, m, s in files}) for share in got]
    assert max(loads) - min(loads) <= 5 * MB   # the small file a is the only unevenness


# ---------------------------------------------------------------- backups over several channels

class Servers(list):
    """The in-process servers a run opened, in order; calling it opens the next (a connect, see
    open_server). `hooks_for(i)` gives the hooks of the i-th one (0 is the run's own connection)."""

    def __init__(self, hooks_for=None) -> None:
        super().__init__()
        self.hooks_for = hooks_for

    def __call__(self) -> InProcessServer:
        self.append(InProcessServer(self.hooks_for(len(self)) if self.hooks_for else None))
        return self[-1]


def parallel_target(server_tree, dest, n: int, hooks_for=None) -> tuple[Target, Servers]:
    """A target over n channels, and the connect that gives each a new in-process server."""
    return make_target(server_tree, dest).with_link(parallel=n), Servers(hooks_for)


def manifests(dest) -> dict:
    out = {}
    for name in NAMES:
        m = json.loads((dest / ".ckptsync" / "manifests" / f"{name}.json").read_text())
        out[name] = {k: v for k, v in m.items() if k not in ("backed_up_at", "verified_at")}
    return out


def add_big(server_tree, size: int = BIG):
    big = server_tree / "checkpoint-12" / "big.bin"
    big.write_bytes(os.urandom(size))
    old = (server_tree / "checkpoint-12" / "optimizer.pt").stat().st_mtime
    os.utime(big, (old, old))
    return big


@pytest.fixture
def small_split(monkeypatch):
    """Split files from 8 MiB on into ranges of at least 2 MiB, so tests move little."""
    monkeypatch.setattr(shares, "SPLIT_MIN", 8 * MB)
    monkeypatch.setattr(shares, "RANGE_MIN", 2 * MB)


def test_three_channels_give_what_one_gives(server_tree, tmp_path):
    one = run_backup(make_target(server_tree, tmp_path / "one"), BackupOptions(all=True),
                     connect=always(InProcessServer()))
    sent = []

    def hooks(_i):
        h = Hooks()
        h.on_before("send", lambda args: sent.append(len(args["pairs"])))
        return h
    t, made = parallel_target(server_tree, tmp_path / "three", 3, hooks)
    three = run_backup(t, BackupOptions(all=True), connect=made)
    assert one.exit_code == three.exit_code == 0
    # each checkpoint is committed as soon as all of it arrived: over three channels the order may differ
    assert sorted(one.fetched) == sorted(three.fetched) and three.channels == 3 and one.channels == 1
    # The three small checkpoints travel as one batch, its files shared among the three channels;
    # files with the bytes of another in the batch are sent once and placed from it.
    files = sum(1 for name in NAMES for p in (server_tree / name).rglob("*") if p.is_file())
    placed = three.linked_files + three.reflinked_files + three.copied_files
    assert len(made) == 3 and len(sent) == 3 and placed > 0 and sum(sent) + placed == files
    for name in NAMES:
        assert tree_digest(tmp_path / "three" / name) == tree_digest(server_tree / name)
    assert manifests(tmp_path / "three") == manifests(tmp_path / "one")
    assert one.raw_bytes == three.raw_bytes
    assert not (tmp_path / "three" / ".ckptsync" / "staging").exists() or not list(
        (tmp_path / "three" / ".ckptsync" / "staging").rglob("*"))


def test_a_large_file_comes_in_ranges_over_several_channels(server_tree, tmp_path, small_split):
    big = add_big(server_tree, 24 * MB)
    ranges = []

    def hooks(_i):
        h = Hooks()
        h.on_before("send", lambda args: ranges.append(args["ranges"]))
        return h
    t, servers = parallel_target(server_tree, tmp_path / "b", 3, hooks)
    r = run_backup(t, BackupOptions(names=["checkpoint-12"], compress="off"), connect=servers)
    assert r.exit_code == 0 and r.channels == 3
    spans = sorted(s for got in ranges for m, s in got.items() if m == "checkpoint-12/big.bin")
    assert len(spans) == 3 and spans[0][0] == 0 and sum(n for _s, n in spans) == 24 * MB
    assert (tmp_path / "b" / "checkpoint-12" / "big.bin").read_bytes() == big.read_bytes()
    assert tree_digest(tmp_path / "b" / "checkpoint-12") == tree_digest(server_tree / "checkpoint-12")
    record = next(f for f in json.loads((tmp_path / "b" / ".ckptsync/manifests/checkpoint-12.json").read_text())["files"]
                  if f["path"] == "checkpoint-12/big.bin")
    assert record["xxh3_128"] == xxhash.xxh3_128(big.read_bytes()).hexdigest()
    assert record["size"] == 24 * MB and r.raw_bytes >= 24 * MB


def test_a_cut_channel_fails_the_run_as_one_channel_would_and_the_rerun_completes(server_tree, tmp_path, small_split):
    big = add_big(server_tree, 24 * MB)
    dest = tmp_path / "b"

    def hooks(i):
        h = Hooks()
        if i == 1:  # the first extra channel: cut inside its range of big.bin
            h.on_before("send", lambda _args: made[1].cut_after(4 * MB), times=1)
        return h
    t, made = parallel_target(server_tree, dest, 3, hooks)
    with pytest.raises(CkptsyncError) as info:
        run_backup(t, BackupOptions(names=["checkpoint-12"], compress="off"), connect=made)
    assert info.value.exit_code == CONNECT and made[1].link.process.cut
    assert "rerun to resume" in info.value.message
    assert not (dest / "checkpoint-12").exists()
    assert not (dest / ".ckptsync" / "manifests" / "checkpoint-12.json").exists()
    assert not (dest / PART).exists()   # its contiguous first bytes were too few to keep

    again, servers = parallel_target(server_tree, dest, 3)
    r = run_backup(again, BackupOptions(names=["checkpoint-12"], compress="off"), connect=servers)
    assert r.exit_code == 0 and r.fetched == ["checkpoint-12"]
    assert (dest / "checkpoint-12" / "big.bin").read_bytes() == big.read_bytes()
    assert tree_digest(dest / "checkpoint-12") == tree_digest(server_tree / "checkpoint-12")
    assert not list(dest.rglob("*.part"))


def test_a_split_file_keeps_its_first_bytes_and_the_rerun_sends_only_the_rest(server_tree, tmp_path, monkeypatch):
    """The run's own channel carries big.bin's first range and is cut 20 MiB in: that prefix is
    kept (the other range's bytes are not: they do not follow on from it), and offered again."""
    monkeypatch.setattr(shares, "SPLIT_MIN", 32 * MB)   # 48 MiB: split in two at its middle
    big = add_big(server_tree)
    dest = tmp_path / "b"

    def hooks(i):
        h = Hooks()
        if i == 0:
            h.on_before("send", lambda _args: made[0].cut_after(20 * MB), times=1)
        return h
    t, made = parallel_target(server_tree, dest, 2, hooks)
    with pytest.raises(CkptsyncError) as info:
        run_backup(t, BackupOptions(names=["checkpoint-12"], compress="off"), connect=made)
    assert info.value.exit_code == CONNECT
    kept = (dest / PART).stat().st_size
    assert KEEP_PREFIX_MIN <= kept <= 20 * MB
    assert (dest / PART).read_bytes() == big.read_bytes()[:kept]

    offered = []

    def watch(_i):
        h = Hooks()
        h.on_before("send", lambda args: offered.append(args["resume"]))
        return h
    again, servers = parallel_target(server_tree, dest, 2, watch)
    r = run_backup(again, BackupOptions(names=["checkpoint-12"], compress="off"), connect=servers)
    assert r.exit_code == 0 and r.resumed_bytes == kept
    assert {m: s for o in offered for m, (s, _h) in o.items()} == {"checkpoint-12/big.bin": kept}
    assert tree_digest(dest / "checkpoint-12") == tree_digest(server_tree / "checkpoint-12")


class FlipProcess(ThreadProcess):
    """A link that inverts one byte from the agent, `at` bytes into the next send."""

    def __init__(self) -> None:
        super().__init__()
        self.at: int | None = None

    def read(self, n: int) -> bytes:
        block = super().read(n)
        if self.at is not None and self.read_bytes - len(block) <= self.at < self.read_bytes:
            i = self.at - (self.read_bytes - len(block))
            block = block[:i] + bytes([block[i] ^ 0xFF]) + block[i + 1:]
            self.at = None
        return block


class FlipServer(InProcessServer):
    def __init__(self) -> None:
        super().__init__(link=InProcessTransport(FlipProcess))
        self.hooks.on_before("send", lambda _args: setattr(self.link.process, "at",
                                                           self.link.process.read_bytes + 3 * MB), times=1)


def test_a_corrupted_range_is_caught_by_its_hash(server_tree, tmp_path, small_split):
    add_big(server_tree, 24 * MB)
    dest = tmp_path / "b"
    made = []

    def factory():
        made.append(FlipServer() if len(made) == 2 else InProcessServer())
        return made[-1]
    t = make_target(server_tree, dest).with_link(parallel=3)
    with pytest.raises(CkptsyncError) as info:
        run_backup(t, BackupOptions(names=["checkpoint-12"], compress="off"), connect=factory)
    assert info.value.exit_code == INTEGRITY
    assert "of checkpoint-12/big.bin: what arrived does not match the server's checksum" in info.value.message
    assert not (dest / "checkpoint-12").exists() and not list(dest.rglob("*.part"))
    again, servers = parallel_target(server_tree, dest, 3)
    assert run_backup(again, BackupOptions(names=["checkpoint-12"], compress="off"), connect=servers).exit_code == 0
    assert tree_digest(dest / "checkpoint-12") == tree_digest(server_tree / "checkpoint-12")


def test_ctrl_c_on_one_channel_stops_them_all(server_tree, tmp_path, small_split):
    add_big(server_tree, 24 * MB)
    dest = tmp_path / "b"
    t, made = parallel_target(server_tree, dest, 3)
    with pytest.raises(Interrupted):
        run_backup(t, BackupOptions(names=["checkpoint-12"], compress="off"), StopAt("checkpoint-12", 12 * MB),
                   connect=made)
    assert not (dest / "checkpoint-12").exists()
    again, servers = parallel_target(server_tree, dest, 3)
    assert run_backup(again, BackupOptions(names=["checkpoint-12"], compress="off"), connect=servers).exit_code == 0
    assert tree_digest(dest / "checkpoint-12") == tree_digest(server_tree / "checkpoint-12")


def test_ctrl_c_while_the_channels_start_stops_those_already_started(monkeypatch):
    from ckptsync.server.parallel import run_all

    broken = threading.Event()

    class Link:
        def abort(self) -> None:
            broken.set()

    started: list[threading.Thread] = []
    real_start = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        if started:
            raise KeyboardInterrupt   # lands while the second channel's thread is being started
        started.append(thread)
        real_start(thread)
    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(KeyboardInterrupt):
        run_all([Link(), Link()], lambda i: broken.wait(HANG))   # a transfer ends when its link breaks
    assert broken.is_set() and not started[0].is_alive()


def test_a_channel_that_cannot_open_leaves_the_run_with_the_others(server_tree, tmp_path, small_split):
    add_big(server_tree, 24 * MB)
    made = []

    class Refused(InProcessServer):
        def open(self) -> None:
            from ckptsync.errors import ConnectError
            raise ConnectError("session open refused by peer")

    def factory():
        made.append(Refused() if len(made) == 2 else InProcessServer())
        return made[-1]
    t = make_target(server_tree, tmp_path / "b").with_link(parallel=3)
    r = run_backup(t, BackupOptions(names=["checkpoint-12"], compress="off"), connect=factory)
    assert r.exit_code == 0 and r.channels == 2
    assert any("2 of 3 channels opened" in w and "session open refused" in w for w in r.warnings)
    assert tree_digest(tmp_path / "b" / "checkpoint-12") == tree_digest(server_tree / "checkpoint-12")


def test_one_server_for_every_connection_means_one_channel(server_tree, tmp_path):
    r = run_backup(make_target(server_tree, tmp_path / "b").with_link(parallel=4), BackupOptions(all=True),
                   connect=always(InProcessServer()))
    assert r.exit_code == 0 and r.channels == 1


def test_bwlimit_is_one_rate_for_all_channels(tmp_path):
    t = Target(label="local", transport=LocalTransport(), remote_dir=str(tmp_path), local_dir=tmp_path / "b",
               link=Link(bwlimit=1 << 20, parallel=3))
    job = Backup(t, BackupOptions())
    first, second = open_server(job.target), open_server(job.target)
    assert first.remote.limiter is not None and first.remote.limiter is second.remote.limiter


# ---------------------------------------------------------------- configuration

def test_parallel_in_the_config(tmp_path):
    from ckptsync.config import load_config, resolve_target

    cfg = tmp_path / "c.yaml"
    cfg.write_text("parallel: 4\ninstances:\n  '1': {host: h1, parallel: 2}\n  '2': {host: h2}\n")
    config = load_config(str(cfg))
    assert resolve_target(config, instance="1", remote_dir="r").link.parallel == 2
    assert resolve_target(config, instance="2", remote_dir="r").link.parallel == 4
    for bad in ("0", "17", "two"):
        cfg.write_text(f"parallel: {bad}\n")
        with pytest.raises(ConfigError, match="parallel"):
            load_config(str(cfg))


@pytest.mark.parametrize("lie, message", [
    (lambda start, length: (start, length + 1), "not the"),        # a range longer than asked for
    (lambda start, length: (None, None), "which was not asked for"),  # the whole file instead
    (lambda start, length: (start + 1, length), "which was not asked for"),
])
def test_a_server_that_sends_other_bytes_than_the_range_asked_for_is_refused(server_tree, tmp_path, small_split,
                                                                            monkeypatch, lie, message):
    from ckptsync.agent import send as agent_send

    real = agent_send.send_one

    def send_one(sender, chan, source, member, alg, offset=0, prefix_hash=None, start=None, length=None,
                 stamp=None):
        if start:
            start, length = lie(start, length)
        return real(sender, chan, source, member, alg, offset, prefix_hash, start, length, stamp)
    monkeypatch.setattr(agent_send, "send_one", send_one)
    add_big(server_tree, 24 * MB)
    dest = tmp_path / "b"
    t, servers = parallel_target(server_tree, dest, 3)
    with pytest.raises(CkptsyncError, match=message) as info:
        run_backup(t, BackupOptions(names=["checkpoint-12"], compress="off"), connect=servers)
    assert info.value.exit_code == CONNECT   # a protocol error
    assert not (dest / "checkpoint-12").exists() and not list(dest.rglob("*.part"))


class Counting(StopAt):
    """Counts what every transfer reports, from however many threads."""

    def __init__(self) -> None:
        super().__init__("", float("inf"))
        self.starts: list[tuple[str, int]] = []
        self.total = 0

    def start(self, label: str, total: int) -> None:
        super().start(label, total)
        self.starts.append((label, total))

    def advance(self, nbytes: int) -> None:
        super().advance(nbytes)
        self.total += nbytes


def test_one_progress_bar_counts_every_channel(server_tree, tmp_path, small_split):
    add_big(server_tree, 24 * MB)
    rep = Counting()
    t, servers = parallel_target(server_tree, tmp_path / "b", 3)
    r = run_backup(t, BackupOptions(names=["checkpoint-12"], compress="off"), rep, connect=servers)
    assert r.exit_code == 0 and r.channels == 3
    assert rep.starts == [("checkpoint-12", r.raw_bytes)] and rep.total == r.raw_bytes


# ---------------------------------------------------------------- restore over several channels

def test_restore_over_three_channels_puts_back_what_one_would(server_tree, tmp_path):
    from ckptsync.restore import RestoreOptions, run_restore

    add_big(server_tree, 24 * MB)
    dest = tmp_path / "b"
    assert run_backup(make_target(server_tree, dest), BackupOptions(all=True),
                      connect=always(InProcessServer())).exit_code == 0
    received = []

    def hooks(_i):
        h = Hooks()
        h.on_before("receive", lambda args: received.append(args["name"]))
        return h
    fresh = tmp_path / "fresh" / "run"
    t, made = parallel_target(fresh, dest, 3, hooks)
    r = run_restore(t, RestoreOptions(checkpoint="checkpoint-12", extra_files=False), connect=made)
    assert r.exit_code == 0 and r.channels == 3 and received == ["checkpoint-12"] * 3
    assert tree_digest(fresh / "checkpoint-12") == tree_digest(server_tree / "checkpoint-12")
    assert sorted(os.listdir(fresh)) == ["checkpoint-12"]


class OpenSeen(InProcessServer):
    def __init__(self, seen: threading.Event) -> None:
        super().__init__()
        self.seen = seen

    def open(self) -> None:
        self.seen.set()
        super().open()


def test_a_restores_other_channels_open_while_it_checks_the_server(server_tree, tmp_path):
    """The run's last checks before sending (space, the best model, the directory) wait here until a
    second channel has begun to open: opened only when the send begins, none would have."""
    from ckptsync.restore import RestoreOptions, run_restore

    add_big(server_tree, 24 * MB)
    dest = tmp_path / "b"
    assert run_backup(make_target(server_tree, dest), BackupOptions(all=True),
                      connect=always(InProcessServer())).exit_code == 0
    opening = threading.Event()
    waited = []
    first = InProcessServer()
    first.hooks.on_before("mkdir", lambda _args: waited.append(opening.wait(HANG)), times=1)
    made: list[InProcessServer] = []

    def factory():
        made.append(first if not made else OpenSeen(opening))
        return made[-1]
    fresh = tmp_path / "fresh" / "run"
    t = make_target(fresh, dest).with_link(parallel=3)
    r = run_restore(t, RestoreOptions(checkpoint="checkpoint-12", extra_files=False), connect=factory)
    assert waited == [True] and r.exit_code == 0 and r.channels == 3
    assert tree_digest(fresh / "checkpoint-12") == tree_digest(server_tree / "checkpoint-12")


class CloseSignals(InProcessServer):
    """A run's first channel, whose close says that it has begun."""

    def __init__(self, closing: threading.Event) -> None:
        super().__init__()
        self.closing = closing

    def close(self, polite: bool = True) -> None:
        self.closing.set()
        super().close(polite)


class CloseWaits(InProcessServer):
    """Another channel, whose close ends only once the first channel's has begun."""

    def __init__(self, closing: threading.Event, waited: list[bool]) -> None:
        super().__init__()
        self.closing = closing
        self.waited = waited

    def close(self, polite: bool = True) -> None:
        if self.remote.proc is not None:
            self.waited.append(self.closing.wait(HANG))
        super().close(polite)


@pytest.mark.parametrize("command", ["backup", "restore"])
def test_a_run_closes_its_first_channel_beside_the_others(server_tree, tmp_path, command):
    """Each close waits a round trip for its end of the server: the first channel's goes beside the
    others', not after them."""
    from ckptsync.restore import RestoreOptions, run_restore

    add_big(server_tree, 24 * MB)
    dest = tmp_path / "b"
    closing = threading.Event()
    waited: list[bool] = []
    made: list[InProcessServer] = []

    def factory():
        made.append(CloseSignals(closing) if not made else CloseWaits(closing, waited))
        return made[-1]
    if command == "backup":
        r = run_backup(make_target(server_tree, dest).with_link(parallel=3), BackupOptions(all=True), connect=factory)
    else:
        assert run_backup(make_target(server_tree, dest), BackupOptions(all=True),
                          connect=always(InProcessServer())).exit_code == 0
        r = run_restore(make_target(tmp_path / "fresh", dest).with_link(parallel=3),
                        RestoreOptions(checkpoint="checkpoint-12", extra_files=False), connect=factory)
    assert r.exit_code == 0 and r.channels == 3
    assert waited == [True, True]
    assert all(server.remote.proc is None for server in made)   # every one closed


class MarkerWithheld(ThreadProcess):
    """A server whose agent starts (shows its marker) only once its link is cut."""

    def __init__(self) -> None:
        self.killed = threading.Event()
        super().__init__()

    def _agent(self) -> None:
        self.killed.wait(HANG)
        super()._agent()

    def kill(self) -> None:
        super().kill()
        self.killed.set()


def test_a_restore_that_fails_while_its_channels_open_breaks_them(server_tree, tmp_path):
    """The first channel finds the server's disk full while the others still wait for their agents:
    the run ends with the disk's error, and their links are cut rather than waited for."""
    from ckptsync.errors import DiskFull
    from ckptsync.restore import RestoreOptions, run_restore

    add_big(server_tree, 24 * MB)
    dest = tmp_path / "b"
    assert run_backup(make_target(server_tree, dest), BackupOptions(all=True),
                      connect=always(InProcessServer())).exit_code == 0
    first = InProcessServer()
    first.hooks.fail("df", "no_space", "No space left on device: /data", "/data")
    made: list[InProcessServer] = []

    def factory():
        made.append(first if not made else InProcessServer(link=InProcessTransport(MarkerWithheld)))
        return made[-1]
    fresh = tmp_path / "fresh" / "run"
    with pytest.raises(DiskFull):
        run_restore(make_target(fresh, dest).with_link(parallel=3),
                    RestoreOptions(checkpoint="checkpoint-12", extra_files=False), connect=factory)
    others = made[1:]
    assert len(others) == 2 and all(s.link.process.cut for s in others)
    assert not (fresh / "checkpoint-12").exists()


def test_an_interrupted_parallel_restore_puts_nothing_in_place_and_the_rerun_completes(server_tree, tmp_path):
    from ckptsync.restore import RestoreOptions, run_restore

    add_big(server_tree, 24 * MB)
    (server_tree / "checkpoint-12" / "big2.bin").write_bytes(os.urandom(24 * MB))
    old = (server_tree / "checkpoint-12" / "optimizer.pt").stat().st_mtime
    os.utime(server_tree / "checkpoint-12" / "big2.bin", (old, old))
    dest = tmp_path / "b"
    assert run_backup(make_target(server_tree, dest), BackupOptions(names=["checkpoint-12"]),
                      connect=always(InProcessServer())).exit_code == 0
    fresh = tmp_path / "fresh" / "run"
    opts = RestoreOptions(checkpoint="checkpoint-12", extra_files=False, compress="off")
    t, servers = parallel_target(fresh, dest, 2)
    with pytest.raises(Interrupted):
        run_restore(t, opts, StopAt("send", 30 * MB), connect=servers)
    assert not (fresh / "checkpoint-12").exists()
    again, servers = parallel_target(fresh, dest, 2)
    r = run_restore(again, opts, connect=servers)
    assert r.exit_code == 0 and r.channels == 2
    assert tree_digest(fresh / "checkpoint-12") == tree_digest(server_tree / "checkpoint-12")
    assert sorted(os.listdir(fresh)) == ["checkpoint-12"]


def backed_up_with_big(server_tree, tmp_path):
    """checkpoint-12 with a 24 MiB big.bin, backed up; returns the backup directory."""
    add_big(server_tree, 24 * MB)
    dest = tmp_path / "b"
    assert run_backup(make_target(server_tree, dest), BackupOptions(names=["checkpoint-12"]),
                      connect=always(InProcessServer())).exit_code == 0
    return dest


def test_a_large_file_is_restored_as_byte_ranges_over_the_channels(server_tree, tmp_path, small_split):
    from ckptsync.restore import RestoreOptions, run_restore

    dest = backed_up_with_big(server_tree, tmp_path)
    assembled = []

    def hooks(_i):
        h = Hooks()
        h.on_before("assemble", lambda args: assembled.append([f["member"] for f in args["files"]]))
        return h
    fresh = tmp_path / "fresh" / "run"
    t, servers = parallel_target(fresh, dest, 3, hooks)
    r = run_restore(t, RestoreOptions(checkpoint="checkpoint-12", extra_files=False, compress="off"), connect=servers)
    assert r.exit_code == 0 and r.channels == 3
    assert assembled == [["checkpoint-12/big.bin"]]   # split, then finished on the server
    assert tree_digest(fresh / "checkpoint-12") == tree_digest(server_tree / "checkpoint-12")
    assert sorted(os.listdir(fresh)) == ["checkpoint-12"]
    assert r.sent_bytes == sum(p.stat().st_size for p in (server_tree / "checkpoint-12").iterdir())


def test_a_split_file_damaged_in_the_backup_is_not_put_in_place(server_tree, tmp_path, small_split):
    from ckptsync.errors import IntegrityError
    from ckptsync.restore import RestoreOptions, run_restore

    dest = backed_up_with_big(server_tree, tmp_path)
    stored = dest / "checkpoint-12" / "big.bin"
    rotted = []

    def rot(_args) -> None:
        """After the backup was verified, before any range is read: one byte flips, same size and mtime."""
        stamp = stored.stat().st_mtime_ns
        with open(stored, "r+b") as f:
            f.seek(12 * MB)
            byte = f.read(1)
            f.seek(12 * MB)
            f.write(bytes([byte[0] ^ 0xFF]))
        os.utime(stored, ns=(stamp, stamp))
        rotted.append(True)

    def hooks(i):
        h = Hooks()
        if i == 1:
            h.on_before("receive", rot, times=1)
        return h
    fresh = tmp_path / "fresh" / "run"
    t, servers = parallel_target(fresh, dest, 3, hooks)
    with pytest.raises(IntegrityError) as caught:
        run_restore(t, RestoreOptions(checkpoint="checkpoint-12", extra_files=False, compress="off"), connect=servers)
    assert rotted == [True]
    assert caught.value.message.startswith("the backup of checkpoint-12 is damaged, nothing was put in place: "
                                           "checkpoint-12/big.bin (its bytes no longer match the manifest)")
    assert not (fresh / "checkpoint-12").exists()


class CtrlCOnceOnDisk(Reporter):
    """Ctrl+C on a channel's thread once it has handed on 4 MiB and the server has written a block
    of a range (`on_disk`). A channel's share is a range of at least 8 MiB after under 1 MiB of
    small files, so what it handed on before the current block holds whole blocks of its range,
    already on their way to the server: the wait ends."""

    def __init__(self, on_disk: threading.Event) -> None:
        self.on_disk, self.sending, self.done, self.fired = on_disk, False, collections.Counter(), False

    def start(self, label: str, total: int) -> None:
        self.sending = label.startswith("send")   # not the check of the backup before it

    def advance(self, nbytes: int) -> None:   # under the Shared reporter's lock while sending
        me = threading.get_ident()
        self.done[me] += nbytes
        if self.sending and not self.fired and self.done[me] >= 4 * MB:
            self.fired = True
            assert self.on_disk.wait(HANG), "no range reached the server's disk"
            raise KeyboardInterrupt


def test_an_interrupted_ranged_restore_is_completed_by_the_rerun(server_tree, tmp_path, small_split, monkeypatch):
    from ckptsync.agent import fileops
    from ckptsync.restore import RestoreOptions, run_restore

    real = fileops.write_range
    on_disk, ends = threading.Event(), []

    def write_range(tmp, start, pieces, h):
        def noted():
            for block in pieces:
                yield block
                ends.append(start + len(block))   # the next block is asked for once this one is written
                on_disk.set()
        real(tmp, start, noted(), h)
    monkeypatch.setattr(fileops, "write_range", write_range)

    dest = backed_up_with_big(server_tree, tmp_path)
    fresh = tmp_path / "fresh" / "run"
    opts = RestoreOptions(checkpoint="checkpoint-12", extra_files=False, compress="off")
    t, servers = parallel_target(fresh, dest, 3)
    with pytest.raises(Interrupted):
        run_restore(t, opts, CtrlCOnceOnDisk(on_disk), connect=servers)
    staged = list((fresh / ".ckptsync-staging-checkpoint-12").rglob("big.bin.part"))
    assert staged and staged[0].stat().st_size >= ends[0]   # ranges had started arriving
    assert not (fresh / "checkpoint-12").exists()
    monkeypatch.setattr(fileops, "write_range", real)
    again, servers = parallel_target(fresh, dest, 3)
    r = run_restore(again, opts, connect=servers)
    assert r.exit_code == 0
    assert tree_digest(fresh / "checkpoint-12") == tree_digest(server_tree / "checkpoint-12")
    assert sorted(os.listdir(fresh)) == ["checkpoint-12"]


# -------------------------------------------------- the default: from the round trip and the rate

GBIT = 125_000_000   # bytes/s
WINDOW = 2 << 20     # OpenSSH's channel window


@pytest.mark.parametrize("rtt, rate, window, channels", [
    (0.0, None, WINDOW, 1),               # this machine
    (0.0005, GBIT, WINDOW, 1),            # a LAN: one window covers 60 times the link
    (0.005, None, WINDOW, 1),             # a LAN, rate unknown
    (0.020, GBIT // 5, WINDOW, 1),        # 200 Mbit/s at 20 ms: 0.5 MB in flight, a quarter window
    (0.020, None, WINDOW, 2),             # 20 ms, rate unknown (1 Gbit/s assumed): 2.5 MB in flight
    (0.100, GBIT // 5, WINDOW, 2),        # 200 Mbit/s at 100 ms: 2.5 MB
    (0.100, GBIT * 2 // 5, WINDOW, 4),    # 400 Mbit/s at 100 ms: 5 MB in flight, 3.6 windows with the headroom
    (0.100, GBIT, WINDOW, 8),             # 1 Gbit/s at 100 ms: nine wanted, the automatic choice stops at two connections
    (0.100, None, WINDOW, 8),             # the same when the rate is not known
    (0.100, 20_000_000, WINDOW, 2),       # --bwlimit 20M at 100 ms: more channels would only wait
    (0.100, 10 * GBIT, WINDOW, 8),        # 10 Gbit/s at 100 ms: capped
    (0.003, GBIT, 256 << 10, 3),          # a small window needs more channels for the same link
    (0.003, GBIT, WINDOW, 1),             # (the same link, OpenSSH's window)
])
def test_channels_chosen_from_the_round_trip_and_rate(rtt, rate, window, channels):
    from ckptsync.policy import auto_channels

    assert auto_channels(rtt, rate, window) == channels


@pytest.mark.parametrize("channels, spread", [(1, 1), (4, 1), (5, 2), (8, 2), (9, 3), (16, 4)])
def test_channels_beyond_four_open_another_connection(channels, spread):
    from ckptsync.policy import connections

    assert connections(channels) == spread


def test_the_window_of_each_ssh_client():
    """What auto_channels divides by: 2 MiB both ways with OpenSSH, and with paramiko, whose
    sessions keep its default window and talk to sshd."""
    import paramiko

    from ckptsync.transport import SshTarget
    from ckptsync.transport.openssh import OpenSshTransport
    from ckptsync.transport.ssh import SshTransport

    assert OpenSshTransport(SshTarget(host="h")).window == WINDOW
    assert SshTransport.window == paramiko.common.DEFAULT_WINDOW_SIZE == WINDOW


def test_the_round_trip_is_the_shortest_of_three_quick_answers_and_the_pings_go_together():
    ticks = iter([10.0, 10.5, 10.51, 10.52])   # sent at 10.0; answered 0.5 s, 0.51 s and 0.52 s later
    with InProcessServer() as server:
        waits = server.round_trips
        assert server.round_trip(clock=lambda: next(ticks)) == pytest.approx(0.5)
        assert server.round_trips == waits + 1   # three pings, one round trip
    with InProcessServer() as server:
        server.remote.quick_answers[:] = [0.04, 0.2]   # two quick requests the run made: one ping more
        ticks = iter([20.0, 20.3])
        assert server.round_trip(clock=lambda: next(ticks)) == pytest.approx(0.04)


class FarServer(InProcessServer):
    """The in-process agent, reporting the round trip of a server on another continent."""

    def __init__(self, rtt: float, limit: int | None = None) -> None:
        super().__init__()
        self.rtt = rtt
        self.limit = limit
        self.asked = 0

    def round_trip(self, clock=None) -> float:
        self.asked += 1
        return self.rtt

    @property
    def rate_limit(self) -> int | None:
        return self.limit


@pytest.mark.parametrize("rtt, limit, wanted", [(0.1, None, 8), (0.1, 20_000_000, 2), (0.001, None, 1)])
def test_without_parallel_the_channels_wanted_follow_the_round_trip_and_the_bwlimit(rtt, limit, wanted):
    from ckptsync.server.parallel import Channels

    with FarServer(rtt, limit) as first:
        channels = Channels(first, lambda: FarServer(rtt, limit), None)
        assert channels.wanted == wanted and channels.wanted == wanted
        assert first.asked == 1   # measured once, on the run's own connection


@pytest.mark.parametrize("rtt, limit, channels", [(0.1, None, 6), (0.1, 20_000_000, 2), (0.001, None, 1)])
def test_without_parallel_a_far_server_gets_several_channels_and_a_near_one_one(server_tree, tmp_path, small_split,
                                                                                rtt, limit, channels):
    """Six for the far one: eight wanted, but its 48 MiB are worth six (SHARE_MIN each); two under a
    20 MB/s limit."""
    add_big(server_tree)
    made: list[FarServer] = []

    def factory() -> FarServer:
        made.append(FarServer(rtt, limit))
        return made[-1]

    dest = tmp_path / "b"
    t = make_target(server_tree, dest).with_link(parallel=None)
    result = run_backup(t, BackupOptions(all=True), connect=factory)
    assert result.exit_code == 0 and result.channels == channels
    assert made[0].asked == 1 and len(made) == result.channels   # measured once, on the run's own connection
    assert manifests(dest) == manifests_of_one_channel(server_tree, tmp_path)


def manifests_of_one_channel(server_tree, tmp_path) -> dict:
    dest = tmp_path / "one"
    t, servers = parallel_target(server_tree, dest, 1)
    assert run_backup(t, BackupOptions(all=True), connect=servers).exit_code == 0
    return manifests(dest)


def test_a_few_small_files_are_not_worth_another_channel(server_tree, tmp_path):
    """Nine wanted at 100 ms, but the fixture's 23 kB are one share: no channel is opened for them."""
    made: list[FarServer] = []

    def factory() -> FarServer:
        made.append(FarServer(0.1))
        return made[-1]

    t = make_target(server_tree, tmp_path / "b").with_link(parallel=None)
    result = run_backup(t, BackupOptions(all=True), connect=factory)
    assert result.exit_code == 0 and result.channels == 1 and len(made) == 1


def test_an_explicit_parallel_is_never_second_guessed(server_tree, tmp_path):
    made: list[FarServer] = []

    def factory() -> FarServer:
        made.append(FarServer(0.2))
        return made[-1]

    t = make_target(server_tree, tmp_path / "b").with_link(parallel=1)
    assert run_backup(t, BackupOptions(all=True), connect=factory).channels == 1
    assert made[0].asked == 0


def test_the_bwlimit_and_the_window_reach_the_choice():
    from ckptsync.server.agent_server import AgentServer
    from ckptsync.transport import SshTarget
    from ckptsync.transport.openssh import OpenSshTransport

    limited = AgentServer(OpenSshTransport(SshTarget(host="h")), bwlimit=20_000_000)
    assert (limited.rate_limit, limited.window) == (20_000_000, WINDOW)
    assert AgentServer(LocalTransport()).rate_limit is None


def test_each_openssh_connection_has_a_master_of_its_own(monkeypatch, tmp_path):
    from ckptsync import osdeps
    from ckptsync.transport import SshTarget
    from ckptsync.transport.openssh import OpenSshTransport

    monkeypatch.setattr(osdeps, "SHARED_SSH", True)
    first = OpenSshTransport(SshTarget(host="h"))

    def control(t) -> str:
        return next(a for a in t.argv() if a.startswith("ControlPath="))
    assert first.lane(0) is first
    paths = [control(first.lane(i)) for i in range(4)]
    assert len(set(paths)) == 4 and paths[0] == control(first)
    assert control(first.lane(2)) == paths[2]   # the same lane, the same master
    assert first.lane(2).argv()[:-6] == first.argv()[:-6]   # the same login otherwise


class Meeting(InProcessServer):
    """An in-process server whose open() waits until `barrier` has every party inside an open():
    channels opened one after another never get there (the wait breaks at HANG)."""

    def __init__(self, barrier: threading.Barrier, log: list) -> None:
        super().__init__()
        self.barrier = barrier
        self.log = log
        self.lane = 0

    def use_connection(self, lane: int) -> None:
        self.lane = lane

    def open(self) -> None:
        self.log.append(("in", self.lane))
        self.barrier.wait()
        super().open()


def test_the_channels_of_a_transfer_open_together():
    """On a long link each open costs several round trips: three extra channels took three times
    that. Here each open waits for the other two to be opening too."""
    from ckptsync.server.parallel import Channels

    barrier = threading.Barrier(3, timeout=HANG)
    log: list = []
    with InProcessServer() as first:
        channels = Channels(first, lambda: Meeting(barrier, log), 4)
        try:
            got = channels.take(4)
            assert len(got) == 4 and got[0] is first and len({id(s) for s in got}) == 4
            assert not barrier.broken and channels.warning == ""
        finally:
            channels.close()


def test_a_new_connections_first_channel_opens_before_the_others_on_it():
    """Eight channels are two ssh connections: the second one's first channel starts its master
    (alongside the channels of the first connection); the three after it open once it has, and
    share it."""
    from ckptsync.server.parallel import Channels

    barrier = threading.Barrier(4, timeout=HANG)   # lane 0's three new channels and lane 1's first
    later = threading.Barrier(3, timeout=HANG)     # lane 1's other three
    log: list = []

    class Lanes(Meeting):
        def use_connection(self, lane: int) -> None:
            super().use_connection(lane)
            if lane == 1 and ("lane", 1) in log:
                self.barrier = later
            log.append(("lane", lane))

    with InProcessServer() as first:
        channels = Channels(first, lambda: Lanes(barrier, log), 8)
        try:
            got = channels.take(8)
            assert len(got) == 8 and channels.warning == ""
            opened = [lane for kind, lane in log if kind == "in"]
            assert sorted(opened[:4]) == [0, 0, 0, 1] and opened[4:] == [1, 1, 1]
        finally:
            channels.close()


def test_quick_requests_the_run_made_count_as_round_trip_samples():
    """A restore has asked stat, staged and df before its transfer: their answers give the round
    trip, and no ping is sent (each is a round trip of its own on a long link)."""
    def no_clock() -> float:
        raise AssertionError("pinged")

    with InProcessServer() as server:
        server.remote.quick_answers.clear()
        for _ in range(3):
            server.stat("/", ["."])
        before = server.round_trips
        assert server.round_trip(clock=no_clock) < 5.0   # an answer on this machine; the bound is a margin
        assert server.round_trips == before


def test_a_restore_chooses_at_most_one_connections_channels():
    """1 Gbit/s at 100 ms: eight channels for a backup, four for a restore (AUTO_MAX_UPLOAD)."""
    from ckptsync.server.parallel import Channels

    with FarServer(0.1) as first:
        channels = Channels(first, lambda: FarServer(0.1), None)
        assert channels.wanted_for(1 << 30) == 8
        assert channels.wanted_for(1 << 30, upload=True) == 4
        assert channels.wanted_for(20 << 20, upload=True) == 2   # SHARE_MIN still holds
    with FarServer(0.1) as first:
        asked = Channels(first, lambda: FarServer(0.1), 6)
        assert asked.wanted_for(1 << 30, upload=True) == 6   # --parallel is taken as given


def test_channels_taken_for_one_connection_stay_on_one_even_when_more_are_wanted():
    """Eight wanted (two ssh connections), four taken by a restore: all four go over the first
    connection, so the restore pays no second login (about a second at 100 ms)."""
    from ckptsync.server.parallel import Channels

    lanes: list[int] = []

    class Far(FarServer):
        def use_connection(self, lane: int) -> None:
            lanes.append(lane)

    with FarServer(0.1) as first:
        channels = Channels(first, lambda: Far(0.1), None)
        try:
            assert channels.wanted == 8
            assert len(channels.take(channels.wanted_for(1 << 30, upload=True))) == 4
            assert lanes == [0, 0, 0]
            assert len(channels.take(8)) == 8 and lanes[3:] == [1, 1, 1, 1]   # then four on the second
        finally:
            channels.close()
