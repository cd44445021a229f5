"""The one interface between core code and a server: typed methods, typed answers, typed errors."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterable, Iterator, Mapping

from ckptsync.errors import CkptsyncError, UsageError
from ckptsync.transport.base import OPENSSH_WINDOW
from ckptsync.server.types import (
    Arrived, Changes, Committed, FileStat, Held, Hello, Listing, Probe, Procs, Sent, Space, Staged, Stats,
)


@dataclass
class Hashes:
    alg: str
    values: dict[str, str] = field(default_factory=dict)   # path -> hex digest
    errors: dict[str, str] = field(default_factory=dict)   # path -> why it could not be read

    def get(self, path: str) -> str | None:
        return self.values.get(path)


@dataclass
class Moved:
    """One item of a transfer between the server and a presigned URL: what the bucket answered
    (`etag`), the MD5 and hash of the bytes moved, or why it failed (`error`, `message`)."""

    etag: str = ""
    md5: str = ""
    hash: str = ""
    size: int = 0
    error: str = ""
    message: str = ""



class Download(ABC):
    """The tar bytes of checkpoint files coming from the server; per-file checks arrive in `records`."""

    alg: str
    records: dict[str, Sent]      # member -> what the server said of it once read

    @abstractmethod
    def read(self, n: int = -1) -> bytes: ...

    @abstractmethod
    def finish(self) -> int:
        """Drain the stream; returns the bytes that crossed the link (after compression)."""


class Upload(ABC):
    """Files going into a staging directory on the server."""

    @abstractmethod
    def add(self, member: str, f: BinaryIO, size: int, mtime_ns: int, mode: int,
            also: Callable[[bytes], None] | None = None, offset: int = 0) -> str:
        """Send one file; returns its hash in the server's algorithm. `offset`: the staging already
        holds that many of its first bytes (checked by hash): they are read and hashed, not sent."""

    @abstractmethod
    def add_range(self, member: str, f: BinaryIO, start: int, length: int, mtime_ns: int, mode: int,
                  also: Callable[[bytes], None] | None = None) -> str:
        """Send bytes start..start+length of one file, written at that offset into its staged
        `.part` (other channels send its other ranges); returns the range's hash. Server.assemble
        finishes the file."""

    @abstractmethod
    def finish(self) -> dict[str, Arrived]:
        """What arrived: member -> Arrived; a byte range under range_key(member, start)."""

    @property
    @abstractmethod
    def wire_bytes(self) -> int: ...


def range_key(member: str, start: int) -> str:
    return f"{member}@{start}"


class Server(ABC):
    """A started agent on one server. Use as a context manager."""

    hello: Hello

    def __enter__(self) -> "Server":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close(polite=exc[0] is None)

    @abstractmethod
    def open(self) -> None: ...

    @abstractmethod
    def close(self, polite: bool = True) -> None: ...

    @abstractmethod
    def describe(self) -> str: ...

    def round_trip(self) -> float:
        """Seconds one request takes to come back; a server on this machine answers at once."""
        return 0.0

    def expect(self, calls: list[tuple[str, dict]]) -> None:
        """The calls core makes next, in order, each (method, keyword arguments): `scan`, `procs`,
        `dirs`, `stat`, `staged` and `df`, which only read. A server across a link sends them at once (with its start,
        when called before open()) and answers each from what came back: one round trip for all.
        Any other call first drops what is left of them. A server on this machine has nothing to save."""

    @property
    def round_trips(self) -> int:
        """How many times this connection waited for the server: its start, then each answer to
        requests just sent (requests sent together wait once)."""
        return 0

    @property
    def window(self) -> int:
        """Bytes one channel may have in flight before the other end grants more."""
        return OPENSSH_WINDOW

    @property
    def rate_limit(self) -> int | None:
        """--bwlimit in bytes/s, when the link is held to one."""
        return None

    def use_connection(self, lane: int) -> None:
        """Before open(): run this channel over the transport's `lane`-th TCP connection, where it
        can open more than one (OpenSSH); elsewhere every channel is separate already."""

    @property
    def hashes(self) -> tuple[str, ...]:
        return self.hello.hashes

    @property
    def best_hash(self) -> str:
        return self.hello.hashes[0]

    @abstractmethod
    def scan(self, root: str, holds: bool = False) -> Listing:
        """Every regular file under root; raises RemoteDirMissing when root does not exist.
        `holds`: also what root/.ckptsync-hold holds (Listing.held)."""

    @abstractmethod
    def stat(self, root: str, paths: Iterable[str]) -> Stats: ...

    @abstractmethod
    def hash(self, root: str, paths: Iterable[str], alg: str | None = None,
             listed: Mapping[str, FileStat] | None = None, limit: int | None = None) -> Hashes:
        """Hashes of files (with `limit`, of their first `limit` bytes). A path in `listed` is hashed
        only while its open file still has the listing's stamp (size, mtime, inode, ctime);
        otherwise it is an error entry."""

    @abstractmethod
    def df(self, path: str) -> Space: ...

    @abstractmethod
    def procs(self, pattern: str = "", root: str = "") -> Procs: ...

    def probe(self) -> Probe:
        """The server's Python, hash and codec with their speeds there, and whose open files it sees."""
        raise UsageError(f"{self.describe()} cannot be probed")

    @abstractmethod
    def mkdir(self, path: str) -> str:
        """Create path (and parents); returns it resolved."""

    @abstractmethod
    def lock(self, root: str, command: str, create: bool = False) -> bool:
        """Take the lock of the server directory `root` (held until `unlock` or the end of this
        connection), so that one run at a time writes into it; another holder raises ServerLocked
        naming it. With `create`, a missing root is made first; returns whether it was."""

    @abstractmethod
    def unlock(self, root: str, wait: bool = True) -> None:
        """Let go of root's lock now; on a link that is busy or broken, the connection's end does.
        `wait` False: do not wait for it to be done, for a run that asks nothing more of this
        connection (the next request, or the close, comes after it)."""

    @contextlib.contextmanager
    def holding(self, root: str, command: str, create: bool = False, wait: bool = True) -> Iterator[bool]:
        """lock() for the length of a block (yields whether root was made); `wait`: as unlock's."""
        created = self.lock(root, command, create)
        try:
            yield created
        except BaseException:
            with contextlib.suppress(CkptsyncError):  # the error in flight is the one to report
                self.unlock(root)
            raise
        self.unlock(root, wait=wait)

    @abstractmethod
    def dirs(self, root: str, patterns: list[str]) -> list[str]:
        """Directories under root matching shell glob patterns, relative to root, sorted."""

    @abstractmethod
    def send(self, root: str, pairs: list[tuple[str, str]], compress: str = "auto",
             resume: dict[str, tuple[int, str]] | None = None,
             ranges: dict[str, tuple[int, int]] | None = None,
             listed: Mapping[str, FileStat] | None = None) -> Download:
        """Stream (source, member) files from the server. `resume`: member -> (bytes already here, their
        hash in the server's best algorithm); when the server's first bytes hash the same, only the rest comes.
        `ranges`: member -> (start, length): only that byte range of the file comes, and its record's
        hash is the range's (a `resume` offer then applies to a range starting at 0).
        `listed`: member -> the listing's FileStat; the server checks the open file against it at the
        end of the read, and a member's record says "changed" when it differs. A member read whole and
        unchanged is a copy of the listed file even if the server deletes it right after."""

    def abort(self) -> None:
        """Break the link now, from any thread: a transfer reading from it ends with ConnectError."""

    @abstractmethod
    def receive(self, root: str, name: str, compress: str = "auto") -> Upload:
        """Stream files into the staging directory `name` on the server."""

    @abstractmethod
    def staged(self, root: str, name: str) -> Staged: ...

    @abstractmethod
    def staging_path(self, root: str, name: str) -> str:
        """Where the staging directory `name` is, for messages."""

    @abstractmethod
    def staging_member(self, name: str, member: str) -> str:
        """The path of a staged member relative to root, for stat and hash."""

    @abstractmethod
    def assemble(self, root: str, name: str, files: list[tuple[str, int, int, int]]) -> dict[str, Arrived]:
        """Finish files of staging `name` that arrived as ranges: (member, size, mtime_ns, mode)
        each; returns member -> its size and whole hash in the server's best algorithm."""

    @abstractmethod
    def commit(self, root: str, name: str, moves: list[tuple[str, str]], force: bool = False) -> Committed: ...

    @abstractmethod
    def discard(self, root: str, name: str) -> None: ...

    @abstractmethod
    def remove(self, root: str, names: list[str]) -> list[str]:
        """Delete whole entries (renamed aside first); returns the names removed."""

    # Optional: watching for changes, and holding checkpoints against rotation (`ckptsync watch`).
    def wait(self, root: str, timeout: float, interval: float) -> Changes:
        """Until something under root is created, written, moved or deleted, or `timeout` passes;
        the first call starts watching and returns at once. Polls every `interval` without inotify."""
        raise UsageError(f"{self.describe()} cannot watch for changes")

    def hold(self, root: str, make: Mapping[str, list[FileStat]]) -> Held:
        """Hard-link each checkpoint's listed files into root/.ckptsync-hold/<name>/."""
        raise UsageError(f"{self.describe()} cannot hold checkpoints")

    def release(self, root: str, names: list[str] | None = None) -> list[str]:
        """Remove the holds of `names` (None: every hold); returns those removed."""
        raise UsageError(f"{self.describe()} cannot hold checkpoints")

    # Optional: moving bytes between the server and presigned URLs (a bucket). Items are dicts:
    # put {path, offset, length, url}; get {member, url, size, mode, mtime_ns, hash}.
    def put_urls(self, root: str, items: list[dict], alg: str = "", workers: int = 4) -> list[Moved]:
        raise UsageError(f"{self.describe()} cannot send files to a bucket")

    def get_urls(self, root: str, name: str, items: list[dict], alg: str, workers: int = 4) -> list[Moved]:
        raise UsageError(f"{self.describe()} cannot fetch files from a bucket")

    def range_hashes(self, root: str, ranges: list[tuple[str, int, int]], alg: str = "md5") -> list[str | None]:
        raise UsageError(f"{self.describe()} cannot hash byte ranges")
