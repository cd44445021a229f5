"""--bwlimit: the rate parser, the limiter on a fake clock, and the limiter on a real link's bytes."""

from __future__ import annotations

import json
import os

import pytest

from ckptsync.ratelimit import BURST_SECONDS, RateLimiter, parse_rate
from ckptsync.server.agent_server import AgentServer
from ckptsync.server.inprocess import InProcessTransport
from helpers import run_cli, tree_digest

pytestmark = pytest.mark.laptop  # a fake clock and the in-process agent: the macOS and Windows jobs run them too


class FakeClock:
    """Time moves only when the limiter sleeps, or when a test says so."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.now += seconds
        self.slept += seconds


@pytest.mark.parametrize("text,rate", [
    ("20M", 20_000_000), ("500K", 500_000), ("500k", 500_000), ("20MB", 20_000_000), ("1.5M", 1_500_000),
    ("2MiB", 2 << 20), ("64KiB", 64 << 10), ("1G", 10**9), ("250000", 250_000), (3_000_000, 3_000_000),
    ("20M/s", 20_000_000),
])
def test_rates_parse_with_decimal_suffixes(text, rate):
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "fast", "20X", "-5M", "100", "1.5.0M", "M"])
def test_bad_rates_are_refused_with_the_expected_form(text):
    with pytest.raises(ValueError, match="expected|smallest"):
        parse_rate(text)


def test_a_steady_stream_is_held_to_the_rate():
    clock = FakeClock()
    lim = RateLimiter(1_000_000, clock=clock, sleep=clock.sleep)
    start = clock()
    for _ in range(2000):
        lim.take(4096)
    elapsed = clock() - start
    sent = 2000 * 4096
    assert sent / elapsed == pytest.approx(1_000_000, rel=0.05)
    assert elapsed == pytest.approx(sent / 1_000_000, abs=1e-6)  # a fresh link starts with no burst


def test_an_idle_link_earns_only_a_short_burst():
    clock = FakeClock()
    lim = RateLimiter(1_000_000, clock=clock, sleep=clock.sleep)
    lim.take(1_000_000)
    clock.now += 60.0  # a long scan: nothing sent
    before = clock.slept
    lim.take(int(BURST_SECONDS * 1_000_000))  # the burst goes out at once
    assert clock.slept == before
    lim.take(500_000)  # the rest waits for the rate
    assert clock.slept - before == pytest.approx(0.5)


def test_big_writes_wait_in_proportion():
    clock = FakeClock()
    lim = RateLimiter(2_000_000, clock=clock, sleep=clock.sleep, burst=0.0)
    lim.take(4_000_000)
    assert clock.slept == pytest.approx(2.0)
    lim.take(0)
    assert clock.slept == pytest.approx(2.0)


def test_the_limiter_counts_every_byte_of_a_real_transfer_both_ways(server_tree):
    """The agent on a thread, its bytes through the client's pipe: the fake clock adds up to bytes / rate."""
    clock = FakeClock()
    server = AgentServer(InProcessTransport(), bwlimit=5_000_000)
    server.remote.limiter = RateLimiter(5_000_000, clock=clock, sleep=clock.sleep, burst=0.0)
    big = server_tree / "checkpoint-12" / "blob.bin"
    big.write_bytes(os.urandom(3 << 20))
    with server:
        dl = server.send(str(server_tree), [("checkpoint-12/blob.bin", "blob.bin")], compress="off")
        while dl.read(1 << 20):
            pass
        down = dl.finish()
        got = clock.slept
        assert got * 5_000_000 == pytest.approx(3 << 20, rel=0.02)
        up = server.receive(str(server_tree), "up", compress="off")
        with open(big, "rb") as f:
            up.add("blob.bin", f, big.stat().st_size, 0, 0o644)
        up.finish()
        assert (clock.slept - got) * 5_000_000 == pytest.approx(3 << 20, rel=0.02)
    assert down >= 3 << 20


def test_open_server_carries_the_targets_limit(tmp_path):
    from ckptsync.config import Config, resolve_target
    from ckptsync.server import open_server

    cfg = Config(values={"remote_dir": str(tmp_path), "bwlimit": "20M"})
    t = resolve_target(cfg, remote_dir=str(tmp_path))
    assert t.link.bwlimit == 20_000_000
    assert open_server(t).remote.limiter.rate == 20_000_000


def test_backup_and_restore_take_bwlimit_on_the_command_line(server_tree, tmp_path):
    dest = tmp_path / "b"
    res = run_cli("backup", "--remote-dir", server_tree, "--local-dir", dest, "--bwlimit", "200M", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["fetched"]
    fresh = tmp_path / "fresh"
    res = run_cli("restore", "--remote-dir", fresh, "--local-dir", dest, "--bwlimit", "200M", "--no-extra-files")
    assert res.returncode == 0, res.stderr
    assert tree_digest(fresh / "checkpoint-12") == tree_digest(server_tree / "checkpoint-12")


def test_a_bad_bwlimit_is_a_usage_error_and_in_the_config_a_config_error(server_tree, tmp_path):
    res = run_cli("backup", "--remote-dir", server_tree, "--local-dir", tmp_path / "b", "--bwlimit", "fast")
    assert res.returncode == 2 and "--bwlimit" in res.stderr and "Traceback" not in res.stderr
    cfg = tmp_path / "c.yaml"
    cfg.write_text("bwlimit: lots\n")
    res = run_cli("backup", "--config", cfg, "--remote-dir", server_tree, "--local-dir", tmp_path / "b")
    assert res.returncode == 4 and "bwlimit in" in res.stderr and "Traceback" not in res.stderr


def test_several_targets_share_one_limiter_for_a_command_line_limit(tmp_path):
    from ckptsync.cli.options import with_bwlimits
    from ckptsync.config import Config, resolve_target
    from ckptsync.server import open_server

    cfg = Config(values={"remote_dir": "/r"}, instances={"0": {"host": "a"}, "1": {"host": "b", "bwlimit": "1M"}})
    ts = [resolve_target(cfg, instance=n) for n in ("0", "1")]
    shared = with_bwlimits(ts, "8M")
    assert [t.link.bwlimit for t in shared] == [8_000_000, 8_000_000]
    a, b = (open_server(t).remote.limiter for t in shared)
    assert a is b and a.rate == 8_000_000
    own = with_bwlimits(ts, None)  # from the config: each its own
    assert [t.link.bwlimit for t in own] == [None, 1_000_000]
    assert open_server(own[0]).remote.limiter is None
