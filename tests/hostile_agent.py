"""A fake, hostile "server" for tests: it speaks the agent protocol but sends what it should not.

Usage (as an instance command): python hostile_agent.py MODE [extra args ignored]
"""

import io
import json
import os
import struct
import sys
import tarfile
import threading
import time

HEADER = struct.Struct(">cI")
MODE = sys.argv[1]
DATA = b"x" * 4096
OUT = sys.stdout.buffer
IN = sys.stdin.buffer


def send(kind, payload=b""):
    OUT.write(HEADER.pack(kind, len(payload)) + payload)
    OUT.flush()


def send_json(obj, kind=b"J"):
    send(kind, json.dumps(obj).encode())


def recv():
    head = IN.read(HEADER.size)
    if len(head) < HEADER.size:
        sys.exit(0)
    kind, size = HEADER.unpack(head)
    return kind, IN.read(size)


def block_forever():
    """A server that stops answering but keeps the connection open; only the client ends it."""
    threading.Event().wait()


def member(name, data=DATA, kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.type = kind
    info.linkname = linkname
    info.mtime = 1_700_000_000
    info.mode = 0o644
    out = info.tobuf(tarfile.PAX_FORMAT)
    if kind == tarfile.REGTYPE:
        out += data + b"\0" * (-len(data) % 512)
    return out


def tar_for(mode):
    target = os.environ.get("HOSTILE_TARGET", "/tmp/ckptsync-hostile-target")
    good = member("checkpoint-5/a.bin")
    return {
        "dotdot": member("../../evil.txt"),
        "absolute": member(target),
        "symlink": member("checkpoint-5/a.bin", kind=tarfile.SYMTYPE, linkname="/etc/passwd"),
        "device": member("checkpoint-5/a.bin", kind=tarfile.CHRTYPE),
        "unexpected": good + member("checkpoint-5/extra.bin"),
        "duplicate": good + good,
        "wronghash": good,
        "truncated": good[:1500],
    }.get(mode, good) + (b"" if mode == "truncated" else b"\0" * 1024)


def main():
    OUT.write(b"\nCKPTSYNC-AGENT-READY\n")
    OUT.flush()
    n = int(IN.readline())
    IN.read(n)
    while True:
        kind, body = recv()
        req = json.loads(body)
        op = req["op"]
        if op == "hello":
            send_json({"protocol": 1, "python": "3.8.0", "zstd": None, "hashes": ["sha1"], "now": time.time()})
        elif op == "ping":
            send_json({})
        elif op == "scan":
            path = "../outside/a.bin" if MODE == "unsafe-scan" else "checkpoint-5/a.bin"
            old = int((time.time() - 3600) * 1e9)
            files = [[path, len(DATA), old, 0o644],
                     ["checkpoint-5/trainer_state.json", 2, old, 0o644]]
            reply = {"root": "/srv", "files": files, "now": time.time(),
                     "meta": {"checkpoint-5/trainer_state.json": {"global_step": 5}}}
            if MODE == "scan-shape":
                reply["unseen"] = ["a word where [path, why, mtime] belongs"]
            if MODE == "scan-stall":  # a frame that promises 1000 bytes, brings 10, and nothing more
                OUT.write(HEADER.pack(b"J", 1000) + b'{"root": "')
                OUT.flush()
                block_forever()
            send_json(reply)
        elif op == "send":
            send_json({"ok": True, "alg": "sha1"})
            if MODE == "garbage-frame":
                send(b"Q", b"what")
            if MODE == "huge-frame":
                OUT.write(HEADER.pack(b"D", 2 << 30))  # 2 GiB announced
                OUT.flush()
                block_forever()
            if MODE == "stall-send":
                send(b"D", member("checkpoint-5/a.bin")[:700])  # part of the file, then silence
                block_forever()
            if MODE == "still-beating":  # heartbeats that report no work done
                while True:
                    send(b"K", struct.pack(">Q", 7))
                    time.sleep(0.05)
            payload = tar_for(MODE)
            for i in range(0, len(payload), 1 << 16):
                send(b"D", payload[i:i + (1 << 16)])
            if MODE == "truncated":
                OUT.flush()
                sys.exit(0)
            import hashlib
            digest = hashlib.sha1(b"y" * 4096 if MODE == "wronghash" else DATA).hexdigest()
            for f in req["files"]:
                while True:  # endless-records: the same record again and again
                    send_json({"member": f[1], "size": len(DATA), "mtime_ns": 1_700_000_000 * 10**9,
                               "mode": 0o644, "hash": digest}, b"H")
                    if MODE != "endless-records":
                        break
            while MODE == "endless-data":  # zeros after the end of the tar, never the end frame
                send(b"D", b"\0" * (1 << 16))
            send(b"E")
            send_json({"raw_bytes": len(payload), "wire_bytes": len(payload)})
        elif op == "stat":
            send_json({"stat": {p: None for p in req["paths"]}})
        elif op == "procs":  # a server whose processes cannot be seen: the settle rule decides
            send_json({"processes": [], "writing": [], "gpu": None, "blind": ["no /proc here"]})
        elif op == "bye":
            send_json({})
            return
        else:
            send_json({"kind": "unknown_op", "message": op}, b"X")


main()
