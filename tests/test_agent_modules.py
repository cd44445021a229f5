"""The agent as modules: the joined payload, its first stage, Sender's choices, tar parsing, checks."""

from __future__ import annotations

import ast
import glob
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from ckptsync import agent as wire
from ckptsync.agent import bundle
from ckptsync.agent.fileops import op_commit, op_discard, op_staged
from ckptsync.agent.procs import op_procs
from ckptsync.transport.base import MARKER, STAGE1
from helpers import exec_done

AGENT_DIR = Path(wire.__file__).resolve().parent
OPTIONAL = {"xxhash", "zstandard"}


# ---------------------------------------------------------------- the payload


def test_payload_parses_as_python_38():
    source = wire.payload().decode("utf-8")
    ast.parse(source, feature_version=(3, 8))
    assert source.rstrip().endswith('if __name__ == "__main__":\n    main()')
    assert wire.payload() is wire.payload()  # cached per process


def test_payload_imports_only_stdlib_and_optional_modules():
    tree = ast.parse(wire.payload().decode("utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in the payload"
            imported.add((node.module or "").split(".")[0])
    assert "ckptsync" not in imported
    assert imported - set(sys.stdlib_module_names) - OPTIONAL == set()
    assert OPTIONAL <= imported  # still tried, so a server that has them uses them


def test_payload_compressed_is_zlib_of_payload():
    import zlib

    assert zlib.decompress(wire.payload_compressed()) == wire.payload()
    assert len(wire.payload_compressed()) < len(wire.payload()) / 2


@pytest.mark.parametrize("path", sorted(p.name for p in AGENT_DIR.glob("*.py")
                                        if p.name not in ("bundle.py", "__init__.py")))
def test_each_module_parses_as_python_38_and_is_bundled(path):
    text = (AGENT_DIR / path).read_text(encoding="utf-8")
    tree = ast.parse(text, feature_version=(3, 8))
    assert path[:-3] in bundle.ORDER
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ckptsync"):
            assert node.module.startswith("ckptsync.agent."), node.module
            assert node.col_offset == 0, "sibling imports only at the top level"
        if isinstance(node, ast.Import):
            assert not any(a.name.startswith("ckptsync") for a in node.names)


def test_payload_passes_the_bundler_checks():
    assert bundle.join(bundle.sources()).encode("utf-8") == wire.payload()


def test_bundler_refuses_imports_it_cannot_strip():
    wrapped = "from ckptsync.agent.frames import (\n    Failure,\n)\n"
    with pytest.raises(RuntimeError, match="still imports"):
        bundle.join([("frames", "X = 1\n"), ("later", wrapped)])
    with pytest.raises(RuntimeError, match="does not come before"):
        bundle.join([("frames", "from ckptsync.agent.later import Y\n"), ("later", "Y = 1\n")])
    with pytest.raises(RuntimeError, match="both define"):
        bundle.join([("frames", "def helper():\n    pass\n"), ("later", "helper = 2\n")])


# ---------------------------------------------------------------- the first stage, for real


def python38():
    """A Python 3.8 interpreter, if this machine has one."""
    candidates = [shutil.which("python3.8")] + sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.8*/bin/python3.8")))
    for exe in candidates:
        if not exe:
            continue
        try:
            out = subprocess.run([exe, "-c", "import sys; print(sys.version_info[:2])"],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        if out.strip() == b"(3, 8)":
            return exe
    return None


class Agent:
    """The payload started the way the transports start it: python -c STAGE1, then the compressed source."""

    def __init__(self, python):
        self.proc = subprocess.Popen([python, "-c", STAGE1], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.watchdog = threading.Timer(60, self.proc.kill)  # a hung agent fails the test instead of hanging it
        self.watchdog.daemon = True
        self.watchdog.start()
        seen = b""
        while not seen.endswith(MARKER + b"\n"):
            byte = self.proc.stdout.read(1)
            assert byte, "the first stage exited: %s" % self.proc.stderr.read().decode()
            seen += byte
        p = wire.payload_compressed()
        self.proc.stdin.write(b"%d\n" % len(p) + p)
        self.proc.stdin.flush()
        self.chan = wire.Channel(self.proc.stdout, self.proc.stdin)

    def call(self, op, **args):
        self.chan.send_json(dict(op=op, **args))
        kind, body = self.chan.recv()
        assert kind in (b"J", b"X"), (kind, self.proc.stderr.read())
        return kind, json.loads(body)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(30)
        self.watchdog.cancel()
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture(params=["current", "3.8"])
def agent_python(request):
    if request.param == "current":
        return sys.executable
    exe = python38()
    if exe is None:
        pytest.skip("no Python 3.8 interpreter on this machine")
    return exe


def test_payload_runs_through_the_first_stage(agent_python, tmp_path):
    agent = Agent(agent_python)
    try:
        kind, hello = agent.call("hello")
        assert kind == b"J" and hello["protocol"] == wire.PROTOCOL
        assert hello["pid"] == agent.proc.pid
        # Two sends on one connection: the second starts from the first's Memory, same bytes either way.
        data = bytes(range(256)) * 9000
        (tmp_path / "a.bin").write_bytes(data)
        for _ in range(2):
            kind, reply = agent.call("send", root=str(tmp_path), files=[["a.bin", "ck/a.bin"]], compress="auto")
            assert kind == b"J" and reply["ok"]
            records = []
            reader = wire.FrameReader(agent.chan, other=lambda k, b: records.append(json.loads(b)))
            stream = wire.TarStream(reader)
            got = [(m.name, b"".join(stream.data(m.size))) for m in stream.members()]
            reader.drain()
            kind, body = agent.chan.recv()
            assert kind == b"J" and json.loads(body)["raw_bytes"] > len(data)
            assert got == [("ck/a.bin", data)]
            assert records[0]["member"] == "ck/a.bin" and records[0]["size"] == len(data)
        kind, err = agent.call("discard", root=str(tmp_path), name="../x")
        assert kind == b"X" and err["kind"] == "bad_path"
    finally:
        agent.close()


# ---------------------------------------------------------------- Sender, on a make-believe link

DATA = bytes(range(256)) * (wire.CHUNK // 256)  # one chunk that compresses very well


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.lock = threading.Lock()

    def __call__(self):
        with self.lock:
            return self.now

    def advance(self, seconds):
        with self.lock:
            self.now += seconds


class FakeLink:
    """A channel that collects frames and moves the clock by what each would cost.

    Sending takes wire bytes / link rate; a compressed frame also pays for
    compressing a whole chunk at comp_rate, so the segment timings Sender
    makes see both, as they would through a real pipeline.
    """

    def __init__(self, clock, link_rate, comp_rate):
        self.clock = clock
        self.link_rate = link_rate
        self.comp_rate = comp_rate
        self.frames = []

    def send(self, kind, payload=b""):
        self.frames.append((kind, len(payload)))
        cost = len(payload) / self.link_rate
        if kind in (b"Z", b"Y"):
            cost += wire.CHUNK / self.comp_rate
        self.clock.advance(cost)


FAST_LINK = (10e9, 50e6)    # 10 GB/s link, compression at 50 MB/s: raw wins
SLOW_LINK = (10e6, 10e9)    # 10 MB/s link, compression at 10 GB/s: zstd wins


def stream(link, chunks=100, memory=None):
    pytest.importorskip("zstandard")
    clock = FakeClock()
    chan = FakeLink(clock, *link)
    sender = wire.Sender(chan, "auto", "module", memory=memory, clock=clock)
    for _ in range(chunks):
        sender.write(DATA)
    sender.close()
    assert sender.raw_bytes == chunks * len(DATA)
    return [kind for kind, _size in chan.frames]


def test_fast_link_and_slow_compression_ends_up_raw():
    kinds = stream(FAST_LINK)
    assert set(kinds[:16]) <= {b"Z", b"Y"}  # warm-up
    assert set(kinds[-30:]) == {b"D"}


def test_slow_link_and_compressible_data_ends_up_compressed():
    kinds = stream(SLOW_LINK)
    assert b"D" in kinds[16:40]  # raw was probed
    assert set(kinds[-30:]) <= {b"Z", b"Y"}


def test_senders_without_shared_memory_start_afresh():
    stream(FAST_LINK)  # learns "raw", but has nowhere to keep it
    assert stream(FAST_LINK, chunks=1)[0] in (b"Z", b"Y")  # a fresh start warms up compressed
    first = wire.Memory()
    stream(FAST_LINK, memory=first)
    assert first.learned is not None and first.learned["winner"] == "raw"
    assert stream(FAST_LINK, chunks=1, memory=wire.Memory())[0] in (b"Z", b"Y")
    # A slow link after a fast one, on its own memory, still finds zstd.
    assert set(stream(SLOW_LINK, memory=wire.Memory())[-30:]) <= {b"Z", b"Y"}


def test_senders_sharing_memory_start_from_the_last_verdict():
    memory = wire.Memory()
    stream(FAST_LINK, memory=memory)
    assert memory.learned["winner"] == "raw"
    assert set(stream(FAST_LINK, chunks=20, memory=memory)) == {b"D"}  # no warm-up, no probing yet
    memory = wire.Memory()
    stream(SLOW_LINK, memory=memory)
    assert memory.learned["winner"] == "zstd"
    assert set(stream(SLOW_LINK, chunks=40, memory=memory)) <= {b"Z", b"Y"}
    assert b"D" in stream(SLOW_LINK, chunks=40)  # while a fresh one probes raw


def small_files(link, files, size, memory=None):
    """A send of `files` small files as the agent frames them (send.py): each tar header and
    each file's data and padding end in a flush, so every file makes two short chunks."""
    pytest.importorskip("zstandard")
    clock = FakeClock()
    chan = FakeLink(clock, *link)
    sender = wire.Sender(chan, "auto", "module", memory=memory, clock=clock)
    for _ in range(files):
        sender.write(DATA[:512])
        sender.flush()
        sender.write(DATA[:size])
        sender.flush()
    sender.close()
    assert sender.chunks == 2 * files
    return [kind for kind, _size in chan.frames]


def test_a_short_stream_of_small_files_goes_compressed_from_its_first_chunk():
    # 80 files of 150 KB: 160 chunks but only 12 MB, less than the warm-up and first probe carry.
    kinds = small_files(SLOW_LINK, files=80, size=150_000)
    assert len(kinds) == 160 and set(kinds) <= {b"Z", b"Y"}
    # A longer one on the slow link probes raw once it has timed compression, then stays compressed.
    kinds = small_files(SLOW_LINK, files=600, size=150_000)
    assert set(kinds[:400]) <= {b"Z", b"Y"} and b"D" in kinds and set(kinds[-200:]) <= {b"Z", b"Y"}


def test_small_tensor_files_go_in_byte_lanes_and_their_headers_plain():
    """A small file's data is one short chunk, yet long enough to tell whether byte lanes pack it
    smaller; its tar header is not, and goes plain."""
    pytest.importorskip("zstandard")
    import random
    import struct
    rng = random.Random(7)
    tensor = struct.pack("<%df" % 37_500, *(rng.gauss(0.0, 0.01) for _ in range(37_500)))   # 150 KB of fp32
    clock = FakeClock()
    chan = FakeLink(clock, *SLOW_LINK)
    sender = wire.Sender(chan, "auto", "module", clock=clock)
    for _ in range(40):
        sender.write(DATA[:512])
        sender.flush()
        sender.write(tensor)
        sender.flush()
    sender.close()
    headers, data = chan.frames[0::2], chan.frames[1::2]
    assert {kind for kind, _n in headers} == {b"Z"}
    assert {kind for kind, _n in data} == {b"Y"}
    from ckptsync.agent.codec import FrameCompressor
    plain = len(FrameCompressor(1).compress(tensor))
    assert all(n < 0.97 * plain for _kind, n in data)


def test_short_streams_on_one_connection_learn_the_link_between_them():
    """Each stream (12 MiB) is shorter than a warm-up and a probe: on their own none would learn the link."""
    for link, wins in ((FAST_LINK, {b"D"}), (SLOW_LINK, {b"Z", b"Y"})):
        memory = wire.Memory()
        runs = [stream(link, chunks=12, memory=memory) for _ in range(14)]
        assert set(runs[0]) <= {b"Z", b"Y"}  # nothing known yet: compressible data goes compressed
        assert all(set(kinds) <= wins for kinds in runs[-4:]), (link, runs)
        assert memory.learned["winner"] == ("raw" if link == FAST_LINK else "zstd")
    # Streams shorter than the refill between them time nothing, and leave the segment under way as it was.
    memory = wire.Memory()
    stream(FAST_LINK, chunks=20, memory=memory)
    timing = ("plan_mode", "seg_bytes", "seg_time", "rates")
    under_way = [memory.learned[name] for name in timing]
    assert memory.learned["seg_bytes"] > 0
    assert set(stream(FAST_LINK, chunks=3, memory=memory)) <= {b"Z", b"Y"}
    assert [memory.learned[name] for name in timing] == under_way
    # Small files count by what they carry: 80 files of 150 KB a stream (12 MB, 160 chunks).
    memory = wire.Memory()
    runs = [small_files(FAST_LINK, files=80, size=150_000, memory=memory) for _ in range(14)]
    assert set(runs[0]) <= {b"Z", b"Y"} and set(runs[-1]) == {b"D"}


def test_data_that_does_not_pack_is_not_compressed_past_a_sample(monkeypatch):
    pytest.importorskip("zstandard")
    packed = []
    pack = wire.Sender._pack
    monkeypatch.setattr(wire.Sender, "_pack", lambda self, chunk: packed.append(len(chunk)) or pack(self, chunk))
    noise = os.urandom(wire.CHUNK)
    clock = FakeClock()
    chan = FakeLink(clock, *SLOW_LINK)
    sender = wire.Sender(chan, "auto", "module", clock=clock)
    for _ in range(20):
        sender.write(noise)
    sender.close()
    assert [kind for kind, _size in chan.frames] == [b"D"] * 20
    assert len(packed) == 2  # CPU spent on compressing: two chunks, not a warm-up's sixteen


# ---------------------------------------------------------------- tar parsing


class Trickle:
    """A source that hands out at most a few bytes per read, like a slow pipe."""

    def __init__(self, data, most=7):
        self.buf = io.BytesIO(data)
        self.most = most

    def read(self, n=-1):
        return self.buf.read(min(n, self.most) if n >= 0 else self.most)


def pax_record(key, value):
    body = b" %s=%s\n" % (key.encode(), value.encode())
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode() + body


def padded(data):
    return data + b"\0" * (-len(data) % 512)


def member(name, data, fmt=tarfile.PAX_FORMAT):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_700_000_000
    info.mode = 0o640
    return info.tobuf(fmt, "utf-8", "surrogateescape") + padded(data)


END = wire.NUL_BLOCK * 2


def read_all(data, source=Trickle):
    stream = wire.TarStream(source(data))
    return [(m.name, m.size, b"".join(stream.data(m.size))) for m in stream.members()]


def test_parse_pax_records():
    data = pax_record("path", "a/" + "b" * 200) + pax_record("ckptsync.mtime_ns", "17") + pax_record("size", "5")
    assert wire.parse_pax(data) == {"path": "a/" + "b" * 200, "ckptsync.mtime_ns": "17", "size": "5"}
    with pytest.raises(wire.Failure) as exc:
        wire.parse_pax(b"xx path=a\n")
    assert exc.value.kind == "protocol"


def test_tar_stream_reads_pax_and_gnu_long_names_and_skips_padding():
    long_pax = "checkpoint-1/" + "p" * 150 + ".bin"
    long_gnu = "checkpoint-1/" + "g" * 150 + ".bin"
    data = (member(long_pax, b"abc") + member(long_gnu, b"0123456789", tarfile.GNU_FORMAT)
            + member("short.txt", b"x" * 513) + END)
    assert b"././@LongLink" in data  # the GNU member really carries an 'L' header
    expected = [(long_pax, 3, b"abc"), (long_gnu, 10, b"0123456789"), ("short.txt", 513, b"x" * 513)]
    assert read_all(data) == expected
    assert read_all(data, io.BytesIO) == expected


def test_tar_stream_hand_built_pax_header():
    pax = pax_record("path", "dir/" + "n" * 120) + pax_record("ckptsync.mtime_ns", "1700000000123456789")
    head = tarfile.TarInfo("PaxHeader")
    head.type, head.size = tarfile.XHDTYPE, len(pax)
    data = head.tobuf(tarfile.USTAR_FORMAT) + padded(pax) + member("dir/short", b"hello", tarfile.USTAR_FORMAT) + END
    stream = wire.TarStream(Trickle(data))
    seen = [(m.name, m.pax_headers.get("ckptsync.mtime_ns"), b"".join(stream.data(m.size))) for m in stream.members()]
    assert seen == [("dir/" + "n" * 120, "1700000000123456789", b"hello")]  # the header renames the member after it


def test_tar_stream_truncated_raises_protocol():
    whole = member("a.bin", b"y" * 2000) + END
    for cut in (100, 512 + 1000, 512 + 2000 + 10, len(whole) - 1024, len(whole) - 1000):
        with pytest.raises(wire.Failure) as exc:
            read_all(whole[:cut])
        assert exc.value.kind == "protocol", cut


def test_tar_header_round_trip():
    name = "checkpoint-7/ünïcode/" + "deep/" * 30 + "optimizer.pt"
    mtime_ns = 1_700_000_000_987_654_321
    body = os.urandom(1500)
    data = wire.tar_header(name, len(body), mtime_ns, 0o600) + padded(body) + wire.tar_header("b", 0, 5, 0o644) + END
    stream = wire.TarStream(Trickle(data, most=100))
    seen = []
    for info in stream.members():
        seen.append((info.name, info.size, info.mode, int(info.pax_headers["ckptsync.mtime_ns"]),
                     b"".join(stream.data(info.size))))
    assert seen == [(name, len(body), 0o600, mtime_ns, body), ("b", 0, 0o644, 5, b"")]


@pytest.mark.parametrize("name, size, mtime_ns, mode, offset, start", [
    ("checkpoint-500/optimizer.pt", 145023, 1_796_646_289_473_394_393, 0o644, 0, None),
    ("a", 0, 0, 0o600, 0, None),
    ("x" * 100, 1, 5, 0o7777, 0, None),                       # the longest name the ustar field holds
    ("ckpt/model.safetensors", 8 ** 11 - 1, (8 ** 11 - 1) * 10 ** 9, 0o640, 4096, None),
    ("ckpt/optimizer.pt", 1 << 30, 1_700_000_000_000_000_001, 0o644, 0, 3 << 30),
    ("ckpt/optimizer.pt", 1 << 20, 1_700_000_000_000_000_001, 0o644, 512, 0),
    # past the ustar fields: tarfile's own header, whatever the fast path would make
    ("y" * 101, 10, 1_700_000_000_000_000_000, 0o644, 0, None),
    ("ckpt/ünïcode.bin", 10, 1_700_000_000_000_000_000, 0o644, 0, None),
    ("ckpt/huge.pt", 8 ** 11, 1_700_000_000_000_000_000, 0o644, 0, None),
    ("ckpt/future.pt", 10, 8 ** 11 * 10 ** 9, 0o644, 0, None),
])
def test_tar_header_is_what_tarfile_writes(name, size, mtime_ns, mode, offset, start):
    """The directly built header reads back, with tarfile too, and is byte for byte tarfile's PAX
    header where tarfile leaves a regular file's device fields empty (Pythons before 3.11 wrote zeros)."""
    pax = {"ckptsync.mtime_ns": str(mtime_ns)}
    if offset:
        pax["ckptsync.offset"] = str(offset)
    if start is not None:
        pax["ckptsync.start"] = str(start)
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.type, info.uname, info.gname = \
        size, mtime_ns // 10 ** 9, mode, tarfile.REGTYPE, "", ""
    info.pax_headers = dict(pax)
    head = wire.tar_header(name, size, mtime_ns, mode, offset=offset, start=start)
    theirs = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    if theirs[-512 + 329:-512 + 345] == bytes(16):
        assert head == theirs
    read = tarfile.open(fileobj=io.BytesIO(head + bytes(1024)), mode="r:").next()   # checks the checksums
    assert (read.name, read.size, read.mode, read.mtime) == (name, size, mode, mtime_ns // 10 ** 9)
    stream = wire.TarStream(Trickle(head))
    got = next(stream.members())
    assert (got.name, got.size, got.mode) == (name, size, mode)
    assert {k: v for k, v in got.pax_headers.items() if k.startswith("ckptsync.")} == pax


# ---------------------------------------------------------------- staging names


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".", "..", "/abs", "a\x00b"])
@pytest.mark.parametrize("op", ["commit", "staged", "discard"])
def test_staging_ops_refuse_bad_names(tmp_path, op, name):
    req = {"root": str(tmp_path), "name": name, "moves": [["", "checkpoint-1"]]}
    fn = {"commit": op_commit, "staged": op_staged, "discard": op_discard}[op]
    with pytest.raises(wire.Failure) as exc:
        fn(req)
    assert exc.value.kind == "bad_path"


def staged(tmp_path, name="stage"):
    staging = tmp_path / (wire.STAGING_PREFIX + name)
    (staging / "checkpoint-1").mkdir(parents=True)
    (staging / "checkpoint-1" / "a.bin").write_bytes(b"a")
    (staging / "extra.json").write_bytes(b"{}")
    return staging


@pytest.mark.parametrize("move", [["../evil", "checkpoint-1"], ["a//b", "checkpoint-1"], ["/etc", "x"],
                                  ["checkpoint-1", ""], ["checkpoint-1", "a//b"], ["checkpoint-1", "."],
                                  ["checkpoint-1", ".."], ["checkpoint-1", "x/"],
                                  ["checkpoint-1", wire.STAGING_PREFIX + "stage/inside"], ["checkpoint-1"]])
def test_commit_refuses_bad_moves_before_moving_anything(tmp_path, move):
    root = tmp_path / "root"
    root.mkdir()
    staging = staged(root)
    with pytest.raises(wire.Failure) as exc:
        op_commit({"root": str(root), "name": "stage", "moves": [["extra.json", "extra.json"], move]})
    assert exc.value.kind == "bad_path"
    assert (staging / "extra.json").exists() and not (root / "extra.json").exists()


def test_commit_moves_into_place_and_beside_the_root(tmp_path):
    root = tmp_path / "run" / "ckpts"
    root.mkdir(parents=True)
    staged(root)
    reply = op_commit({"root": str(root), "name": "stage",
                       "moves": [["checkpoint-1", "checkpoint-1"], ["extra.json", "../extra.json"]]})
    # everything moved: the staging is gone, and the reply says so (the client need not discard it)
    assert reply == {"moved": ["checkpoint-1", "../extra.json"], "kept": [], "staging_left": False}
    assert (root / "checkpoint-1" / "a.bin").read_bytes() == b"a"
    assert (tmp_path / "run" / "extra.json").read_bytes() == b"{}"
    assert not (root / (wire.STAGING_PREFIX + "stage")).exists()


def test_a_commit_that_leaves_something_staged_says_so(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    staging = staged(root)
    reply = op_commit({"root": str(root), "name": "stage", "moves": [["checkpoint-1", "checkpoint-1"]]})
    assert reply == {"moved": ["checkpoint-1"], "kept": [], "staging_left": True}
    assert (staging / "extra.json").exists()


# ---------------------------------------------------------------- procs


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc")
def test_procs_finds_a_process_with_a_file_open_under_root(tmp_path):
    root = tmp_path / "ckpts"
    (root / "checkpoint-3").mkdir(parents=True)
    held = root / "checkpoint-3" / "train_log.txt"
    held.write_text("step 3\n")
    # The child inherits the file open for reading: it is in /proc once its exec is done.
    # A relative name keeps the command line short whatever the temp path (it is cut at 200 chars).
    fd = os.open(held, os.O_RDONLY)
    try:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", held.name],
                                 cwd=tmp_path, pass_fds=(fd,))
    finally:
        os.close(fd)
    exec_done(child.pid)
    try:
        real = os.path.realpath(held)
        reply = op_procs({"root": str(root), "pattern": "train_log"})
        mine = [p for p in reply["processes"] if p["pid"] == child.pid]
        assert mine and mine[0]["run"] == "has %s open" % real and "train_log.txt" in mine[0]["cmd"]
        # Open for reading only: it is this run's, and the pattern makes it training; nothing is written.
        assert mine[0]["trainer"] and mine[0]["python"] and reply["writing"] == []
        assert all(p["pid"] != os.getpid() for p in reply["processes"])
        assert set(reply) == {"processes", "writing", "gpu", "blind", "now", "root", "writing_total"}
        assert all(len(p["cmd"]) <= 200 for p in reply["processes"]) and len(reply["processes"]) <= 50
    finally:
        child.kill()
        child.wait()
    nobody = op_procs({"root": str(root)})
    assert all(p["pid"] != child.pid for p in nobody["processes"])
    without_root = op_procs({})
    assert without_root["writing"] == [] and all(not p["run"] for p in without_root["processes"])


def test_a_range_hands_each_written_span_to_the_disk_as_it_goes(tmp_path, monkeypatch):
    """A byte range is written into a file other channels share: each WRITEBACK_STEP bytes written
    are handed to the disk at once, so the fsync before the commit finds little left to write."""
    from ckptsync.agent import fileops
    from ckptsync.agent.hashing import WRITEBACK_STEP, hash_names, new_hash

    started: list[tuple[int, int]] = []
    monkeypatch.setattr(fileops, "writeback_range", lambda fd, offset, length: started.append((offset, length)))
    target = tmp_path / "big.part"
    start = 3 << 20
    pieces = [os.urandom(1 << 20) for _ in range(2 * WRITEBACK_STEP // (1 << 20) + 3)]
    fileops.write_range(str(target), start, iter(pieces), new_hash(hash_names()[0]))
    assert started == [(start, WRITEBACK_STEP), (start + WRITEBACK_STEP, WRITEBACK_STEP)]
    assert target.read_bytes()[start:] == b"".join(pieces)
