"""Framing an outgoing tar byte stream, raw or compressed, whichever makes it arrive sooner."""

import queue
import threading
import time

from ckptsync.agent.frames import CHUNK, Failure
from ckptsync.agent.codec import DATA_FRAMES, FrameCompressor, LaneCoder, split_lanes, zstd_library


class Memory:
    """What one connection's streams learned about raw against compressed.

    One per connection: each stream goes on from where the last one left
    off (the rates measured, the probe under way, the verdict), so that many
    short streams on one link, each too short to probe both modes, still
    reach a verdict between them; other connections (other links, other
    data) are not swayed by it.
    """

    def __init__(self):
        self.learned = None  # Sender.LEARNED of the last stream, by name ("winner": the verdict, once reached)


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
    `memory` (a Memory) carries what was learned from one stream to the next;
    `clock` times every decision, so tests can stand in for the link.
    """

    # Segments are counted in chunks' worth of tar bytes (CHUNK each): small files come as many
    # short chunks (a tar header, a file's data, its tail), which must count for what they carry.
    WARMUP = 16     # sent compressed, untimed, at a connection's first stream until the pipe and window are full
    REFILL = 8      # untimed at each later stream, in the mode under way: the pipe ran empty in between
    PROBE = 16      # timed per mode when probing
    EXPLOIT = 192   # sent in the faster mode before probing again; doubles while the same mode
    MAX_EXPLOIT = 1536  # keeps winning, since every probe of the slower mode costs time
    SETTLE = 8      # untimed after a switch: the queue and the channel still drain the other mode
    LANE_CHECK = 32  # every so many chunks of LANE_MIN or more, try both with and without byte lanes
    # A chunk this large says whether byte lanes pack the data smaller: a small file's data comes
    # as one short chunk, while tar headers and padding stay under it.
    LANE_MIN = 64 << 10
    PACKS = 0.97    # compressing pays only when it makes the bytes at least 3% smaller
    SAMPLE = 2      # compressed this much, and it does not pay: raw at once, before any timing
    # What a connection's Memory carries from one stream to the next.
    LEARNED = ("plan_mode", "seg_len", "seg_bytes", "seg_time", "rates", "exploiting", "exploit", "winner",
               "lanes", "packed_in", "packed_out")

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
        self.chunks = 0
        self.error = None
        self.aborted = False
        self.zc = None
        # The first stream of a connection warms up compressed, then probes compressed (the pipe
        # already holds compressed frames), then raw; a compressible sample means compressed
        # from the first chunk, whatever the link, until timing can tell.
        self.plan_mode = "zstd"
        self.seg_len = self.PROBE * CHUNK
        self.seg_start = None
        self.seg_mark = None
        self.seg_bytes = 0         # timed bytes of the segment under way, over all streams
        self.seg_time = 0.0        # its seconds in earlier streams (not the time between them)
        self.settle = 0
        self.lanes = None          # is splitting into byte lanes worth it? None: not tried yet
        self.packed_chunks = 0
        self.packed_in = 0         # bytes compressed lately, and what they packed to
        self.packed_out = 0
        self.rates = {}
        self.exploiting = False
        self.exploit = self.EXPLOIT * CHUNK
        self.winner = None
        self.fill = self.WARMUP * CHUNK  # untimed bytes before the segment's clock runs
        if compress == "auto" and memory is not None and memory.learned is not None:
            for name in self.LEARNED:
                setattr(self, name, memory.learned[name])
            self.rates = dict(self.rates)
            self.fill = self.REFILL * CHUNK  # in the mode under way: it also settles a switch
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
        if len(chunk) < self.LANE_MIN:   # a header, a small text file, a tail: plain packs them better
            return b"Z", self.zc.compress(bytes(chunk))
        self.packed_chunks += 1
        if self.lanes is None or self.packed_chunks % self.LANE_CHECK == 0:
            plain = self.zc.compress(bytes(chunk))
            laned = self.zc.compress(split_lanes(chunk))
            self.lanes = len(laned) < 0.97 * len(plain)
            return (b"Y", laned) if self.lanes else (b"Z", plain)
        if self.lanes:
            return b"Y", self.zc.compress(split_lanes(chunk))
        return b"Z", self.zc.compress(bytes(chunk))

    def ratio(self):
        """What compressing has lately packed to, by bytes; None before any."""
        return self.packed_out / float(self.packed_in) if self.packed_in else None

    def _adaptive(self, chunk):
        """Per chunk, raw or compressed, by the throughput each has actually achieved.

        Both ends share CPU with ssh's own crypto, so a rule based on
        compression speed alone misjudges fast links. Instead, segments of
        each mode are timed end to end (back-pressure from the bounded send
        queue makes the time reflect the whole pipeline, once the buffers
        on the way are full), the faster mode is used for a long stretch,
        then both are probed again. Until timing can tell, compressible data
        goes compressed, and data that does not pack goes raw at once.
        """
        n = len(chunk)
        if self.plan_mode == "zstd":
            kind, packed = self._pack(chunk)
            self.packed_in += n
            self.packed_out += min(len(packed), n)
            if len(packed) < n:
                self._put(kind, packed)
            else:
                self._put(b"D", chunk)
            if self.packed_in >= self.SAMPLE * CHUNK and self.ratio() > self.PACKS:
                self._incompressible()
                return
            if self.packed_in >= self.PROBE * CHUNK:
                self.packed_in //= 2  # the ratio follows the data as it changes
                self.packed_out //= 2
        else:
            self._put(b"D", chunk)
        if self.fill > 0 or self.settle > 0:
            # Until the buffers between here and the link are full of this mode's frames,
            # sends return at once and any timing flatters whichever mode goes first.
            if self.fill > 0:
                self.fill -= n
            else:
                self.settle -= n
            self.seg_start, self.seg_mark = self.clock(), None
            return
        now = self.clock()
        if self.seg_start is None:
            self.seg_start = now
        self.seg_bytes += n
        self.seg_mark = now  # the last timed chunk of this stream
        if self.seg_bytes >= self.seg_len:
            self._next_segment(now)

    def _incompressible(self):
        """Data that does not pack: raw for a long stretch, without timing compression."""
        self.rates.pop("zstd", None)
        self.plan_mode, self.seg_len, self.exploiting = "raw", self.EXPLOIT * CHUNK, True
        self.packed_in = self.packed_out = 0
        self.seg_bytes, self.seg_time, self.seg_start, self.seg_mark = 0, 0.0, None, None
        self.settle = 0

    def _next_segment(self, now):
        before = self.plan_mode
        self._plan(now)
        if self.plan_mode != before:
            self.settle = self.SETTLE * CHUNK
            self.seg_start = self.seg_mark = None
            if self.plan_mode == "zstd":
                self.packed_in = self.packed_out = 0

    def _plan(self, now):
        rate = self.seg_bytes / max(self.seg_time + now - self.seg_start, 1e-9)
        self.rates[self.plan_mode] = rate
        self.seg_start, self.seg_mark, self.seg_bytes, self.seg_time = now, None, 0, 0.0
        missing = [m for m in ("zstd", "raw") if m not in self.rates]
        if missing:
            self.plan_mode, self.seg_len, self.exploiting = missing[0], self.PROBE * CHUNK, False
            return
        if self.exploiting:
            # re-probe the other mode; conditions (link, CPU, data) change
            other = "raw" if self.plan_mode == "zstd" else "zstd"
            self.rates.pop(other, None)
            self.plan_mode, self.seg_len, self.exploiting = other, self.PROBE * CHUNK, False
            return
        winner = "zstd" if self.rates["zstd"] > 1.05 * self.rates["raw"] else "raw"
        same = winner == self.winner
        self.exploit = min(2 * self.exploit, self.MAX_EXPLOIT * CHUNK) if same else self.EXPLOIT * CHUNK
        self.winner = winner
        self.plan_mode, self.seg_len, self.exploiting = winner, self.exploit, True

    def close(self):
        self.flush()
        self.queue.put(None)
        self.writer.join()
        if self.compress == "auto" and self.memory is not None:
            if self.seg_mark is not None:
                self.seg_time += self.seg_mark - self.seg_start  # the time between streams does not count
            self.memory.learned = dict((name, getattr(self, name)) for name in self.LEARNED)
        if self.error is not None:
            raise Failure("protocol", "connection lost: %s" % self.error)
