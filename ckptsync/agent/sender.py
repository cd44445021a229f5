"""Framing an outgoing tar byte stream, raw or compressed, whichever makes it arrive sooner."""

import queue
import threading
import time

from ckptsync.agent.frames import CHUNK, Failure
from ckptsync.agent.codec import DATA_FRAMES, FrameCompressor, LaneCoder, split_lanes, zstd_library


class Memory:
    """What one connection's streams learned about raw against zstd.

    One per connection: the next stream on the same link starts from the
    last verdict instead of probing from scratch, while other connections
    (other links, other data) are not swayed by it.
    """

    def __init__(self):
        self.verdict = None  # (winner, exploit, lanes) of the last stream that reached one


class Sender:
    """Frames a tar byte stream, compressing it when that makes it arrive sooner.

    When both ends have zstd in-process (the zstandard module, or Python
    3.14's compression.zstd), each chunk is sent raw ("D") or as its own zstd
    frame ("Z", or "Y" when splitting it into byte lanes first packs it
    smaller), chosen per chunk from measured compression and link rates.
    When either end lacks it, chunks go raw or as "L" frames instead (byte
    lanes packed with zlib or lzma, see LaneCoder), chosen the same way. A
    zstd binary is not used: it can only pack one continuous stream, which
    has neither the byte lanes (checkpoints came out 0.06 to 0.09 larger on
    the wire than as L frames) nor the choice of raw per chunk.

    `receiver_lzma`: whether the receiver can unpack lzma lanes.
    `memory` (a Memory) carries the verdict from one stream to the next;
    `clock` times every decision, so tests can stand in for the link.
    """

    WARMUP = 16     # chunks sent compressed, untimed, until the pipe and window are full
    PROBE = 16      # chunks timed per mode when probing
    EXPLOIT = 192   # chunks sent in the faster mode before probing again; doubles while the same mode
    MAX_EXPLOIT = 1536  # keeps winning, since every probe of the slower mode costs time
    SETTLE = 8      # untimed chunks after a switch: the queue and the channel still drain the other mode
    LANE_CHECK = 32  # every so many compressed chunks, try both with and without byte lanes

    def __init__(self, chan, compress, receiver_zstd="module", *, memory=None, clock=time.perf_counter,
                 receiver_lzma=True):
        self.chan = chan
        self.compress = compress  # "off", "auto" or an int level
        self.memory = memory
        self.clock = clock
        self.buf = bytearray()
        self.queue = queue.Queue(maxsize=4)
        self.wire_bytes = 0
        self.raw_bytes = 0
        self.ratio = None
        self.chunks = 0
        self.error = None
        self.aborted = False
        self.zc = None
        self.plan_mode = "raw"
        self.seg_len = self.PROBE
        self.seg_start = None
        self.seg_bytes = 0
        self.seg_chunks = 0
        self.settle = self.SETTLE  # warm-up chunks are zstd; the first probe is raw
        self.lanes = None          # is splitting into byte lanes worth it? None: not tried yet
        self.packed_chunks = 0
        self.rates = {}
        self.exploiting = False
        self.exploit = self.EXPLOIT
        self.winner = None
        self.warmup = self.WARMUP
        if compress == "auto" and memory is not None and memory.verdict is not None:
            self.winner, self.exploit, self.lanes = memory.verdict
            self.plan_mode, self.seg_len, self.exploiting = self.winner, self.exploit, True
            self.warmup, self.settle = 0, 0
        level = 1 if compress == "auto" else (0 if compress == "off" else int(compress))
        self.level = max(1, min(level, 19))
        self.lane_coder = None
        if receiver_zstd != "module" or zstd_library() is None:
            # no zstd that both ends run in-process: every receiver decodes L frames with its standard library
            self.lane_coder = LaneCoder(self.level, receiver_lzma)
        self.enabled = compress != "off"
        if self.enabled and self.lane_coder is None:
            self.zc = FrameCompressor(self.level)
        self.writer = threading.Thread(target=self._write_loop)
        self.writer.daemon = True
        self.writer.start()

    def _write_loop(self):
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.aborted:
                continue
            kind, payload = item
            try:
                self.chan.send(kind, payload)
            except Exception as exc:
                self.error = exc
                continue
            if kind in DATA_FRAMES:
                self.wire_bytes += len(payload)

    def abort(self, wait):
        """Stop sending: drop what is queued; True once a send under way has also ended.

        The link must not be closed while the writer may still write to it: its
        file descriptor could by then belong to another file of this process.
        """
        self.aborted = True
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        self.queue.put(None)
        self.writer.join(wait)
        return not self.writer.is_alive()

    def _put(self, kind, payload):
        if self.error is not None:
            raise Failure("protocol", "connection lost: %s" % self.error)
        self.queue.put((kind, bytes(payload)))

    def write(self, data):
        if not self.buf and len(data) == CHUNK:
            self._emit(data)  # whole chunks of file data pass through without a copy
            return
        self.buf += data
        while len(self.buf) >= CHUNK:
            self._emit(self.buf[:CHUNK])
            del self.buf[:CHUNK]

    def flush(self):
        if self.buf:
            self._emit(self.buf)
            self.buf = bytearray()

    def _emit(self, chunk):
        self.raw_bytes += len(chunk)
        self.chunks += 1
        if not self.enabled:
            self._put(b"D", chunk)
        elif self.compress != "auto":
            kind, packed = self._pack(chunk)
            self._put(kind, packed)
        else:
            self._adaptive(chunk)

    def _pack(self, chunk):
        """The chunk as an L frame, or as one zstd frame, split into byte lanes when that has been packing smaller."""
        if self.lane_coder is not None:
            return b"L", self.lane_coder.encode(chunk)
        full = len(chunk) == CHUNK  # tar headers and file tails say little about the data
        if full:
            self.packed_chunks += 1
        if full and (self.lanes is None or self.packed_chunks % self.LANE_CHECK == 0):
            plain = self.zc.compress(bytes(chunk))
            laned = self.zc.compress(split_lanes(chunk))
            self.lanes = len(laned) < 0.97 * len(plain)
            return (b"Y", laned) if self.lanes else (b"Z", plain)
        if self.lanes:
            return b"Y", self.zc.compress(split_lanes(chunk))
        return b"Z", self.zc.compress(bytes(chunk))

    def _measure(self, chunk, packed):
        ratio = len(packed) / float(len(chunk))
        self.ratio = ratio if self.ratio is None else 0.7 * self.ratio + 0.3 * ratio

    def _adaptive(self, chunk):
        """Per chunk, raw or compressed, by the throughput each has actually achieved.

        Both ends share CPU with ssh's own crypto, so a rule based on
        compression speed alone misjudges fast links. Instead, short
        segments of each mode are timed end to end (back-pressure from the
        bounded send queue makes the time reflect the whole pipeline), the
        faster mode is used for a long stretch, then both are probed again.
        """
        now = self.clock()
        if self.seg_start is None:
            self.seg_start = now
        mode = self.plan_mode
        if self.chunks <= self.warmup:
            # Until the buffers between here and the link are full, sends return at
            # once and any timing flatters whichever mode goes first.
            mode = "zstd"
            self.seg_start = now
        if mode == "zstd":
            kind, packed = self._pack(chunk)
            self._measure(chunk, packed)
            if len(packed) < len(chunk):
                self._put(kind, packed)
            else:
                self._put(b"D", chunk)
        else:
            self._put(b"D", chunk)
        if self.chunks <= self.warmup:
            return
        if self.settle:
            self.settle -= 1
            self.seg_start = self.clock()
            return
        self.seg_bytes += len(chunk)
        self.seg_chunks += 1
        if self.seg_chunks >= self.seg_len:
            self._next_segment(self.clock())

    def _next_segment(self, now):
        before = self.plan_mode
        self._plan(now)
        if self.plan_mode != before:
            self.settle = self.SETTLE

    def _plan(self, now):
        rate = self.seg_bytes / max(now - self.seg_start, 1e-9)
        self.rates[self.plan_mode] = rate
        self.seg_start, self.seg_bytes, self.seg_chunks = now, 0, 0
        if self.ratio is not None and self.ratio > 0.97:
            # incompressible data: stop trying for a while
            self.plan_mode, self.seg_len, self.exploiting = "raw", self.EXPLOIT, True
            self.rates.pop("zstd", None)
            self.ratio = None
            return
        missing = [m for m in ("raw", "zstd") if m not in self.rates]
        if missing:
            self.plan_mode, self.seg_len, self.exploiting = missing[0], self.PROBE, False
            return
        if self.exploiting:
            # re-probe the other mode; conditions (link, CPU, data) change
            other = "raw" if self.plan_mode == "zstd" else "zstd"
            self.rates.pop(other, None)
            self.plan_mode, self.seg_len, self.exploiting = other, self.PROBE, False
            return
        winner = "zstd" if self.rates["zstd"] > 1.05 * self.rates["raw"] else "raw"
        self.exploit = min(2 * self.exploit, self.MAX_EXPLOIT) if winner == self.winner else self.EXPLOIT
        self.winner = winner
        self.plan_mode, self.seg_len, self.exploiting = winner, self.exploit, True

    def close(self):
        self.flush()
        self.queue.put(None)
        self.writer.join()
        if self.winner is not None and self.memory is not None:
            self.memory.verdict = (self.winner, self.exploit, self.lanes)
        if self.error is not None:
            raise Failure("protocol", "connection lost: %s" % self.error)
