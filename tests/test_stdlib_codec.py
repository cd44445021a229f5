"""Compression with the standard library only: L frames (byte lanes, zlib or lzma per lane) and
Python 3.14's compression.zstd, down to a server Python that has no optional module and no zstd on PATH."""

from __future__ import annotations

import importlib
import io
import json
import os
import random
import shutil
import struct
import sys
import time
import zlib
from pathlib import Path

import pytest

from ckptsync import agent as wire
from ckptsync.agent import codec, reader, sender
from ckptsync.server.agent_server import AgentServer
from ckptsync.transport import CommandTransport

from helpers import digest_diff, run_cli, set_tree_mtime, tree_digest
from test_agent_modules import FakeClock, FakeLink

CHUNK = wire.CHUNK


def floats(n: int, seed: int = 0, scale: float = 1e-3) -> bytes:
    """n fp32 values like an optimizer's: random mantissas, exponents in a narrow band."""
    rng = random.Random(seed)
    return struct.pack("<%df" % n, *(rng.gauss(0.0, scale) for _ in range(n)))


FP32_CHUNK = floats(CHUNK // 4)


def laned(chunk: bytes, level: int = 1) -> bytes:
    return codec.LaneCoder(level).encode(chunk)


def methods_of(frame: bytes) -> list[int]:
    return list(codec.LANE_HEAD.unpack_from(frame)[1:5])


# ---------------------------------------------------------------- the L frame itself


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 511, 512 + 3, CHUNK - 1, CHUNK])
def test_lane_frames_round_trip_at_any_length(size):
    data = (FP32_CHUNK * 2)[:size]
    for level in (1, 3, 12):
        assert codec.decode_lanes(laned(data, level)) == data


def test_only_the_lanes_that_pack_are_compressed():
    frame = laned(FP32_CHUNK)
    # little-endian fp32: byte 3 is sign and exponent, byte 0 pure mantissa
    assert methods_of(frame)[3] == codec.DEFLATE and methods_of(frame)[0] == codec.STORED
    assert len(frame) < 0.9 * CHUNK
    noise = os.urandom(CHUNK)
    assert methods_of(laned(noise)) == [codec.STORED] * 4
    assert len(laned(noise)) == CHUNK + codec.LANE_HEAD.size


def test_lzma_competes_from_level_10_and_is_bounded():
    if codec.lzma is None:
        pytest.skip("this Python has no lzma")
    # repeats further apart than deflate's 32 KiB window, within lzma's dictionary
    data = (random.Random(1).randbytes(192 << 10) * 6)[:CHUNK]
    frame = codec.LaneCoder(12).encode(data)
    assert methods_of(frame) == [codec.XZ] * 4 and len(frame) < CHUNK // 4
    assert codec.decode_lanes(frame) == data
    assert methods_of(laned(data, 9)) == [codec.STORED] * 4
    assert codec.decode_lanes(laned(FP32_CHUNK, 19)) == FP32_CHUNK


def test_methods_follow_the_last_trial_and_are_tried_again():
    coder = codec.LaneCoder(1)
    noise = os.urandom(CHUNK)
    assert methods_of(coder.encode(FP32_CHUNK))[3] == codec.DEFLATE
    # until the next trial the exponent lane stays deflated, even where it no longer pays
    assert methods_of(coder.encode(noise))[3] == codec.DEFLATE
    for _ in range(coder.CHECK - 2):
        coder.encode(noise)
    assert methods_of(coder.encode(noise)) == [codec.STORED] * 4
    # between trials, stored lanes are probed: a zero tensor after noise still packs to almost nothing
    zeros = coder.encode(bytes(CHUNK))
    assert methods_of(zeros) == [codec.DEFLATE] * 4 and len(zeros) < 10_000
    assert codec.decode_lanes(zeros) == bytes(CHUNK)
    # a short chunk (a small file, a tail) has a trial of its own, and leaves the full chunks' methods alone
    assert methods_of(coder.encode(b'{"step": 12}\n' * 300)) == [codec.DEFLATE] * 4
    assert methods_of(coder.encode(noise)) == [codec.STORED] * 4


