"""Protocol constants, the error type the agent reports, and the frame channel.

Frames on stdin/stdout, each a 5-byte header (type byte, big-endian u32
length) and a payload. Requests and replies are JSON ("J"); errors are JSON
("X"); bulk data travels as "D" (raw tar bytes), "Z" (one complete zstd
frame of tar bytes), "Y" (a zstd frame of tar bytes split into byte lanes,
see split_lanes), "S" (a piece of one continuous zstd stream) or "L" (byte
lanes packed with zlib or lzma, see LaneCoder), then "E" ends the data.
"H" carries one file's checksum record while a tar stream is being sent.
"K" (a heartbeat, numbered from 1, u64) tells the client that work which sends
nothing else still advances. Paths only ever travel inside frames.
"""

import errno
import json
import os
import struct
import threading

PROTOCOL = 1
CHUNK = 1 << 20
DIRECT_READ = 64 << 10   # a frame body from this size on is read in place (Channel._exact_into)
JOINED = 64 << 10        # a frame body up to this size goes out in one write with its header
HEADER = struct.Struct(">cI")
BEAT = b"K"
BEAT_COUNT = struct.Struct(">Q")
STAGING_PREFIX = ".ckptsync-staging-"
TRASH_PREFIX = ".ckptsync-trash-"
HOLD_DIR = ".ckptsync-hold"   # checkpoints held against rotation (agent/hold.py)
LOCK_NAME = ".ckptsync-lock"  # in a server directory: flock-ed by the run writing into it

OS_KINDS = {
    "FileNotFoundError": "not_found",
    "PermissionError": "permission",
    "IsADirectoryError": "is_dir",
    "NotADirectoryError": "not_dir",
    "FileExistsError": "exists",
}


class Failure(Exception):
    def __init__(self, kind, message, path="", info=None):
        Exception.__init__(self, message)
        self.kind = kind
        self.message = message
        self.path = path
        self.info = info  # more for the client, in the error reply (a lock's holder)


def os_failure(exc, path):
    kind = OS_KINDS.get(type(exc).__name__, "os")
    if getattr(exc, "errno", None) == errno.ENOSPC:
        kind = "no_space"
    return Failure(kind, "%s: %s" % (getattr(exc, "strerror", None) or exc, path), path)


class PipeWriter:
    """A file descriptor written without a buffer in between. A signal can cut a write to a pipe
    short (a process stopped and continued, a frozen cgroup, a laptop's suspend): the rest is
    written from where it stopped. Python's buffered writer over a pipe lost bytes there."""

    def __init__(self, fd):
        self.fd = fd

    def write(self, data):
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(self.fd, view):]

    def flush(self):
        pass


class Channel:
    def __init__(self, rfile, wfile):
        self.rfile = rfile
        self.wfile = wfile
        self.lock = threading.Lock()

    def send(self, kind, payload=b""):
        head = HEADER.pack(kind, len(payload))
        with self.lock:
            if len(payload) <= JOINED:
                self.wfile.write(b"".join((head, payload)))   # one write for a small frame
            else:
                self.wfile.write(head)
                self.wfile.write(payload)
            self.wfile.flush()

    def send_json(self, obj, kind=b"J"):
        self.send(kind, json.dumps(obj).encode("utf-8"))

    def recv(self):
        head = self._exact(HEADER.size)
        if head is None:
            return None, None
        kind, size = HEADER.unpack(head)
        body = self._exact(size) if size else b""
        if body is None:
            raise Failure("protocol", "connection closed mid-frame")
        return kind, body

    def _exact(self, n):
        if n >= DIRECT_READ and hasattr(self.rfile, "readinto"):
            return self._exact_into(n)
        parts = []
        while n:
            piece = self.rfile.read(n)
            if not piece:
                if parts:
                    raise Failure("protocol", "connection closed mid-frame")
                return None
            parts.append(piece)
            n -= len(piece)
        return b"".join(parts)

    def _exact_into(self, n):
        """A large frame body read straight into its own buffer: no piece is copied again to join them."""
        body = bytearray(n)
        view = memoryview(body)
        got = 0
        try:
            while got < n:
                k = self.rfile.readinto(view[got:])
                if not k:
                    raise Failure("protocol", "connection closed mid-frame")
                got += k
        finally:
            view.release()
        return body


class Work:
    """How much work this agent has done: the loops that read files or walk trees count here."""

    done = 0


def tick(n=1):
    Work.done += n


class Heartbeat:
    """Sends a K frame when work advanced since the last one: while a request reads or walks without
    sending, the client's stall limit then sees progress; a stopped agent or a hung disk sends none."""

    def __init__(self, chan):
        self.chan = chan
        self.seen = Work.done
        self.beats = 0  # numbers the frames: the client refuses one that does not count up
        self.stopped = threading.Event()
        self.every = None

    def beat(self):
        """One look at the count of work: True while the channel still takes frames."""
        done = Work.done
        if done == self.seen:
            return True
        self.seen = done
        self.beats += 1
        try:
            self.chan.send(BEAT, BEAT_COUNT.pack(self.beats))
        except Exception:
            return False
        return True

    def run(self, every):
        while not self.stopped.wait(every) and self.beat():
            pass

    def start(self, every):
        self.every = every
        t = threading.Thread(target=self.run, args=(every,))
        t.daemon = True
        t.start()
