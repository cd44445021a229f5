"""What the data frames hold: byte lanes, zstd (the zstandard module or Python 3.14's own) and zlib/lzma."""

import importlib
import struct
import zlib

from ckptsync.agent.frames import CHUNK, Failure

try:
    import zstandard  # type: ignore
except ImportError:
    zstandard = None

try:
    # the standard library's zstd from Python 3.14 on, looked up by name: older Pythons have no such package
    stdzstd = importlib.import_module("compression.zstd")
except ImportError:
    stdzstd = None

try:
    import lzma
except ImportError:  # Pythons built without liblzma
    lzma = None

LANES = 4
DATA_FRAMES = (b"D", b"Z", b"Y", b"L")


def zstd_library():
    """Which zstd this Python can call in-process: "zstandard", "stdlib" (3.14+) or None."""
    if zstandard is not None:
        return "zstandard"
    return "stdlib" if stdzstd is not None else None


class FrameCompressor:
    """One complete zstd frame per call, with the content size in its header (what Z and Y frames hold)."""

    def __init__(self, level):
        if zstandard is not None:
            self.lib = zstandard.ZstdCompressor(level=level)
            self.mode = None
        else:
            self.lib = stdzstd.ZstdCompressor(level=level)
            self.mode = stdzstd.ZstdCompressor.FLUSH_FRAME

    def compress(self, data):
        if self.mode is None:
            return self.lib.compress(data)
        return self.lib.compress(data, self.mode)  # all input at once: the frame records its size


class FrameDecompressor:
    """Z and Y frames decoded in-process, by whichever zstd library this Python has."""

    def __init__(self):
        self.lib = zstandard.ZstdDecompressor() if zstandard is not None else None

    def decompress(self, body):
        return self.lib.decompress(body) if self.lib is not None else stdzstd.decompress(body)


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


# "L" frames: a chunk's byte lanes, each packed on its own with the standard library or stored.
# Layout: u32 chunk length, 4 method bytes, 4 u32 lane lengths, then the lanes in order.
LANE_HEAD = struct.Struct(">I4B4I")
STORED, DEFLATE, XZ = 0, 1, 2  # on the wire
XZ_DICT = 1 << 20  # no lane is longer; bounds the memory of both ends
# How a lane is packed, and the wire method that unpacks it.
WAYS = {"stored": STORED, "rle": DEFLATE, "deflate": DEFLATE, "lzma": XZ}


def xz_filters(preset):
    return [{"id": lzma.FILTER_LZMA2, "preset": preset, "dict_size": XZ_DICT}]


