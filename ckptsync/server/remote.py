"""The client side of the agent protocol: start the agent, call operations, stream tar both ways."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from typing import Any, BinaryIO, Callable

from ckptsync import agent as wire
from ckptsync.agent.codec import lzma
from ckptsync.agent.direct import ReadAhead
from ckptsync.disk import new_hasher
from ckptsync.errors import ConnectError, IntegrityError, ProtocolError, Stalled
from ckptsync.ratelimit import RateLimiter
from ckptsync.server.base import Download as DownloadBase, Upload as UploadBase, range_key
from ckptsync.server.errors import from_reply
from ckptsync.server.types import Arrived, Sent
from ckptsync.policy import STALL_ENV, STALL_TIMEOUT
from ckptsync.server.watchdog import READ, WRITE, Watchdog
from ckptsync.transport import Process, Transport
from ckptsync.transport.base import MARKER, NO_PYTHON

MAX_FRAME = 64 << 20
READ_BLOCK = 64 << 10   # what a small read asks the process for
MAX_NOISE = 256 << 10
MAX_TRAILING = 4 << 20  # data after the end of a tar stream: its last padding, never more
START_TIMEOUT = 60.0
ABORT_WAIT = 5.0    # seconds for an abandoned upload's frame in flight before the link is killed
KILLED_WAIT = 10.0  # then for the writer to see its write fail
CHUNK = wire.CHUNK
HAVE_LZMA = lzma is not None   # whether this end unpacks lzma lanes, told to a sending server


class _Pipe:
    """File-like adapter over a Process, with a buffer of bytes read ahead.

    A small read asks the process for a whole block: the frames of many small files then cost a
    few system calls instead of two each (a header, then a body). Bytes read past the start
    marker wait there too (`push`). Every read and write is timed by the watchdog; once it has
    ended the link, they raise `stalled()`.
    """

    def __init__(self, proc: Process, limiter: RateLimiter | None, watch: Watchdog,
                 stalled: Callable[[], Stalled]) -> None:
        self.proc = proc
        self.head = b""   # bytes read ahead; the next read starts at self.pos
        self.pos = 0
        self.limiter = limiter  # --bwlimit: both directions share it
        self.watch = watch
        self.stalled = stalled

    def push(self, data: bytes) -> None:
        """Bytes already read from the process that the next reads return first."""
        self.head, self.pos = bytes(data) + self.head[self.pos:], 0

    def read(self, n: int) -> bytes:
        if self.pos < len(self.head):
            out = self.head[self.pos:self.pos + n]
            self.pos += len(out)
            return out
        block = self._read(max(n, READ_BLOCK))
        if len(block) <= n:
            return block
        self.head, self.pos = block, n
        return block[:n]

    def _read(self, n: int) -> bytes:
        block = b""
        self.watch.begin(READ)
        try:
            block = self.proc.read(n)
        finally:
            self.watch.end(READ, bool(block))
        if self.watch.fired:
            raise self.stalled()
        if self.limiter is not None:
            self.limiter.take(len(block))  # reading later makes the sender wait: the link stays at the rate
        return block

    def readinto(self, buf: memoryview) -> int:
        if self.pos < len(self.head):
            n = min(len(buf), len(self.head) - self.pos)
            buf[:n] = self.head[self.pos:self.pos + n]
            self.pos += n
            return n
        got = 0
        self.watch.begin(READ)
        try:
            got = self.proc.readinto(buf)
        finally:
            self.watch.end(READ, got > 0)
        if self.watch.fired:
            raise self.stalled()
        if self.limiter is not None:
            self.limiter.take(got)
        return got

    def write(self, data: bytes) -> None:
        if self.limiter is not None:
            self.limiter.take(len(data))
        # One write is at most a frame (about 1 MiB): on any link worth using it ends well inside the limit.
        self.watch.begin(WRITE)
        done = False
        try:
            self.proc.write(data)
            done = True
        except ConnectError:
            if self.watch.fired:
                raise self.stalled() from None
            raise
        finally:
            self.watch.end(WRITE, done)
        if self.watch.fired:
            raise self.stalled()

    def flush(self) -> None:
        self.proc.flush()


class _Channel(wire.Channel):
    """The agent's framing, with a size limit: a broken server must not make us allocate gigabytes.

    Heartbeat frames (`K`, numbered) are taken here: their bytes are what keeps the watchdog quiet
    while the server works without sending anything else.
    """

    beats = -1

    def recv(self):
        while True:
            head = self._exact(wire.HEADER.size)
            if head is None:
                return None, None
            kind, size = wire.HEADER.unpack(head)
            if size > MAX_FRAME:
                raise wire.Failure("protocol", f"frame of {size} bytes is larger than allowed")
            body = self._exact(size) if size else b""
            if body is None:
                raise wire.Failure("protocol", "connection closed mid-frame")
            if kind != wire.BEAT:
                return kind, body
            if len(body) != wire.BEAT_COUNT.size or wire.BEAT_COUNT.unpack(body)[0] <= self.beats:
                raise wire.Failure("protocol", "a heartbeat that reports no progress")
            self.beats = wire.BEAT_COUNT.unpack(body)[0]


def _raise(payload: dict, where: str) -> None:
    raise from_reply(payload, where)


STDERR_WAIT = 2.0  # seconds, at most, for the last of stderr after the stream ended
# Requests the server answers without reading a file or walking a tree: the time each takes to
# come back is the link's round trip, and a run that made a few needs no ping to learn it.
QUICK_OPS = frozenset(("ping", "stat", "df", "lock", "unlock", "staged", "mkdir"))


class Remote:
    """A started agent. Use as a context manager."""

    def __init__(self, transport: Transport, limiter: RateLimiter | None = None,
                 stall_timeout: float = STALL_TIMEOUT) -> None:
        self.transport = transport
        self.limiter = limiter
        self.stall_timeout = stall_timeout
        self.watch: Watchdog | None = None
        self.proc: Process | None = None
        self.chan: _Channel | None = None
        self.hello: dict[str, Any] = {}
        self.busy = False
        self.sender: wire.Sender | None = None  # an upload's writer thread, while it may write
        self.memory = wire.Memory()  # what this connection's uploads learned of the link
        # Requests sent ahead, in order, whose replies are still in the stream (see expect).
        self.expected: deque[tuple[str, dict]] = deque()
        self._sent_at: deque[float] = deque()   # when each of expected went out
        self.round_trips = 0      # waits for the server: its start, then each reply to something just sent
        self.quick_answers: list[float] = []   # seconds each request of QUICK_OPS took to come back
        self._sent = False        # a request went out since the last frame was read
        self._aborted = False     # abort() came, maybe before open() had a process to end

    # -------------------------------------------------- lifecycle

    def __enter__(self) -> "Remote":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close(polite=exc[0] is None)

    def describe(self) -> str:
        return self.transport.describe()

    def open(self, first: list[tuple[str, dict]] | None = None) -> None:
        """Start the agent; `first`: requests sent with the hello, so that their answers come in the
        same round trip (see expect)."""
        self.memory = wire.Memory()  # a new connection may be another link
        self.proc = self.transport.connect()   # the agent's source already on its input
        if self._aborted:   # abort() found no process yet: the open ends at the marker's wait
            self.proc.kill()
        self.watch = Watchdog(self.stall_timeout, self.abort)
        pipe = _Pipe(self.proc, self.limiter, self.watch, self.stalled)
        self.chan = _Channel(pipe, pipe)
        self.watch.start()
        # The hello and the first requests go out behind the source, before the server has
        # answered: their replies follow its marker, in the round trip of the start itself.
        unsent: ConnectError | None = None
        try:
            self._send("hello", {"beat": self.watch.beat_every})
            for op, args in first or ():
                self._send_ahead(op, args)
        except ConnectError as exc:   # a process already gone: the wait for its marker says why
            unsent = exc
        timer = threading.Timer(START_TIMEOUT, self.proc.close)
        timer.daemon = True
        timer.start()
        try:
            self._await_marker(pipe)
        except ConnectError:
            self.watch.close()
            raise
        finally:
            timer.cancel()
        self._sent = False   # what went out with the source is answered in the start's round trip
        try:
            if unsent is not None:
                raise unsent
            self.hello = self.reply()
        except Stalled:
            self.watch.close()
            raise
        except (ConnectError, wire.Failure) as exc:
            self.watch.close()
            raise ConnectError(f"the agent did not start on {self.describe()}: {exc}") from None
        if self.hello.get("protocol") != wire.PROTOCOL:
            raise ConnectError(f"the agent on {self.describe()} speaks protocol {self.hello.get('protocol')}")

    def _await_marker(self, pipe: _Pipe) -> None:
        seen = b""
        while True:
            block = self.proc.read(65536)
            if not block:
                err = self.proc.stderr_text()
                if NO_PYTHON in err:
                    raise ConnectError(f"{self.describe()}: no python3 on the server (ckptsync needs Python 3.8+ there)")
                last = err.splitlines()[-1] if err else "the connection closed"
                raise ConnectError(f"could not start the agent on {self.describe()}: {last}")
            seen += block
            at = seen.find(MARKER + b"\n")
            if at >= 0 and (at == 0 or seen[at - 1 : at] == b"\n"):
                pipe.push(seen[at + len(MARKER) + 1 :])
                self.round_trips += 1
                return
            if len(seen) > MAX_NOISE:
                raise ConnectError(f"could not start the agent on {self.describe()}: too much output before it started")

    def stalled(self) -> Stalled:
        """The error of a link the watchdog ended."""
        what = "the server took no data" if self.watch is not None and self.watch.fired == WRITE \
            else "no data from the server"
        return Stalled(f"{what} for {self.stall_timeout:g} s; ended the connection to {self.describe()} "
                       "(its agent stopped, its disk hung, or the link dead)",
                       hint=f"a server that is only slow: raise stall_timeout in the config or {STALL_ENV}")

    def lost(self, detail: str) -> ConnectError:
        """The error of a link that failed while writing: the watchdog's, when it ended the link."""
        if self.watch is not None and self.watch.fired:
            return self.stalled()
        return ConnectError(f"connection to {self.describe()} lost: {detail}")

    def close(self, polite: bool = True) -> None:
        if self.watch is not None:
            self.watch.close()
        if self.proc is None:
            return
        if polite and self.chan is not None and not self.busy:
            try:
                self._send("bye", {})  # no need to wait for the answer (nor those expected): saves a round trip
            except Exception:
                pass
        proc, self.proc = self.proc, None
        sender, self.sender = self.sender, None
        if sender is not None and not sender.abort(ABORT_WAIT):
            proc.kill()  # a write stalled on a dead link fails once the peer is gone
            sender.abort(KILLED_WAIT)
        try:
            proc.close()
            self.transport.close()
        except Exception:  # closing a broken link must not hide why it broke, nor fail finished work
            pass
        finally:
            self._aborted = False   # closed: a later open() is a new link

    # -------------------------------------------------- requests

    def _recv(self) -> tuple[bytes, bytes]:
        if self._sent:
            self.round_trips += 1
            self._sent = False
        try:
            kind, body = self.chan.recv()
        except wire.Failure as exc:
            raise ProtocolError(f"{self.describe()}: {exc.message}{self._last_words()}") from None
        if kind is None:
            raise ConnectError(f"connection to {self.describe()} closed{self._last_words()}")
        return kind, body

    def _last_words(self) -> str:
        """What the server's side wrote on stderr before the stream ended (a traceback's last line,
        ssh's reason), so that a cut stream says why."""
        # The stream has ended, so stderr ends too: the wait is only for its last bytes.
        err = self.proc.stderr_text(wait=STDERR_WAIT) if self.proc is not None else ""
        return f" ({err.splitlines()[-1].strip()})" if err.strip() else ""

    def _json(self, body: bytes) -> dict:
        try:
            value = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ProtocolError(f"{self.describe()}: the agent sent something that is not JSON") from None
        if not isinstance(value, dict):
            raise ProtocolError(f"{self.describe()}: the agent sent an unexpected reply")
        return value

    def request(self, op: str, **args: Any) -> None:
        if self.expected:
            self.drop_expected()
        self._send(op, args)

    def _send(self, op: str, args: dict) -> None:
        try:
            self.chan.send_json({"op": op, **args})
        except (OSError, wire.Failure) as exc:
            raise self.lost(str(exc)) from None
        self._sent = True

    def expect(self, requests: list[tuple[str, dict]]) -> None:
        """Send `requests` now, in order, without waiting: each reply waits in the stream until
        `call` asks for exactly that request, so that they cost one round trip together. A call of
        anything else first reads and drops what is left of them: the server then ran requests
        that only read, and the call is answered as if they had not been sent."""
        if list(self.expected)[:len(requests)] == requests:
            return  # already on their way
        self.drop_expected()
        for op, args in requests:
            self._send_ahead(op, args)

    def tell(self, op: str, args: dict) -> None:
        """Send a request without waiting for its answer: the next call reads and drops it, and a
        close does not read it at all. For a request whose failure changes nothing for the run."""
        self._send_ahead(op, args)

    def _send_ahead(self, op: str, args: dict) -> None:
        self._send(op, args)
        self.expected.append((op, args))
        self._sent_at.append(time.monotonic())

    def drop_expected(self) -> None:
        while self.expected:
            self.expected.popleft()
            self._sent_at.popleft()
            kind, _body = self._recv()
            if kind not in (b"J", b"X"):
                raise ProtocolError(f"{self.describe()}: expected a reply, got frame {kind!r}")

    def reply(self) -> dict:
        kind, body = self._recv()
        if kind == b"X":
            _raise(self._json(body), self.describe())
        if kind != b"J":
            raise ProtocolError(f"{self.describe()}: expected a reply, got frame {kind!r}")
        return self._json(body)

    def call(self, op: str, **args: Any) -> dict:
        if self.expected and self.expected[0] == (op, args):
            self.expected.popleft()   # sent ahead: its reply is the next in the stream
            start = self._sent_at.popleft()
        else:
            start = time.monotonic()
            self.request(op, **args)
        out = self.reply()
        if op in QUICK_OPS:   # one read later than it came back only counts as a longer round trip
            self.quick_answers.append(time.monotonic() - start)
        return out

    # -------------------------------------------------- abilities

    @property
    def hashes(self) -> list[str]:
        return list(self.hello.get("hashes", ["sha1"]))

    @property
    def best_hash(self) -> str:
        return self.hashes[0]

    @property
    def zstd(self) -> str | None:
        return self.hello.get("zstd")

    # -------------------------------------------------- streams

    def download(self, root: str, pairs: list[tuple[str, str]], *, compress: str = "auto",
                 resume: dict[str, tuple[int, str]] | None = None,
                 ranges: dict[str, tuple[int, int]] | None = None,
                 stamps: dict[str, list[int]] | None = None) -> "Download":
        return Download(self, root, pairs, compress, resume or {}, ranges or {}, stamps or {})

    def abort(self) -> None:
        """End the peer from any thread; whoever reads from the link then gets end of stream. Before
        open() has started the process, the open ends as soon as it has."""
        self._aborted = True
        proc = self.proc
        if proc is not None:
            proc.kill()

    def upload(self, root: str, name: str, *, compress: str = "auto") -> "Upload":
        return Upload(self, root, name, compress)


