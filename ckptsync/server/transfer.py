"""Receive a tar stream from the agent into local files, checked file by file against the server's hashes."""

from __future__ import annotations

import contextlib
import os
import queue
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable


from ckptsync import agent as wire
from ckptsync.errors import ConnectError, IntegrityError, ProtocolError
from ckptsync.progress import Reporter
from ckptsync.server.base import Download
from ckptsync.disk import XXH3, io_error, new_hasher

CHUNK = wire.CHUNK
# A partly received file at least this large keeps its bytes when the link drops or the run is
# stopped; the next run offers them to the server, which sends only the rest when its first bytes
# hash the same. Smaller ones are cheaper to send again than to hash on both sides.
KEEP_PREFIX_MIN = 16 << 20
# Files up to this size are written and hashed by the thread that reads the stream: for an
# adapter's small files, handing each piece to the writer thread costs more than it overlaps.
SMALL_FILE = 1 << 20


@dataclass
class Received:
    member: str
    size: int
    mode: int
    mtime_ns: int
    xxh3_128: str
    skipped: int = 0     # leading bytes that were already here (a kept prefix), not sent again
    start: int | None = None   # a byte range of the file that begins here (`size` is the range's)
    file_size: int = 0         # for a range: the whole file's size as the server read it
    hashes: dict[str, str] = field(default_factory=dict)   # the server's algorithm -> its checked value, when not xxh3


@dataclass
class Span:
    """A byte range of a file whose ranges come over several channels into one `.part`."""

    start: int
    length: int
    done: int = 0        # bytes of the range written so far, from its start (a kept prefix included)


@dataclass
class Prefix:
    """The kept first bytes of a partly received file, hashed, so that the writer continues the hashes."""

    size: int
    digest: str          # in the server's algorithm: what the server compares
    xxh: Any             # xxh3_128 state after the prefix
    other: Any = None    # the server's algorithm's state, when that is not xxh3_128


def kept_prefixes(targets: dict[str, Path], alg: str, done: Iterable[Path] = ()) -> dict[str, Prefix]:
    """Hash the kept `.part` of each target that has one worth offering (the rest are dropped).

    `done`: files already complete in staging by other means (a resumed or locally placed copy);
    a `.part` beside one of those is stale and would otherwise be committed with the entry.
    """
    for path in done:
        path.with_name(path.name + ".part").unlink(missing_ok=True)
    out = {}
    for member, path in targets.items():
        part = path.with_name(path.name + ".part")
        try:
            size = part.stat().st_size
        except OSError:
            continue
        if size < KEEP_PREFIX_MIN:
            part.unlink(missing_ok=True)
            continue
        hx = new_hasher()
        other = None if alg == XXH3 else new_hasher(alg)
        with open(part, "rb") as f:
            for block in iter(lambda: f.read(CHUNK), b""):
                hx.update(block)
                if other is not None:
                    other.update(block)
        out[member] = Prefix(size, (other or hx).hexdigest(), hx, other)
    return out


def offers(prefixes: dict[str, Prefix]) -> dict[str, tuple[int, str]]:
    """What Server.send takes as `resume`."""
    return {member: (p.size, p.digest) for member, p in prefixes.items()}


