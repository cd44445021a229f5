"""`ckptsync restore`: put a backed-up checkpoint back on a server, checked, in one rename.

Order: choose a checkpoint from the manifests; refuse before any byte moves
when its name is taken on the server (unless --force), when the local copy
no longer matches its manifest, or when the server lacks the space; then
stream the files into `<remote_dir>/.ckptsync-staging-<name>/` and compare
the server's hash of each file with the hash of what was read here. Only when
every file matches is the staged directory renamed to its final name by the
agent's `commit`. An interrupted run leaves only the staging directory; the
next run checks the staged files on the server and sends only the rest.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, ContextManager, Iterator


from ckptsync import osdeps
from ckptsync.agent import safe_member
from ckptsync.config import Target
from ckptsync.digests import LocalDigests
from ckptsync.errors import OK, AgentError, IntegrityError, Interrupted, IOFailure, NotFound, UsageError
from ckptsync.checkpoint_names import RESTORED_MARKER
from ckptsync.destination import identical_there, mark_restored, same_place
from ckptsync.policy import human, named
from ckptsync.progress import QUIET, Reporter
from ckptsync.ratelimit import RateLimiter
from ckptsync.restore_choice import (
    choose, elsewhere_hint, files_text, files_to_send, newest_first, older_hint, only_extras,
    pick_generation, resume_hint, verify_files, weight_files,
)
from ckptsync.restore_send import Rotted, Sender
from ckptsync.result import Result
from ckptsync.server import MissingOnServer, Server, ServerLocked, Stat, open_server
from ckptsync.server.parallel import Channels
from ckptsync.disk import io_error
from ckptsync.stores import ability, open_store
from ckptsync.stores.directory import DirectoryStore as Store
from ckptsync.stores.manifest import EXTRA, FileRecord, Manifest


# ExtraItem.action values.
SEND = "send"
STAGED = "staged"
SAME = "already there"
DIFFERS = "kept existing (differs)"
REPLACE = "replace"
OUTSIDE = "skipped (outside the new run's directory)"


@dataclass
class RestoreOptions:
    checkpoint: str | None = None
    adapter_only: bool = False
    extra_files: bool = True
    force: bool = False
    dry_run: bool = False
    compress: str = "auto"
    extra_files_to: str | None = None   # put every extra file here instead (on the server)
    extra_files_only: bool = False      # send only the extra files, not the checkpoint
    discard_staged: bool = False        # only drop what an interrupted restore left in staging
    also: frozenset = frozenset()       # names restored by the same run (restore --all): not "missing"
    generation: str | None = None       # an earlier version of --checkpoint: 1 = the one before, or its id
    extra_paths: tuple = ()             # only these backed-up extra files (--extra-file), by path or name


@dataclass
class FileItem:
    path: str        # relative to remote_dir, the same string as in the backup directory
    size: int
    action: str      # "send"; "staged": left by an interrupted run and checked on the server; "already there"


@dataclass
class ExtraItem:
    source: str      # where it was, relative to the remote_dir it was backed up from
    size: int
    action: str      # send, already there, kept existing (differs), replace, skipped (outside ...)
    dest: str = ""   # where it goes on the server (absolute once known); "" when skipped
    kept_at: str = ""  # for a skipped one: the copy in the backup directory


@dataclass
class RestoreRun(Result):
    """Where a restore (of one checkpoint, or of all) reads and writes."""

    target: str
    server: str
    source: str                  # the backup directory (or the bucket store's URL)
    remote_dir: str              # absolute on the server once known
    dry_run: bool
    direct: bool = False         # the server read the bytes from the store itself (a bucket): none came through here


@dataclass
class RestoreResult(RestoreRun):
    checkpoint: str = ""
    generation: str = ""         # the id of the earlier version restored, if one was asked for
    step: int | None = None
    layout: str = ""
    content: str = ""
    path: str = ""               # where the checkpoint is (or would be) on the server
    adapter_only: bool = False
    exact_resume: bool = False
    creates_remote_dir: bool = False
    replaced: bool = False       # an existing copy on the server was replaced (--force)
    identical: bool = False      # the server already had it with the same bytes: nothing of it was sent
    files: list[FileItem] = field(default_factory=list)
    extras: list[ExtraItem] = field(default_factory=list)
    sent_files: int = 0
    sent_bytes: int = 0
    wire_bytes: int = 0
    resumed_files: int = 0
    resumed_bytes: int = 0       # first bytes of partly sent files kept in staging, not sent again
    resume_hint: str = ""
    warnings: list[str] = field(default_factory=list)
    channels: int = 1             # the most connections one transfer used at once (--parallel)
    seconds: float = 0.0
    discarded_bytes: int | None = None   # with --discard-staged: what the staging held
    extra_files_only: bool = False

    @property
    def exit_code(self) -> int:
        return OK

    @property
    def send_bytes(self) -> int:
        """What this run sends (or would send): files not already staged, extra files to put in place."""
        return sum(f.size for f in self.files if f.action == SEND) + sum(
            e.size for e in self.extras if e.action in (SEND, REPLACE))

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["send_bytes"] = self.send_bytes
        return out


# ------------------------------------------------------------ the run


class Restore:
    def __init__(self, target: Target, opts: RestoreOptions, rep: Reporter = QUIET, store: Store | None = None,
                 connect: Callable[[], Server] | None = None) -> None:
        """`store`: where the backup is read (an archive's extracted copy), else the target's directory;
        `connect`: gives each connection (see open_server)."""
        if target.link.parallel != 1 and target.link.bwlimit and target.link.limiter is None:
            target = target.with_link(limiter=RateLimiter(target.link.bwlimit))  # one rate for all channels
        self.target = target
        self.connect = connect
        self.opts = opts
        self.rep = rep
        self.store = store or Store(target.local_dir)
        self.result = RestoreResult(target=target.label, server=target.describe(), source=str(target.local_dir),
                                    remote_dir=target.remote_dir or "", dry_run=opts.dry_run,
                                    adapter_only=opts.adapter_only)
        self.phase = "prepare"
        self.best_missing: str | None = None   # the best model's checkpoint, when the server lacks it (_check_server)
        self.files_root = self.store.root  # where the chosen version's files are (a generation's folder)
        self.digests = LocalDigests(self.store)   # the backup's bytes in the server's algorithm

    def open_server(self) -> Server:
        """A new connection to the target's server, not yet opened."""
        return open_server(self.target, self.connect)

    def run(self, server=None) -> RestoreResult:
        """`server`: an open connection to reuse (restore --all), else one is opened here."""
        started = time.monotonic()
        try:
            manifests = self.store.manifests()
            ordered = newest_first(manifests)
            damaged = {n: why for n, why in self.store.damaged().items() if "@" not in n}
            if self.opts.checkpoint:
                known = [(m.name, m.step) for m in ordered] + [(n, None) for n in damaged]
                self.opts = replace(self.opts, checkpoint=named(self.opts.checkpoint, known))
            self._refuse_damaged(damaged, ordered)
            if not ordered:
                raise NotFound(f"no checkpoint backups in {self.store.location}",
                               hint=elsewhere_hint(self.store.root, self.target))
            m, notes = choose(ordered, self.opts.checkpoint, self.opts.adapter_only)
            if not self.opts.checkpoint:
                self.result.warnings.extend(
                    f"skipped {name}: its manifest {path} is damaged ({why}), so its files cannot be checked; "
                    f"restoring {m.name}" for name, (path, why) in damaged.items() if name != EXTRA)
            self.result.warnings.extend(notes)
            if self.opts.generation is not None:
                g = pick_generation(self.store, m.name, self.opts.generation)
                m, self.files_root = g.manifest, g.root
                self.result.generation = g.id
            extras = manifests.get(EXTRA) if self.opts.extra_files else None
            if self.opts.extra_paths and self.opts.extra_files:
                extras = only_extras(extras, self.opts.extra_paths, Path(self.store.location))
            if EXTRA in damaged and self.opts.extra_files and not self.opts.extra_files_only:
                path, why = damaged[EXTRA]
                self.result.warnings.append(f"the extra files are not restored: their manifest {path} is "
                                            f"damaged ({why})")
            if self.opts.extra_files_only:
                if extras is None:
                    raise NotFound(f"no extra files in {self.store.location}" + ("" if self.opts.extra_files
                                                                             else " (--no-extra-files was given)"))
                self.result.checkpoint, self.result.step = m.name, m.step
                self.result.extra_files_only = True
                files = []
            else:
                files = self._select(m)
            given = server is not None
            with self._lock(), (contextlib.nullcontext(server) if given else self.open_server()) as server:
                self.server = server
                self.channels = Channels(server, self.open_server, self.target.link.parallel)
                self.sender = Sender(server, self.channels, self.target, self.result, self.files_root, self.digests,
                                     self.rep, self.opts.compress, self.opts.dry_run)
                ended = False   # without an error: the first channel closes beside the others
                try:
                    with self._server_lock():
                        if self.opts.discard_staged:
                            self._discard_staged(m)
                        else:
                            self._restore(m, files, extras, ordered, manifests)
                    ended = True
                finally:
                    if not self.opts.dry_run:
                        self.digests.save()   # what sending computed: the next comparison reads nothing
                    self.result.channels = self.channels.most
                    if self.channels.warning:
                        self.result.warnings.append(self.channels.warning)
                    self.channels.close(first=ended and not given)
            return self.result
        except KeyboardInterrupt:
            if self.phase == "commit":
                raise Interrupted(f"interrupted while moving {self.result.checkpoint} into place on the server: "
                                  f"if it is not at {self.result.path}, run the same restore again") from None
            raise Interrupted("interrupted before anything was sent: nothing changed on the server") from None
        finally:
            self.result.seconds = time.monotonic() - started

    def _refuse_damaged(self, damaged: dict[str, tuple[Path, str]], ordered: list[Manifest]) -> None:
        """A backup asked for by name (or the extra files alone) whose manifest is damaged, or a
        store where every checkpoint's is: exit 30 naming the manifest."""
        wanted = EXTRA if self.opts.extra_files_only and self.opts.extra_files else self.opts.checkpoint
        if wanted in damaged:
            path, why = damaged[wanted]
            raise IntegrityError(f"the backup of {wanted} cannot be checked, nothing was sent: its manifest "
                                 f"{path} is damaged ({why})", hint=self._older_hint(None, ordered))
        if not ordered and set(damaged) - {EXTRA}:
            shown = "; ".join(f"{n}: {p} ({why})" for n, (p, why) in damaged.items() if n != EXTRA)
            raise IntegrityError(f"no backup in {self.store.location} can be checked, nothing was sent: "
                                 f"damaged manifests: {shown}")

    def _lock(self) -> contextlib.ExitStack:
        """Hold the backup directory's lock, so prune or a backup cannot change what is being read."""
        stack = contextlib.ExitStack()
        if not self.opts.dry_run:
            try:
                stack.enter_context(self.store.lock("ckptsync restore", stall_limit=self.target.link.stall_timeout,
                                                    hint="wait for it to finish, then run the restore again"))
                self.digests.held = True
            except IOFailure:
                if os.access(self.store.root, os.W_OK) and not osdeps.read_only_fs(self.store.root):
                    raise
                # A read-only backup directory (a mounted disk, an archive's copy) cannot change under us.
                self.result.warnings.append(f"{self.store.location} is read-only: restoring without its lock")
        return stack

    @contextlib.contextmanager
    def _server_lock(self) -> Iterator[None]:
        """The server directory's lock, from the first look at the server to the commit: two restores
        into one directory would otherwise mix their files, and both say they succeeded."""
        root = self.target.remote_dir
        if self.opts.dry_run:
            yield
            return
        held = contextlib.ExitStack()
        try:
            # Not waited for at the end: the next restore on this connection, or its close, comes after it.
            created = held.enter_context(self.server.holding(root, "ckptsync restore", wait=False,
                                                             create=not self.opts.discard_staged))
        except ServerLocked as exc:
            raise ServerLocked(f"{exc.message}; nothing was sent", path=exc.path, holder=exc.holder) from None
        except MissingOnServer:  # --discard-staged in a directory that is not there: nothing is staged
            yield
            return
        except AgentError as exc:
            if exc.agent_kind != "not_dir":
                raise
            raise UsageError(f"{root} on {self.result.server} is not a directory") from None
        with held:
            self.result.creates_remote_dir = created
            yield

    def _restore(self, m: Manifest, files: list[FileRecord], extras: Manifest | None,
                 ordered: list[Manifest], manifests: dict[str, Manifest]) -> None:
        r = self.result
        root = self.target.remote_dir
        r.path = posixpath.join(root, m.name)
        self.rep.info(f"{m.name}: checking the server")
        extra_items = self._check_server(root, m, extras)
        if r.identical:  # the server's copy has these bytes: nothing of the checkpoint is sent
            r.files, files = [FileItem(f.path, f.size, SAME) for f in files], []
            self.rep.info(f"{m.name}: already there, identical (hashed on the server)")
        self._verify(m, files, extra_items, ordered)
        records = files + [f for f, _item in extra_items]
        staged = self.sender.usable_staged(root, m, records, check=not self.opts.dry_run)
        r.files += [FileItem(f.path, f.size, STAGED if f.path in staged else SEND) for f in files]
        r.extras = [item for _f, item in extra_items]
        r.resumed_files = sum(1 for f in r.files if f.action == STAGED)
        to_send = [f for f in files if f.path not in staged]
        to_send += [f for f, item in extra_items if item.action in (SEND, REPLACE) and f.path not in staged]
        if not self.opts.dry_run:
            self.sender.open_ahead(to_send)   # the channels start to open before the last answers are read
        self.sender.check_space(root, sum(f.size for f in to_send), m.name)
        best_note = self._best_model_note(root, m, manifests)
        if self.opts.dry_run and self.server.hello.home:  # the path the real run will print
            r.remote_dir = root = self._absolute(root)
            r.path = posixpath.join(root, m.name)
            for item in r.extras:
                if item.action != OUTSIDE:
                    item.dest = posixpath.normpath(posixpath.join(root, self._extra_dest(item.source)))
        if not self.opts.dry_run:
            r.remote_dir = root = self.server.mkdir(root)
            r.path = posixpath.join(root, m.name)
            for item in r.extras:
                if item.action != OUTSIDE:
                    item.dest = posixpath.normpath(posixpath.join(root, self._extra_dest(item.source)))
            if to_send or not r.identical:
                self.rep.info(f"{m.name}: sending {files_text(len(to_send))}, {human(sum(f.size for f in to_send))}"
                              + (f" ({len(staged)} already on the server from an interrupted restore)" if staged else ""))
            self.phase = "send"
            try:
                self.sender.send(root, m.name, to_send)
            except Rotted as exc:
                raise self._damaged(root, m, exc, ordered) from None
            if self.opts.adapter_only and not r.identical:
                mark_restored(self.server, root, m, self.opts.compress)
            self.phase = "commit"
            self._commit(root, m, extra_items)
            self.phase = "done"
        if best_note:
            r.warnings.append(best_note)
        if not self.opts.extra_files_only:
            r.resume_hint = resume_hint(m, root, r.path, r.exact_resume)

    def _select(self, m: Manifest) -> list[FileRecord]:
        r = self.result
        r.checkpoint, r.step, r.layout, r.content = m.name, m.step, m.layout, m.content
        r.exact_resume = m.resumable and not self.opts.adapter_only
        files, warnings = files_to_send(m, self.opts.adapter_only)
        r.warnings.extend(warnings)
        return files

    def _older_hint(self, m: Manifest | None, ordered: list[Manifest]) -> str:
        return older_hint(self.store.root, m, ordered, self.opts.adapter_only,
                          lambda name: self.target.printed.command("restore", "--checkpoint", name))

    # -------------------------------------------------- checks before sending

    def _check_server(self, root: str, m: Manifest, extras: Manifest | None) -> list[tuple[FileRecord, ExtraItem]]:
        """Refuse an existing checkpoint without --force; sort extra files into send / same / differs / outside."""
        records = [f for f in (extras.files if extras else []) if f.source]
        placed = {f.path: self._extra_place(root, f, extras) for f in records}
        dests = [placed[f.path] for f in records if placed[f.path] is not None]
        best = self._best_model_name(m)
        paths = [".", m.name] + dests + ([best] if best is not None and best not in dests else [])
        # The staging, the free space and the directory's full path are asked next (usable_staged,
        # check_space, mkdir): all four answers come in one round trip. The lock made the
        # directory, so that mkdir changes nothing before the checks are passed.
        ahead = [("stat", {"root": root, "paths": paths}), ("staged", {"root": root, "name": m.name}),
                 ("df", {"path": root})]
        self.server.expect(ahead + ([] if self.opts.dry_run else [("mkdir", {"path": root})]))
        st = self.server.stat(root, paths)
        self.best_missing = best if best is not None and st.get(best) is None else None
        here = st.get(".")
        if here is not None and not here.is_dir:
            raise UsageError(f"{root} on {self.result.server} is not a directory")
        self.result.creates_remote_dir = self.result.creates_remote_dir or here is None
        if st.get(m.name) is not None and not self.opts.extra_files_only:
            self.result.identical = self._identical(root, m, st[m.name])
            if self.result.identical:
                pass  # restored already: the same bytes, whatever --force says
            elif not self.opts.force:
                raise UsageError(
                    f"{m.name} already exists in {root} on {self.result.server}; nothing was sent",
                    hint="add --force to replace it (atomically: the old copy goes only once the new one is in place)")
            else:
                self.result.replaced = True
        existing = [f for f in records if placed[f.path] is not None and st.get(placed[f.path]) is not None]
        same = self._same_on_server(root, [f for f in existing if not st[placed[f.path]].is_dir], placed)
        items = []
        for f in records:
            dest = placed[f.path]
            if dest is None:
                items.append((f, ExtraItem(f.source, f.size, OUTSIDE, "", self.store.shown_path(self.files_root / f.path))))
                continue
            if st.get(dest) is None:
                action = SEND
            elif f.path in same:
                action = SAME
            else:
                action = REPLACE if self.opts.force else DIFFERS
            items.append((f, ExtraItem(f.source, f.size, action, posixpath.normpath(posixpath.join(root, dest)))))
            if action == DIFFERS:
                self.result.warnings.append(f"kept existing {dest} (differs from the backup; --force replaces it)")
        outside = [f for f in records if placed[f.path] is None]
        if outside:
            self.result.warnings.append(self._outside_text(root, m, outside))
        return items

    def _outside_text(self, root: str, m: Manifest, outside: list[FileRecord]) -> str:
        """One line for the extra files left in the backup: they lay outside the run's tree, and
        `root` is another directory than the one they were backed up from."""
        dirs = {posixpath.dirname(f.source) or "." for f in outside}
        where = dirs.pop() if len(dirs) == 1 else "DIR"
        again = self.target.printed.command("restore", "--checkpoint", m.name, "--extra-files-only", "--extra-files-to", where)
        return (f"not restored: {', '.join(f.source for f in outside)} (outside {root}, which is not the "
                f"directory they were backed up from; kept in {self.store.shown_path(self.store.root / EXTRA)}); to put them at the "
                f"same place relative to this run: {again}")

    def _identical(self, root: str, m: Manifest, there: Stat) -> bool:
        want = weight_files(m) if self.opts.adapter_only else m.files
        return identical_there(self.server, root, m.name, want, there,
                               lambda f, alg: self.digests.get(f, alg, self.files_root / f.path),
                               ignore={RESTORED_MARKER} if self.opts.adapter_only else set())

    def _extra_dest(self, source: str) -> str:
        """Where an extra file goes, relative to remote_dir (or absolute)."""
        if self.opts.extra_files_to:
            return posixpath.join(self.opts.extra_files_to, posixpath.basename(source))
        return source

    def _extra_place(self, root: str, f: FileRecord, extras: Manifest | None) -> str | None:
        """The destination of one extra file, or None when it would land outside a new run's tree."""
        dest = self._extra_dest(f.source)
        if self.opts.extra_files_to:
            return dest
        if extras is not None and same_place(extras.source, self._absolute(root), self.server.hello.home):
            return dest  # the same run directory: back where it came from
        inside = posixpath.normpath(dest)
        if inside.startswith("/") or inside == ".." or inside.startswith("../"):
            return None
        return dest

    def _absolute(self, root: str) -> str:
        home = self.server.hello.home or "/"
        if root == "~" or root.startswith("~/"):
            root = home + root[1:]
        return posixpath.normpath(root if root.startswith("/") else posixpath.join(home, root))

    def _same_on_server(self, root: str, records: list[FileRecord], placed: dict[str, str | None]) -> set[str]:
        """Extra files whose server copy has the same content as the backup (hashed on the server)."""
        if not records:
            return set()
        alg = self.server.best_hash
        got = self.server.hash(root, [placed[f.path] for f in records], alg)
        return {f.path for f in records if got.get(placed[f.path]) is not None
                and got.get(placed[f.path]) == self.digests.get(f, alg, self.store.root / f.path)}

    def _verify(self, m: Manifest, files: list[FileRecord], extra_items: list[tuple[FileRecord, ExtraItem]],
                ordered: list[Manifest]) -> None:
        """Refuse a damaged backup before anything is sent. A real run reads no bytes here: the send
        hashes each file as it reads it, and a file that does not match its manifest then stops the
        restore before anything is put in place (`_damaged`). A dry run reads them all."""
        read = self.opts.dry_run
        if files and read:
            self.rep.info(f"{m.name}: checking {files_text(len(files))} in {self.store.location} against the manifest")
            self.rep.start(f"verify {m.name}", sum(f.size for f in files))
            try:
                bad = verify_files(self.files_root, files, self.rep)
            finally:
                self.rep.finish()
        else:
            bad = verify_files(self.files_root, files, read=False)
        if bad:
            raise IntegrityError(f"the backup of {m.name} is damaged, nothing was sent: {'; '.join(bad)}",
                                 hint=self._older_hint(m, ordered))
        sent_extras = [f for f, item in extra_items if item.action in (SEND, REPLACE)]
        bad = verify_files(self.store.root, sent_extras, read=read)
        if bad:
            raise IntegrityError(f"the backup of the extra files is damaged, nothing was sent: {'; '.join(bad)}",
                                 hint="restore without them: --no-extra-files")

    def _damaged(self, root: str, m: Manifest, exc: Rotted, ordered: list[Manifest]) -> IntegrityError:
        """Backup files that did not hash to their manifest as they were sent: nothing is put in
        place, an older checkpoint is suggested, and what arrived whole stays staged for a rerun
        once the backup is repaired (with the command that drops it)."""
        drop = self.target.printed.command("restore", "--checkpoint", m.name, "--discard-staged")
        return IntegrityError(f"the backup of {m.name} is damaged, nothing was put in place: "
                              + "; ".join(f"{p} (its bytes no longer match the manifest)" for p in exc.paths)
                              + f"; the files that matched are kept in {self.server.staging_path(root, m.name)} on "
                              f"the server (to drop them: {drop})", hint=self._older_hint(m, ordered))

    def _discard_staged(self, m: Manifest) -> None:
        root = self.target.remote_dir
        found = self.server.staged(root, m.name)
        self.sender.staged, self.sender.usable = found, set()
        held, _ = self.sender.staging_bytes(root, m.name)
        self.result.checkpoint, self.result.path = m.name, self.server.staging_path(root, m.name)
        self.result.discarded_bytes = held
        if not self.opts.dry_run and (found.files or found.partial):
            self.server.discard(root, m.name)

    def _best_model_name(self, m: Manifest) -> str | None:
        """The checkpoint that m's trainer_state names as the best model, when it is another one
        this restore does not bring: the server should have it already."""
        best = m.state.get("best_model_checkpoint")
        if self.opts.adapter_only or self.opts.extra_files_only or not isinstance(best, str) or not best.strip():
            return None
        last = re.split(r"[\\/]", best.rstrip("/\\"))[-1]
        if not last or last == m.name or last in self.opts.also or not safe_member(last):
            return None
        return last

    def _best_model_note(self, root: str, m: Manifest, manifests: dict[str, Manifest]) -> str:
        """A warning when the best model's checkpoint is not on the server (stat-ed with the checks)."""
        last = self.best_missing
        if last is None:
            return ""
        best = m.state.get("best_model_checkpoint")
        again = (f"; restore it too: {self.target.printed.command('restore', '--checkpoint', last)}"
                 if last in manifests else "")
        return (f"trainer_state.json names best_model_checkpoint {best!r}, but {last} is not in {root} on "
                f"this server: a resumed run that loads the best model at the end can crash there{again}")

    # -------------------------------------------------- committing

    def _commit(self, root: str, m: Manifest, extra_items: list[tuple[FileRecord, ExtraItem]]) -> None:
        stage = m.name
        done = self.server.commit(root, stage, [(m.name, m.name)], force=self.opts.force) \
            if not (self.opts.extra_files_only or self.result.identical) else None
        if done is not None and m.name in done.kept:
            raise UsageError(
                f"{m.name} appeared in {root} during the restore and was left as it is; the restored copy is in "
                f"{self.server.staging_path(root, stage)}", hint="add --force to replace it")
        moves = [(f.path, self._extra_dest(f.source)) for f, item in extra_items if item.action in (SEND, REPLACE)]
        if moves:
            done = self.server.commit(root, stage, moves, force=self.opts.force)
            for dest in done.kept:
                self.result.warnings.append(f"kept existing {dest} (it appeared during the restore)")
                for f, item in extra_items:
                    if self._extra_dest(f.source) == dest:
                        item.action = DIFFERS
        if done is None or done.staging_left:   # else the commit took all and removed it: no round trip
            self.server.discard(root, stage)


def run_restore(target: Target, opts: RestoreOptions, reporter: Reporter = QUIET,
                connect: Callable[[], Server] | None = None) -> RestoreResult:
    """Restore one checkpoint (and the extra files) to the target's server; the source may be an archive."""
    try:
        with local_copy(target, reporter) as store:
            return Restore(target, opts, reporter, store=store, connect=connect).run()
    except OSError as exc:  # the laptop side: reading the backup, taking its lock
        raise io_error(exc, f"reading {target.local_dir}") from None


def local_copy(target: Target, rep: Reporter = QUIET) -> ContextManager[Store]:
    """The target's store as a directory on this machine: itself, or a copy the store makes (an archive)."""
    store = open_store(target)
    copy = ability(store, "local_copy")
    return copy(rep) if copy is not None else contextlib.nullcontext(store)
