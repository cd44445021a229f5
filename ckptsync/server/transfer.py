"""Receive a tar stream from the agent into local files, checked file by file against the server's hashes."""

from __future__ import annotations

import contextlib
import os
import queue
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import xxhash

from ckptsync import agent as wire
from ckptsync.errors import CkptsyncError, IntegrityError, ProtocolError
from ckptsync.progress import Reporter
from ckptsync.server.base import Download
from ckptsync.store import io_error

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
    unreadable: dict[str, str] = field(default_factory=dict)   # member -> why the server could not read it


class TarStream(wire.TarStream):
    """The agent's tar reader, raising the client's error type."""

    def members(self):
        try:
            yield from super().members()
        except wire.Failure as exc:
            raise ProtocolError(exc.message) from None

    def data(self, size: int):
        try:
            yield from super().data(size)
        except wire.Failure as exc:
            raise ProtocolError(exc.message) from None


class DiskWriter:
    """Hashes and writes file data on its own thread, so the disk works while the network does."""

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize=16)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        out = hx = other = None
        while True:
            op, arg = self.queue.get()
            if op == "stop":
                return
            if op == "discard":
                # Queued after the file's "open": it runs once the file exists, never before.
                if out is not None and not out.closed:
                    out.close()
                with contextlib.suppress(OSError):
                    os.unlink(arg)
                continue
            if self.error is not None:
                if op == "close":
                    arg.set()
                continue
            try:
                if op == "open":
                    path, alg, self.result = arg
                    out = open(path, "wb")
                    hx = xxhash.xxh3_128()
                    other = None if alg == "xxh3_128" else wire.new_hash(alg)
                elif op == "data":
                    hx.update(arg)
                    if other is not None:
                        other.update(arg)
                    out.write(arg)
                elif op == "close":
                    out.flush()
                    wire.start_writeback(out.fileno())
                    out.close()
                    self.result.extend([hx.hexdigest(), other.hexdigest() if other is not None else None])
                    arg.set()
            except BaseException as exc:  # handed to the reading thread
                self.error = exc
                if out is not None:
                    out.close()
                if op == "close":
                    arg.set()

    def put(self, op: str, arg) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((op, arg))

    def discard(self, path: Path) -> None:
        """Remove a half-written file, in order with the writes already queued for it."""
        self.queue.put(("discard", path))

    def stop(self) -> None:
        self.queue.put(("stop", None))
        self.thread.join(timeout=30)


def receive(dl: Download, targets: dict[str, Path], rep: Reporter,
            on_file: Callable[[Received], None]) -> tuple[Outcome, int]:
    """Write each expected member to its target path ("<target>.part" until confirmed).

    A member counts only once the server's record for it has arrived and its
    size and hash match what was written here; `on_file` is then called.
    Anything the server sends that was not asked for stops the transfer.
    Returns the outcome and the bytes that crossed the link.
    """
    pending: list[tuple[Received, Path, str]] = []
    received: list[Received] = []
    changed: dict[str, str] = {}
    unreadable: dict[str, str] = {}
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

    writer = DiskWriter()
    try:
        stream = TarStream(dl)
        for member in stream.members():
            name = member.name
            if name not in targets or name in seen or not member.isreg():
                raise ProtocolError(f"the server sent an unexpected tar member {name!r}")
            seen.add(name)
            pending.append(_write_member(stream, writer, member, targets[name], dl.alg, rep))
            settle(final=False)
        wire_bytes = dl.finish()
    except BaseException:
        for _rec, path, _h in pending:  # unconfirmed data is worthless; confirmed files stay
            path.with_name(path.name + ".part").unlink(missing_ok=True)
        raise
    finally:
        writer.stop()
    for member in targets:
        if member not in seen:
            record = dl.records.get(member, {})
            if record.get("error") and record.get("kind") not in (None, "not_found"):
                unreadable[member] = record["error"]  # there, but the server's user may not read it
            else:
                changed[member] = record.get("error") or "not sent by the server"
    settle(final=True)
    return Outcome(received=received, changed=changed, unreadable=unreadable), wire_bytes


def _write_member(stream: TarStream, writer: DiskWriter, member: tarfile.TarInfo, path: Path, alg: str,
                  rep: Reporter) -> tuple[Received, Path, str]:
    part = path.with_name(path.name + ".part")
    written = 0
    result: list = []
    done = threading.Event()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        writer.put("open", (part, alg, result))
        for piece in stream.data(member.size):
            writer.put("data", piece)
            written += len(piece)
            rep.advance(len(piece))
        writer.put("close", done)
        done.wait()
        if writer.error is not None:
            raise writer.error
        mtime_ns = int(member.pax_headers.get("ckptsync.mtime_ns", int(member.mtime) * 10**9))
        mode = member.mode & 0o7777
        os.chmod(part, mode)
        os.utime(part, ns=(mtime_ns, mtime_ns))
    except OSError as exc:
        writer.discard(part)
        raise io_error(exc, f"writing {path}") from None
    except BaseException:  # a broken stream, Ctrl+C: the writer thread may not even have opened it yet
        writer.discard(part)
        raise
    digest, other = result
    rec = Received(member=member.name, size=written, mode=mode, mtime_ns=mtime_ns, xxh3_128=digest)
    return rec, path, digest if other is None else other