def _fd(f: BinaryIO) -> int | None:
    """The descriptor of a file object, None for one in memory."""
    try:
        return f.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _entry(source: str, member: str, kept: tuple[int, str] | None, span: tuple[int, int] | None,
           stamp: list[int] | None) -> Any:
    """One file of a send request: [source, member], plus [offset, hash] to resume and the listing's
    stamp to check the read against; a byte range as an object."""
    if span is None:
        if stamp is not None:
            return [source, member, *(kept or (0, None)), stamp]
        return [source, member, *kept] if kept else [source, member]
    entry = {"source": source, "member": member, "start": span[0], "length": span[1]}
    if kept:
        entry.update(offset=kept[0], hash=kept[1])
    if stamp is not None:
        entry["stamp"] = stamp
    return entry


_SENT_INTS = ("size", "mtime_ns", "mode", "offset", "file_size")
_SENT_TEXTS = ("hash", "changed", "error", "kind")


def sent_record(record: dict) -> Sent | None:
    """An `H` record of the agent (see agent/send.py) as a value; None when a field has the wrong type."""
    ints = {k: record.get(k) or 0 for k in _SENT_INTS}
    texts = {k: record.get(k) or "" for k in _SENT_TEXTS}
    start = record.get("start")
    if not all(type(v) is int for v in ints.values()) or not all(isinstance(v, str) for v in texts.values()) \
            or not (start is None or type(start) is int):
        return None
    return Sent(member=str(record["member"]), start=start, **ints, **texts)


