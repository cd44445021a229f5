"""What the data frames hold: byte lanes, and the zstd module or binary behind them."""

import shutil
import subprocess
import threading

from ckptsync.agent.frames import CHUNK, Failure

try:
    import zstandard  # type: ignore
except ImportError:
    zstandard = None

LANES = 4
DATA_FRAMES = (b"D", b"Z", b"Y", b"S")


def zstd_binary():
    return shutil.which("zstd")


def split_lanes(chunk):
    """Byte k of every 4-byte word, for k = 0..3, one lane after another.

    Checkpoints are mostly fp32/bf16 tensors: the sign and exponent bytes of
    neighbouring values are nearly alike, and grouped together they compress
    far better than interleaved with mantissa noise.
    """
    return b"".join(chunk[k::LANES] for k in range(LANES))


def join_lanes(data):
    n = len(data)
    out = bytearray(n)
    view = memoryview(data)
    pos = 0
    for k in range(LANES):
        size = (n - k + LANES - 1) // LANES
        out[k::LANES] = view[pos:pos + size]
        pos += size
    return out


class ZstdStream:
    def __init__(self, cobj, put):
        self.cobj = cobj
        self.put = put

    def write(self, data):
        out = self.cobj.compress(data)
        if out:
            self.put(b"S", out)

    def close(self):
        out = self.cobj.flush()
        if out:
            self.put(b"S", out)


class BinaryStream:
    """A zstd process compressing our tar bytes; a thread frames its output."""

    def __init__(self, level, put):
        self.proc = subprocess.Popen(
            [zstd_binary(), "-q", "-c", "-%d" % level, "-T0"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        self.put = put
        self.failed = None
        self.thread = threading.Thread(target=self._pump)
        self.thread.daemon = True
        self.thread.start()

    def _pump(self):
        try:
            while True:
                block = self.proc.stdout.read1(CHUNK)
                if not block:
                    return
                self.put(b"S", block)
        except Exception as exc:
            self.failed = exc

    def write(self, data):
        self.proc.stdin.write(data)

    def close(self):
        self.proc.stdin.close()
        self.thread.join()
        self.proc.wait()
        if self.failed is not None:
            raise Failure("protocol", "compression failed: %s" % self.failed)