def keepable(exc: BaseException, size: int) -> bool:
    """Is a partly written file worth keeping after this failure? Only an interruption keeps it:
    the bytes that arrived are what the server sent, and the next run checks them against its hash."""
    return size >= KEEP_PREFIX_MIN and isinstance(exc, (KeyboardInterrupt, ConnectError))


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
    """Hashes and writes file data on its own thread, so the disk works while the network does.
    A small file is written by the caller's thread (`now`): handing it over would cost more."""

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize=16)
        self.error: BaseException | None = None
        self.out = self.hx = self.other = None
        self.size = 0   # of the file being written
        self.folders: set[Path] = set()   # made (or found) for this transfer's files
        self.buffer = wire.direct_buffer()   # a new file's bytes go from here to the disk (agent/direct.py)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            op, arg = self.queue.get()
            if op == "stop":
                return
            self._do(op, arg)

    def _do(self, op: str, arg) -> None:
        out = self.out
        if op == "discard":
            # Queued after the file's "open": it runs once the file exists, never before.
            if out is not None and not out.closed:
                out.close()
            with contextlib.suppress(OSError):
                os.unlink(arg)
            return
        if op == "leave":
            # A range of a file other channels also write: closed, never removed here.
            if out is not None and not out.closed:
                with contextlib.suppress(OSError):
                    out.close()
            return
        if op == "keep":
            # An interrupted file: its written bytes stay for the next run, unless writing failed.
            try:
                if out is not None and not out.closed:
                    out.close()
            except OSError:
                self.error = self.error or OSError("close failed")
            if self.error is not None:
                with contextlib.suppress(OSError):
                    os.unlink(arg)
            return
        if self.error is not None:
            if op == "close":
                arg.set()
            return
        try:
            if op == "open":
                path, alg, self.result, prefix, start, self.size = arg
                if start is not None:  # a range, into a file other channels write too
                    self.out = open(path, "r+b")
                    self.out.seek(prefix.size if prefix is not None else start)
                    self.hx = prefix.xxh if prefix is not None else new_hasher()
                    self.other = prefix.other if prefix is not None else (
                        None if alg == XXH3 else new_hasher(alg))
                elif prefix is None:
                    self.out = wire.NewFile(path, self.buffer, self.size)
                    self.hx = new_hasher()
                    self.other = None if alg == XXH3 else new_hasher(alg)
                else:  # the server sends the rest of a kept prefix
                    self.out = open(path, "r+b")
                    self.out.truncate(prefix.size)
                    self.out.seek(prefix.size)
                    self.hx, self.other = prefix.xxh, prefix.other
            elif op == "data":
                self.hx.update(arg)
                if self.other is not None:
                    self.other.update(arg)
                out.write(arg)
            elif op == "close":
                out.flush()
                wire.start_writeback(out.fileno(), self.size)
                out.close()
                self.result.extend([self.hx.hexdigest(), self.other.hexdigest() if self.other is not None else None])
                arg.set()
        except BaseException as exc:  # handed to the reading thread
            self.error = exc
            if self.out is not None:
                with contextlib.suppress(OSError):  # the first error is the one to report
                    self.out.close()
            if op == "close":
                arg.set()

    def now(self, op: str, arg) -> None:
        """`put`, done by the caller's thread; only between files, when the queue is empty."""
        if self.error is not None:
            raise self.error
        self._do(op, arg)
        if self.error is not None and op != "close":   # the caller's close checks it after the wait
            raise self.error

    def put(self, op: str, arg) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((op, arg))

    def discard(self, path: Path, now: bool = False) -> None:
        """Remove a half-written file, in order with the writes already queued for it (`now`:
        one the caller's thread wrote)."""
        if now:
            self._do("discard", path)
        else:
            self.queue.put(("discard", path))

    def leave(self, path: Path) -> None:
        """Close a range's file once the writes queued for it are done; whoever split it decides its fate."""
        self.queue.put(("leave", path))

    def keep(self, path: Path) -> None:
        """Close a half-written file once the writes queued for it are done, and leave it."""
        self.queue.put(("keep", path))

    def stop(self) -> None:
        self.queue.put(("stop", None))
        self.thread.join(timeout=30)