def corrupt_frames():
    good = laned(FP32_CHUNK[:4096])
    head = list(codec.LANE_HEAD.unpack_from(good))
    body = good[codec.LANE_HEAD.size:]

    def with_head(values, rest=body):
        return codec.LANE_HEAD.pack(*values) + rest

    bomb_lane = zlib.compressobj(1, zlib.DEFLATED, -15)
    bomb = bomb_lane.compress(bytes(4096)) + bomb_lane.flush()
    sizes = [1024, 1024, 1024, len(bomb)]
    yield "short", good[:10]
    yield "truncated", good[:-1]
    yield "too long a chunk", with_head([CHUNK + 4] + head[1:])
    yield "unknown method", with_head([head[0], 9] + head[2:])
    yield "lane longer than its chunk", codec.LANE_HEAD.pack(4096, 0, 0, 0, 1, *sizes) + bytes(3072) + bomb
    yield "bomb in an empty lane", codec.LANE_HEAD.pack(1, 0, 1, 0, 0, 1, len(bomb), 0, 0) + b"x" + bomb
    yield "cut deflate", codec.LANE_HEAD.pack(4096, 0, 0, 0, 1, 1024, 1024, 1024, len(bomb) - 2) + bytes(3072) + bomb[:-2]
    yield "not deflate", codec.LANE_HEAD.pack(4096, 0, 0, 0, 1, 1024, 1024, 1024, 5) + bytes(3072) + b"\xff" * 5


@pytest.mark.parametrize("name,frame", list(corrupt_frames()), ids=[n for n, _ in corrupt_frames()])
def test_corrupt_lane_frames_are_protocol_errors(name, frame):
    with pytest.raises(wire.Failure) as err:
        codec.decode_lanes(frame)
    assert err.value.kind == "protocol" and "byte-lane frame" in err.value.message


# ---------------------------------------------------------------- Sender and FrameReader


class Pipe:
    """A channel whose frames a FrameReader reads back, in the order sent."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.kinds = []

    def send(self, kind, payload=b""):
        self.kinds.append(kind)
        self.buf.write(wire.HEADER.pack(kind, len(payload)) + payload)

    def read_back(self) -> bytes:
        self.send(b"E")
        r = wire.FrameReader(wire.Channel(io.BytesIO(self.buf.getvalue()), None))
        return b"".join(iter(lambda: r.read(1 << 16), b""))


def send_through(data: bytes, compress: str, receiver: str | None, **kw) -> tuple[bytes, list[bytes], int]:
    pipe = Pipe()
    s = wire.Sender(pipe, compress, receiver, **kw)
    for i in range(0, len(data), 300_000):  # writes that straddle chunk boundaries
        s.write(data[i:i + 300_000])
    s.close()
    got = pipe.read_back()
    return got, pipe.kinds, s.wire_bytes


@pytest.fixture
def no_local_zstd(monkeypatch):
    """This end as a bare server: no zstandard, no compression.zstd."""
    for module in (codec, sender, reader):
        monkeypatch.setattr(module, "zstd_library", lambda: None)


DATA = FP32_CHUNK * 3 + b"tail" * 1000


def test_receiver_without_zstd_gets_lane_frames():
    got, kinds, wire_bytes = send_through(DATA, "1", None)
    assert got == DATA and set(kinds) == {b"L", b"E"} and wire_bytes < 0.9 * len(DATA)


def test_sender_without_zstd_sends_lane_frames_to_a_zstd_receiver(no_local_zstd):
    got, kinds, wire_bytes = send_through(DATA, "3", "module")
    assert got == DATA and set(kinds) == {b"L", b"E"} and wire_bytes < 0.9 * len(DATA)
    got, kinds, _ = send_through(DATA, "off", "module")
    assert got == DATA and set(kinds) == {b"D", b"E"}


class LaneLink(FakeLink):
    """The make-believe link of test_agent_modules, where an L frame also costs a chunk's compression."""

    def send(self, kind, payload=b""):
        FakeLink.send(self, kind, payload)
        if kind == b"L":
            self.clock.advance(CHUNK / self.comp_rate)


@pytest.mark.parametrize("link,wins", [((10e9, 50e6), b"D"), ((10e6, 10e9), b"L")])
def test_auto_still_times_lane_frames_against_raw(link, wins):
    clock = FakeClock()
    chan = LaneLink(clock, *link)
    s = wire.Sender(chan, "auto", None, clock=clock)
    for _ in range(120):
        s.write(FP32_CHUNK)
    s.close()
    kinds = [kind for kind, _size in chan.frames]
    assert set(kinds[:16]) == {b"L"}       # warm-up
    assert b"D" in kinds[16:60]            # raw was probed
    assert set(kinds[-30:]) == {wins}


