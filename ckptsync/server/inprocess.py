"""The in-process twin of a server: the real agent on a thread of this process, with fault hooks.

Tests use it to put a fault at a known point of a run (a checkpoint deleted right
after the scan, an error reply to one operation, a stream cut after N bytes)
instead of racing a timer against a transfer.
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict
import tarfile
from typing import Any, Callable, Mapping

from ckptsync.server.agent_server import AgentServer
from ckptsync.server.base import Download, Upload
from ckptsync.server.errors import from_reply
from ckptsync.server.types import FileStat, Sent
from ckptsync.transport.base import MARKER, Process, Transport

Hook = Callable[[dict], Any]


class Hooks:
    """Callables run before or after an operation, keyed by its name (scan, stat, hash, send, receive...).

    A send has three more points, all on the client's side of the stream, so each is known to have
    happened on the server: after "send" runs once the stream has ended (every file read);
    after "send_member" gets {"member"} once that member's tar header has arrived (the server has
    opened the file and is reading it: what it may have read ahead is bounded by the frames in
    flight, a few MiB); after "send_record" gets {"record"}, a `Sent`, once the file's checksum
    record has arrived (the server has finished reading it).
    """

    def __init__(self) -> None:
        self.before: dict[str, list[Hook]] = defaultdict(list)
        self.after: dict[str, list[Hook]] = defaultdict(list)

    def on_before(self, op: str, hook: Hook, times: int | None = None) -> None:
        self.before[op].append(_limited(hook, times))

    def on_after(self, op: str, hook: Hook, times: int | None = None) -> None:
        self.after[op].append(_limited(hook, times))

    def fail(self, op: str, kind: str, message: str, path: str = "", times: int | None = 1) -> None:
        """The next `times` calls of op get an error reply of this kind, as the agent would send it."""
        def hook(_args: dict) -> None:
            raise _Reply({"kind": kind, "message": message, "path": path})
        self.on_before(op, hook, times)

    def run(self, table: dict[str, list[Hook]], op: str, value: dict) -> None:
        for hook in list(table.get(op, ())):
            hook(value)


class _Reply(Exception):
    def __init__(self, payload: dict) -> None:
        super().__init__(payload.get("message", ""))
        self.payload = payload


def _limited(hook: Hook, times: int | None) -> Hook:
    if times is None:
        return hook
    left = [times]

    def once(value: dict) -> Any:
        if left[0] <= 0:
            return None
        left[0] -= 1
        return hook(value)
    return once


class _Pipes:
    def __init__(self) -> None:
        c2a_r, c2a_w = os.pipe()
        a2c_r, a2c_w = os.pipe()
        self.agent_in = os.fdopen(c2a_r, "rb")
        self.client_out = os.fdopen(c2a_w, "wb", buffering=0)
        self.client_in = os.fdopen(a2c_r, "rb", buffering=0)
        self.agent_out = os.fdopen(a2c_w, "wb")

    def close_client(self) -> None:
        for f in (self.client_out, self.client_in):
            try:
                f.close()
            except OSError:
                pass

    def mute_agent(self) -> None:
        """A read blocked on the agent ends (with what it sent so far, then EOF), even when the agent
        itself is stuck. Its end of the pipe becomes /dev/null in place (so no number is freed for
        another file to take); it still reads what was sent to it, until the client closes."""
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, self.agent_out.fileno())
        except (OSError, ValueError):
            pass
        finally:
            os.close(null)


class ThreadProcess(Process):
    """The agent's serve loop on a daemon thread, talking over two pipes."""

    def __init__(self) -> None:
        self.pipes = _Pipes()
        self.read_bytes = 0
        self.cut_at: int | None = None
        self.cut = False
        self.thread = threading.Thread(target=self._agent, daemon=True)
        self.thread.start()

    def _agent(self) -> None:
        from ckptsync.agent import Channel
        from ckptsync.agent.serve import serve

        p = self.pipes
        try:
            p.agent_out.write(b"\n" + MARKER + b"\n")
            p.agent_out.flush()
            n = int(p.agent_in.readline())
            p.agent_in.read(n)  # the payload: this twin runs the installed agent modules instead
            serve(Channel(p.agent_in, p.agent_out))
        except (OSError, ValueError):
            pass
        finally:
            for f in (p.agent_in, p.agent_out):
                try:
                    f.close()
                except OSError:
                    pass

    def cut_after(self, nbytes: int) -> None:
        """Drop the connection once `nbytes` more bytes have come from the agent."""
        self.cut_at = self.read_bytes + nbytes

    def write(self, data: bytes) -> None:
        from ckptsync.errors import ConnectError

        if self.cut:
            raise ConnectError("connection lost: the in-process link was cut")
        try:
            self.pipes.client_out.write(data)
        except (OSError, ValueError) as exc:
            raise ConnectError(f"connection lost: {exc}") from None

    def read(self, n: int) -> bytes:
        if self.cut:
            return b""
        if self.cut_at is not None:
            n = min(n, self.cut_at - self.read_bytes)
            if n <= 0:
                self.cut = True
                self.pipes.close_client()
                return b""
        try:
            block = self.pipes.client_in.read(n)
        except (OSError, ValueError):
            return b""
        self.read_bytes += len(block)
        return block

    def kill(self) -> None:
        self.cut = True
        self.pipes.mute_agent()

    def close(self) -> None:
        self.pipes.close_client()
        self.thread.join(timeout=10)


class InProcessTransport(Transport):
    """`process`: the class of the agent's end (a test's own can alter what passes)."""

    def __init__(self, process: type[ThreadProcess] = ThreadProcess) -> None:
        self.process_class = process
        self.process: ThreadProcess | None = None

    def start(self) -> Process:
        self.process = self.process_class()
        return self.process

    def describe(self) -> str:
        return "the in-process server"


