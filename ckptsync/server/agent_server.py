"""`AgentServer`: the Server interface over the agent's frames, on any Transport."""

from __future__ import annotations

import contextlib
import os
import posixpath
import socket
import time
from typing import Callable, Iterable, Iterator, Mapping

from ckptsync.agent import STAGING_PREFIX, safe_member
from ckptsync.errors import AgentError, ProtocolError, UsageError
from ckptsync.ratelimit import RateLimiter
from ckptsync.server.remote import Remote
from ckptsync.server.base import Download, Hashes, Moved, Server, Upload
from ckptsync.server.errors import MissingOnServer, RemoteDirMissing
from ckptsync.policy import stall_limit
from ckptsync.server.types import (
    Arrived, Changes, Committed, FileStat, Held, Hello, Listing, Probe, Process, Procs, Space, Staged, Stat, Stats,
    Unseen,
)
from ckptsync.transport import Transport

ROUND_TRIP_SAMPLES = 3   # quick requests whose shortest is taken as the round trip


class AgentServer(Server):
    def __init__(self, transport: Transport, missing_hint: Callable[[str, str], str] | None = None,
                 bwlimit: int | None = None, limiter: RateLimiter | None = None,
                 stall_timeout: float | None = None) -> None:
        """`stall_timeout`: seconds the link may move nothing (None: $CKPTSYNC_STALL_TIMEOUT or 300)."""
        self.remote = Remote(transport, limiter or (RateLimiter(bwlimit) if bwlimit else None),
                             stall_limit(stall_timeout))
        self.missing_hint = missing_hint  # (missing root, server's home) -> a hint, or ""
        self.hello = Hello(protocol=0, python="", zstd=None, hashes=("sha1",))
        self._first: list[tuple[str, dict]] = []   # requests to send with the hello (expect before open)

    # -------------------------------------------------- lifecycle

    def open(self) -> None:
        first, self._first = self._first, []
        self.remote.open(first)
        h = self.remote.hello
        arrived = time.time()
        with self._reading("hello"):
            now = float(h.get("now", 0.0))
            self.hello = Hello(protocol=int(h.get("protocol", 0)), python=str(h.get("python", "")),
                               zstd=h.get("zstd"), hashes=tuple(str(x) for x in h.get("hashes") or ["sha1"]),
                               hostname=str(h.get("hostname", "")), home=str(h.get("home", "")),
                               now=now, lzma=bool(h.get("lzma", True)), offset=now - arrived if now else 0.0,
                               pid=int(h.get("pid", 0)), managed=bool(h.get("managed")), apt=bool(h.get("apt")),
                               root=bool(h.get("root")), aes=None if h.get("aes") is None else bool(h.get("aes")))
        self.remote.transport.server_cpu(aes=self.hello.aes)

    def close(self, polite: bool = True) -> None:
        self.remote.close(polite=polite)

    def describe(self) -> str:
        return self.remote.describe()

    @contextlib.contextmanager
    def _reading(self, op: str) -> Iterator[None]:
        """Around the reading of a reply: a value of the wrong shape is the server's fault (exit 20)."""
        try:
            yield
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise ProtocolError(f"{self.describe()}: malformed reply to {op} ({exc})") from None

    def _call(self, op: str, **args) -> dict:
        return self.remote.call(op, **args)

    def _ask(self, request: tuple[str, dict]) -> dict:
        return self._call(request[0], **request[1])

    def expect(self, calls: list[tuple[str, dict]]) -> None:
        requests = []
        for method, kwargs in calls:
            request = _AHEAD[method](**kwargs) if method in _AHEAD else None
            if request is None:
                break
            requests.append(request)
        if self.remote.chan is None:
            self._first = requests
        elif requests:
            self.remote.expect(requests)

    @property
    def round_trips(self) -> int:
        return self.remote.round_trips

    def round_trip(self, clock: Callable[[], float] = time.monotonic) -> float:
        """The shortest of three quick requests (remote.QUICK_OPS): the link's round trip, not the
        server's work. Those the run already made count; empty ones make up the rest, sent
        together (one round trip for all), each timed from their sending to its answer."""
        seen = self.remote.quick_answers[:ROUND_TRIP_SAMPLES]
        best = min(seen, default=float("inf"))
        missing = ROUND_TRIP_SAMPLES - len(seen)
        if missing > 0:
            start = clock()
            self.remote.expect([("ping", {})] * missing)
            for _ in range(missing):
                self._call("ping")
                best = min(best, clock() - start)
        return best

    @property
    def window(self) -> int:
        return self.remote.transport.window

    @property
    def rate_limit(self) -> int | None:
        return self.remote.limiter.rate if self.remote.limiter is not None else None

    def use_connection(self, lane: int) -> None:
        self.remote.transport = self.remote.transport.lane(lane)

    # -------------------------------------------------- queries

    def scan(self, root: str, holds: bool = False) -> Listing:
        try:
            reply = self._ask(_scan_request(root, holds))
        except MissingOnServer as exc:
            path = exc.path or root
            hint = self.missing_hint(path, self.hello.home) if self.missing_hint else ""
            raise RemoteDirMissing(f"remote directory does not exist on {self.describe()}: {path}",
                                   path=path, hint=hint) from None
        except AgentError as exc:
            if exc.agent_kind != "not_dir":
                raise
            raise UsageError(f"the remote directory is a file on {self.describe()}: {exc.path or root}",
                             hint="give the directory the checkpoints are saved in "
                             "(--remote-dir, or remote_dir in the config)") from None
        with self._reading("scan"):
            files = self._file_rows(reply["files"])
            unseen = [Unseen(str(path), str(why), int(mtime or 0)) for path, why, mtime in reply.get("unseen") or []]
            held = reply.get("held") or {}
            return Listing(root=str(reply.get("root", root)), files=files, meta=dict(reply.get("meta") or {}),
                           now=float(reply["now"]), errors=[str(e) for e in reply.get("errors") or []],
                           unseen=unseen, stopped=str(reply.get("stopped") or ""),
                           held=self._file_rows(held.get("files") or []), held_meta=dict(held.get("meta") or {}),
                           links=[str(p) for p in reply.get("links") or []])

    def _file_rows(self, rows: list) -> list[FileStat]:
        """[path, size, mtime_ns, mode, ctime_ns, inode, nlink] rows as FileStats; an unsafe path is refused."""
        files = []
        for row in rows:
            path = row[0]
            if not isinstance(path, str) or not safe_member(path):
                raise ProtocolError(f"{self.describe()}: the server listed an unsafe path {path!r}")
            files.append(FileStat(path, *(int(v) for v in row[1:7])))
        return files

    def stat(self, root: str, paths: Iterable[str]) -> Stats:
        paths = list(paths)
        answer = self._ask(_stat_request(root, paths))
        reply = answer.get("stat", {})
        out = Stats()
        with self._reading("stat"):
            for p in paths:
                info = reply.get(p)
                out[p] = None if info is None else Stat(int(info[0]), int(info[1]), int(info[2]), bool(info[3]),
                                                        *(int(v) for v in info[4:6]))
            out.errors = {str(k): str(v) for k, v in (answer.get("errors") or {}).items() if k in out}
        return out

    def hash(self, root: str, paths: Iterable[str], alg: str | None = None,
             listed: Mapping[str, FileStat] | None = None, limit: int | None = None) -> Hashes:
        alg = alg or self.best_hash
        paths = list(paths)
        args = {"stamps": {p: listed[p].stamp for p in paths if p in listed}} if listed else {}
        if limit is not None:
            args["limit"] = limit
        got = self._call("hash", root=root, paths=paths, alg=alg, **args).get("hashes", {})
        out = Hashes(alg=alg)
        for p in paths:
            value = got.get(p) if isinstance(got, dict) else None
            if isinstance(value, str):
                out.values[p] = value
            elif isinstance(value, dict):
                out.errors[p] = str(value.get("__error__", "cannot be read"))
            else:
                out.errors[p] = "no hash returned"
        return out

    def df(self, path: str) -> Space:
        reply = self._ask(_df_request(path))
        with self._reading("df"):
            return Space(free=int(reply.get("free", 0)), path=str(reply.get("path", path)),
                         total=int(reply.get("total", 0)))

    def probe(self) -> Probe:
        reply = self._call("probe")
        with self._reading("probe"):
            return Probe(python=str(reply["python"]), executable=str(reply.get("executable", "")),
                         hash=str(reply["hash"]), hash_rate=float(reply["hash_rate"]), codec=str(reply["codec"]),
                         codec_rate=float(reply.get("codec_rate") or 0.0), fd_readable=int(reply["fd_readable"]),
                         fd_total=int(reply["fd_total"]))

    def procs(self, pattern: str = "", root: str = "") -> Procs:
        reply = self._ask(_procs_request(pattern, root))
        with self._reading("procs"):
            gpu = reply.get("gpu")
            return Procs(
                processes=[Process(int(p["pid"]), str(p["cmd"]), bool(p["mine"]), str(p["run"]), bool(p["trainer"]),
                                   bool(p["python"]), bool(p.get("gpu")), bool(p.get("seen", True)))
                           for p in reply.get("processes") or []],
                writing=[(int(p), str(c), str(f)) for p, c, f in reply.get("writing") or []],
                gpu=None if gpu is None else [str(g) for g in gpu],
                blind=[str(b) for b in reply.get("blind") or []],
                now=float(reply.get("now") or 0.0), root=str(reply.get("root") or ""),
                complete=int(reply.get("writing_total", 0)) <= len(reply.get("writing") or []),
            )

    def mkdir(self, path: str) -> str:
        return str(self._ask(_mkdir_request(path)).get("path", path))

    def lock(self, root: str, command: str, create: bool = False) -> bool:
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "since": time.time()}
        return self._call("lock", root=root, owner=owner, create=create).get("created") is True

    def unlock(self, root: str, wait: bool = True) -> None:
        if self.remote.proc is None or self.remote.busy:  # mid-transfer, a request would break the stream
            return
        if wait:
            self._call("unlock", root=root)
        else:   # should it fail, the agent lets go of its locks anyway when the link closes
            self.remote.tell("unlock", {"root": root})

    def dirs(self, root: str, patterns: list[str]) -> list[str]:
        reply = self._ask(_dirs_request(root, patterns))
        found = reply.get("dirs") or []
        if not isinstance(found, list) or not all(isinstance(d, str) and safe_member(d) for d in found):
            raise ProtocolError(f"{self.describe()}: the server listed an unsafe path in {found!r}")
        return list(found)

    def wait(self, root: str, timeout: float, interval: float) -> Changes:
        reply = self._call("wait", root=root, timeout=timeout, interval=interval)
        with self._reading("wait"):
            return Changes(changed=tuple(str(p) for p in reply.get("changed") or []), how=str(reply.get("how", "")),
                           why=str(reply.get("why", "")), started=bool(reply.get("started")))

    def hold(self, root: str, make: Mapping[str, list[FileStat]]) -> Held:
        rows = {name: [[f.path, f.size, f.mtime_ns, f.inode] for f in files] for name, files in make.items()}
        reply = self._call("hold", root=root, make=rows)
        with self._reading("hold"):
            return Held(held={str(n): self._file_rows(r) for n, r in (reply.get("held") or {}).items()},
                        refused={str(n): str(why) for n, why in (reply.get("refused") or {}).items()})

    def release(self, root: str, names: list[str] | None = None) -> list[str]:
        args = {"all": True} if names is None else {"names": list(names)}
        return [str(n) for n in self._call("release", root=root, **args).get("released") or []]

    # -------------------------------------------------- streams and staging

    def send(self, root: str, pairs: list[tuple[str, str]], compress: str = "auto",
             resume: dict[str, tuple[int, str]] | None = None,
             ranges: dict[str, tuple[int, int]] | None = None,
             listed: Mapping[str, FileStat] | None = None) -> Download:
        stamps = {member: listed[member].stamp for _src, member in pairs if member in listed} if listed else None
        return self.remote.download(root, pairs, compress=compress, resume=resume, ranges=ranges, stamps=stamps)

    def abort(self) -> None:
        self.remote.abort()

    def receive(self, root: str, name: str, compress: str = "auto") -> Upload:
        return self.remote.upload(root, name, compress=compress)

    def staged(self, root: str, name: str) -> Staged:
        reply = self._ask(_staged_request(root, name))
        with self._reading("staged"):
            files = {str(p): Stat(int(v[0]), int(v[1]), 0) for p, v in (reply.get("staged") or {}).items()}
            return Staged(files=files, partial={str(p) for p in reply.get("partial") or []})

    def staging_path(self, root: str, name: str) -> str:
        return posixpath.join(root, STAGING_PREFIX + name)

    def staging_member(self, name: str, member: str) -> str:
        return f"{STAGING_PREFIX}{name}/{member}"

    def assemble(self, root: str, name: str, files: list[tuple[str, int, int, int]]) -> dict[str, Arrived]:
        items = [{"member": m, "size": size, "mtime_ns": mtime_ns, "mode": mode} for m, size, mtime_ns, mode in files]
        reply = self._call("assemble", root=root, name=name, files=items, alg=self.best_hash)
        with self._reading("assemble"):
            return {str(x["member"]): Arrived(str(x["member"]), int(x["size"]), str(x["hash"]))
                    for x in reply.get("files") or []}

    def commit(self, root: str, name: str, moves: list[tuple[str, str]], force: bool = False) -> Committed:
        reply = self._call("commit", root=root, name=name, moves=[list(m) for m in moves], force=force)
        with self._reading("commit"):
            return Committed(moved=[str(x) for x in reply.get("moved") or []],
                             kept=[str(x) for x in reply.get("kept") or []],
                             staging_left=reply.get("staging_left") is not False)

    def discard(self, root: str, name: str) -> None:
        self._call("discard", root=root, name=name)

    def remove(self, root: str, names: list[str]) -> list[str]:
        reply = self._call("remove", root=root, names=list(names))
        with self._reading("remove"):
            return [str(x) for x in reply.get("removed") or []]

    # -------------------------------------------------- presigned URLs

    def _moved(self, op: str, reply: dict, count: int) -> list[Moved]:
        with self._reading(op):
            rows = list(reply["results"])
            if len(rows) != count:
                raise ValueError(f"{len(rows)} results for {count} items")
            return [Moved(etag=str(r.get("etag", "")), md5=str(r.get("md5", "")), hash=str(r.get("hash", "")),
                          size=int(r.get("size", 0)), error=str(r.get("error", "")),
                          message=str(r.get("message", ""))) for r in rows]

    def put_urls(self, root: str, items: list[dict], alg: str = "", workers: int = 4) -> list[Moved]:
        reply = self._call("http_put", root=root, items=items, alg=alg, workers=workers)
        return self._moved("http_put", reply, len(items))

    def get_urls(self, root: str, name: str, items: list[dict], alg: str, workers: int = 4) -> list[Moved]:
        reply = self._call("http_get", root=root, name=name, items=items, alg=alg, workers=workers)
        return self._moved("http_get", reply, len(items))

    def range_hashes(self, root: str, ranges: list[tuple[str, int, int]], alg: str = "md5") -> list[str | None]:
        got = self._call("range_hash", root=root, ranges=[list(r) for r in ranges], alg=alg).get("hashes") or []
        with self._reading("range_hash"):
            return [g if isinstance(g, str) else None for g in got] + [None] * (len(ranges) - len(got))


# The requests of the calls that only read, which expect() may send ahead: each method above
# builds its request with the same function, so a call matches what was sent for it.
def _scan_request(root: str, holds: bool = False) -> tuple[str, dict]:
    return "scan", {"root": root, **({"holds": True} if holds else {})}


def _procs_request(pattern: str = "", root: str = "") -> tuple[str, dict]:
    return "procs", {"pattern": pattern, "root": root}


def _dirs_request(root: str, patterns: list[str]) -> tuple[str, dict]:
    return "glob", {"root": root, "patterns": list(patterns)}


def _stat_request(root: str, paths: Iterable[str]) -> tuple[str, dict]:
    return "stat", {"root": root, "paths": list(paths)}


def _staged_request(root: str, name: str) -> tuple[str, dict]:
    return "staged", {"root": root, "name": name}


def _df_request(path: str) -> tuple[str, dict]:
    return "df", {"path": path}


def _mkdir_request(path: str) -> tuple[str, dict]:
    return "mkdir", {"path": path}


_AHEAD = {"scan": _scan_request, "procs": _procs_request, "dirs": _dirs_request, "stat": _stat_request,
          "staged": _staged_request, "df": _df_request, "mkdir": _mkdir_request}
