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
from typing import Iterator


from ckptsync import osdeps
from ckptsync.agent import safe_member
from ckptsync.config import Target
from ckptsync.digests import LocalDigests
from ckptsync.errors import (
    OK, AgentError, ConnectError, DiskFull, IntegrityError, Interrupted, IOFailure, NotFound, UsageError,
)
from ckptsync.layout import RESTORED_MARKER
from ckptsync.destination import identical_there, mark_restored, same_place
from ckptsync.policy import SPACE_MARGIN, fits, human, named, newest_first as _newest
from ckptsync.progress import QUIET, Reporter
from ckptsync.ratelimit import RateLimiter
from ckptsync.result import Result
from ckptsync.server import Arrived, MissingOnServer, Server, ServerLocked, Stat, open_server, shares
from ckptsync.server.base import Upload, range_key
from ckptsync.server.parallel import Channels, Shared, run_all
from ckptsync.server.shares import Piece
from ckptsync.server.transfer import KEEP_PREFIX_MIN
from ckptsync.disk import io_error, new_hasher
from ckptsync.stores.directory import Generation, DirectoryStore as Store
from ckptsync.stores.manifest import EXTRA, FileRecord, Manifest
from ckptsync.verify import check_files
from ckptsync.agent import hash_file

# What --adapter-only sends: weights and the configs needed to load them, never training state.
WEIGHT_FILE = re.compile(r"adapter_model\.\w+|(pytorch_)?model[^/]*\.(safetensors|bin)")
LOAD_FILE = re.compile(
    r"(pytorch_)?model[^/]*\.(safetensors|bin)\.index\.json|adapter_config\.json|config\.json"
    r"|generation_config\.json|tokenizer[^/]*|special_tokens_map\.json|added_tokens\.json"
    r"|vocab\.[^/]+|merges\.txt"
)
# Labels of layout.Checkpoint.missing that make an exact resume impossible.
TRAINING_STATE = {"optimizer.pt", "scheduler.pt", "optimizer", "scheduler", "*optim_states.pt"}
NO_RNG = {"rng_state.pth", "rng"}

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
class RestoreResult(Result):
    target: str
    server: str
    source: str                  # the backup directory
    remote_dir: str              # absolute on the server once known
    dry_run: bool
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


# ------------------------------------------------------------ pure parts


def newest_first(manifests: dict[str, Manifest]) -> list[Manifest]:
    """Checkpoints of the backup directory by step, then mtime, newest first (extra files left out)."""
    found = [m for name, m in manifests.items() if name != EXTRA]
    return _newest(found)


def weight_files(m: Manifest) -> list[FileRecord]:
    """The files --adapter-only sends: top-level weights and loading configs of a checkpoint directory."""
    out = []
    for f in m.files:
        head, _, rel = f.path.partition("/")
        if rel and "/" not in rel and (WEIGHT_FILE.fullmatch(rel) or LOAD_FILE.fullmatch(rel)):
            out.append(f)
    return out


def has_weights(m: Manifest) -> bool:
    return any(WEIGHT_FILE.fullmatch(f.path.partition("/")[2]) for f in weight_files(m))


def lacks_training_state(m: Manifest) -> bool:
    return m.content in ("adapter-only", "weights-only") or bool(TRAINING_STATE & set(m.missing))


def only_extras(extras: Manifest | None, paths: tuple, root: Path) -> Manifest:
    """The backed-up extra files named by --extra-file: by the path they were backed up from, or their name."""
    files = extras.files if extras is not None else []
    def names(f: FileRecord) -> set[str]:
        return {f.source or f.path, f.path, posixpath.basename(f.path)}
    unknown = [p for p in paths if not any(p.rstrip("/") in names(f) for f in files)]
    if unknown:
        have = ", ".join(f.source or f.path for f in files) or "none"
        raise NotFound(f"no backed-up extra file {', '.join(unknown)} in {root} (backed up: {have})")
    return replace(extras, files=[f for f in files if any(p.rstrip("/") in names(f) for p in paths)])