class LaneCoder:
    """Chunks as L frames, for when one end has no zstd: each lane packed the way a trial found best.

    The sign and exponent lane of fp32/bf16 values has few distinct bytes in
    no repeating order: deflate limited to runs (Z_RLE) packs it smaller than
    full matching (0.32 against 0.41 of its size on LoRA and Adam state; zstd
    -1 makes 0.37) at twice the speed, and still packs runs of zeros to
    nothing. Mantissa lanes pack by a few percent at most; text and headers
    need matching. So each lane's way is picked by a trial on its first
    TRIAL bytes: on the first full chunk and every CHECK full chunks after,
    and on every shorter one (tar headers, small files, tails are unlike the
    tensors). In between, a stored lane is probed on 1 KiB at each of 16
    points spread over it, since zero tensors (a LoRA's B matrices, fresh
    optimizer state) come and go within a chunk. lzma joins the trial from
    level 10 on: it wins where data repeats further apart than deflate's
    32 KiB window.
    """

    CHECK = 32
    TRIAL = 1 << 16
    POINTS = 16     # where a stored lane is probed, evenly spread
    PROBE = 1024    # bytes probed at each point
    PAYS = 0.97     # a lane is packed only when that makes its sample at least 3% smaller
    SLOWER = 0.97   # a slower way must pack at least 3% smaller than a faster one to be chosen

    def __init__(self, level, receiver_lzma=True):
        self.zlevel = max(1, min(level, 9))
        # lzma only when both ends have it (a Python may be built without liblzma)
        self.xz = min(level - 10, 9) if level >= 10 and lzma is not None and receiver_lzma else None
        self.ways = None  # per lane, from the last trial on a full chunk
        self.full = 0

    def _pack(self, way, lane):
        if way == "rle" or way == "deflate":
            strategy = zlib.Z_RLE if way == "rle" else zlib.Z_DEFAULT_STRATEGY
            c = zlib.compressobj(self.zlevel, zlib.DEFLATED, -15, 8, strategy)
            return c.compress(lane) + c.flush()
        if way == "lzma":
            return lzma.compress(lane, format=lzma.FORMAT_RAW, filters=xz_filters(self.xz))
        return lane

    def _trial(self, lane):
        """The lane's way and, when the whole lane was the sample, its packed bytes."""
        sample = lane[:self.TRIAL]
        best = self._pack("rle", sample)
        way = "rle"
        for other in ("deflate", "lzma") if self.xz is not None else ("deflate",):
            out = self._pack(other, sample)
            if len(out) < self.SLOWER * len(best):
                way, best = other, out
        if len(best) >= self.PAYS * len(sample):
            way, best = "stored", sample
        return way, (best if len(sample) == len(lane) else None)

    def _probe(self, lane):
        step = max(len(lane) // self.POINTS, 1)
        sample = b"".join(lane[i:i + self.PROBE] for i in range(0, len(lane), step))
        return "rle" if len(self._pack("rle", sample)) < self.PAYS * len(sample) else "stored"

    def encode(self, chunk):
        lanes = [bytes(chunk[k::LANES]) for k in range(LANES)]
        full = len(chunk) == CHUNK
        if full:
            self.full += 1
        if full and self.ways is not None and self.full % self.CHECK:
            ways = [self._probe(lane) if way == "stored" else way for way, lane in zip(self.ways, lanes)]
            parts = [(way, self._pack(way, lane)) for way, lane in zip(ways, lanes)]
        else:
            tried = [self._trial(lane) for lane in lanes]
            parts = [(way, self._pack(way, lane) if packed is None else packed)
                     for (way, packed), lane in zip(tried, lanes)]
            if full:
                self.ways = [way for way, _ in tried]
        head = LANE_HEAD.pack(len(chunk), *([WAYS[way] for way, _ in parts] + [len(p) for _, p in parts]))
        return b"".join([head] + [p for _, p in parts])


def unpack_lane(method, data, size):
    most = size or 1  # a limit of 0 would mean none
    if method == STORED:
        lane, done = bytes(data), True
    elif method == DEFLATE:
        d = zlib.decompressobj(-15)
        lane = d.decompress(data, most)
        done = d.eof and not d.unconsumed_tail
    elif method == XZ:
        if lzma is None:
            raise Failure("unsupported", "this Python has no lzma module: send with --compress 1-9")
        d = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=xz_filters(0))
        lane = d.decompress(data, most)
        done = d.eof
    else:
        raise Failure("protocol", "byte-lane frame with unknown method %d" % method)
    if not done or len(lane) != size:
        raise Failure("protocol", "corrupt byte-lane frame: a lane does not unpack to its %d bytes" % size)
    return lane


LANE_ERRORS = (zlib.error, EOFError) + ((lzma.LZMAError,) if lzma is not None else ())


def decode_lanes(body):
    """The chunk an L frame holds."""
    if len(body) < LANE_HEAD.size:
        raise Failure("protocol", "corrupt byte-lane frame: %d bytes" % len(body))
    head = LANE_HEAD.unpack_from(body)
    n, methods, sizes = head[0], head[1:1 + LANES], head[1 + LANES:]
    if n > CHUNK or LANE_HEAD.size + sum(sizes) != len(body):
        raise Failure("protocol", "corrupt byte-lane frame: lengths do not add up")
    out = bytearray(n)
    view = memoryview(body)
    pos = LANE_HEAD.size
    try:
        for k in range(LANES):
            out[k::LANES] = unpack_lane(methods[k], view[pos:pos + sizes[k]], (n - k + LANES - 1) // LANES)
            pos += sizes[k]
    except LANE_ERRORS as exc:
        raise Failure("protocol", "corrupt byte-lane frame: %s" % exc)
    return out
