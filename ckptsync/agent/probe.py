"""What this server's python3 offers ckptsync, measured here on short samples in memory."""

import os
import sys
import time

from ckptsync.agent.codec import FrameCompressor, LaneCoder, lzma, zstd_library
from ckptsync.agent.frames import CHUNK
from ckptsync.agent.hashing import hash_names, new_hash
from ckptsync.agent.procs import process_ids

HASH_SAMPLE = 32 << 20
CODEC_SAMPLE = 16 << 20


def sample(size):
    """Half random bytes, half zeros, in 64 KiB runs: a checkpoint's dense and empty tensors."""
    noise = os.urandom(64 << 10)
    zeros = bytes(64 << 10)
    return b"".join(noise if i % 2 == 0 else zeros for i in range(size // (64 << 10)))


def timed_rate(work, size, clock=time.perf_counter):
    """Bytes per second of work() over `size` bytes (the best of two runs)."""
    best = None
    for _ in range(2):
        start = clock()
        work()
        spent = max(clock() - start, 1e-9)
        best = spent if best is None else min(best, spent)
    return size / best


def hash_rate(alg, data):
    def work():
        h = new_hash(alg)
        view = memoryview(data)
        for i in range(0, len(data), CHUNK):
            h.update(view[i:i + CHUNK])
        h.hexdigest()
    return timed_rate(work, len(data))


def codec():
    """The codec a backup's stream uses from here: what the Sender picks for a laptop with zstandard."""
    lib = zstd_library()
    if lib is not None:
        return "zstd-" + lib        # zstd-zstandard, zstd-stdlib: a frame per chunk
    return "zlib-lanes"             # byte lanes packed by zlib (lzma at high levels)


def codec_rate(name, data):
    """Bytes per second that codec packs at the level `--compress auto` uses (1)."""
    if name.startswith("zstd-"):
        zc = FrameCompressor(1)
        return timed_rate(lambda: [zc.compress(data[i:i + CHUNK]) for i in range(0, len(data), CHUNK)], len(data))
    coder = LaneCoder(1, lzma is not None)
    return timed_rate(lambda: [coder.encode(data[i:i + CHUNK]) for i in range(0, len(data), CHUNK)], len(data))


def readable_fds():
    """(other processes whose open files can be read, other processes): the first is all of them
    as root, only this user's otherwise."""
    pids = process_ids()
    if pids is None:
        return 0, 0
    me = os.getpid()
    others = [p for p in pids if p != me]
    readable = 0
    for pid in others:
        try:
            os.listdir("/proc/%d/fd" % pid)
        except OSError:
            continue
        readable += 1
    return readable, len(others)


def op_probe(req):
    """Python, hash and codec with their speeds here, and whose open files this user can see."""
    alg = hash_names()[0]
    name = codec()
    readable, others = readable_fds()
    codec_speed = codec_rate(name, sample(CODEC_SAMPLE))
    return {
        "python": "%d.%d.%d" % sys.version_info[:3],
        "executable": sys.executable,
        "hash": alg,
        "hash_rate": hash_rate(alg, sample(HASH_SAMPLE)),
        "codec": name,
        "codec_rate": codec_speed,
        "fd_readable": readable,
        "fd_total": others,
        "uid": os.getuid() if hasattr(os, "getuid") else -1,
    }
