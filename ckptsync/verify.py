"""`ckptsync verify`: re-read backups and check them against their manifests, or against the server.

Local (the default) needs no connection: every file of every entry is read
again and its size and xxh3-128 compared with the manifest; files a resume
needs must be there, and nothing else may be in the entry (only `.ckptsync*`
names are ignored). A file hard-linked into several checkpoints is read once.
An entry that passes gets its manifest's `verified_at` set. A file reached
through a symlink (the entry, or a directory in it) is not the backup's own
copy and fails, and so does an entry whose manifest is damaged.

`--remote` compares the server's copy with the backup instead: sizes from
the server's listing, hashes computed on the server in its best algorithm.
When that is not xxh3-128, the manifest's value in that algorithm is used; a
file without one is hashed here once (in both algorithms: it counts only when
its xxh3-128 matches the manifest) and the value is recorded (digests.py).
Checkpoints present on one side only are reported; they fail the run only
when they were named on the command line (a server rotates old checkpoints
away, and a new one is not backed up yet: both are normal).
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ckptsync.config import Target
from ckptsync.digests import LocalDigests
from ckptsync.errors import INTEGRITY, OK, NotFound, UsageError
from ckptsync.progress import QUIET, Reporter
from ckptsync.policy import named, newest_first
from ckptsync.result import Result
from ckptsync.scan import ServerView, scan_server
from ckptsync.server import FileStat, Server, open_server
from ckptsync.stores import CORRUPT, MISSING, UNEXPECTED, Store, ability, open_store
from ckptsync.stores.directory import DirectoryStore
from ckptsync.stores.manifest import EXTRA, FileRecord, Manifest
from ckptsync.agent import hash_file

IGNORED_PREFIX = ".ckptsync"
HASH_BATCH = 256 << 20     # bytes per `hash` request, so progress moves on big checkpoints

# Entry states (EntryCheck.status).
OK_STATUS = "ok"
ONLY_LOCAL = "only in the backup"
ONLY_SERVER = "only on the server"
IN_PROGRESS = "in progress on the server"
UNREADABLE = "not all readable on the server"
CHANGED = "changed by another run during the check"

# Problem kinds, local (CORRUPT, MISSING and UNEXPECTED are every store's: stores/__init__.py).
DAMAGED = "damaged manifest"
# Problem kinds, remote.
DIFFERS = "differs"
MISSING_ON_SERVER = "missing on the server"
NOT_IN_BACKUP = "not in the backup"
MISSING_HERE = "missing in the backup"
NOT_COMPARED = "not compared"


@dataclass
class Problem:
    path: str          # relative to the backup directory (and to remote_dir)
    kind: str
    detail: str = ""


@dataclass
class EntryCheck:
    name: str
    status: str = OK_STATUS
    files: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)
    verified_at: float = 0.0

    @property
    def failed(self) -> bool:
        return bool(self.problems)

    def settle(self) -> None:
        """Name the status after the kinds of problems found (local checks)."""
        if not self.problems:
            return
        labels = {DAMAGED: DAMAGED, CORRUPT: "corrupt", MISSING: "missing files", UNEXPECTED: "unexpected files"}
        kinds = {p.kind for p in self.problems}
        self.status = ", ".join(label for kind, label in labels.items() if kind in kinds)


@dataclass
class VerifyResult(Result):
    target: str
    dest: str
    remote: bool
    server: str | None = None
    remote_dir: str | None = None
    alg: str = "xxh3_128"
    entries: list[EntryCheck] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    bytes_read: int = 0        # bytes hashed: here, or on the server with --remote
    seconds: float = 0.0
    read_data: bool = True     # False: a bucket's objects checked by size and ETag only

    @property
    def failed(self) -> list[EntryCheck]:
        return [e for e in self.entries if e.failed]

    @property
    def exit_code(self) -> int:
        return INTEGRITY if self.failed else OK

    def to_dict(self) -> dict:
        out = super().to_dict()
        for entry, check in zip(out["entries"], self.entries):
            entry["failed"] = check.failed
        return out


def run_verify(target: Target, names: list[str], remote: bool = False, rep: Reporter = QUIET,
               read_data: bool = False, connect: Callable[[], Server] | None = None) -> VerifyResult:
    """`read_data` matters where the store can check its objects without reading them (a bucket):
    a backup directory (and an archive) is always read back. `connect`: gives the server of a
    --remote verify (see open_server)."""
    started = time.monotonic()
    store = open_store(target)
    if ability(store, "check_objects") is not None:
        if remote:
            raise UsageError(f"--remote does not work on {store.kind}")
        result = ObjectVerify(target, store, names, read_data or bool(ability(store, "reads_data")), rep).run()
        result.seconds = time.monotonic() - started
        return result
    job = RemoteVerify(target, names, rep, connect) if remote else LocalVerify(target, names, rep)
    try:
        return job.run()
    finally:
        job.result.seconds = time.monotonic() - started


def select(store: Store, names: list[str]) -> tuple[list[str], list[Manifest]]:
    """The names asked for (a step number resolved to its checkpoint), and the manifests to check:
    those named, or every entry newest first. NotFound for a name the store does not hold."""
    manifests, damaged = store.manifests(), store.damaged()
    if names:
        known = [(m.name, m.step) for m in manifests.values()] + [(n, None) for n in damaged]
        names = [named(n, known) for n in names]
        unknown = [n for n in names if n not in manifests and n not in damaged]
        if unknown:
            have = ", ".join(m.name for m in _ordered(manifests.values())) or "none"
            raise NotFound(f"no backup named {', '.join(unknown)} in {store.location} (backups there: {have})")
        return names, [manifests[n] for n in dict.fromkeys(names) if n in manifests]
    if not manifests and not damaged:
        raise NotFound(f"no backups in {store.location}", hint="check --local-dir or --instance")
    return names, _ordered(manifests.values())


class ObjectVerify:
    """A store that checks its own objects (check_objects): sizes and ETags from its listing,
    the bytes too with read_data. Entries, then their earlier versions, as NAME@ID."""

    def __init__(self, target: Target, store: Store, names: list[str], read_data: bool, rep: Reporter) -> None:
        self.store, self.names, self.read_data, self.rep = store, names, read_data, rep
        self.result = VerifyResult(target=target.label, dest=store.location, remote=False, read_data=read_data)

    def run(self) -> VerifyResult:
        names, chosen = select(self.store, self.names)
        kept = self.store.generations()
        total = sum(m.size for m in chosen) + sum(g.manifest.size for m in chosen for g in kept.get(m.name, []))
        self.rep.start("verify", total if self.read_data else 0)
        try:
            for label, m, found in ability(self.store, "check_objects")([m.name for m in chosen], self.read_data,
                                                                         self._advance):
                check = EntryCheck(label, files=len(m.files), bytes=m.size, verified_at=m.verified_at)
                check.problems = [Problem(path, kind, detail) for path, kind, detail in found]
                check.settle()
                self.result.entries.append(check)
        finally:
            self.rep.finish()
        return self.result

    def _advance(self, n: int) -> None:
        self.result.bytes_read += n
        self.rep.advance(n)


def _ordered(manifests) -> list[Manifest]:
    """Checkpoints newest first, then extra-files."""
    manifests = list(manifests)
    return newest_first(m for m in manifests if m.name != EXTRA) + [m for m in manifests if m.name == EXTRA]


class Hasher:
    """Hashes local files, once per inode and content state: hard links are read once."""

    def __init__(self, rep: Reporter) -> None:
        self.rep = rep
        self.cache: dict[tuple, str] = {}
        self.bytes_read = 0

    @staticmethod
    def key(st: os.stat_result, alg: str) -> tuple:
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, alg)

    def digest(self, path: Path, st: os.stat_result, alg: str = "xxh3_128") -> str:
        key = self.key(st, alg)
        if key not in self.cache:
            self.cache[key] = hash_file(path, alg, self._advance)
        return self.cache[key]

    def _advance(self, n: int) -> None:
        self.bytes_read += n
        self.rep.advance(n)


# ------------------------------------------------------------------ local

Todo = list[tuple[FileRecord, Path, os.stat_result]]


def inspect_files(root: Path, files: list[FileRecord], resume: set[str] = frozenset()) -> tuple[list[Problem], Todo]:
    """Presence, type and size of stored files; returns the problems and the files still to be read.
    Nothing is read through a symlink: a linked entry or directory is reported once, its files not read."""
    problems, todo = [], []
    links: dict[str, bool] = {}    # directory (relative to root) -> whether it is a symlink
    reported: set[str] = set()
    for f in files:
        path = root / f.path
        link = _linked_dir(root, f.path, links)
        if link is not None:
            if link not in reported:
                reported.add(link)
                problems.append(Problem(link, CORRUPT, _link_text(root / link, "directory")))
            continue
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            problems.append(Problem(f.path, MISSING, "needed to resume" if f.path in resume else ""))
            continue
        except OSError as exc:
            problems.append(Problem(f.path, CORRUPT, f"cannot read: {exc.strerror or exc}"))
            continue
        if stat.S_ISLNK(st.st_mode):
            problems.append(Problem(f.path, CORRUPT, _link_text(path, "file")))
        elif not stat.S_ISREG(st.st_mode):
            problems.append(Problem(f.path, CORRUPT, "not a regular file"))
        elif st.st_size != f.size:
            what = "truncated" if st.st_size < f.size else "grown"
            problems.append(Problem(f.path, CORRUPT, f"{what}: {st.st_size} bytes, the backup had {f.size}"))
        else:
            todo.append((f, path, st))
    return problems, todo


def _linked_dir(root: Path, rel: str, seen: dict[str, bool]) -> str | None:
    """The first directory on the way to `rel` that is a symlink, or None."""
    parts = rel.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        d = "/".join(parts[:i])
        if d not in seen:
            try:
                seen[d] = stat.S_ISLNK(os.lstat(root / d).st_mode)
            except OSError:
                seen[d] = False   # missing: the file's own lstat says so
        if seen[d]:
            return d
    return None


def _link_text(path: Path, what: str) -> str:
    try:
        to = f" to {os.readlink(path)}"
    except OSError:
        to = ""
    return f"a symlink{to}, not a {what} of the backup: its files are not checked or trusted"


def damaged_checks(store: DirectoryStore, names: list[str]) -> list[EntryCheck]:
    """A failed check for each entry (or generation, NAME@ID) whose manifest is damaged; limited
    to `names` (and their generations) when given."""
    out = []
    for label, (path, why) in store.damaged().items():
        if names and label.split("@")[0] not in names:
            continue
        check = EntryCheck(label)
        check.problems.append(Problem(path.relative_to(store.root).as_posix(), DAMAGED, why))
        check.settle()
        out.append(check)
    return out


def hash_files(todo: Todo, hasher: "Hasher") -> tuple[list[Problem], list[tuple[str, bool]]]:
    """Compare contents with the manifest; also returns the intact files whose local mtime is not the
    manifest's, as (path, hard-linked): worth a warning, not a failure, since restore uses the manifest's."""
    problems, restamped = [], []
    for f, path, st in todo:
        try:
            digest = hasher.digest(path, st)
        except OSError as exc:
            problems.append(Problem(f.path, CORRUPT, f"read error: {exc.strerror or exc}"))
            continue
        if digest != f.xxh3_128:
            problems.append(Problem(f.path, CORRUPT, "content differs from the backup's checksum"))
        elif st.st_mtime_ns != f.mtime_ns:
            restamped.append((f.path, st.st_nlink > 1))
    return problems, restamped


def check_files(root: Path, files: list[FileRecord], rep: Reporter = QUIET) -> list[Problem]:
    """Every problem of these stored files against their manifest records (presence, size, xxh3-128)."""
    problems, todo = inspect_files(root, files)
    found, _restamped = hash_files(todo, Hasher(rep))
    return sorted(problems + found, key=lambda p: p.path)



class LocalVerify:
    def __init__(self, target: Target, names: list[str], rep: Reporter) -> None:
        self.store = DirectoryStore(target.local_dir)
        self.names = names
        self.rep = rep
        self.hasher = Hasher(rep)
        self.result = VerifyResult(target=target.label, dest=str(target.local_dir), remote=False)

    def run(self) -> VerifyResult:
        self.names, chosen = select(self.store, self.names)
        self.result.entries.extend(damaged_checks(self.store, self.names))
        unmanaged = self.store.unmanaged()
        if unmanaged and not self.names:
            self.result.warnings.append(f"not made by ckptsync, not verified: {', '.join(unmanaged)}")
        plans = [(m, *self._inspect(m), None) for m in chosen]
        for gens in self.store.generations().values():
            plans += [(g.manifest, *self._inspect(g.manifest, g.root, f"{g.name}@{g.id}"), g) for g in gens
                      if not self.names or g.name in self.names]
        seen: set[tuple] = set()
        total = 0
        for _m, _check, todo, _g in plans:
            for _f, _path, st in todo:
                key = Hasher.key(st, "xxh3_128")
                if key not in seen:
                    seen.add(key)
                    total += st.st_size
        self.rep.start("verify", total)
        try:
            for m, check, todo, g in plans:
                restamped = self._hash(check, todo)
                if g is None:
                    self._record(m, check)
                elif not check.failed:
                    m.verified_at = check.verified_at = time.time()
                    try:
                        self.store.write_generation(g)
                    except OSError as exc:
                        self.result.warnings.append(f"{check.name}: verified, but its manifest could not be "
                                                    f"updated: {exc.strerror or exc}")
                self.result.entries.append(check)
                if restamped and check.status != CHANGED:
                    self.result.warnings.append(_mtime_warning(m.name, restamped))
        finally:
            self.rep.finish()
            self.result.bytes_read = self.hasher.bytes_read
        return self.result

    def _inspect(self, m: Manifest, root: Path | None = None,
                 label: str = "") -> tuple[EntryCheck, list[tuple[FileRecord, Path, os.stat_result]]]:
        """Sizes, presence and unexpected files; returns the files whose content still needs reading.
        `root`: where the entry is (a generation's folder; default the backup directory)."""
        root = root or self.store.root
        check = EntryCheck(label or m.name, files=len(m.files), bytes=m.size, verified_at=m.verified_at)
        resume = set(m.resume_files)
        problems, todo = inspect_files(root, m.files, resume)
        check.problems.extend(problems)
        listed = {f.path for f in m.files}
        for path in sorted(resume - listed):
            check.problems.append(Problem(path, MISSING, "needed to resume, not in the manifest"))
        for rel in self._extra_paths(root, m.name, listed):
            check.problems.append(Problem(rel, UNEXPECTED, "not in the manifest"))
        return check, todo

    def _extra_paths(self, root: Path, name: str, listed: set[str]) -> list[str]:
        entry = root / name
        if not entry.is_dir() or entry.is_symlink():
            return []
        found = []
        for dirpath, dirnames, filenames in os.walk(entry):
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(IGNORED_PREFIX) and d not in links)
            for n in sorted(filenames + links):
                rel = f"{rel_dir}/{n}"
                if not n.startswith(IGNORED_PREFIX) and rel not in listed:
                    found.append(rel)
        return found

    def _hash(self, check: EntryCheck, todo: list[tuple[FileRecord, Path, os.stat_result]]) -> list[tuple[str, bool]]:
        """Compare contents; returns the intact files whose local mtime is not the manifest's
        (path, hard-linked), which is worth a warning, not a failure: restore uses the manifest's."""
        problems, restamped = hash_files(todo, self.hasher)
        check.problems.extend(problems)
        check.problems.sort(key=lambda p: p.path)
        check.settle()
        return restamped

    def _record(self, m: Manifest, check: EntryCheck) -> None:
        """Set verified_at, unless another run replaced or removed the entry meanwhile."""
        current = self.store.load(m.name)
        if current is None or current.files != m.files:
            check.problems.clear()
            check.status = CHANGED
            return
        if check.failed:
            return
        current.verified_at = time.time()
        try:
            self.store.write_manifest(current)
        except OSError as exc:
            self.result.warnings.append(f"{m.name}: verified, but the manifest could not be updated: "
                                        f"{exc.strerror or exc}")
            return
        check.verified_at = current.verified_at


