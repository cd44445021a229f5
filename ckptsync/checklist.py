"""`ckptsync checklist`: may I delete this instance now? The seed's pre-shutdown checklist as checks."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from ckptsync import datapath
from ckptsync.agent import hash_file
from ckptsync.backup import BackupOptions
from ckptsync.commit import staging_note
from ckptsync.config import Target
from ckptsync.errors import OK, PARTIAL, CkptsyncError
from ckptsync.layout import Checkpoint
from ckptsync.progress import QUIET, Reporter
from ckptsync.digests import LocalDigests
from ckptsync.freshness import judge_view
from ckptsync.result import Result
from ckptsync.runs import RunState, survey
from ckptsync.policy import CHECK, human, last_run_summary, span
from ckptsync.scan import ServerView, empty_remote_dir, scan_server
from ckptsync.server import RemoteDirMissing, Server, open_server
from ckptsync.disk import new_hasher
from ckptsync.stores import ability, open_store
from ckptsync.stores.manifest import EXTRA, FileRecord
from ckptsync.training import Verdict, judge_training
from ckptsync.verify import run_verify

# The server's clock this far from this computer's is worth saying (it decides nothing).
CLOCK_REPORT = 120.0
MAX_FETCHED = 256 << 20   # an extra file fetched from a store elsewhere (a bucket) to be hashed here


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


@dataclass
class ChecklistResult(Result):
    target: str
    server: str
    dest: str
    checks: list[Check] = field(default_factory=list)
    backup_ran: bool = False
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)     # information: other training on the server
    clock_offset: float | None = None                  # the server's clock minus this computer's, seconds

    @property
    def safe(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def exit_code(self) -> int:
        return OK if self.safe else PARTIAL

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(safe=self.safe, exit_code=self.exit_code)
        return out


class Checklist:
    """Over any store (stores.Store): what differs by kind is asked of the store as an ability."""

    def __init__(self, target: Target, rep: Reporter = QUIET, connect: Callable[[], Server] | None = None) -> None:
        self.target = target
        self.connect = connect   # gives the connection (see open_server)
        self.rep = rep
        self.store = open_store(target)
        self.result = ChecklistResult(target.label, target.describe(), self.store.location)

    def add(self, name: str, ok: bool, detail: str, fix: str = "") -> None:
        self.result.checks.append(Check(name, ok, detail, "" if ok else fix))

    def run(self, backup_first: bool, now: float | None = None, training_stopped: bool = False) -> ChecklistResult:
        """`now`: this computer's clock, for the last backup's age; `training_stopped`: the user
        says so (see training.judge_training)."""
        if backup_first:
            self.rep.info("running the backup first")
            datapath.backup(self.target, BackupOptions(max_checkpoints=1, include_best=True), self.rep,
                            connect=self.connect)
            self.result.backup_ran = True
        return self._run(now, training_stopped)

    def verify(self, name: str) -> tuple[bool, str, str]:
        """(ok, detail, fix) of re-checking the stored copy of `name` now."""
        checked = run_verify(self.target, [name], rep=self.rep)
        bad = checked.failed
        if not bad:
            how = ("every file re-read and matches its manifest" if checked.read_data
                   else "every object's size and ETag match its manifest")
            return True, f"{name}: {how}", ""
        problems = ", ".join(p.path for p in bad[0].problems[:3])
        fix = (f"{self.target.printed.command('verify', '--repair', name)}   (fetches the damaged files again)"
               if ability(self.store, "commit")   # repair puts the fetched files back
               else f"{self.target.printed.command('verify', '--read-data', name)}   (reads every object back)")
        return False, f"{name}: {bad[0].status}: {problems}", fix

    def _run(self, now: float | None, training_stopped: bool) -> ChecklistResult:
        t = self.target
        try:
            with open_server(t, self.connect) as server:
                self.add("server reachable", True, f"{server.describe()}, Python {server.hello.python}")
                self._clock(server)
                view = scan_server(server, t.remote_dir, t.policy.settle_seconds)
                procs = server.procs(t.policy.train_process or "", view.root)
                extras = self._extras_on_server(server, view)
                # Strict: a backup made before inodes were recorded is hashed before it counts.
                self._manifests = self.store.manifests()
                self._current = judge_view(server, view, self._manifests, CHECK, local=self._digests())
                runs = survey(server, view.root, t)
                self._read_again(server, view)
                empty = None if view.checkpoints else empty_remote_dir(server, view, t, "checklist")
        except RemoteDirMissing as exc:
            self.add("remote directory exists", False, exc.message,
                     exc.hint or "check --remote-dir (or remote_dir in the config): nothing there can be checked")
            self._last_run(now)
            return self.result
        except CkptsyncError as exc:
            if not self.result.checks:
                self.add("server reachable", False, exc.message,
                         "check the connection, or back up before the server is gone")
            else:
                self.add("server answered", False, exc.message, "run the checklist again; if it repeats, report it")
            self._last_run(now)
            return self.result
        if view.clock:
            self.result.warnings.append(view.clock)
        self._training(judge_training(view, procs, t.policy.settle_seconds, training_stopped))
        self._unseen(view)
        for c in view.checkpoints:
            if c.abandoned:
                self.result.warnings.append(f"{c.name} is abandoned (incomplete: {c.reason}); it cannot be "
                                            "backed up and does not block deleting the instance")
        newest = next((c for c in view.checkpoints if c.complete), None)
        top = next((c for c in view.checkpoints if c.complete or c.unreadable), None)
        if top is not None and top.unreadable:
            # The newest checkpoint there is may be the one that could not be read.
            self.add("newest checkpoint backed up", False,
                     f"{top.name} could not be read on the server, and it is newer than every checkpoint that could",
                     "make it readable on the server, then back it up")
        if empty is not None:
            self.add("newest checkpoint backed up", False,
                     empty.young_text if empty.young else f"{empty.message}: {empty.detail}",
                     empty.command or "nothing to save yet")
        elif top is None:
            self.add("newest checkpoint backed up", False, f"no complete checkpoint in {t.remote_dir}",
                     "nothing to save yet")
        elif newest is not None:
            title = "newest checkpoint backed up" if top is newest else "newest readable checkpoint backed up"
            self._backed_up(title, view, newest)
        best = next((c for c in view.checkpoints if c.is_best and c.complete), None)
        if best is not None and best is not newest:
            self._backed_up("best checkpoint backed up", view, best)
        self._runs(runs)
        self._extras(extras)
        self._not_backed_up(view)
        self._last_run(now)
        return self.result

    def _clock(self, server: Server) -> None:
        offset = server.hello.offset
        if not server.hello.now:
            return
        self.result.clock_offset = round(offset, 1)
        if abs(offset) >= CLOCK_REPORT:
            way = "behind" if offset < 0 else "ahead of"
            self.result.warnings.append(f"the server's clock is {span(offset)} {way} this computer's; the ages "
                                        "of its files are measured by the server's own clock")

    def _training(self, v: Verdict) -> None:
        t = self.target
        if v.writing:
            fix = "wait for the save to finish (or stop training), then run the checklist again"
        else:
            fix = (f"stop training (or wait for the next checkpoint), then run the checklist again"
                   f"   (or: {t.printed.command('checklist', '--training-stopped')})")
        self.add("training stopped", v.stopped, v.detail, fix)
        self.result.notes.extend(v.notes)
        self.result.warnings.extend(v.stale)

    def _unseen(self, view: ServerView) -> None:
        """What the server could not list or read may be what matters most (the newest checkpoint
        behind a dangling link): it is never taken as absent."""
        problems = [f"{c.name}: {c.reason}" for c in view.checkpoints if c.unreadable]
        if view.stopped:
            problems.append(f"{view.stopped}; checkpoints past that point were not seen")
        self.add("everything on the server read", not problems,
                 "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
                 or f"every checkpoint under {view.root} listed and readable",
                 "make them readable by the login user on the server (or repair the link), "
                 "then run the checklist again")

    def _not_backed_up(self, view: ServerView) -> None:
        """Name every complete checkpoint the backup does not hold (deleting the instance loses it),
        and what unfinished backups left in staging."""
        left = [c.name for c in view.checkpoints if c.complete and not self._current.get(c.name)]
        if left:
            self.result.warnings.append(
                f"complete on the server but not backed up: {', '.join(left)} (deleting the instance loses "
                f"them); back them up with: {self.target.printed.command('backup', '--all')}")
        note = (staging_note(self.store, self.target.printed.command("backup", "--discard-staged"))[2]
                if ability(self.store, "staged_names") else "")
        if note:
            self.result.warnings.append(note)

    def _runs(self, runs: list[RunState]) -> None:
        """A newer run beside remote_dir (the trainer moved on) must be saved too."""
        if not runs:
            return
        pending = [r for r in runs if not r.covered]
        if not pending:
            self.add("newer runs backed up", True, ", ".join(f"{r.name} ({r.newest or 'no checkpoint yet'})"
                                                             for r in runs))
            return
        for r in pending:
            self.add("newer run backed up", False, f"{r.path}: {r.problem}", self.target.printed.command("backup", "--follow-runs"))

    def _digests(self) -> LocalDigests:
        """Stored copies are hashed here only where they are (a directory); a bucket's are not."""
        return LocalDigests(self.store if ability(self.store, "files_here") else None)

    def _read_again(self, server, view: ServerView) -> None:
        """A backup running beside the checklist may have committed since the manifests were read:
        judge again the ones that changed, so that each verdict is about the manifest it names."""
        now = self.store.manifests()
        changed = [name for name, m in now.items() if self._manifests.get(name) != m]
        for name in set(self._current) - set(now):
            del self._current[name]
        self._current.update(judge_view(server, view, now, CHECK, names=changed))
        self._manifests = now

    def _backed_up(self, title: str, view: ServerView, c: Checkpoint) -> None:
        t = self.target
        m = self._manifests.get(c.name)
        if not self._current.get(c.name):
            state = "not backed up" if m is None else "backup is older than the server's copy"
            self.add(title, False, f"{c.name} (step {c.step}): {state}",
                     f"{t.printed.command('backup', '--checkpoint', c.name)}   (or: {t.printed.command('checklist', '--backup')})")
            return
        self.add(title, True, f"{c.name} (step {c.step}), {human(m.size)}")
        ok, detail, fix = self.verify(c.name)
        if ok:
            detail += "; size equals the server's"
        self.add(title.replace("backed up", "verifies") if title.startswith("best") else "backup verifies",
                 ok and m.size == c.size, detail, fix)

    def _extras_on_server(self, server: Server, view: ServerView) -> tuple[list[str], str] | None:
        """(problems, what was compared) of the extra files the server has, their content hashed
        there and compared with the backup's; None when none is configured."""
        if not self.target.policy.extra_files:
            return None
        m = self.store.manifests().get(EXTRA)
        stored = {f.source or f.path: f for f in (m.files if m else [])}
        listed = server.stat(view.root, list(self.target.policy.extra_files))
        present = [src for src in self.target.policy.extra_files if listed.get(src) is not None and not listed[src].is_dir]
        problems = [f"{p}: could not be read on the server ({why})" for p, why in sorted(listed.errors.items())]
        problems += [f"{src}: not backed up" for src in present if src not in stored]
        compared = [src for src in present if src in stored]
        alg = server.best_hash
        hashes = server.hash(view.root, compared, alg) if compared else None
        for src in compared:
            theirs = hashes.get(src)
            ours = self._digest(stored[src], alg)
            if theirs is None:
                problems.append(f"{src}: cannot be read on the server ({hashes.errors.get(src, 'no hash')})")
            elif ours is None:
                problems.append(f"{src}: the backup's copy cannot be read to compare")
            elif ours != theirs:
                problems.append(f"{src}: changed since the backup")
        return problems, f"{len(compared)} file(s): the server's copies have the backup's content ({alg})"

    def _digest(self, f: FileRecord, alg: str) -> str | None:
        """The stored copy's hash in `alg`: the manifest's for xxh3-128, else read from the copy."""
        if alg == "xxh3_128":
            return f.xxh3_128
        try:
            if ability(self.store, "entry"):   # a directory's file: streamed, whatever its size
                return hash_file(str(self.store.entry(f.path)), alg)
            raw = self.store.read_file(f.path, MAX_FETCHED)
        except OSError:
            return None
        if raw is None:
            return None
        h = new_hasher(alg)
        h.update(raw)
        return h.hexdigest()

    def _extras(self, found: tuple[list[str], str] | None) -> None:
        if found is None:
            return
        problems, compared = found
        self.add("extra files backed up", not problems, "; ".join(problems) or compared, self.target.printed.command("backup"))
        if EXTRA in self.store.manifests():
            ok, detail, fix = self.verify(EXTRA)
            self.add("extra files verify", ok, detail, fix)

    def _last_run(self, now: float | None) -> None:
        holder = ability(self.store, "stuck_holder")   # a lease of a bucket is taken over instead
        stuck = holder(time.time() if now is None else now, self.target.link.stall_timeout) if holder else ""
        if stuck:
            self.result.warnings.append(stuck)
        status = self.store.status()
        fix = self.target.printed.command("backup")
        if status is None:
            self.add("last backup succeeded", False, "no backup has run for this target", fix)
            return
        age = (time.time() if now is None else now) - status.time
        ok, summary = last_run_summary(status)
        self.add("last backup succeeded", ok, f"{span(age)} ago: {summary}", fix)


def run_checklist(target: Target, backup_first: bool = False, rep: Reporter = QUIET,
                  now: float | None = None, training_stopped: bool = False,
                  connect: Callable[[], Server] | None = None) -> ChecklistResult:
    return Checklist(target, rep, connect).run(backup_first, now, training_stopped)
