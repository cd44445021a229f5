"""The local backup directory: checkpoints under their own names, bookkeeping under .ckptsync/.

    <dest>/checkpoint-500/...          files exactly as on the server
    <dest>/latest.pt                   a single-file checkpoint
    <dest>/extra-files/...             the configured extra files
    <dest>/.ckptsync/manifests/N.json  one manifest per entry
    <dest>/.ckptsync/staging/N/        files of an unfinished transfer, kept for the next run;
                                       N.progress.json: those verified, N.manifest.json: N as listed
    <dest>/.ckptsync/generations/N/ID.json and ID/N
                                       earlier versions of entry N, each with its manifest
    <dest>/<run-dir>/                  a followed run: a store of its own (its own .ckptsync/)
    <dest>/.ckptsync/lock, status.json (and status-scheduled/-manual.json), history.jsonl

A manifest is written before its entry is renamed into place, so every
visible entry has one; a manifest without its entry is ignored. The same
holds for generations: ID.json is written before the entry moves to ID/.
A manifest that cannot be read as one (cut short, not JSON, naming another
entry or files outside it) is damaged: its entry is neither trusted nor
taken for a stranger's (`DirectoryStore.damaged`).

Nothing of `.ckptsync/` is ever reached through a symlink: ckptsync deletes
in staging and trash, and a link there would make it delete elsewhere. The
first use of a DirectoryStore checks its bookkeeping paths (`DirectoryStore.check_own`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from ckptsync import liveness, osdeps
from ckptsync.agent import hash_file
from ckptsync.disk import atomic_write, atomic_writes, children, fsync_dir, io_error, refuse_link, remove_tree
from ckptsync.disk import sync_trees
from ckptsync.errors import Locked
from ckptsync.policy import STATUS_FILES, RunStatus, newest_generations, status_file
from ckptsync.stores.manifest import DamagedManifest, FileRecord, Manifest, Verified, read_manifest

META = ".ckptsync"
GENERATIONS = "generations"
# What versions before generations left beside an entry that changed on the server.
REPLACED = re.compile(r"^(?P<name>.+)\.replaced-(?P<ts>\d{8}-\d{6})$")
# ckptsync's own paths under .ckptsync/ (and two levels inside staging/ and generations/).
WATCH_LOCK = "watch.lock"
# Where a removal puts an entry first: it leaves its name in one rename, then is deleted.
TRASH = "trash"
OWN_PATHS = ("manifests", "staging", GENERATIONS, TRASH, "repair", "lock", "watch.lock", *STATUS_FILES,
             "history.jsonl")
# How a lock message tells a command that has --wait from one that has not.
WAIT_HINT = "use --wait to wait for it"


@dataclass
class Generation:
    """An earlier version of an entry, kept when a newer one replaced it under the same name."""

    name: str          # the entry's name, e.g. latest.pt
    id: str            # when that version was backed up, e.g. 20261201-101500
    root: Path         # holds the entry under its own name, so manifest paths resolve as in the store
    manifest: Manifest

    @property
    def entry(self) -> Path:
        return self.root / self.name



class DirectoryStore:
    """A stores.Store: a backup directory on this machine."""

    kind = "a backup directory"
    files_here = True   # an ability (stores/__init__.py)

    def __init__(self, root: Path, shown: str = "") -> None:
        """`shown`: what messages name instead of `root` (an archive, for its extracted copy)."""
        self.root = Path(root)
        self.meta = self.root / META
        self.shown = shown
        self._own_checked = False

    @property
    def location(self) -> str:
        return self.shown or str(self.root)

    def shown_path(self, path: Path) -> str:
        """`path` (under root) as messages name it."""
        return str(Path(self.location) / Path(path).relative_to(self.root)) if self.shown else str(path)

    def exists(self) -> bool:
        return self.root.is_dir()

    def check_own(self) -> None:
        """Refuse a backup directory where .ckptsync, or a path ckptsync keeps in it, is a symlink:
        staging and trash are deleted from and manifests written, and a link would take that
        elsewhere. Checked once per DirectoryStore, before its first use of them (IntegrityError, exit 30)."""
        if self._own_checked:
            return
        for path in [self.meta] + [self.meta / p for p in OWN_PATHS]:
            refuse_link(path)
        for top in ("staging", GENERATIONS):   # staging/NAME/NAME, generations/NAME/ID
            for path in children(self.meta / top):
                refuse_link(path)
                for inner in children(path):
                    refuse_link(inner)
        self._own_checked = True

    # -------------------------------------------------- manifests

    def manifest_path(self, name: str) -> Path:
        self.check_own()
        return self.meta / "manifests" / f"{name}.json"

    def entry(self, name: str) -> Path:
        return self.root / name

    def load(self, name: str) -> Manifest | None:
        """The manifest of a visible entry, or None (missing, damaged, or entry absent)."""
        path = self.manifest_path(name)
        if not os.path.lexists(self.entry(name)):
            return None
        try:
            return read_manifest(path, name)
        except (OSError, DamagedManifest):
            return None

    def _read_manifests(self) -> tuple[dict[str, Manifest], dict[str, tuple[Path, str]]]:
        """The manifests of visible entries, and the damaged ones (name -> (path, why))."""
        good: dict[str, Manifest] = {}
        bad: dict[str, tuple[Path, str]] = {}
        self.check_own()
        folder = self.meta / "manifests"
        if not folder.is_dir():
            return good, bad
        for path in sorted(folder.glob("*.json")):
            if not os.path.lexists(self.entry(path.stem)):
                continue   # left by an interrupted prune: ignored, and cleaned by the next one
            try:
                good[path.stem] = read_manifest(path, path.stem)
            except FileNotFoundError:
                continue
            except DamagedManifest as exc:
                bad[path.stem] = (path, str(exc))
        return good, bad

    def manifests(self) -> dict[str, Manifest]:
        return self._read_manifests()[0]

    def damaged(self) -> dict[str, tuple[Path, str]]:
        """Manifests that are there, beside their entry, but cannot be trusted: the entry's name
        (NAME@ID for a generation) -> (the manifest's path, why). Such an entry is not verified,
        listed as backed up or restored, and not taken for one made by another tool either."""
        out = dict(self._read_manifests()[1])
        for name, (_found, bad) in self._scan_generations().items():
            out.update({f"{name}@{gid}": why for gid, why in bad.items()})
        return out

    def unmanaged(self) -> list[str]:
        """Entries in the backup directory that have no manifest (copied by hand, or left by other tools)."""
        if not self.root.is_dir():
            return []
        good, bad = self._read_manifests()
        known = set(good) | set(bad)
        # A directory with its own .ckptsync/ is a followed run's store, not a stray entry.
        return sorted(p.name for p in self.root.iterdir() if not p.name.startswith(".") and p.name not in known
                      and not (p / META).is_dir())

    def write_manifest(self, m: Manifest) -> None:
        atomic_write(self.manifest_path(m.name), m.to_json())

    def drop_manifest(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.manifest_path(name).unlink()

    def read_file(self, path: str, limit: int) -> bytes | None:
        """A stored file's bytes (`path` as in a manifest); None when it is larger than `limit`."""
        full = self.root / path
        return None if full.stat().st_size > limit else full.read_bytes()

    # -------------------------------------------------- staging

    def staging(self, name: str) -> Path:
        self.check_own()
        return self.meta / "staging" / name

    def progress_path(self, name: str) -> Path:
        self.check_own()
        return self.meta / "staging" / f"{name}.progress.json"

    def load_progress(self, name: str) -> dict[str, Verified]:
        """What the progress file records (a record that is not one is left out: its file is fetched again)."""
        try:
            data = json.loads(self.progress_path(name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        found = {p: Verified.from_dict(r) for p, r in data.items()} if isinstance(data, dict) else {}
        return {p: r for p, r in found.items() if r is not None}

    def save_progress(self, name: str, progress: Mapping[str, Verified]) -> None:
        # Not fsynced: a rerun hashes every staged file before it trusts a record of it.
        atomic_write(self.progress_path(name), json.dumps({p: r.to_dict() for p, r in progress.items()}),
                     durable=False)

    def pending_path(self, name: str) -> Path:
        return self.meta / "staging" / f"{name}.manifest.json"

    def save_pending(self, m: Manifest) -> None:
        """The manifest a fetch will commit, as listed (no hashes yet): with the progress it lets a
        later run commit the staging of a checkpoint the server deleted once every file was copied.
        Not fsynced, as the progress: lost to a power loss, the staging is fetched again or dropped."""
        atomic_write(self.pending_path(m.name), m.to_json(), durable=False)

    def load_pending(self, name: str) -> Manifest | None:
        try:
            return Manifest.from_dict(json.loads(self.pending_path(name).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def staged_names(self) -> list[str]:
        """Entries that staging holds anything of: files, a progress record or a pending manifest."""
        folder = self.meta / "staging"
        if not folder.is_dir():
            return []
        names = set()
        for p in folder.iterdir():
            for suffix in (".progress.json", ".manifest.json"):
                if p.name.endswith(suffix) and p.is_file():
                    names.add(p.name[:-len(suffix)])
                    break
            else:
                if p.is_dir():
                    names.add(p.name)
        return sorted(names)

    def staged_bytes(self) -> int:
        """Bytes that interrupted transfers keep in staging."""
        total = 0
        self.check_own()
        for dirpath, _dirs, files in os.walk(self.meta / "staging"):
            for f in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, f)).st_size
        return total

    def discard_staging(self, name: str) -> None:
        shutil.rmtree(self.staging(name), ignore_errors=True)
        for path in (self.progress_path(name), self.pending_path(name)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def commit(self, m: Manifest) -> Generation | None:
        return self.commit_all([m])[0]

    def commit_all(self, ms: list[Manifest]) -> list[Generation | None]:
        """Move staged entries into place, in order; an entry one replaces becomes a generation, returned.

        The files and directories of all are fsynced first, then the new manifests (one fsync of
        their directory), then each entry is renamed in and the backup directory fsynced once. A
        replaced entry leaves its name first (its manifest copied to the generation). A crash at any
        point leaves either no entry under a name (the next run fetches it) or a matching pair.
        """
        staged = {m.name: self.staging(m.name) / m.name for m in ms}
        sync_trees(list(staged.values()))
        kept: dict[str, Generation | None] = {m.name: None for m in ms}
        new = [m for m in ms if not (self.entry(m.name).exists() or self.entry(m.name).is_symlink())]
        for m in (m for m in ms if all(m is not n for n in new)):
            final = self.entry(m.name)
            old = self.load(m.name) or self.manifest_from_bytes(final, m.name, template=m, backed_up_at=0.0)
            kept[m.name] = self.keep_generation(old, final)
            self.write_manifest(m)
            os.rename(staged[m.name], final)
            fsync_dir(self.root)
        atomic_writes([(self.manifest_path(m.name), m.to_json()) for m in new])
        for m in new:
            os.rename(staged[m.name], self.entry(m.name))
        if new:
            fsync_dir(self.root)
        for m in ms:
            self.discard_staging(m.name)
        return [kept[m.name] for m in ms]

    # -------------------------------------------------- generations

    def generation_dir(self, name: str) -> Path:
        self.check_own()
        return self.meta / GENERATIONS / name

    def generations(self, name: str | None = None) -> dict[str, list[Generation]]:
        """Entry name -> its kept generations, newest first. A generation counts only when both
        its manifest and its entry are there (and the manifest is whole: see damaged())."""
        out: dict[str, list[Generation]] = {}
        for n, (found, _bad) in self._scan_generations(name).items():
            if found:
                out[n] = newest_generations(found)
        return out

    def _scan_generations(self, name: str | None = None) -> dict[str, tuple[list[Generation], dict]]:
        """Entry name -> (its generations, {id: (manifest path, why)} for damaged manifests)."""
        self.check_own()
        top = self.meta / GENERATIONS
        names = [name] if name is not None else (sorted(p.name for p in top.iterdir() if p.is_dir())
                                                 if top.is_dir() else [])
        out: dict[str, tuple[list[Generation], dict]] = {}
        for n in names:
            found, bad = [], {}
            for path in sorted(self.generation_dir(n).glob("*.json")):
                root = path.with_suffix("")
                if not os.path.lexists(root / n):
                    continue
                try:
                    found.append(Generation(n, root.name, root, read_manifest(path, n)))
                except FileNotFoundError:
                    continue
                except DamagedManifest as exc:
                    bad[root.name] = (path, str(exc))
            out[n] = (found, bad)
        return out

    def keep_generation(self, old: Manifest, entry: Path) -> Generation:
        """Move `entry` (whose manifest is `old`) into the generations of old.name."""
        folder = self.generation_dir(old.name)
        folder.mkdir(parents=True, exist_ok=True)
        base = time.strftime("%Y%m%d-%H%M%S", time.gmtime(old.backed_up_at)) if old.backed_up_at else "unknown"
        gid, n = base, 1
        while (folder / gid).exists() or (folder / f"{gid}.json").exists():
            n += 1
            gid = f"{base}-{n}"
        g = Generation(old.name, gid, folder / gid, old)
        self.write_generation(g)
        (folder / gid).mkdir()
        os.rename(entry, folder / gid / old.name)
        fsync_dir(folder / gid)
        return g

    def write_generation(self, g: Generation) -> None:
        atomic_write(g.root.parent / f"{g.id}.json", g.manifest.to_json())

    def drop_generation(self, g: Generation) -> None:
        """Manifest first, so a half-removed generation is never listed."""
        with contextlib.suppress(FileNotFoundError):
            (g.root.parent / f"{g.id}.json").unlink()
        self._remove_aside(g.root, f"{g.name}.{g.id}", g.root.parent)

    def trim_generations(self, name: str, keep: int) -> list[Generation]:
        """Drop all but the `keep` newest generations of `name`; returns the dropped ones."""
        dropped = self.generations(name).get(name, [])[max(keep, 0):]
        for g in dropped:
            self.drop_generation(g)
        return dropped

    def manifest_from_bytes(self, entry: Path, name: str, template: Manifest, backed_up_at: float) -> Manifest:
        """A manifest for an entry that has none, read from its bytes (layout and kind from `template`)."""
        paths = [entry] if not entry.is_dir() else sorted(p for p in entry.rglob("*") if p.is_file()
                                                           and not p.is_symlink())
        files = []
        for p in paths:
            st = p.stat()
            rel = name if p == entry else f"{name}/{p.relative_to(entry).as_posix()}"
            files.append(FileRecord(path=rel, size=st.st_size, mode=stat.S_IMODE(st.st_mode),
                                    mtime_ns=st.st_mtime_ns, xxh3_128=hash_file(p)))
        return Manifest(name=name, layout=template.layout, kind=template.kind, step=None, files=files,
                        content=template.content, source=dict(template.source),
                        backed_up_at=backed_up_at, verified_at=time.time())

    def adopt_replaced(self) -> list[str]:
        """Turn `NAME.replaced-YYYYMMDD-HHMMSS` entries left by earlier versions into generations
        of NAME, each with a manifest built from its bytes. Returns the adopted entry names."""
        if not self.root.is_dir():
            return []
        current = self.manifests()
        adopted = []
        for p in sorted(self.root.iterdir()):
            m = REPLACED.match(p.name)
            if not m or p.name in current or m["name"] not in current:
                continue
            when = time.mktime(time.strptime(m["ts"], "%Y%m%d-%H%M%S"))  # written in local time
            old = self.manifest_from_bytes(p, m["name"], template=current[m["name"]], backed_up_at=when)
            self.keep_generation(old, p)
            adopted.append(p.name)
        if adopted:
            fsync_dir(self.root)
        return adopted

    # -------------------------------------------------- removal

    def remove_entry(self, name: str) -> None:
        """Take entry `name` out of sight in one rename into the trash, made durable before its
        manifest goes (a manifest without its entry is ignored, never the other way round), then
        delete its bytes. An entry already gone loses its manifest only. Raises OSError."""
        self._remove_aside(self.entry(name), name, self.root, then=lambda: self.drop_manifest(name))

    def _remove_aside(self, path: Path, label: str, parent: Path, then=lambda: None) -> None:
        """Rename `path` into the trash and fsync `parent`, run `then`, delete it; the trash goes
        too once empty (what an interruption leaves there, clean_trash removes)."""
        self.check_own()
        aside = self.meta / TRASH / f"{label}.{time.time_ns()}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.rename(path, aside)
            fsync_dir(parent)
        then()
        remove_tree(aside)
        with contextlib.suppress(OSError):
            aside.parent.rmdir()

    def clean_trash(self) -> None:
        self.check_own()
        shutil.rmtree(self.meta / TRASH, ignore_errors=True)

    def clean_leftovers(self) -> list[str]:
        """What an interrupted removal left: the trash, and manifests whose entry is gone. Call under the lock."""
        self.clean_trash()
        dropped = []
        folder = self.meta / "manifests"
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            if not os.path.lexists(self.entry(path.stem)):
                self.drop_manifest(path.stem)
                dropped.append(path.stem)
        return dropped

    def freed_bytes(self, names: list[str], generations: list[Generation] = ()) -> int:
        """Bytes that removing these entries (and earlier versions) gives back: a hard-linked file
        counts only if every link goes."""
        links: dict[tuple[int, int], list[int]] = {}
        for where in [self.entry(name) for name in names] + [g.root for g in generations]:
            for path in _files_under(where):
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                seen = links.setdefault((st.st_dev, st.st_ino), [0, st.st_nlink, st.st_blocks * 512])
                seen[0] += 1
        return sum(size for count, nlink, size in links.values() if count >= nlink)

    # -------------------------------------------------- dedup index

    def content_sources(self) -> dict[tuple[str, int, int], list[tuple[Path, FileRecord]]]:
        """(xxh3, size, mode) -> every stored file with that content and its record, in manifest order."""
        sources: dict[tuple[str, int, int], list[tuple[Path, FileRecord]]] = {}
        for m in self.manifests().values():
            for f in m.files:
                sources.setdefault((f.xxh3_128, f.size, f.mode), []).append((self.root / f.path, f))
        for gens in self.generations().values():
            for g in gens:
                for f in g.manifest.files:
                    sources.setdefault((f.xxh3_128, f.size, f.mode), []).append((g.root / f.path, f))
        return sources

    # -------------------------------------------------- status

    def record_status(self, status: RunStatus) -> None:
        self.check_own()
        self.meta.mkdir(parents=True, exist_ok=True)
        text = status.to_json()
        atomic_write(self.meta / status_file(), text)
        # The last run of each kind too: a manual run must not hide how the last cron run went.
        atomic_write(self.meta / status_file(status.kind), text)
        with open(self.meta / "history.jsonl", "a", encoding="utf-8") as f:
            f.write(status.to_json(indent=None) + "\n")

    def status(self, kind: str = "") -> RunStatus | None:
        """The last recorded run; of one kind ("scheduled" or "manual") when given."""
        try:
            return RunStatus.from_json((self.meta / status_file(kind)).read_bytes())
        except OSError:
            return None

    # -------------------------------------------------- lock

    @contextlib.contextmanager
    def lock(self, command: str, wait: bool = False, on_wait=None, hint: str = "",
             stall_limit: float | None = None, name: str = "lock", on_takeover=None) -> Iterator[None]:
        """One run per backup directory. The system releases the lock when a holder dies (so,
        unlike a bucket's lease, it is never taken over: `on_takeover` is never called).

        `hint`: what the refusal suggests; a command that has --wait passes WAIT_HINT, the
        others get "wait for it to finish", since a hint must name only flags the command has.
        The holder's info (and, as its work advances, its progress time) is in the lock file; with
        `stall_limit`, a refusal says when that holder lives but has not progressed for longer.
        `name`: WATCH_LOCK is held by a watch for as long as it runs (it takes "lock" per cycle)."""
        path = self.meta / name
        self.check_own()
        try:
            self.meta.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise io_error(exc, f"taking the lock in {self.root}") from None
        held = False
        try:
            if not osdeps.lock_file(fd, path, wait=False):
                info = liveness.read_holder(path)
                idle = liveness.stuck(info, time.time(), stall_limit) if stall_limit else None
                if idle is not None:
                    raise Locked(f"{self.root} is locked: {liveness.stuck_text(info, idle, stall_limit)}",
                                 hint=liveness.stuck_hint(info), stuck=True) from None
                holder = liveness.holder_text(info)
                if not wait:
                    raise Locked(f"{self.root} is in use by {holder}",
                                 hint=hint or "wait for it to finish, then run the command again") from None
                if on_wait is not None:
                    on_wait(holder)
                osdeps.lock_file(fd, path, wait=True)
            held = True
            now = time.time()
            liveness.RECORDER.hold(fd, {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                                        "since": now, "progress": now})
            yield
        finally:
            if held:  # a refused run must not erase the holder's info
                liveness.RECORDER.drop(fd)
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                with contextlib.suppress(OSError):
                    osdeps.unlock_file(fd, path)
            os.close(fd)

    def holder(self) -> dict[str, Any] | None:
        """Who holds the lock, as its file says (a holder killed with SIGKILL leaves its info behind)."""
        return liveness.read_holder(self.meta / "lock")

    def watcher(self) -> str:
        """Who runs a watch on this backup directory ('' when none does)."""
        path = self.meta / WATCH_LOCK
        if not path.is_file():
            return ""
        self.check_own()
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            return ""
        try:
            if osdeps.lock_file(fd, path, wait=False):
                osdeps.unlock_file(fd, path)
                return ""
            return liveness.holder_text(liveness.read_holder(path))
        finally:
            os.close(fd)

    def stuck_holder(self, now: float, limit: float) -> str:
        """A warning when a live run holds the lock and has made no progress for longer than `limit`."""
        info = self.holder()
        idle = liveness.stuck(info, now, limit)
        return "" if idle is None else f"{liveness.stuck_text(info, idle, limit)}; {liveness.stuck_hint(info)}"


def _files_under(entry: Path) -> list[str]:
    if not entry.is_dir() or entry.is_symlink():
        return [str(entry)] if os.path.lexists(entry) else []
    return [os.path.join(d, n) for d, _dirs, files in os.walk(entry) for n in files]