_WIRE = {"dirs": "glob"}   # the agent's name of a Server method, where it differs


class InProcessServer(AgentServer):
    """An AgentServer whose agent runs on a thread here; `hooks` inject faults at known points."""

    def __init__(self, hooks: Hooks | None = None, link: InProcessTransport | None = None,
                 stall_timeout: float | None = None) -> None:
        self.link = link or InProcessTransport()  # a test's own link can alter what passes
        super().__init__(self.link, stall_timeout=stall_timeout)
        self.hooks = hooks or Hooks()

    def cut_after(self, nbytes: int) -> None:
        assert self.link.process is not None, "not open"
        self.link.process.cut_after(nbytes)

    def expect(self, calls: list[tuple[str, dict]]) -> None:
        # A hooked operation must run when it is called, not ahead: the calls before it only.
        ahead = []
        for method, kwargs in calls:
            if any(self.hooks.before.get(op) or self.hooks.after.get(op) for op in (method, _WIRE.get(method))):
                break
            ahead.append((method, kwargs))
        super().expect(ahead)

    def _call(self, op: str, **args) -> dict:
        if self.hooks.before.get(op) or self.hooks.after.get(op):
            self.remote.drop_expected()   # hooked after the requests were sent ahead: they are dropped
        self._before(op, args)
        reply = super()._call(op, **args)
        self.hooks.run(self.hooks.after, op, {"args": args, "reply": reply})
        return reply

    def _before(self, op: str, args: dict) -> None:
        try:
            self.hooks.run(self.hooks.before, op, args)
        except _Reply as exc:
            raise from_reply(exc.payload, self.describe()) from None

    def send(self, root: str, pairs: list[tuple[str, str]], compress: str = "auto",
             resume: dict[str, tuple[int, str]] | None = None,
             ranges: dict[str, tuple[int, int]] | None = None,
             listed: Mapping[str, FileStat] | None = None) -> Download:
        args = {"root": root, "pairs": pairs, "compress": compress, "resume": resume, "ranges": ranges,
                "listed": listed}
        self._before("send", args)
        return _Tapped(super().send(root, pairs, compress, resume, ranges, listed), self.hooks, args)

    def receive(self, root: str, name: str, compress: str = "auto") -> Upload:
        self._before("receive", {"root": root, "name": name, "compress": compress})
        return super().receive(root, name, compress)


class _Tapped(Download):
    """A send's stream as the client reads it, running the send hooks at their points."""

    def __init__(self, dl: Download, hooks: Hooks, args: dict) -> None:
        self.dl, self.hooks, self.args = dl, hooks, args
        self.alg = dl.alg
        self.tar = _TarFollower()
        self.told: set[str] = set()

    @property
    def records(self) -> dict[str, Sent]:  # type: ignore[override]
        return self.dl.records

    def read(self, n: int = -1) -> bytes:
        data = self.dl.read(n)
        for member in self.tar.feed(data):
            self.hooks.run(self.hooks.after, "send_member", {"member": member})
        self._records()
        return data

    def finish(self) -> int:
        wire_bytes = self.dl.finish()
        self._records()
        self.hooks.run(self.hooks.after, "send", {"args": self.args, "reply": {"wire_bytes": wire_bytes}})
        return wire_bytes

    def _records(self) -> None:
        for member, record in list(self.dl.records.items()):
            if member not in self.told:
                self.told.add(member)
                self.hooks.run(self.hooks.after, "send_record", {"record": record})


class _TarFollower:
    """Follows a tar stream fed in pieces; feed() returns the members whose header just completed."""

    def __init__(self) -> None:
        self.head = bytearray()
        self.skip = 0              # data bytes (with padding) of the current member still to pass
        self.extended: bytearray | None = None   # a PAX or long-name header's data being collected
        self.want = 0
        self.name = ""             # from a PAX or long-name header, for the next member
        self.size: int | None = None   # from a PAX header, for the next member
        self.kind = b""
        self.ended = False

    def feed(self, data: bytes) -> list[str]:
        found, i = [], 0
        while i < len(data) and not self.ended:
            if self.skip:
                step = min(self.skip, len(data) - i)
                if self.extended is not None:
                    self.extended += data[i:i + step]
                self.skip -= step
                i += step
                if not self.skip and self.extended is not None:
                    self._extended(bytes(self.extended[:self.want]))
                    self.extended = None
                continue
            step = min(tarfile.BLOCKSIZE - len(self.head), len(data) - i)
            self.head += data[i:i + step]
            i += step
            if len(self.head) == tarfile.BLOCKSIZE:
                block, self.head = bytes(self.head), bytearray()
                member = self._header(block)
                if member:
                    found.append(member)
        return found

    def _header(self, block: bytes) -> str:
        if block == bytes(tarfile.BLOCKSIZE):
            self.ended = True
            return ""
        info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        extended = info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME)
        size = info.size if extended or self.size is None else self.size
        self.skip = size + (-size % tarfile.BLOCKSIZE)
        if extended:
            self.extended, self.want, self.kind = bytearray(), info.size, info.type
            if not self.skip:
                self._extended(b"")
                self.extended = None
            return ""
        name, self.name, self.size = self.name or info.name, "", None
        return name

    def _extended(self, data: bytes) -> None:
        if self.kind == tarfile.GNUTYPE_LONGNAME:
            self.name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            return
        from ckptsync.agent import parse_pax

        pax = parse_pax(data)
        if "path" in pax:
            self.name = pax["path"]
        if "size" in pax:
            self.size = int(pax["size"])
