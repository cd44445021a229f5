"""The send operation: files out as one tar, each followed by its checksum record."""

import json
import os
import stat
import tarfile

from ckptsync.agent.direct import Prefetcher, ReadAhead
from ckptsync.agent.frames import CHUNK, Failure, os_failure, tick
from ckptsync.agent.hashing import hash_names, new_hash, unlike_listing
from ckptsync.agent.paths import resolve
from ckptsync.agent.sender import Sender
from ckptsync.agent.tar import tar_header

ABORT_WAIT = 10  # seconds for a frame already being written when a send fails


def kept_prefix(f, offset, prefix_hash, h):
    """Feed the first `offset` bytes to h; True when they hash to what the receiver holds."""
    left = offset
    while left:
        block = f.read(min(CHUNK, left))
        if not block:
            return False
        h.update(block)
        left -= len(block)
        tick()
    return h.hexdigest() == prefix_hash


def send_one(sender, chan, source, member, alg, offset=0, prefix_hash=None, start=None, length=None,
             stamp=None):
    """One file as a tar member. With an offset, the receiver holds that many bytes of an earlier
    try: when they hash alike here, only the rest is sent, and the record's hash is still the whole file's.
    With `start` and `length`, only that byte range of the file is the member (its record's hash is
    the range's; a kept prefix applies to a range that starts at 0).

    `stamp`: the listing's [size, mtime_ns, inode, ctime_ns] of the file. The fstat of the open file
    at the end of the read must equal it: then every byte sent is the listed file's, whatever happens
    to the path afterwards (a rotation may delete it the next moment). Without a stamp, the file must
    not change while read and must still be at its path afterwards."""
    record = {"member": member, "source": source}
    try:
        f = open(source, "rb", buffering=0)   # reads sized to the file: nothing to buffer
    except OSError as exc:
        failure = os_failure(exc, source)
        record["error"] = str(failure)
        record["kind"] = failure.kind
        chan_put_record(sender, record)
        return
    with f:
        before = os.fstat(f.fileno())
        size = before.st_size
        first, span = (0, size) if start is None else (start, length)
        h = new_hash(alg)
        skip = 0
        if first == 0 and 0 < offset <= span and prefix_hash:
            if kept_prefix(f, offset, prefix_hash, h):
                skip = offset
            else:
                h = new_hash(alg)
                f.seek(0)
        elif first:
            f.seek(first)
        sender.write(tar_header(member, span - skip, before.st_mtime_ns, stat.S_IMODE(before.st_mode),
                                offset=skip, start=start))
        sender.flush()  # so the file's data starts on a chunk boundary
        left = span - skip
        ahead = ReadAhead(f.fileno(), first + skip, left)
        while left:
            block = f.read(min(CHUNK, left))
            if not block:
                break
            ahead.read(len(block))
            h.update(block)
            sender.write(block)
            left -= len(block)
        if left:
            sender.write(b"\x00" * left)  # the file shrank under us: keep the tar well-formed
        grew = start is None and bool(f.read(1))
        after = os.fstat(f.fileno())
        if stamp is not None:
            why = _unlike(stamp, before, after, left, grew)
        else:
            why = _moved(source, before, after, left, grew)
        if why:
            record["changed"] = why
        pad = (-(span - skip)) % tarfile.BLOCKSIZE
        if pad:
            sender.write(b"\x00" * pad)
    record.update(size=span, mtime_ns=before.st_mtime_ns, mode=stat.S_IMODE(before.st_mode), hash=h.hexdigest(),
                  offset=skip)
    if start is not None:
        record.update(start=start, file_size=size)
    chan_put_record(sender, record)


def _unlike(stamp, before, after, left, grew):
    """Why the bytes read are not the listed file's ("" when they are)."""
    if unlike_listing(stamp, before):
        return "changed on the server since the listing"
    if left:
        return "shrank while being read"
    if grew:
        return "grew while being read"
    if unlike_listing(stamp, after):
        return "deleted while being read" if after.st_nlink == 0 else "modified while being read"
    return ""


def _moved(source, before, after, left, grew):
    """Without a listing to compare with: did the file change while read, or leave its path?"""
    if left:
        return "shrank while being read"
    why = "grew while being read" if grew else ""
    try:
        if os.stat(source).st_ino != before.st_ino:
            why = "replaced while being read"
    except OSError:
        why = "deleted while being read"
    if not why and (after.st_mtime_ns != before.st_mtime_ns or after.st_size != before.st_size):
        why = "modified while being read"
    return why


def chan_put_record(sender, record):
    sender.flush()
    sender._put(b"H", json.dumps(record).encode("utf-8"))


def _prefetch_item(root, entry):
    """(path, offset, size) of a send entry for the Prefetcher; a bad entry is (None, 0, 0): its
    own send reports it."""
    try:
        if isinstance(entry, dict):
            return resolve(root, entry["source"]), int(entry["start"]), int(entry["length"])
        stamp = entry[4] if len(entry) >= 5 else None
        return resolve(root, entry[0]), 0, int(stamp[0]) if stamp else None
    except (Failure, KeyError, IndexError, TypeError, ValueError):
        return None, 0, 0


def op_send(chan, req, memory=None):
    """Stream files as one tar: [[source relative to root or absolute, member name], ...]; an entry
    may add [..., offset, hash of the receiver's first offset bytes] to resume a partly received file
    (0, null: nothing to resume), then the listing's stamp [size, mtime_ns, inode, ctime_ns] (see
    send_one). An entry {"source", "member", "start", "length"} (and "offset", "hash", "stamp" as
    above) is one byte range of a file; a stream carries at most one range of a file, so members stay unique.

    `memory` is the connection's Memory: the next send goes on from what this one learned.
    """
    alg = req.get("alg") or hash_names()[0]
    new_hash(alg)
    root = req["root"]
    for entry in req["files"]:
        if isinstance(entry, dict) and not (int(entry["start"]) >= 0 and int(entry["length"]) >= 0):
            raise Failure("protocol", "a byte range must not be negative")
    chan.send_json({"ok": True, "alg": alg})
    sender = Sender(chan, req.get("compress", "auto"), "module", memory=memory,
                    receiver_lzma=bool(req.get("lzma", True)))
    files = req["files"]
    try:
        ahead = Prefetcher([_prefetch_item(root, entry) for entry in files])
        for i, entry in enumerate(files):
            ahead.reading(i)
            if isinstance(entry, dict):
                send_one(sender, chan, resolve(root, entry["source"]), entry["member"], alg,
                         int(entry.get("offset", 0)), entry.get("hash"), int(entry["start"]), int(entry["length"]),
                         entry.get("stamp"))
                continue
            source, member = entry[0], entry[1]
            offset, prefix_hash = (int(entry[2] or 0), entry[3]) if len(entry) >= 4 else (0, None)
            stamp = entry[4] if len(entry) >= 5 else None
            send_one(sender, chan, resolve(root, source), member, alg, offset, prefix_hash, stamp=stamp)
        sender.write(b"\x00" * (2 * tarfile.BLOCKSIZE))
    except BaseException:
        sender.abort(ABORT_WAIT)  # no frame of this stream may follow the error reply
        raise
    sender.close()
    chan.send(b"E")
    return {"raw_bytes": sender.raw_bytes, "wire_bytes": sender.wire_bytes, "chunks": sender.chunks}