class Download(DownloadBase):
    """The tar bytes of `send`, readable as a file; per-file records arrive in `records`."""

    def __init__(self, remote: Remote, root: str, pairs: list[tuple[str, str]], compress: str,
                 resume: dict[str, tuple[int, str]], ranges: dict[str, tuple[int, int]],
                 stamps: dict[str, list[int]]) -> None:
        self.remote = remote
        self.records: dict[str, Sent] = {}
        self.members = {member for _src, member in pairs}
        self.alg = remote.best_hash
        files = [_entry(src, member, resume.get(member), ranges.get(member), stamps.get(member))
                 for src, member in pairs]
        remote.request("send", root=root, files=files, compress=compress, alg=self.alg, lzma=HAVE_LZMA)
        remote.reply()
        remote.busy = True
        self.reader = wire.FrameReader(remote.chan, other=self._other)
        self.stats: dict = {}

    def _other(self, kind: bytes, body: bytes) -> None:
        if kind == b"H":
            record = self.remote._json(body)
            member = record.get("member")
            if not isinstance(member, str) or member not in self.members or member in self.records:
                # one each, for what was asked: an endless stream of them is refused
                raise ProtocolError(f"{self.remote.describe()}: a checksum record for {member!r}, "
                                    "which was not asked for or came twice")
            sent = sent_record(record)
            if sent is None:
                raise ProtocolError(f"{self.remote.describe()}: a malformed checksum record for {member!r}")
            self.records[member] = sent
        elif kind == b"X":
            self.remote.busy = False
            _raise(self.remote._json(body), self.remote.describe())
        else:
            raise ProtocolError(f"{self.remote.describe()}: unexpected frame {kind!r} in a transfer")

    def read(self, n: int = -1) -> bytes:
        try:
            return self.reader.read(n)
        except wire.Failure as exc:
            raise ProtocolError(f"{self.remote.describe()}: {exc.message}") from None
        except Exception as exc:
            if type(exc).__name__ == "ZstdError":
                raise ProtocolError(f"{self.remote.describe()}: corrupt compressed data: {exc}") from None
            raise

    def finish(self) -> int:
        try:
            self.reader.drain(MAX_TRAILING)
        except wire.Failure as exc:
            raise ProtocolError(f"{self.remote.describe()}: {exc.message}") from None
        self.remote.busy = False
        self.stats = self.remote.reply()
        try:
            return int(self.stats.get("wire_bytes", 0))
        except (TypeError, ValueError):
            return 0


