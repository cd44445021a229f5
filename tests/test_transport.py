"""One contract, every transport, through the typed Server interface: local subprocess, argv command
prefix, SSH through the OpenSSH client and through paramiko, and the in-process twin."""

from __future__ import annotations

import array
import io
import os
import random
import tarfile
from pathlib import Path

import pytest

import zstandard

from ckptsync.agent import join_lanes, split_lanes
from ckptsync.errors import NotFound, ProtocolError
from ckptsync.server.agent_server import AgentServer
from ckptsync.server.inprocess import InProcessTransport
from ckptsync.transport import CommandTransport, LocalTransport, ssh_transport
from ckptsync.transport import SshTarget
from sshd import FULL_ALIAS

STDLIB_ENV = ["env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin"]


@pytest.fixture(params=["local", "command-stdlib-python", "command-with-noise", "openssh", "paramiko",
                        "openssh-with-modules", "in-process"])
def transport(request):
    kind = request.param
    if kind == "local":
        return LocalTransport()
    if kind == "in-process":
        return InProcessTransport()
    if kind == "command-stdlib-python":
        # A server with a bare system Python: no xxhash, maybe no zstandard.
        return CommandTransport(STDLIB_ENV + ["/usr/bin/python3", "-c", "import os,sys; os.execvp(sys.argv[1], sys.argv[1:])"])
    if kind == "command-with-noise":
        # Login noise on stdout before the agent starts must be skipped.
        return CommandTransport(["sh", "-c", 'echo "Welcome to the GPU box"; printf "motd without newline"; exec "$@"', "x"])
    request.getfixturevalue("ssh_home")
    if kind == "openssh-with-modules":  # the test sshd's server whose python3 has xxhash and zstandard
        return ssh_transport(SshTarget(host=FULL_ALIAS), "openssh")
    return ssh_transport(SshTarget(host="tnr-1"), kind)  # a stock python3: the standard library only


def test_hello_reports_abilities(transport):
    with AgentServer(transport) as r:
        assert r.hello.protocol == 1
        assert r.hello.zstd in ("module", "binary", None)
        assert r.best_hash in ("xxh3_128", "sha1")
        assert tuple(int(x) for x in r.hello.python.split(".")[:2]) >= (3, 8)


def test_scan_lists_files_and_metadata(transport, server_tree):
    with AgentServer(transport) as r:
        listing = r.scan(str(server_tree))
    paths = {f.path for f in listing.files}
    assert "checkpoint-12/optimizer.pt" in paths and len(paths) == 24
    assert listing.meta["checkpoint-12/trainer_state.json"]["global_step"] == 12
    size = (server_tree / "checkpoint-12" / "optimizer.pt").stat().st_size
    assert [f.size for f in listing.files if f.path == "checkpoint-12/optimizer.pt"] == [size]


def test_missing_directory_is_not_found(transport, tmp_path):
    with AgentServer(transport) as r:
        with pytest.raises(NotFound, match="does not exist"):
            r.scan(str(tmp_path / "nope"))
        assert r.df(str(tmp_path)).free > 0  # the agent keeps serving after an error


@pytest.mark.parametrize("compress", ["auto", "off", "3"])
def test_download_roundtrip(transport, tmp_path, compress):
    src = tmp_path / "src"
    src.mkdir()
    payload = {"a b.bin": os.urandom(3 << 20) + bytes(2 << 20), "quote'\"$(x);.txt": b"hello\n",
               "nonascii-é.json": b"{}", "empty": b""}
    for name, data in payload.items():
        (src / name).write_bytes(data)
    with AgentServer(transport) as r:
        dl = r.send(str(src), [(n, f"m/{n}") for n in payload], compress=compress)
        got = {}
        with tarfile.open(fileobj=dl, mode="r|", bufsize=1 << 20) as tar:
            for member in tar:
                got[member.name] = tar.extractfile(member).read()
        wire_bytes = dl.finish()
    assert got == {f"m/{n}": d for n, d in payload.items()}
    assert set(dl.records) == set(got)
    tar_bytes = sum(512 + len(d) + (-len(d) % 512) for d in payload.values()) + 1024
    if compress == "off":
        assert wire_bytes >= tar_bytes  # raw: every tar byte crossed (plus PAX headers)
    elif compress == "3" and r.hello.zstd is not None:
        assert 0 < wire_bytes < tar_bytes  # 2 MiB of zeros compress
    else:
        assert wire_bytes > 0  # auto may judge raw faster on this link