MTIME_NAMES = 5


def _mtime_warning(name: str, restamped: list[tuple[str, bool]]) -> str:
    files = [path.removeprefix(f"{name}/") for path, _linked in sorted(restamped)]
    shown = ", ".join(files[:MTIME_NAMES]) + (f" and {len(files) - MTIME_NAMES} more" if len(files) > MTIME_NAMES else "")
    why = ("hard-linked to identical files, as with dedup: link" if all(linked for _p, linked in restamped)
           else "changed after the backup; restore uses the manifest's")
    what = "1 file's local mtime differs" if len(files) == 1 else f"{len(files)} files' local mtimes differ"
    return f"{name}: {what} from the manifest ({why}): {shown}"


# ------------------------------------------------------------------ remote


class RemoteVerify:
    def __init__(self, target: Target, names: list[str], rep: Reporter,
                 connect: Callable[[], Server] | None = None) -> None:
        self.target = target
        self.connect = connect
        self.store = DirectoryStore(target.local_dir)
        self.names = names
        self.rep = rep
        self.digests = LocalDigests(self.store, on_block=self._advance)
        self.result = VerifyResult(target=target.label, dest=str(target.local_dir), remote=True,
                                   server=target.describe())

    def _advance(self, n: int) -> None:
        self.rep.advance(n)

    def run(self) -> VerifyResult:
        with open_server(self.target, self.connect) as server:
            self.server = server
            view = scan_server(server, self.target.remote_dir, self.target.policy.settle_seconds)
            self.view = view
            self.alg = self.result.alg = server.best_hash
            self.result.remote_dir = view.root
            self.result.warnings.extend(view.errors)
            manifests = self.store.manifests()
            known = [(c.name, c.step) for c in view.checkpoints] + [(m.name, m.step) for m in manifests.values()]
            self.names = [named(n, known) for n in self.names]
            damaged = [c for c in damaged_checks(self.store, self.names) if "@" not in c.name]
            self.result.entries.extend(damaged)
            names = [n for n in self._select(view, manifests, {c.name for c in damaged})
                     if n not in {c.name for c in damaged}]
            pairs = [(n, view.find(n), manifests.get(n)) for n in names]
            compared = [m for n, c, m in pairs if m is not None and (n == EXTRA or c is not None)]
            here = sum(f.size for m in compared for f in m.files if self.digests.known(f, self.alg) is None)
            self.rep.start("verify", sum(m.size for m in compared) + here)
            try:
                for name, c, m in pairs:
                    self.result.entries.append(self._entry(name, c, m))
            finally:
                self.rep.finish()
                self.digests.save()
        return self.result

    def _select(self, view: ServerView, manifests: dict[str, Manifest], damaged: set[str]) -> list[str]:
        server = [c.name for c in view.checkpoints]
        local = [m.name for m in newest_first(m for n, m in manifests.items() if n not in server and n != EXTRA)]
        everything = server + local + ([EXTRA] if EXTRA in manifests else []) + sorted(damaged - set(server))
        if not self.names:
            return everything
        unknown = [n for n in self.names if n not in everything]
        if unknown:
            raise NotFound(f"{', '.join(unknown)}: neither on the server nor in {self.store.root} "
                           f"(known: {', '.join(everything) or 'none'})")
        return list(dict.fromkeys(self.names))

    def _entry(self, name: str, c, m: Manifest | None) -> EntryCheck:
        named = name in self.names
        if m is None:
            busy = "" if c.complete else " (not all readable)" if c.unreadable else " (in progress)"
            check = EntryCheck(name, ONLY_SERVER + busy, len(c.files), c.size)
            if named:
                check.problems.append(Problem(name, NOT_IN_BACKUP, "never backed up"))
            elif c.complete:
                self.result.warnings.append(f"{name} is on the server but has never been backed up: "
                                            f"{self.target.printed.command('backup', '--checkpoint', name)}")
            return check
        check = EntryCheck(name, OK_STATUS, len(m.files), m.size, verified_at=m.verified_at)
        if name == EXTRA:
            server, where = self._extra_stat(m)
        elif c is None:
            check.status = ONLY_LOCAL
            if named:
                check.problems.append(Problem(name, MISSING_ON_SERVER, "no longer on the server"))
            return check
        else:
            server = self.view.files_of(c)
            where = {f.path: f.path for f in m.files}
        self._compare(check, m, server, where)
        busy = c is not None and not c.complete
        if check.failed:
            check.status = DIFFERS + (f" ({_busy(c)})" if busy else "")
        elif busy:
            check.status = _busy(c)
        return check

    def _extra_stat(self, m: Manifest) -> tuple[dict[str, FileStat], dict[str, str]]:
        """The configured extra files as the server has them now, keyed by their backup path."""
        where = {f.path: f.source or f.path for f in m.files}
        reply = self.server.stat(self.view.root, sorted(set(where.values())))
        server = {}
        for member, src in where.items():
            st = reply.get(src)
            if st is not None and not st.is_dir:
                server[member] = FileStat(member, st.size, st.mtime_ns, st.mode)
        return server, where

    def _compare(self, check: EntryCheck, m: Manifest, server: dict[str, FileStat],
                 where: dict[str, str]) -> None:
        stored = {f.path: f for f in m.files}
        for path in sorted(set(server) - set(stored)):
            check.problems.append(Problem(path, NOT_IN_BACKUP, "a file the backup does not have"))
        todo = []
        for path, f in sorted(stored.items()):
            if path not in server:
                check.problems.append(Problem(path, MISSING_ON_SERVER))
            elif server[path].size != f.size:
                check.problems.append(Problem(path, DIFFERS, f"{server[path].size} bytes on the server, "
                                                             f"{f.size} in the backup"))
            else:
                todo.append(f)
        for batch in _batches(todo):
            hashes = self.server.hash(self.view.root, [where[f.path] for f in batch], self.alg)
            for f in batch:
                self.result.bytes_read += f.size
                self.rep.advance(f.size)
                theirs = hashes.get(where[f.path])
                if theirs is None:
                    error = hashes.errors.get(where[f.path], "no hash returned")
                    check.problems.append(Problem(f.path, NOT_COMPARED, f"cannot read on the server: {error}"))
                    continue
                ours = self._local_hash(check, f)
                if ours is not None and ours != theirs:
                    same = server[f.path].mtime_ns == f.mtime_ns
                    detail = ("same size and mtime, different content: one of the copies is damaged" if same
                              else "changed on the server after the backup")
                    check.problems.append(Problem(f.path, DIFFERS, detail))
        check.problems.sort(key=lambda p: p.path)

    def _local_hash(self, check: EntryCheck, f: FileRecord) -> str | None:
        """The backup's value in the server's algorithm: the manifest's, or its stored copy's."""
        value = self.digests.get(f, self.alg)
        if value is None and f.path in self.digests.damaged:
            check.problems.append(Problem(f.path, NOT_COMPARED, "the copy here no longer matches its manifest "
                                          f"(check it: {self.target.printed.command('verify', check.name)})"))
        elif value is None:
            why = self.digests.errors.get(f.path, "")
            check.problems.append(Problem(f.path, MISSING_HERE, f"cannot read the local copy: {why}"))
        return value


def _batches(files: list[FileRecord]) -> list[list[FileRecord]]:
    out: list[list[FileRecord]] = []
    size = 0
    for f in files:
        if not out or size + f.size > HASH_BATCH:
            out.append([])
            size = 0
        out[-1].append(f)
        size += f.size
    return out


def _busy(c) -> str:
    """Why a checkpoint on the server is not complete, in the words of a status."""
    return UNREADABLE if c.unreadable else IN_PROGRESS