class Upload(UploadBase):
    """Send files as a tar into a staging directory on the server; `finish` returns its hashes."""

    def __init__(self, remote: Remote, root: str, name: str, compress: str) -> None:
        self.remote = remote
        self.alg = remote.best_hash
        remote.request("receive", root=root, name=name, alg=self.alg)
        self.info = remote.reply()
        remote.busy = True
        self.sender = wire.Sender(remote.chan, compress, remote.zstd, memory=remote.memory,
                                  receiver_lzma=bool(remote.hello.get("lzma", True)))
        remote.sender = self.sender
        self.sent: dict[str, str] = {}

    def add(self, member: str, f: BinaryIO, size: int, mtime_ns: int, mode: int,
            also: Callable[[bytes], None] | None = None, offset: int = 0) -> str:
        """Stream one file; returns the hash (in the server's algorithm) of what was read."""
        self.sent[member] = self._stream(member, f, wire.tar_header(member, size - offset, mtime_ns, mode,
                                                                    offset=offset), offset, size - offset, also)
        return self.sent[member]

    def add_range(self, member: str, f: BinaryIO, start: int, length: int, mtime_ns: int, mode: int,
                  also: Callable[[bytes], None] | None = None) -> str:
        f.seek(start)
        key = range_key(member, start)
        self.sent[key] = self._stream(member, f, wire.tar_header(member, length, mtime_ns, mode, start=start),
                                      0, length, also)
        return self.sent[key]

    def _stream(self, member: str, f: BinaryIO, header: bytes, hashed: int, length: int,
                also: Callable[[bytes], None] | None) -> str:
        """A tar member from f: `hashed` bytes only read and hashed (a kept prefix), then `length`
        bytes sent; returns the hash of everything read."""
        self._write(header)
        try:
            self.sender.flush()  # file data then starts on a chunk boundary and is sent without copies
        except wire.Failure as exc:
            raise self.remote.lost(exc.message) from None
        h = new_hasher(self.alg)
        ahead = ReadAhead(_fd(f), f.tell(), hashed + length)
        for n, send in ((hashed, False), (length, True)):
            left = n
            while left:
                block = f.read(min(CHUNK, left))
                if not block:
                    raise IntegrityError(f"{member}: file shrank while being sent")
                ahead.read(len(block))
                h.update(block)
                if also is not None:
                    also(block)
                if send:
                    self._write(block)
                left -= len(block)
        pad = (-length) % 512
        if pad:
            self._write(b"\x00" * pad)
        return h.hexdigest()

    def _write(self, data: bytes) -> None:
        try:
            self.sender.write(data)
        except wire.Failure as exc:
            raise self.remote.lost(exc.message) from None

    @property
    def wire_bytes(self) -> int:
        return self.sender.wire_bytes

    def finish(self) -> dict[str, Arrived]:
        try:
            self._write(b"\x00" * 1024)
            self.sender.close()
            self.remote.sender = None
            self.remote.chan.send(b"E")
        except (wire.Failure, OSError) as exc:
            raise self.remote.lost(str(exc)) from None
        self.remote.busy = False
        reply = self.remote.reply()
        arrived = {}
        try:
            for x in reply.get("files") or []:
                key = str(x["member"]) if x.get("start") is None else range_key(str(x["member"]), int(x["start"]))
                arrived[key] = Arrived(str(x["member"]), int(x["size"]), str(x["hash"]))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ProtocolError(f"{self.remote.describe()}: malformed reply to receive") from None
        return arrived