def choose(ordered: list[Manifest], name: str | None, adapter_only: bool) -> tuple[Manifest, list[str]]:
    """The checkpoint to restore and notes on the choice. Default: the newest one that can be used."""
    names = ", ".join(m.name for m in ordered) or "none"
    if name:
        name = named(name, ((m.name, m.step) for m in ordered))
        for m in ordered:
            if m.name == name:
                return m, []
        raise NotFound(f"no backup of {name} (backed up: {names})")
    usable = [m for m in ordered if (has_weights(m) if adapter_only else m.resumable)]
    if not usable:
        what = "has adapter or model weight files" if adapter_only else "can resume a run"
        raise NotFound(f"none of the backed-up checkpoints {what} ({names})",
                       hint="choose one with --checkpoint NAME")
    notes = []
    skipped = ordered[: ordered.index(usable[0])]
    if skipped:
        why = ", ".join(f"{m.name} ({m.content})" for m in skipped)
        notes.append(f"newer backups cannot resume the run: {why}; restoring {usable[0].name}")
    return usable[0], notes


def resume_hint(m: Manifest, root: str, path: str, exact: bool) -> str:
    """One line for the user: how to continue from the restored checkpoint."""
    if not exact:
        return f"load the weights from {path} to fine-tune or evaluate (a new run: fresh optimizer and schedule)"
    if m.layout == "trainer":
        return f"resume with: --resume-from-checkpoint {path}"
    if m.layout == "deepspeed":
        return f"resume with: engine.load_checkpoint({root!r}, tag={m.name!r})"
    return f"resume your training script from {path}"


def pick_generation(store: Store, name: str, wanted: str) -> Generation:
    """Generation `wanted` of `name`: its index (1 = the version before the current one) or its id."""
    gens = store.generations(name).get(name, [])
    if not gens:
        raise NotFound(f"no earlier versions of {name} in {store.root}",
                       hint="an earlier version is kept when a newer one replaces it under the same name")
    for i, g in enumerate(gens, 1):
        if wanted in (str(i), g.id):
            return g
    have = ", ".join(f"{i} ({g.id})" for i, g in enumerate(gens, 1))
    raise NotFound(f"no generation {wanted} of {name} (there are: {have})")


