"""Reading the tar bytes that arrive as data frames, whatever their compression."""

import queue
import subprocess
import threading

from ckptsync.agent.frames import CHUNK, Failure
from ckptsync.agent.codec import DATA_FRAMES, FrameDecompressor, decode_lanes, join_lanes, zstd_binary, zstd_library


class FrameReader:
    """File-like view of the tar bytes arriving as D/Z/Y/S/L frames until E."""

    def __init__(self, chan, other=None):
        self.chan = chan
        self.other = other
        self.pending = bytearray()
        self.done = False
        self.dz = FrameDecompressor() if zstd_library() is not None else None
        self.dstream = None
        self.proc = None
        self.proc_out = queue.Queue()

    def _start_proc(self):
        binary = zstd_binary()
        if binary is None:
            raise Failure("unsupported", "no zstd on this server to decompress the stream")
        self.proc = subprocess.Popen([binary, "-q", "-d", "-c"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)

        def pump():
            while True:
                block = self.proc.stdout.read1(CHUNK) if hasattr(self.proc.stdout, "read1") else self.proc.stdout.read(CHUNK)
                self.proc_out.put(block)
                if not block:
                    return

        t = threading.Thread(target=pump)
        t.daemon = True
        t.start()

    def _fill(self):
        if self.proc is not None and self.done:
            block = self.proc_out.get()
            if block:
                self.pending += block
                return True
            return False
        if self.done:
            return False
        kind, body = self.chan.recv()
        if kind is None:
            raise Failure("protocol", "connection closed during transfer")
        self._absorb(kind, body)
        return True

    def _to_binary(self, body):
        """Without the zstandard module, the zstd binary decodes: its stdin takes the frames."""
        if self.proc is None:
            self._start_proc()
        self.proc.stdin.write(body)

    def _absorb(self, kind, body):
        if kind == b"D":
            self.pending += body
        elif kind == b"Z":
            if self.dz is not None:
                self.pending += self.dz.decompress(body)
            else:
                self._to_binary(body)
        elif kind == b"Y":
            if self.dz is None:
                raise Failure("protocol", "byte-lane frame sent to a receiver without the zstandard module")
            self.pending += join_lanes(self.dz.decompress(body))
        elif kind == b"L":
            self.pending += decode_lanes(body)
        elif kind == b"S":
            if self.dz is not None:
                if self.dstream is None:
                    self.dstream = self.dz.decompressobj()
                self.pending += self.dstream.decompress(body)
            else:
                self._to_binary(body)
        elif kind == b"E":
            self.done = True
            if self.proc is not None:
                self.proc.stdin.close()
        elif self.other is not None:
            self.other(kind, body)
        else:
            raise Failure("protocol", "unexpected frame %r during transfer" % kind)
        if self.proc is not None:
            while not self.proc_out.empty():
                block = self.proc_out.get()
                if block:
                    self.pending += block
                else:
                    self.proc_out.put(block)
                    break

    def read(self, n=-1):
        want = n if n is not None and n >= 0 else 1 << 62
        if not self.pending and self.proc is None and not self.done:
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
