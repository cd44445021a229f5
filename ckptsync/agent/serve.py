"""The request loop: one JSON request at a time, each answered by a reply or an error frame."""

import json
import os
import shutil
import sys
import sysconfig
import time

from ckptsync.agent.frames import PROTOCOL, Channel, Failure, Heartbeat, PipeWriter, os_failure
from ckptsync.agent.hashing import hash_names
from ckptsync.agent.codec import lzma, zstd_library
from ckptsync.agent.scan import op_df, op_glob, op_hash, op_scan, op_stat
from ckptsync.agent.procs import op_procs
from ckptsync.agent.cpu import cpu_aes
from ckptsync.agent.probe import op_probe
from ckptsync.agent.sender import Memory
from ckptsync.agent.fileops import op_commit, op_discard, op_mkdir, op_receive, op_remove, op_staged
from ckptsync.agent.fileops import op_lock, op_unlock, unlock_all, widen_pipes
from ckptsync.agent.assemble import op_assemble
from ckptsync.agent.send import op_send
from ckptsync.agent.http import op_http_get, op_http_put, op_range_hash
from ckptsync.agent.watching import close_watchers, op_wait
from ckptsync.agent.hold import op_hold, op_release


def op_hello(_req):
    import socket  # here, not at the top: for the one call

    return {
        "protocol": PROTOCOL,
        "python": "%d.%d.%d" % sys.version_info[:3],
        "zstd": "module" if zstd_library() is not None else None,  # zstd frames are decoded in-process only
        "lzma": lzma is not None,
        "hashes": hash_names(),
        "hostname": socket.gethostname(),
        "home": os.path.expanduser("~"),
        "pid": os.getpid(),
        "now": time.time(),
        # What installing a module takes here: a distribution's python refuses pip (PEP 668).
        "managed": os.path.isfile(os.path.join(sysconfig.get_path("stdlib") or "", "EXTERNALLY-MANAGED")),
        "apt": shutil.which("apt-get") is not None,
        "root": getattr(os, "geteuid", lambda: -1)() == 0,
        # The client offers AES-GCM first from the next connection on where this is true.
        "aes": cpu_aes(),
    }


SIMPLE = {
    "hello": op_hello,
    "ping": lambda _req: {},   # the client times it: the link's round trip
    "scan": op_scan,
    "stat": op_stat,
    "hash": op_hash,
    "df": op_df,
    "glob": op_glob,
    "procs": op_procs,
    "probe": op_probe,
    "commit": op_commit,
    "assemble": op_assemble,
    "staged": op_staged,
    "discard": op_discard,
    "remove": op_remove,
    "mkdir": op_mkdir,
    "http_put": op_http_put,
    "http_get": op_http_get,
    "range_hash": op_range_hash,
    "hold": op_hold,
    "release": op_release,
}
# These talk on the channel themselves; they also get the connection's Memory.
STREAMING = {"send": op_send, "receive": op_receive}
# These keep something for as long as the connection lasts: its locks.
HOLDING = {"lock": op_lock, "unlock": op_unlock}


def error_reply(failure):
    reply = {"kind": failure.kind, "message": failure.message, "path": failure.path}
    if failure.info is not None:
        reply["info"] = failure.info
    return reply


def serve(chan):
    memory = Memory()  # per connection: what one send learned about the link serves the next
    held = {}  # lock file -> (fd, directories it made): let go of when the connection ends
    watchers = {}      # per connection: root -> what watches it for `wait`
    beat = Heartbeat(chan)
    try:
        _serve(chan, memory, held, watchers, beat)
    finally:
        beat.stopped.set()
        unlock_all(held)
        close_watchers(watchers)


def _serve(chan, memory, held, watchers, beat):
    while True:
        try:
            kind, body = chan.recv()
        except Failure:
            return
        if kind is None:
            return
        if kind != b"J":
            chan.send_json({"kind": "protocol", "message": "expected a request, got %r" % kind}, b"X")
            continue
        try:
            req = json.loads(body.decode("utf-8"))
            if not isinstance(req, dict):
                raise Failure("protocol", "a request is a JSON object")
            op = req.get("op")
            if op == "bye":
                chan.send_json({})
                return
            if op == "hello" and req.get("beat") and beat.every is None:
                beat.start(float(req["beat"]))
            if op in SIMPLE:
                chan.send_json(SIMPLE[op](req))
            elif op == "wait":
                chan.send_json(op_wait(req, watchers))
            elif op in STREAMING:
                chan.send_json(STREAMING[op](chan, req, memory))
            elif op in HOLDING:
                chan.send_json(HOLDING[op](req, held))
            else:
                raise Failure("unknown_op", "unknown operation %r" % (op,))
        except Failure as exc:
            chan.send_json(error_reply(exc), b"X")
        except OSError as exc:
            chan.send_json(error_reply(os_failure(exc, getattr(exc, "filename", "") or "")), b"X")
        except Exception as exc:  # report, keep serving: the client decides
            chan.send_json({"kind": "internal", "message": "%s: %s" % (type(exc).__name__, exc)}, b"X")


def stdio_channel(kind=Channel):
    """The agent's channel: requests on stdin, frames written straight to stdout's pipe."""
    return kind(sys.stdin.buffer, PipeWriter(sys.stdout.fileno()))


def main():
    widen_pipes((0, 1))
    serve(stdio_channel())