def checkpoint_like(chunks: int) -> bytes:
    """fp32 tensors with zero tensors among them, as in a LoRA checkpoint (B matrices start at zero)
    and its optimizer state: in every other chunk half of it is zeros, at no chunk boundary."""
    zeros = bytes(CHUNK // 2)
    parts = []
    for i in range(chunks):
        parts.append(FP32_CHUNK if i % 2 else FP32_CHUNK[:CHUNK // 8] + zeros + FP32_CHUNK[CHUNK // 8 + len(zeros):])
    return b"".join(parts)


def test_stored_lanes_are_probed_all_along_for_zero_tensors():
    coder = codec.LaneCoder(1)
    coder.encode(FP32_CHUNK)  # the trial: mantissa lanes of dense values do not pack
    assert methods_of(coder.encode(FP32_CHUNK))[0] == codec.STORED
    zeros = bytes(CHUNK // 4)
    chunk = FP32_CHUNK[:CHUNK // 16] + zeros + FP32_CHUNK[CHUNK // 16 + len(zeros):]  # away from start, middle, end
    frame = coder.encode(chunk)
    assert methods_of(frame) == [codec.DEFLATE] * 4 and len(frame) < 0.8 * CHUNK
    assert codec.decode_lanes(frame) == chunk


SLOW = (25e6, 200e6)  # 200 Mbit/s, and packing at 200 MB/s (zstd and zlib lanes alike)


def wire_ratio(data: bytes, receiver: str | None) -> tuple[float, set[bytes]]:
    clock = FakeClock()
    chan = LaneLink(clock, *SLOW)
    s = wire.Sender(chan, "auto", receiver, clock=clock)
    for i in range(0, len(data), CHUNK):
        s.write(data[i:i + CHUNK])
    s.close()
    assert s.raw_bytes == len(data)
    return s.wire_bytes / s.raw_bytes, {kind for kind, _size in chan.frames[s.WARMUP:]}


@pytest.mark.parametrize("direction", ["restore", "backup"])
def test_a_server_with_only_the_zstd_binary_gets_the_wire_ratio_of_one_with_zstandard(monkeypatch, tmp_path,
                                                                                     direction):
    """Restore: this end has zstandard, the server only a zstd binary on its PATH. Backup: the
    server (this end, without zstandard) sends to a laptop that has it. On checkpoint-like data over
    a 200 Mbit/s link either way packs within 0.03 of what zstd frames make between two ends with
    zstandard."""
    pytest.importorskip("zstandard")
    from ckptsync.agent import serve
    data = checkpoint_like(96)  # past the warm-up and both probes
    equipped, kinds = wire_ratio(data, "module")
    assert kinds <= {b"Y", b"Z", b"D"} and b"Y" in kinds and equipped < 0.8
    binary = tmp_path / "bin" / "zstd"
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\nexec cat\n")
    binary.chmod(0o755)
    monkeypatch.setenv("PATH", f"{binary.parent}{os.pathsep}{os.environ['PATH']}")
    if direction == "restore":
        with monkeypatch.context() as m:
            m.setattr(serve, "zstd_library", lambda: None)
            receiver = serve.op_hello({})["zstd"]
    else:
        monkeypatch.setattr(sender, "zstd_library", lambda: None)
        receiver = "module"
    stock, kinds = wire_ratio(data, receiver)
    assert b"L" in kinds and kinds <= {b"L", b"D"}
    assert abs(stock - equipped) <= 0.03, (stock, equipped)


# ---------------------------------------------------------------- Python 3.14's compression.zstd


def standard_zstd():
    for name in ("compression.zstd", "backports.zstd"):  # the backport has the same interface
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    pytest.skip("neither compression.zstd (Python 3.14+) nor backports.zstd")


@pytest.mark.parametrize("compress", ["auto", "3"])
def test_standard_zstd_frames_are_read_by_zstandard_and_back(monkeypatch, compress):
    pytest.importorskip("zstandard")
    std = standard_zstd()
    data = FP32_CHUNK * 2 + bytes(CHUNK) + b"x" * 5000
    with monkeypatch.context() as m:  # this end has only the standard library's zstd
        m.setattr(codec, "zstandard", None)
        m.setattr(codec, "stdzstd", std)
        assert codec.zstd_library() == "stdlib"
        pipe = Pipe()
        s = wire.Sender(pipe, compress, "module")
        s.write(data)
        s.close()
        assert s.lane_coder is None and b"Y" in pipe.kinds
    assert pipe.read_back() == data  # zstandard reads them
    pipe = Pipe()
    s = wire.Sender(pipe, "3", "module")
    s.write(data)
    s.close()
    with monkeypatch.context() as m:
        m.setattr(codec, "zstandard", None)
        m.setattr(codec, "stdzstd", std)
        assert pipe.read_back() == data  # and the standard library reads zstandard's


# ---------------------------------------------------------------- a bare server, through the CLI

BLOCKER = """\
import sys

BLOCKED = {blocked!r}


class NoOptionalModules:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("not on this server: " + name)


sys.meta_path.insert(0, NoOptionalModules())
stage = sys.argv[2]  # python3 -c STAGE
del sys.argv[1:]
exec(compile(stage, "<stage1>", "exec"))
"""


def bare_server(where: Path, also: tuple[str, ...] = ()) -> list[str]:
    """A command: prefix for a server whose Python has only the standard library (less `also`, such
    as lzma, which some builds lack) and whose PATH has no zstd."""
    bin_dir = where / "bare-bin"
    bin_dir.mkdir()
    blocked = ("zstandard", "xxhash", "compression", "backports", *also)
    (bin_dir / "block.py").write_text(BLOCKER.replace("{blocked!r}", repr(blocked)))
    python = bin_dir / "python3"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} -S -I {bin_dir / "block.py"} "$@"\n')
    python.chmod(0o755)
    os.symlink(shutil.which("sh"), bin_dir / "sh")
    return ["env", "-i", f"PATH={bin_dir}"]


@pytest.fixture
def bare(tmp_path):
    prefix = bare_server(tmp_path)
    cfg = tmp_path / "ckptsync.yaml"
    cfg.write_text(json.dumps({"settle_seconds": 60, "instances": {"9": {"command": prefix}}}))
    return prefix, cfg


def test_the_bare_server_has_no_optional_module(bare):
    prefix, _ = bare
    with AgentServer(CommandTransport(prefix)) as r:
        assert r.hello.zstd is None
        assert "xxh3_128" not in r.hello.hashes


@pytest.fixture
def run_copy(tmp_path, fixtures_dir):
    run = tmp_path / "server" / "output"
    shutil.copytree(fixtures_dir / "full-finetune" / "output", run)
    set_tree_mtime(run, time.time() - 4000)
    for path in run.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return run


def cli_json(*args):
    res = run_cli(*args, "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    return json.loads(res.stdout)


@pytest.mark.parametrize("compress", ["1", "auto"])
def test_backup_and_restore_with_a_bare_server(bare, run_copy, tmp_path, compress):
    _, cfg = bare
    dest = tmp_path / "backups"
    via = ("--config", cfg, "--instance", "9")
    out = cli_json("backup", *via, "--remote-dir", run_copy, "--local-dir", dest, "--all", "--compress", compress)
    for name in ("checkpoint-3", "checkpoint-6"):
        diff = digest_diff(tree_digest(run_copy / name), tree_digest(dest / name))
        assert not diff, diff
    raw, sent = out["raw_bytes"], out["wire_bytes"]
    assert raw > 3_000_000
    if compress == "1":
        assert sent < 0.95 * raw, (sent, raw)  # L frames: the server had no zstd to send anything else

    fresh = tmp_path / "new-server" / "output"
    fresh.mkdir(parents=True)
    out = cli_json("restore", *via, "--remote-dir", fresh, "--local-dir", dest, "--checkpoint", "checkpoint-6",
                   "--compress", compress)
    diff = digest_diff(tree_digest(run_copy / "checkpoint-6"), tree_digest(fresh / "checkpoint-6"))
    assert not diff, diff
    if compress == "1":
        assert out["wire_bytes"] < 0.95 * out["sent_bytes"], out
    assert not [p for p in fresh.iterdir() if p.name.startswith(".ckptsync-")]


def test_a_server_python_without_lzma_gets_lanes_it_can_unpack(tmp_path, run_copy):
    """--compress 10 and up adds lzma to the lanes' trial; a server built without liblzma must
    not be sent lzma lanes, and says it has none."""
    prefix = bare_server(tmp_path, also=("lzma", "_lzma"))
    with AgentServer(CommandTransport(prefix)) as r:
        assert r.hello.zstd is None and r.hello.lzma is False
    cfg = tmp_path / "ckptsync.yaml"
    cfg.write_text(json.dumps({"settle_seconds": 60, "instances": {"9": {"command": prefix}}}))
    via = ("--config", cfg, "--instance", "9")
    dest = tmp_path / "backups"
    cli_json("backup", *via, "--remote-dir", run_copy, "--local-dir", dest, "--checkpoint", "checkpoint-6",
             "--compress", "12")
    fresh = tmp_path / "new-server" / "output"
    fresh.mkdir(parents=True)
    out = cli_json("restore", *via, "--remote-dir", fresh, "--local-dir", dest, "--checkpoint", "checkpoint-6",
                   "--compress", "12")
    assert not digest_diff(tree_digest(run_copy / "checkpoint-6"), tree_digest(fresh / "checkpoint-6"))
    assert out["wire_bytes"] < 0.95 * out["sent_bytes"], out   # deflate lanes still packed it