def files_text(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def verify_files(root: Path, files: list[FileRecord], rep: Reporter = QUIET) -> list[str]:
    """Re-read the stored copies: what does not match the manifest, one phrase per file."""
    return [f"{p.path} ({p.kind}{': ' + p.detail if p.detail else ''})" for p in check_files(root, files, rep)]


# ------------------------------------------------------------ the run


class Restore:
    def __init__(self, target: Target, opts: RestoreOptions, rep: Reporter = QUIET) -> None:
        if target.parallel != 1 and target.bwlimit and target.limiter is None:
            target = replace(target, limiter=RateLimiter(target.bwlimit))  # one rate for all channels
        self.target = target
        self.opts = opts
        self.rep = rep
        self.store = Store(target.local_dir)
        self.result = RestoreResult(target=target.label, server=target.describe(), source=str(target.local_dir),
                                    remote_dir=target.remote_dir or "", dry_run=opts.dry_run,
                                    adapter_only=opts.adapter_only)
        self.phase = "prepare"
        self._staged = None        # what an interrupted restore left in staging (server.staged)
        self._usable: set[str] = set()   # the staged files that are checked and kept
        self.files_root = self.store.root  # where the chosen version's files are (a generation's folder)
        self.digests = LocalDigests(self.store)   # the backup's bytes in the server's algorithm

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
                raise NotFound(f"no checkpoint backups in {self.store.root}", hint=self._elsewhere())
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
                extras = only_extras(extras, self.opts.extra_paths, self.store.root)
            if EXTRA in damaged and self.opts.extra_files and not self.opts.extra_files_only:
                path, why = damaged[EXTRA]
                self.result.warnings.append(f"the extra files are not restored: their manifest {path} is "
                                            f"damaged ({why})")
            if self.opts.extra_files_only:
                if extras is None:
                    raise NotFound(f"no extra files in {self.store.root}" + ("" if self.opts.extra_files
                                                                             else " (--no-extra-files was given)"))
                self.result.checkpoint, self.result.step = m.name, m.step
                self.result.extra_files_only = True
                files = []
            else:
                files = self._select(m)
            with self._lock(), (contextlib.nullcontext(server) if server else open_server(self.target)) as server:
                self.server = server
                self.channels = Channels(server, lambda: open_server(self.target), self.target.parallel)
                try:
                    with self._server_lock():
                        if self.opts.discard_staged:
                            self._discard_staged(m)
                        else:
                            self._restore(m, files, extras, ordered, manifests)
                finally:
                    if not self.opts.dry_run:
                        self.digests.save()   # what sending computed: the next comparison reads nothing
                    self.result.channels = self.channels.most
                    if self.channels.warning:
                        self.result.warnings.append(self.channels.warning)
                    self.channels.close()
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
            raise IntegrityError(f"no backup in {self.store.root} can be checked, nothing was sent: "
                                 f"damaged manifests: {shown}")

    def _lock(self) -> contextlib.ExitStack:
        """Hold the backup directory's lock, so prune or a backup cannot change what is being read."""
        stack = contextlib.ExitStack()
        if not self.opts.dry_run:
            try:
                stack.enter_context(self.store.lock("ckptsync restore", stall_limit=self.target.stall_timeout,
                                                    hint="wait for it to finish, then run the restore again"))
                self.digests.held = True
            except IOFailure:
                if os.access(self.store.root, os.W_OK) and not osdeps.read_only_fs(self.store.root):
                    raise
                # A read-only backup directory (a mounted disk, an archive's copy) cannot change under us.
                self.result.warnings.append(f"{self.store.root} is read-only: restoring without its lock")
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
            created = held.enter_context(self.server.holding(root, "ckptsync restore",
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

    def _select(self, m: Manifest) -> list[FileRecord]:
        r = self.result
        r.checkpoint, r.step, r.layout, r.content = m.name, m.step, m.layout, m.content
        r.exact_resume = m.resumable and not self.opts.adapter_only
        if not self.opts.adapter_only:
            files = list(m.files)
        elif m.layout == "single-file" or not has_weights(m):
            raise UsageError(f"--adapter-only: {m.name} has no separate adapter or model weight files",
                             hint="restore it whole (without --adapter-only)")
        else:
            files = weight_files(m)
            r.warnings.append(f"--adapter-only: only the weights and configs of {m.name} are sent; you can "
                              "fine-tune from these weights, but the run cannot be resumed exactly "
                              "(no optimizer, scheduler or RNG state)")
        if not self.opts.adapter_only:
            missing = ", ".join(m.missing) or "nothing listed"
            if lacks_training_state(m):
                r.warnings.append(f"{m.name} has no optimizer or scheduler state (missing: {missing}): you can "
                                  "fine-tune from these weights, but the run cannot be resumed exactly")
            elif not m.resumable:
                r.warnings.append(f"{m.name} cannot resume the run exactly (content: {m.content}; "
                                  f"missing: {missing})")
            elif NO_RNG & set(m.missing):
                r.warnings.append(f"{m.name} has no RNG state: the run resumes, but its data order "
                                  "will not be bit-identical")
        return sorted(files, key=lambda f: f.path)

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
        staged = self._usable_staged(root, m, records, check=not self.opts.dry_run)
        r.files += [FileItem(f.path, f.size, STAGED if f.path in staged else SEND) for f in files]
        r.extras = [item for _f, item in extra_items]
        r.resumed_files = sum(1 for f in r.files if f.action == STAGED)
        to_send = [f for f in files if f.path not in staged]
        to_send += [f for f, item in extra_items if item.action in (SEND, REPLACE) and f.path not in staged]
        self._check_space(root, sum(f.size for f in to_send), m.name)
        best_note = "" if self.opts.extra_files_only else self._best_model_note(root, m, manifests)
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
            self._send(root, m.name, to_send)
            if self.opts.adapter_only and not r.identical:
                mark_restored(self.server, root, m, self.opts.compress)
            self.phase = "commit"
            self._commit(root, m, extra_items)
            self.phase = "done"
        if best_note:
            r.warnings.append(best_note)
        if not self.opts.extra_files_only:
            r.resume_hint = resume_hint(m, root, r.path, r.exact_resume)

    # -------------------------------------------------- checks before sending

    def _check_server(self, root: str, m: Manifest, extras: Manifest | None) -> list[tuple[FileRecord, ExtraItem]]:
        """Refuse an existing checkpoint without --force; sort extra files into send / same / differs / outside."""
        records = [f for f in (extras.files if extras else []) if f.source]
        placed = {f.path: self._extra_place(root, f, extras) for f in records}
        dests = [placed[f.path] for f in records if placed[f.path] is not None]
        st = self.server.stat(root, [".", m.name] + dests)
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
                items.append((f, ExtraItem(f.source, f.size, OUTSIDE, "", str(self.files_root / f.path))))
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
        again = self.target.command("restore", "--checkpoint", m.name, "--extra-files-only", "--extra-files-to", where)
        return (f"not restored: {', '.join(f.source for f in outside)} (outside {root}, which is not the "
                f"directory they were backed up from; kept in {self.store.root / EXTRA}); to put them at the "
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
        total = sum(f.size for f in files)
        if files:
            self.rep.info(f"{m.name}: checking {files_text(len(files))} in {self.store.root} against the manifest")
        self.rep.start(f"verify {m.name}", total)
        try:
            bad = verify_files(self.files_root, files, self.rep)
        finally:
            self.rep.finish()
        if bad:
            raise IntegrityError(f"the backup of {m.name} is damaged, nothing was sent: {'; '.join(bad)}",
                                 hint=self._older_hint(m, ordered))
        sent_extras = [f for f, item in extra_items if item.action in (SEND, REPLACE)]
        bad = verify_files(self.store.root, sent_extras)
        if bad:
            raise IntegrityError(f"the backup of the extra files is damaged, nothing was sent: {'; '.join(bad)}",
                                 hint="restore without them: --no-extra-files")

    def _older_hint(self, m: Manifest | None, ordered: list[Manifest]) -> str:
        """The next older backup that verifies (with m None: the newest one), as a command."""
        older = ordered[ordered.index(m) + 1:] if m is not None else ordered
        for other in older:
            if not (has_weights(other) if self.opts.adapter_only else other.resumable):
                continue
            files = weight_files(other) if self.opts.adapter_only else other.files
            if not verify_files(self.store.root, files):
                which = "the next older backup" if m is not None else "the newest backup that"
                return f"{which} verifies: {self.target.command('restore', '--checkpoint', other.name)}"
        if m is None:
            return "no other backup verifies" if older else "there is no other backup"
        return "no older backup verifies either" if older else "there is no older backup"

    def _usable_staged(self, root: str, m: Manifest, records: list[FileRecord], check: bool) -> set[str]:
        """Files an interrupted restore left in staging with the right size, mtime and (if check) hash."""
        stage = m.name
        found = self.server.staged(root, stage)
        self._staged, self._usable = found, set()
        staged, partial = found.files, found.partial
        if not staged and not partial:
            return set()
        want = {f.path: f for f in records}
        marker = posixpath.join(m.name, RESTORED_MARKER)  # staged last: sent again, never in the way
        inside = [p for p in list(staged) + list(partial)
                  if (p == m.name or p.startswith(m.name + "/")) and p != marker]
        if any(p not in want for p in inside):
            # It would be renamed into place with the checkpoint: start over.
            if not self.opts.dry_run:
                self.server.discard(root, stage)
                self._staged = None
            return set()
        # A member with a leftover ".part" is sent again, which replaces the ".part" too.
        fits = [p for p, info in staged.items()
                if p in want and p not in partial and (info.size, info.mtime_ns) == (want[p].size, want[p].mtime_ns)]
        if not check or not fits:
            self._usable = set(fits)
            return set(fits)
        alg = self.server.best_hash
        where = {p: self.server.staging_member(stage, p) for p in fits}
        got = self.server.hash(root, list(where.values()), alg)
        self._usable = {p for p in fits if got.get(where[p]) is not None
                        and got.get(where[p]) == self.digests.get(want[p], alg, self.files_root / p)}
        return set(self._usable)

    def _check_space(self, root: str, need: int, stage: str) -> None:
        free = self.server.df(root).free
        held, reclaim = self._staging_bytes(root, stage)
        if fits(need, free + reclaim):  # staged bytes this run overwrites count as free
            return
        leftover = (f"; an interrupted restore's staging {self.server.staging_path(root, stage)} holds "
                    f"{human(held)} ({human(reclaim)} of it is sent again, so it was counted as free)"
                    if held else "")
        raise DiskFull(
            f"not enough space on {self.result.server} in {root}: this restore needs {human(need)} plus a "
            f"{human(SPACE_MARGIN)} margin, {human(free)} is free (nothing was sent){leftover}",
            hint=("free some space on the server"
                  + (f", or drop the leftover staging: {self.target.command('restore', '--checkpoint', stage, '--discard-staged')}"
                     if held else "")
                  + ", or send only the weights with --adapter-only"))

    def _staging_bytes(self, root: str, stage: str) -> tuple[int, int]:
        """Bytes the staging of `stage` holds, and how many of them this run overwrites."""
        found = self._staged
        if found is None:
            return 0, 0
        usable = self._usable
        parts = {p: self.server.staging_member(stage, p + ".part") for p in found.partial}
        part_sizes = {p: st.size for p, st in self.server.stat(root, list(parts.values())).items() if st is not None}
        held = sum(st.size for st in found.files.values()) + sum(part_sizes.values())
        reclaim = sum(st.size for p, st in found.files.items() if p not in usable) + sum(part_sizes.values())
        return held, reclaim

    def _discard_staged(self, m: Manifest) -> None:
        root = self.target.remote_dir
        found = self.server.staged(root, m.name)
        self._staged, self._usable = found, set()
        held, _ = self._staging_bytes(root, m.name)
        self.result.checkpoint, self.result.path = m.name, self.server.staging_path(root, m.name)
        self.result.discarded_bytes = held
        if not self.opts.dry_run and (found.files or found.partial):
            self.server.discard(root, m.name)

    def _best_model_note(self, root: str, m: Manifest, manifests: dict[str, Manifest]) -> str:
        best = m.state.get("best_model_checkpoint")
        if self.opts.adapter_only or not isinstance(best, str) or not best.strip():
            return ""
        last = re.split(r"[\\/]", best.rstrip("/\\"))[-1]
        if not last or last == m.name or last in self.opts.also or not safe_member(last):
            return ""
        if self.server.stat(root, [last]).get(last) is not None:
            return ""
        again = (f"; restore it too: {self.target.command('restore', '--checkpoint', last)}"
                 if last in manifests else "")
        return (f"trainer_state.json names best_model_checkpoint {best!r}, but {last} is not in {root} on "
                f"this server: a resumed run that loads the best model at the end can crash there{again}")

    # -------------------------------------------------- sending and committing

    def _send(self, root: str, name: str, files: list[FileRecord]) -> None:
        if not files:
            return
        stage = name  # the staging directory is named after the checkpoint: a rerun finds it
        staging = self.server.staging_path(root, stage)
        rotted = []
        kept = self._kept_parts(root, stage, files)
        self.rep.start(f"send {name}", sum(f.size for f in files))
        try:
            sent = self._uploads(root, stage, files, kept)
        except KeyboardInterrupt:
            raise Interrupted(
                f"interrupted while sending {name}: nothing was put in place under {posixpath.join(root, name)}; "
                f"the files that arrived completely are kept in {staging} on the server, and running the same "
                "restore again sends only the rest") from None
        except ConnectError as exc:
            raise type(exc)(f"{exc.message} ({name}: nothing was put in place; the files that arrived are kept in "
                            f"{staging} on the server; run the same restore again to send only the rest)",
                            hint=exc.hint) from exc
        except DiskFull as exc:
            raise DiskFull(f"{exc.message} while sending {name}: nothing was put in place; what arrived is kept "
                           f"in {staging} on the server",
                           hint="free some space there and run the same restore again (it sends only the rest), "
                                "or drop what arrived: "
                                + self.target.command("restore", "--checkpoint", name, "--discard-staged")) from exc
        finally:
            self.rep.finish()
        arrived: dict[str, Arrived] = {}
        hashes: dict[str, str] = {}
        wire_bytes = 0
        for got, hashed, rot, on_wire in sent:
            arrived.update(got)
            hashes.update(hashed)
            rotted += rot
            wire_bytes += on_wire
        if rotted:
            raise IntegrityError(
                f"changed in the backup directory while being sent: {', '.join(rotted)}; nothing was put in place",
                hint="the backup copy is damaged: restore an older checkpoint with --checkpoint NAME")
        bad = [f.path for f in files
               if f.path not in arrived or arrived[f.path].size != f.size or arrived[f.path].hash != hashes.get(f.path)]
        if bad:
            raise IntegrityError(f"arrived damaged on the server: {', '.join(bad)}; nothing was put in place",
                                 hint="run the same restore again")
        r = self.result
        r.sent_files += len(files)
        r.sent_bytes += sum(f.size for f in files) - sum(kept.values())
        r.resumed_bytes += sum(kept.values())
        r.wire_bytes += wire_bytes

    def _uploads(self, root: str, stage: str, files: list[FileRecord], kept: dict[str, int]) -> list[tuple]:
        """Send the files into staging over as many channels as they can keep busy, about the same
        bytes each, a large file as byte ranges over several (finished by Server.assemble); one
        (arrived, hashes sent, rotted, wire bytes) per channel. A split file's kept prefix is
        written over, so `kept` loses it."""
        weights = [(f.path, f.path, f.size) for f in files]
        by_path = {f.path: f for f in files}
        planned = [s for s in shares.plan(weights, self.channels.wanted) if s]
        servers = self.channels.take(max(len(planned), 1))
        if len(planned) <= 1 or len(servers) < 2:
            whole = [Piece(f.path, f.path) for f in files]
            return [self._upload(self.server, root, stage, whole, by_path, kept, self.rep)]
        if len(servers) < len(planned):
            planned = [s for s in shares.plan(weights, len(servers)) if s]
        self.channels.most = max(self.channels.most, len(planned))
        ranges = [p for share in planned for p in share if p.start is not None]
        split = {p.member for p in ranges}
        for member in split:
            kept.pop(member, None)
        rep = Shared(self.rep)
        sent = run_all(servers[:len(planned)],
                       lambda i: self._upload(servers[i], root, stage, planned[i], by_path, kept, rep))
        if split:
            sent.append(self._assemble(root, stage, [f for f in files if f.path in split], ranges, sent))
        return sent

    def _assemble(self, root: str, stage: str, files: list[FileRecord], pieces: list[Piece],
                  sent: list[tuple]) -> tuple:
        """Check every range (`pieces`) of the split files, then have the server finish them;
        returns the whole files as one more channel's (arrived, hashes, rotted, wire bytes)."""
        arrived: dict[str, Arrived] = {}
        hashes: dict[str, str] = {}
        for got, hashed, _rot, _wire in sent:
            arrived.update(got)
            hashes.update(hashed)
        ranges = [range_key(p.member, p.start) for p in pieces]
        bad = [k for k in ranges if k not in arrived or k not in hashes or arrived[k].hash != hashes[k]]
        if bad:
            raise IntegrityError(f"arrived damaged on the server: {', '.join(sorted(bad))}; nothing was put in place",
                                 hint="run the same restore again")
        alg = self.server.best_hash
        whole = self.server.assemble(root, stage, [(f.path, f.size, f.mtime_ns, f.mode) for f in files])
        expect, rotted = {}, []
        for f in files:
            local = self.files_root / f.path
            try:
                expect[f.path] = self.digests.get(f, alg, local) or ""   # "": the copy here changed
                if whole.get(f.path) is not None and whole[f.path].hash != expect[f.path] \
                        and hash_file(local) != f.xxh3_128:
                    rotted.append(f.path)   # the ranges were read from a copy that changed here
            except OSError as exc:
                raise io_error(exc, f"reading {local}") from None
        return whole, expect, rotted, 0

    def _upload(self, server: Server, root: str, stage: str, pieces: list[Piece], by_path: dict[str, FileRecord],
                kept: dict[str, int], rep: Reporter) -> tuple[dict[str, Arrived], dict[str, str], list[str], int]:
        up = server.receive(root, stage, compress=self.opts.compress)
        rotted = []
        for piece in pieces:
            f = by_path[piece.member]
            if piece.start is not None:
                self._upload_range(up, f, piece, rep)
                continue
            seen = new_hasher()

            def also(block: bytes, seen=seen) -> None:
                seen.update(block)
                rep.advance(len(block))

            path = self.files_root / f.path
            try:
                with open(path, "rb") as fh:
                    sent = up.add(f.path, fh, f.size, f.mtime_ns, f.mode, also=also, offset=kept.get(f.path, 0))
            except OSError as exc:
                raise io_error(exc, f"reading {path}") from None
            if seen.hexdigest() != f.xxh3_128:
                rotted.append(f.path)
            else:
                self.digests.learn(f.xxh3_128, f.size, server.best_hash, sent)
        arrived = up.finish()
        return arrived, dict(up.sent), rotted, up.wire_bytes

    def _upload_range(self, up: Upload, f: FileRecord, piece: Piece, rep: Reporter) -> None:
        path = self.files_root / f.path
        try:
            with open(path, "rb") as fh:
                up.add_range(f.path, fh, piece.start, piece.length, f.mtime_ns, f.mode,
                             also=lambda block: rep.advance(len(block)))
        except OSError as exc:
            raise io_error(exc, f"reading {path}") from None

    def _kept_parts(self, root: str, stage: str, files: list[FileRecord]) -> dict[str, int]:
        """Large files an interrupted restore left partly written in staging, whose bytes there hash
        like the same first bytes of the backup's copy: path -> how many need not be sent again."""
        found = self._staged
        want = {f.path: f for f in files if found is not None and f.path in found.partial}
        if not want:
            return {}
        parts = {p: self.server.staging_member(stage, p + ".part") for p in want}
        st = self.server.stat(root, list(parts.values()))
        sizes = {p: st[parts[p]].size for p in want if st.get(parts[p]) is not None
                 and KEEP_PREFIX_MIN <= st[parts[p]].size <= want[p].size}
        if not sizes:
            return {}
        alg = self.server.best_hash
        got = self.server.hash(root, [parts[p] for p in sizes], alg)
        kept = {}
        for p, n in sizes.items():
            try:
                mine = hash_file(self.files_root / p, alg, limit=n)
            except OSError:
                continue  # the send reports it
            if got.get(parts[p]) == mine:
                kept[p] = n
        return kept

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
        self.server.discard(root, stage)

    def _elsewhere(self) -> str:
        root = self.store.root
        try:  # the parent of the backup directories (<local_dir>, not <local_dir>/instance-N)?
            inside = sorted(p for p in root.iterdir() if (p / ".ckptsync" / "manifests").is_dir())
        except OSError:
            inside = []
        if inside:
            names = ", ".join(p.name for p in inside[:5]) + (", ..." if len(inside) > 5 else "")
            return (f"{root} holds backup directories ({names}), not a backup itself: choose one, e.g. "
                    + self.target.command_with("--local-dir", str(inside[0].absolute()), "restore"))
        try:
            found = sorted(str(p) for p in root.parent.iterdir()
                           if p != root and (p / ".ckptsync" / "manifests").is_dir())
        except OSError:
            found = []
        if found:
            return f"backups exist in {', '.join(found[:3])}: choose one with --local-dir"
        return "give the backup directory with --local-dir"


def run_restore(target: Target, opts: RestoreOptions, reporter: Reporter = QUIET) -> RestoreResult:
    """Restore one checkpoint (and the extra files) to the target's server; the source may be an archive."""
    from ckptsync.archive import ArchiveNames, local_source

    try:
        with local_source(target, reporter) as source:
            named = ArchiveNames(target, source)   # messages name the archive, not its extraction
            return named.result(Restore(source, opts, named.reporter(reporter)).run())
    except OSError as exc:  # the laptop side: reading the backup, taking its lock
        raise io_error(exc, f"reading {target.local_dir}") from None
