"""Receive a tar stream from the agent into local files, checked file by file against the server's hashes."""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import xxhash

from ckptsync import agent as wire
from ckptsync.errors import CkptsyncError, IntegrityError, ProtocolError
from ckptsync.progress import Reporter
from ckptsync.remote import Download
from ckptsync.store import FileRecord, io_error

CHUNK = wire.CHUNK


@dataclass
class Received:
    member: str
    size: int
    mode: int
    mtime_ns: int
    xxh3_128: str


@dataclass
class Outcome:
    received: list[Received]
    changed: dict[str, str]      # member -> what happened to it on the server


def hash_file(path: Path, alg: str = "xxh3_128", on_block: Callable[[int], None] | None = None) -> str:
    h = xxhash.xxh3_128() if alg == "xxh3_128" else wire.new_hash(alg)
    with open(path, "rb") as f:
        while True:
            block = f.read(CHUNK)
            if not block:
                break
            h.update(block)
            if on_block is not None:
                on_block(len(block))
    return h.hexdigest()


def receive(dl: Download, targets: dict[str, Path], rep: Reporter,
            on_file: Callable[[Received], None]) -> Outcome:
    """Write each expected member to its target path ("<target>.part" until confirmed).

    A member counts only once the server's record for it has arrived and its
    size and hash match what was written here; `on_file` is then called.
    Anything the server sends that was not asked for stops the transfer.
    """
    pending: list[tuple[Received, Path, str]] = []
    received: list[Received] = []
    changed: dict[str, str] = {}
    seen: set[str] = set()

    def settle(final: bool) -> None:
        still = []
        for rec, path, alg_hash in pending:
            record = dl.records.get(rec.member)
            if record is None:
                if final:
                    raise ProtocolError(f"the server sent no checksum for {rec.member}")
                still.append((rec, path, alg_hash))
                continue
            part = path.with_name(path.name + ".part")
            if record.get("changed") or record.get("error"):
                changed[rec.member] = record.get("changed") or record.get("error")
                part.unlink(missing_ok=True)
                continue
            if record.get("size") != rec.size or record.get("hash") != alg_hash:
                part.unlink(missing_ok=True)
                raise IntegrityError(f"{rec.member}: what arrived does not match the server's checksum")
            os.replace(part, path)
            received.append(rec)
            on_file(rec)
        pending[:] = still

    try:
        tar = tarfile.open(fileobj=dl, mode="r|", bufsize=CHUNK)
        for member in tar:
            name = member.name
            if name not in targets or name in seen or not member.isreg():
                raise ProtocolError(f"the server sent an unexpected tar member {name!r}")
            seen.add(name)
            path = targets[name]
            pending.append(_write_member(tar, member, path, dl.alg, rep))
            settle(final=False)
    except tarfile.TarError as exc:
        raise ProtocolError(f"broken tar stream from the server: {exc}") from None
    dl.finish()
    for member in targets:
        if member not in seen:
            record = dl.records.get(member, {})
            changed[member] = record.get("error") or "not sent by the server"
    settle(final=True)
    return Outcome(received=received, changed=changed)


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path, alg: str,
                  rep: Reporter) -> tuple[Received, Path, str]:
    hx = xxhash.xxh3_128()
    other = None if alg == "xxh3_128" else wire.new_hash(alg)
    part = path.with_name(path.name + ".part")
    src = tar.extractfile(member)
    written = 0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(part, "wb") as out:
            while True:
                block = src.read(CHUNK)
                if not block:
                    break
                hx.update(block)
                if other is not None:
                    other.update(block)
                out.write(block)
                written += len(block)
                rep.advance(len(block))
            out.flush()
            os.fsync(out.fileno())
        if written != member.size:
            raise ProtocolError(f"{member.name}: stream ended after {written} of {member.size} bytes")
        mtime_ns = int(member.pax_headers.get("ckptsync.mtime_ns", int(member.mtime) * 10**9))
        mode = member.mode & 0o7777
        os.chmod(part, mode)
        os.utime(part, ns=(mtime_ns, mtime_ns))
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise io_error(exc, f"writing {path}") from None
    except CkptsyncError:
        part.unlink(missing_ok=True)
        raise
    digest = hx.hexdigest()
    rec = Received(member=member.name, size=written, mode=mode, mtime_ns=mtime_ns, xxh3_128=digest)
    return rec, path, digest if other is None else other.hexdigest()


def to_record(rec: Received, source: str = "") -> FileRecord:
    return FileRecord(path=rec.member, size=rec.size, mode=rec.mode, mtime_ns=rec.mtime_ns,
                      xxh3_128=rec.xxh3_128, source=source)
