"""One transfer over several channels: each streams a share of the files (shares.py), a large
file split into byte ranges that land in one `.part`, so one channel's window no longer caps a run.
`run_all` (one thread per channel, the first error stops all) serves restore too.

Every share runs `transfer.receive` on a thread of its own, with the same checks as one channel.
A split file is complete once every range has arrived and matched the server's hash of it; its
xxh3-128 for the manifest is then read back from the assembled file. The first error stops
every channel (their links are broken, so no read stays blocked) and is raised once all have
stopped; a split file then keeps its contiguous first bytes, as a single channel keeps a prefix.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Callable, Mapping, TypeVar


from ckptsync.errors import ConnectError
from ckptsync.policy import AUTO_MAX_UPLOAD, MAX_PARALLEL, SHARE_MIN, auto_channels, connections
from ckptsync.progress import Reporter
from ckptsync.server import shares as sharing
from ckptsync.server.base import Server
from ckptsync.server.types import FileStat
from ckptsync.server.transfer import (
    CHUNK, Outcome, Prefix, Received, Span, keepable, offers, receive,
)
from ckptsync.disk import XXH3, io_error, new_hasher

T = TypeVar("T")


class Channels:
    """The connections a run moves files over: its own first, the others opened when a transfer can use them.

    `open_more()` gives a new, unopened server (with OpenSSH it shares the first one's login;
    beyond CHANNELS_PER_CONNECTION channels they are spread over more connections of that login).
    A channel that cannot be opened (sshd's MaxSessions, a refused login) leaves the run with
    those that did; `warning` says so.
    """

    def __init__(self, first: Server, open_more: Callable[[], Server], wanted: int | None) -> None:
        """`wanted` None: chosen from the link's round trip and rate the first time a transfer asks."""
        self.servers = [first]
        self.lanes = [0]   # the connection each of servers goes over (Server.use_connection)
        self.open_more = open_more
        self._wanted = None if wanted is None else max(1, min(wanted, MAX_PARALLEL))
        self.asked = wanted is not None
        self.round_trip: float | None = None   # seconds, when it was measured for the choice
        self.warning = ""
        self.most = 1   # the most channels one transfer used
        self._ahead: threading.Thread | None = None   # opening what open_ahead asked for
        self._ahead_error: BaseException | None = None
        self._opening: list[Server] = []   # what _take is opening, for _settle to break
        self._stopping = False
        self._lock = threading.Lock()

    @property
    def wanted(self) -> int:
        if self._wanted is None:
            first = self.servers[0]
            self.round_trip = first.round_trip()
            self._wanted = auto_channels(self.round_trip, first.rate_limit, first.window)
        return self._wanted

    def wanted_for(self, nbytes: int, upload: bool = False) -> int:
        """The channels a transfer of `nbytes` may use: all that were asked for; of those chosen
        from the link, no more than gives each SHARE_MIN bytes, and for an `upload` (a restore)
        no more than AUTO_MAX_UPLOAD."""
        if self.asked:
            return self.wanted
        most = min(self.wanted, AUTO_MAX_UPLOAD) if upload else self.wanted
        return max(1, min(most, nbytes // SHARE_MIN))

    def open_ahead(self, k: int) -> None:
        """Start opening the channels take(k) will need, on a thread, while the run goes on over its
        first one: each open is a few round trips of its own, which the run's remaining requests
        then overlap. take() waits for them; close() breaks those still opening."""
        want = min(k, self.wanted)   # here: choosing may ping the first server, which is this thread's
        if self._ahead is not None or want <= len(self.servers):
            return
        self._ahead = threading.Thread(target=self._take_ahead, args=(want,), daemon=True, name="channels-ahead")
        self._ahead.start()

    def _take_ahead(self, k: int) -> None:
        try:
            self._take(k)
        except BaseException as exc:
            self._ahead_error = exc

    def _settle(self, abort: bool = False) -> None:
        """Wait for what open_ahead started; `abort`: the run is ending, so break the links still opening."""
        ahead = self._ahead
        if ahead is None:
            return
        if abort:
            with self._lock:
                self._stopping = True
                opening = list(self._opening)
            _abort_all(opening)
        ahead.join()
        self._ahead = None
        exc, self._ahead_error = self._ahead_error, None
        if exc is not None and not abort:
            raise exc

    def take(self, k: int) -> list[Server]:
        """The first `k` channels (at most `wanted`), opening those missing (after those open_ahead
        started). They open together: each costs its own round trips (a session, the agent's start,
        its hello), which on a long link add up to seconds one after another. A connection's first
        channel starts that connection (its ssh master) before the others on it open, so that they
        share it."""
        self._settle()
        return self._take(k)

    def _take(self, k: int) -> list[Server]:
        want = min(k, self.wanted)
        spread = connections(want)   # a restore's four of eight wanted stay on one login
        new: list[tuple[int, Server]] = []   # (the connection it goes over, the server)
        while len(self.servers) + len(new) < want:
            server = self.open_more()
            if any(server is s for s in (*self.servers, *(s for _lane, s in new))):
                want = len(self.servers) + len(new)   # a factory that hands out one server
                self._wanted = want
                break
            load = [self.lanes.count(i) + sum(1 for lane, _s in new if lane == i) for i in range(spread)]
            lane = load.index(min(load))   # the connection with the fewest channels
            server.use_connection(lane)
            new.append((lane, server))
        up = set(self.lanes)
        first: list[Server] = []
        later: list[Server] = []
        starting: set[int] = set()
        for lane, server in new:
            if lane in up or lane not in starting:
                first.append(server)
                starting.add(lane)
            else:
                later.append(server)
        with self._lock:
            self._opening = [s for _lane, s in new]
            stopping = self._stopping
        if stopping:   # the run ended before these started opening: they end at once
            _abort_all(self._opening)
        failures = open_all(first)
        failures.update(open_all(later))
        with self._lock:
            self._opening = []
        opened = [s for _lane, s in new if id(s) not in failures]
        self.servers += opened
        self.lanes += [lane for lane, s in new if id(s) not in failures]
        if len(opened) < len(new):
            exc = next(iter(failures.values()))
            self.warning = (f"{len(self.servers)} of {self.wanted} channels opened; "
                            f"another failed: {exc.message}")
            self._wanted = len(self.servers)
        return self.servers[:k]

    def close(self, first: bool = False) -> None:
        """Close all but the first (the run closes that one), together: each waits for its end of
        the server to finish. `first`: the first too, beside them, for a run that opened it and
        asks nothing more (its own close then finds it closed); each close waits a round trip."""
        self._settle(abort=True)
        extra, self.servers, self.lanes = self.servers[1:], self.servers[:1], self.lanes[:1]
        closing = extra + (self.servers if first and extra else [])
        run_all(closing, lambda i: _close_quietly(closing[i]))


def _abort_all(servers: list[Server]) -> None:
    for server in servers:
        with contextlib.suppress(Exception):
            server.abort()


def _close_quietly(server: Server, polite: bool = True) -> None:
    with contextlib.suppress(Exception):
        server.close(polite=polite)


def open_all(servers: list[Server]) -> dict[int, ConnectError]:
    """Open the servers, each on a thread of its own (run_all): id(server) -> why it did not open,
    for those that did not (a server that fails is closed). An error other than a ConnectError
    closes them all and is raised, as is Ctrl+C while they open."""
    failed: dict[int, BaseException] = {}
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            servers[i].open()
        except BaseException as exc:
            _close_quietly(servers[i], polite=False)
            with lock:
                failed[id(servers[i])] = exc

    try:
        run_all(servers, one)
        worst = next((exc for exc in failed.values() if not isinstance(exc, ConnectError)), None)
        if worst is not None:
            raise worst
    except BaseException:
        for server in servers:
            if id(server) not in failed:
                _close_quietly(server, polite=False)
        raise
    return failed   # type: ignore[return-value]


def run_all(servers: list[Server], work: Callable[[int], T]) -> list[T]:
    """work(i) for every server, each on a thread of its own. The first error breaks every link
    (so no thread stays blocked reading one) and is raised once all threads have stopped; Ctrl+C
    and SIGTERM, which land on this thread, do the same."""
    results: list = [None] * len(servers)
    errors: list[BaseException] = []
    lock = threading.Lock()

    def stop(exc: BaseException) -> None:
        with lock:
            errors.append(exc)
            if len(errors) > 1:
                return
        _abort_all(servers)

    def run(i: int) -> None:
        try:
            results[i] = work(i)
        except BaseException as exc:
            stop(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(servers))]
    try:  # Ctrl+C while the threads are starting stops those already started too
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    except BaseException as exc:
        stop(exc)
        for t in threads:
            if t.ident is not None:  # started
                t.join()
    if errors:
        raise errors[0]
    return results


class Shared(Reporter):
    """One progress bar fed by several threads."""

    def __init__(self, rep: Reporter) -> None:
        self.rep = rep
        self.lock = threading.Lock()

    def info(self, message: str) -> None:
        with self.lock:
            self.rep.info(message)

    def advance(self, nbytes: int) -> None:
        with self.lock:
            self.rep.advance(nbytes)


def fetch(channels: Channels, root: str, pairs: list[tuple[str, str]], sizes: dict[str, int],
          targets: dict[str, Path], prefixes: dict[str, Prefix], rep: Reporter,
          on_file: Callable[[Received], None], compress: str = "auto",
          listed: Mapping[str, FileStat] | None = None) -> tuple[Outcome, int]:
    """Fetch (source, member) files into their targets as `transfer.receive` does, over as many
    channels as the files can keep busy (at most channels.wanted_for their bytes). `listed`: see Server.send."""
    files = [(source, member, sizes[member]) for source, member in pairs]
    kept = {member: p.size for member, p in prefixes.items()}
    todo = sum(max(size - kept.get(member, 0), 0) for _source, member, size in files)
    planned = [s for s in sharing.plan(files, channels.wanted_for(todo), kept) if s]
    servers = channels.take(max(len(planned), 1))
    if len(servers) < len(planned):
        planned = [s for s in sharing.plan(files, len(servers), kept) if s]
    if len(planned) <= 1:
        dl = servers[0].send(root, pairs, compress=compress, resume=offers(prefixes), listed=listed)
        return receive(dl, targets, rep, on_file, prefixes)
    channels.most = max(channels.most, len(planned))
    return _Run(servers, planned, root, sizes, targets, prefixes, rep, on_file, compress, listed).go()


class _Run:
    def __init__(self, servers: list[Server], planned: list[list[sharing.Piece]], root: str,
                 sizes: dict[str, int], targets: dict[str, Path], prefixes: dict[str, Prefix], rep: Reporter,
                 on_file: Callable[[Received], None], compress: str,
                 listed: Mapping[str, FileStat] | None = None) -> None:
        self.servers, self.planned, self.root, self.compress = servers, planned, root, compress
        self.listed = listed
        self.sizes, self.targets, self.prefixes = sizes, targets, prefixes
        self.rep, self.on_file = Shared(rep), on_file
        self.lock = threading.Lock()
        self.spans: dict[str, list[Span]] = {}       # split member -> its ranges, one per share
        self.arrived: dict[str, list[Received]] = {}  # split member -> its verified ranges
        self.assembled: list[Received] = []
        self.changed: dict[str, str] = {}
        for share in planned:
            for p in share:
                if p.start is not None:
                    kept = prefixes[p.member].size if p.start == 0 and p.member in prefixes else 0
                    self.spans.setdefault(p.member, []).append(Span(p.start, p.length, done=kept))

    def go(self) -> tuple[Outcome, int]:
        self._create_parts()
        try:
            results = run_all(self.servers[:len(self.planned)], self._work)
        except BaseException as exc:
            self._leave_split(exc)
            raise
        self._leave_split(None)
        outcome = Outcome(received=[], changed=dict(self.changed))
        wire_bytes = 0
        for got, sent in results:
            outcome.received += [r for r in got.received if r.start is None]
            outcome.changed.update(got.changed)
            outcome.unreadable.update(got.unreadable)
            wire_bytes += sent
        outcome.received += self.assembled
        return outcome, wire_bytes

    # -------------------------------------------------- the channels

    def _work(self, i: int) -> tuple[Outcome, int]:
        share = self.planned[i]
        members = {p.member for p in share}
        spans = {}
        for p in share:
            if p.start is not None:
                spans[p.member] = next(s for s in self.spans[p.member] if s.start == p.start)
        prefixes = {m: self.prefixes[m] for m in members
                    if m in self.prefixes and (m not in spans or spans[m].start == 0)}
        dl = self.servers[i].send(self.root, [(p.source, p.member) for p in share], compress=self.compress,
                                  resume=offers(prefixes), ranges={m: (s.start, s.length) for m, s in spans.items()},
                                  listed=self.listed)
        return receive(dl, {m: self.targets[m] for m in members}, self.rep, self._arrived, prefixes, spans)

    def _arrived(self, rec: Received) -> None:
        if rec.start is None:
            with self.lock:
                self.on_file(rec)
            return
        with self.lock:
            got = self.arrived.setdefault(rec.member, [])
            got.append(rec)
            if len(got) < len(self.spans[rec.member]):
                return
        whole = self._assemble(rec.member, got)  # outside the lock: it reads the whole file
        if whole is not None:
            with self.lock:
                self.assembled.append(whole)
                self.on_file(whole)

    # -------------------------------------------------- split files

    def _part(self, member: str) -> Path:
        path = self.targets[member]
        return path.with_name(path.name + ".part")

    def _create_parts(self) -> None:
        """Every range writes into the one `.part`, so it exists first (a kept prefix stays in it)."""
        for member in self.spans:
            part = self._part(member)
            try:
                part.parent.mkdir(parents=True, exist_ok=True)
                if member not in self.prefixes:
                    part.open("wb").close()
            except OSError as exc:
                raise io_error(exc, f"writing {self.targets[member]}") from None

    def _assemble(self, member: str, got: list[Received]) -> Received | None:
        """All ranges verified: one version of the file? Then its hash, its stamps, its final name."""
        first = got[0]
        if any((r.mtime_ns, r.mode, r.file_size) != (first.mtime_ns, first.mode, self.sizes[member]) for r in got):
            with self.lock:
                self.changed[member] = "modified during the backup (its ranges differ)"
            return None
        part, path = self._part(member), self.targets[member]
        hx = new_hasher()
        alg = self.servers[0].best_hash
        other = None if alg == XXH3 else new_hasher(alg)   # recorded for the next comparison
        try:
            with open(part, "rb") as f:
                for block in iter(lambda: f.read(CHUNK), b""):
                    hx.update(block)
                    if other is not None:
                        other.update(block)
            os.chmod(part, first.mode)
            os.utime(part, ns=(first.mtime_ns, first.mtime_ns))
            os.replace(part, path)
        except OSError as exc:
            raise io_error(exc, f"writing {path}") from None
        return Received(member=member, size=self.sizes[member], mode=first.mode, mtime_ns=first.mtime_ns,
                        xxh3_128=hx.hexdigest(), skipped=sum(r.skipped for r in got),
                        hashes={} if other is None else {alg: other.hexdigest()})

    def _leave_split(self, exc: BaseException | None) -> None:
        """After the channels stopped: a split file not assembled keeps its contiguous first bytes
        when the failure is an interruption (as one channel keeps a prefix), else its `.part` goes."""
        for member, spans in self.spans.items():
            part = self._part(member)
            if not part.exists():
                continue
            upto = 0
            for s in sorted(spans, key=lambda s: s.start):
                if s.start != upto:
                    break
                upto = s.start + s.done
                if s.done < s.length:
                    break
            try:
                if exc is not None and keepable(exc, upto):
                    os.truncate(part, upto)
                else:
                    part.unlink(missing_ok=True)
            except OSError:
                pass