def weights(n_floats: int, seed: int = 7) -> bytes:
    """fp32 values like trained weights: small, normally spread."""
    rng = random.Random(seed)
    return array.array("f", (rng.gauss(0.0, 0.02) for _ in range(n_floats))).tobytes()


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 4097, (1 << 20) + 3])
def test_byte_lanes_roundtrip(size):
    data = os.urandom(size)
    assert bytes(join_lanes(split_lanes(data))) == data


def test_float_weights_travel_in_byte_lanes_and_arrive_intact(transport, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    data = weights(3 << 18) + b"tail"  # 3 MiB of fp32 and a length that is not a multiple of 4
    (src / "adapter_model.bin").write_bytes(data)
    plain = sum(len(zstandard.ZstdCompressor(level=3).compress(data[i:i + (1 << 20)]))
                for i in range(0, len(data), 1 << 20))
    with AgentServer(transport) as r:
        dl = r.send(str(src), [("adapter_model.bin", "m/w.bin")], compress="3")
        with tarfile.open(fileobj=dl, mode="r|", bufsize=1 << 20) as tar:
            got = {m.name: tar.extractfile(m).read() for m in tar}
        wire_bytes = dl.finish()
    assert got == {"m/w.bin": data}
    if r.hello.zstd == "module":
        assert wire_bytes < 0.97 * plain  # the lanes pack smaller than plain zstd frames
    else:
        assert wire_bytes <= len(data) + 4096


def test_upload_commit_roundtrip(transport, tmp_path):
    root = tmp_path / "server"
    data = os.urandom(1 << 20) * 3
    with AgentServer(transport) as r:
        r.mkdir(str(root))
        up = r.receive(str(root), "ck")
        sent = up.add("ck/weights.bin", io.BytesIO(data), len(data), 1_700_000_000_123_456_789, 0o600)
        arrived = up.finish()
        assert [a.hash for a in arrived.values()] == [sent]
        assert not (root / "ck").exists()  # still staged, invisible
        assert r.commit(str(root), "ck", [("ck", "checkpoint-1")]).moved == ["checkpoint-1"]
    out = root / "checkpoint-1" / "weights.bin"
    assert out.read_bytes() == data
    assert out.stat().st_mtime_ns == 1_700_000_000_123_456_789
    assert out.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in root.iterdir()] == ["checkpoint-1"]


def test_uploads_on_one_connection_go_on_from_what_the_last_one_learned(tmp_path):
    """A restore of several checkpoints: each upload's sender starts from the connection's Memory."""
    root = tmp_path / "server"
    noise = os.urandom(4 << 20)
    with AgentServer(InProcessTransport()) as r:
        r.mkdir(str(root))
        memory = r.remote.memory
        for name in ("a", "b"):
            up = r.receive(str(root), name)
            up.add(f"{name}/weights.bin", io.BytesIO(noise), len(noise), 1_700_000_000_000_000_000, 0o600)
            up.finish()
            assert r.remote.memory is memory and memory.learned is not None
            assert memory.learned["plan_mode"] == "raw"  # noise: raw after a sample, and the next upload knows


def test_agent_refuses_unsafe_member(transport, tmp_path):
    root = tmp_path / "server"
    root.mkdir()
    with AgentServer(transport) as r:
        up = r.receive(str(root), "ck")
        up.add("../escape.txt", io.BytesIO(b"x"), 1, 1_700_000_000_000_000_000, 0o644)
        with pytest.raises(ProtocolError, match="refusing tar member"):
            up.finish()
    assert not (tmp_path / "escape.txt").exists()


def test_a_launcher_started_ahead_serves_the_next_connection_only(transport, server_tree):
    """prestart() starts the server's side while this one still loads; the connection made
    after takes that launcher and works as any other, and the one after starts its own."""
    transport.prestart()
    early = transport._early
    if not transport.starts_ahead:   # paramiko connects in start(): never ahead, where a failure would escape
        assert early is None
        with AgentServer(transport) as only:
            assert only.hello.protocol == 1
        return
    assert early is not None
    other = transport.lane(1)
    assert other is transport or other._early is None   # a second connection's channels never take it
    with AgentServer(transport) as first:
        assert first.remote.proc is early
        assert len(first.scan(str(server_tree)).files) == 24
    with AgentServer(transport) as second:
        assert second.remote.proc is not early and second.hello.protocol == 1
