"""Reading the tar bytes that arrive as data frames, whatever their compression."""

from ckptsync.agent.frames import Failure
from ckptsync.agent.codec import DATA_FRAMES, FrameDecompressor, decode_lanes, join_lanes, zstd_library


class FrameReader:
    """File-like view of the tar bytes arriving as D/Z/Y/L frames until E."""

    def __init__(self, chan, other=None):
        self.chan = chan
        self.other = other
        self.pending = bytearray()
        self.done = False
        self.dz = FrameDecompressor() if zstd_library() is not None else None

    def _fill(self):
        if self.done:
            return False
        kind, body = self.chan.recv()
        if kind is None:
            raise Failure("protocol", "connection closed during transfer")
        self._absorb(kind, body)
        return True

    def _absorb(self, kind, body):
        if kind == b"D":
            self.pending += body
        elif kind == b"Z" or kind == b"Y":
            if self.dz is None:
                raise Failure("protocol", "zstd frame sent to a receiver without the zstandard module")
            data = self.dz.decompress(body)
            self.pending += join_lanes(data) if kind == b"Y" else data
        elif kind == b"L":
            self.pending += decode_lanes(body)
        elif kind == b"E":
            self.done = True
        elif self.other is not None:
            self.other(kind, body)
        else:
            raise Failure("protocol", "unexpected frame %r during transfer" % kind)

    def read(self, n=-1):
        want = n if n is not None and n >= 0 else 1 << 62
        if not self.pending and not self.done:
            # Fast path: hand over a whole raw frame without copying it.
            kind, body = self._peek_raw()
            if kind == b"D" and len(body) <= want:
                return body
            if kind is not None:
                self._absorb(kind, body)
        while len(self.pending) < want and self._fill():
            pass
        out = bytes(self.pending[:want])
        del self.pending[:want]
        return out

    def _peek_raw(self):
        kind, body = self.chan.recv()
        if kind is None:
            raise Failure("protocol", "connection closed during transfer")
        return kind, body

    def drain(self, limit=None):
        """Read to the end of the stream; with `limit`, refuse more than that many bytes of data frames."""
        seen = 0
        while not self.done:
            kind, body = self.chan.recv()
            if kind is None or kind == b"E":
                self.done = True
            elif kind not in DATA_FRAMES and self.other is not None:
                self.other(kind, body)
            else:
                seen += len(body)
                if limit is not None and seen > limit:
                    raise Failure("protocol", "the stream went on after the end of its tar data")
