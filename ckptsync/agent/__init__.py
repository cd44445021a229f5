"""The ckptsync agent: runs on the server, stdlib only, Python 3.8+.

It is sent over the channel at every connection and executed from memory,
so nothing is left on the server. Its modules import nothing from ckptsync
but each other, and bundle.py joins them into the one source that is sent;
the names below are what the client side uses of it. The server side (serve
and the modules only it needs: http, scan, fileops) is left out, so that a
client connecting over SSH does not import it; the in-process server imports
ckptsync.agent.serve itself.
"""

from ckptsync.agent.frames import (
    BEAT, BEAT_COUNT, CHUNK, HEADER, PROTOCOL, STAGING_PREFIX, TRASH_PREFIX, Channel, Failure, os_failure,
)
from ckptsync.agent.hashing import fsync_dir, fsync_file, hash_file, hash_names, new_hash, start_writeback
from ckptsync.agent.direct import NewFile, direct_buffer
from ckptsync.agent.paths import resolve, safe_member
from ckptsync.agent.codec import DATA_FRAMES, join_lanes, split_lanes
from ckptsync.agent.tar import NUL_BLOCK, TarStream, parse_pax, tar_header
from ckptsync.agent.sender import Memory, Sender
from ckptsync.agent.reader import FrameReader
from ckptsync.agent.bundle import payload, payload_compressed

__all__ = [
    "BEAT", "BEAT_COUNT", "CHUNK", "HEADER", "PROTOCOL", "STAGING_PREFIX", "TRASH_PREFIX",
    "Channel", "Failure", "os_failure",
    "fsync_dir", "fsync_file", "hash_file", "hash_names", "new_hash", "start_writeback",
    "NewFile", "direct_buffer",
    "resolve", "safe_member",
    "DATA_FRAMES", "join_lanes", "split_lanes",
    "NUL_BLOCK", "TarStream", "parse_pax", "tar_header",
    "Memory", "Sender", "FrameReader",
    "payload", "payload_compressed",
]
