"""The ckptsync agent: runs on the server, stdlib only, Python 3.8+.

It is sent over the channel at every connection and executed from memory,
so nothing is left on the server. Its modules import nothing from ckptsync
but each other, and bundle.py joins them into the one source that is sent;
the names below are what the client side uses of it. The server side (serve
and the modules only it needs: http, scan, fileops) is left out, so that a
client connecting over SSH does not import it; the in-process server imports
ckptsync.agent.serve itself.
"""

import importlib

# Each name is imported from its module when first asked for (PEP 562): the client imports
# ckptsync.agent.frames or .hashing alone without loading the codec, the tar code and the rest.
_HOME = {
    "frames": ("BEAT", "BEAT_COUNT", "CHUNK", "HEADER", "PROTOCOL", "STAGING_PREFIX", "TRASH_PREFIX",
               "Channel", "Failure", "os_failure"),
    "hashing": ("fsync_dir", "fsync_file", "hash_file", "hash_names", "new_hash", "start_writeback"),
    "direct": ("NewFile", "direct_buffer"),
    "paths": ("resolve", "safe_member"),
    "codec": ("DATA_FRAMES", "join_lanes", "split_lanes"),
    "tar": ("NUL_BLOCK", "TarStream", "parse_pax", "tar_header"),
    "sender": ("Memory", "Sender"),
    "reader": ("FrameReader",),
    "bundle": ("payload", "payload_compressed"),
}
_MODULE_OF = {name: module for module, names in _HOME.items() for name in names}


def __getattr__(name):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = list(_MODULE_OF)
