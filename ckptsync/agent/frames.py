"""Protocol constants, the error type the agent reports, and the frame channel.

Frames on stdin/stdout, each a 5-byte header (type byte, big-endian u32
length) and a payload. Requests and replies are JSON ("J"); errors are JSON
("X"); bulk data travels as "D" (raw tar bytes), "Z" (one complete zstd
frame of tar bytes), "Y" (a zstd frame of tar bytes split into byte lanes,
see split_lanes), "S" (a piece of one continuous zstd stream) or "L" (byte
lanes packed with zlib or lzma, see LaneCoder), then "E" ends the data.
"H" carries one file's checksum record while a tar stream is being sent.
Paths only ever travel inside frames.
"""

import errno
import json
import struct
import threading

PROTOCOL = 1
CHUNK = 1 << 20
HEADER = struct.Struct(">cI")
STAGING_PREFIX = ".ckptsync-staging-"
TRASH_PREFIX = ".ckptsync-trash-"
HOLD_DIR = ".ckptsync-hold"   # checkpoints held against rotation (agent/hold.py)

OS_KINDS = {
    "FileNotFoundError": "not_found",
    "PermissionError": "permission",
    "IsADirectoryError": "is_dir",
    "NotADirectoryError": "not_dir",
    "FileExistsError": "exists",
}


class Failure(Exception):
    def __init__(self, kind, message, path=""):
        Exception.__init__(self, message)
        self.kind = kind
        self.message = message
        self.path = path


def os_failure(exc, path):
    kind = OS_KINDS.get(type(exc).__name__, "os")
    if getattr(exc, "errno", None) == errno.ENOSPC:
        kind = "no_space"
    return Failure(kind, "%s: %s" % (getattr(exc, "strerror", None) or exc, path), path)


class Channel:
    def __init__(self, rfile, wfile):
        self.rfile = rfile
        self.wfile = wfile
        self.lock = threading.Lock()

    def send(self, kind, payload=b""):
        with self.lock:
            self.wfile.write(HEADER.pack(kind, len(payload)))
            if payload:
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