def receive(dl: Download, targets: dict[str, Path], rep: Reporter,
            on_file: Callable[[Received], None], prefixes: dict[str, Prefix] | None = None,
            spans: dict[str, Span] | None = None) -> tuple[Outcome, int]:
    """Write each expected member to its target path ("<target>.part" until confirmed).

    A member counts only once the server's record for it has arrived and its
    size and hash match what was written here; `on_file` is then called.
    Anything the server sends that was not asked for stops the transfer.
    `prefixes`: the kept prefixes offered in the send request (see kept_prefixes);
    a member the server resumes continues after its prefix. An interruption
    keeps large partly written files for the next run. `spans`: members that
    are one byte range of their file, written at its offset into a `.part`
    that already exists; `on_file` gets each verified range (`start` set), and
    the `.part` is left in place for whoever split the file. Returns the
    outcome and the bytes that crossed the link.
    """
    prefixes = prefixes or {}
    spans = spans or {}
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
            ranged = rec.member in spans
            if record.failed:
                changed[rec.member] = record.failed
                if not ranged:
                    part.unlink(missing_ok=True)
                continue
            if record.size != rec.size or record.hash != alg_hash:
                if not ranged:
                    part.unlink(missing_ok=True)
                what = f"bytes {rec.start}-{rec.start + rec.size} of {rec.member}" if ranged else rec.member
                raise IntegrityError(f"{what}: what arrived does not match the server's checksum")
            if ranged:
                rec.file_size = record.file_size
            else:
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
            pending.append(_write_member(stream, writer, member, targets[name], dl.alg, rep, prefixes.get(name),
                                         spans.get(name)))
            settle(final=False)
        wire_bytes = dl.finish()
    except BaseException as exc:
        for rec, path, _h in pending:  # unconfirmed data is worthless, unless kept to resume; confirmed files stay
            if rec.member not in spans and not keepable(exc, rec.size):
                path.with_name(path.name + ".part").unlink(missing_ok=True)
        raise
    finally:
        writer.stop()
    for member in targets:
        if member not in seen:
            sent = dl.records.get(member)
            if sent is not None and sent.error and sent.kind not in ("", "not_found"):
                unreadable[member] = sent.error  # there, but the server's user may not read it
            else:
                changed[member] = (sent.error if sent is not None else "") or "not sent by the server"
    settle(final=True)
    return Outcome(received=received, changed=changed, unreadable=unreadable), wire_bytes


def _write_member(stream: TarStream, writer: DiskWriter, member: tarfile.TarInfo, path: Path, alg: str,
                  rep: Reporter, prefix: Prefix | None = None, span: Span | None = None) -> tuple[Received, Path, str]:
    part = path.with_name(path.name + ".part")
    offset = int(member.pax_headers.get("ckptsync.offset", 0) or 0)
    start = member.pax_headers.get("ckptsync.start")
    if (start is None) != (span is None) or (span is not None and _int(start) != span.start):
        raise ProtocolError(f"the server sent {member.name} from byte {start or 0}, which was not asked for")
    if offset and (prefix is None or prefix.size != offset or (span is not None and span.start != 0)):
        raise ProtocolError(f"the server resumed {member.name} at byte {offset}, which was not offered")
    if span is not None and offset + member.size != span.length:
        raise ProtocolError(f"the server sent {offset + member.size} bytes of {member.name} from byte "
                            f"{span.start}, not the {span.length} asked for")
    if not offset:
        prefix = None  # the server's first bytes differ from the kept ones: the whole file comes
    written = 0
    if span is not None:
        span.done = offset  # a kept prefix the server did not take is being written over
    result: list = []
    done = threading.Event()
    small = member.size <= SMALL_FILE and span is None
    put = writer.now if small else writer.put
    try:
        if path.parent not in writer.folders:
            path.parent.mkdir(parents=True, exist_ok=True)
            writer.folders.add(path.parent)
        put("open", (part, alg, result, prefix, None if span is None else span.start, offset + member.size))
        rep.advance(offset)
        for piece in stream.data(member.size):
            put("data", piece)
            written += len(piece)
            if span is not None:
                span.done = offset + written
            rep.advance(len(piece))
        put("close", done)
        done.wait()
        if writer.error is not None:
            raise writer.error
        mtime_ns = int(member.pax_headers.get("ckptsync.mtime_ns", int(member.mtime) * 10**9))
        mode = member.mode & 0o7777
        if span is None:  # a split file gets its stamps once all its ranges are in
            os.chmod(part, mode)
            os.utime(part, ns=(mtime_ns, mtime_ns))
    except OSError as exc:
        if span is not None:
            writer.leave(part)
        else:
            writer.discard(part, now=small)
        raise io_error(exc, f"writing {path}") from None
    except BaseException as exc:  # a broken stream, Ctrl+C: the writer thread may not even have opened it yet
        if span is not None:
            writer.leave(part)
        elif keepable(exc, offset + written):
            writer.keep(part)
        else:
            writer.discard(part, now=small)
        raise
    digest, other = result
    rec = Received(member=member.name, size=offset + written, mode=mode, mtime_ns=mtime_ns, xxh3_128=digest,
                   skipped=offset, start=None if span is None else span.start,
                   hashes={} if other is None or span is not None else {alg: other})
    return rec, path, digest if other is None else other


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ProtocolError(f"the server sent {value!r} where a number belongs") from None

