"""`ckptsync checklist`: may I delete this instance now? The seed's pre-shutdown checklist as checks."""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import asdict, dataclass, field

from ckptsync.backup import BackupOptions, run_backup
from ckptsync.config import Target
from ckptsync.errors import OK, PARTIAL, CkptsyncError
from ckptsync.layout import Checkpoint
from ckptsync.progress import QUIET, Reporter
from ckptsync.freshness import judge_view
from ckptsync.runs import RunState, survey
from ckptsync.policy import CHECK, human, last_run_summary
from ckptsync.scan import ServerView, empty_remote_dir, scan_server
from ckptsync.server import Procs, RemoteDirMissing, open_server
from ckptsync.store import EXTRA, Store
from ckptsync.verify import run_verify


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


@dataclass
class ChecklistResult:
    target: str
    server: str
    dest: str
    checks: list[Check] = field(default_factory=list)
    backup_ran: bool = False
    warnings: list[str] = field(default_factory=list)

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


def save_interval(checkpoints: list[Checkpoint]) -> float | None:
    """The typical time between two saves, from the complete checkpoints' mtimes. Pure."""
    times = sorted(c.mtime for c in checkpoints if c.complete)
    gaps = [b - a for a, b in zip(times, times[1:]) if b > a]
    return statistics.median(gaps) if gaps else None


LAUNCHERS = {"torchrun", "deepspeed", "accelerate"}


def looks_like_trainer(cmd: str) -> bool:
    """A launcher, or a python script or module whose own name says train (not any path that does). Pure."""
    words = cmd.split()
    if not words or "ckptsync" in cmd:
        return False
    names = [w.rsplit("/", 1)[-1] for w in words]
    if names[0] in LAUNCHERS or any(n in LAUNCHERS for n in names[1:3]):
        return True
    if not names[0].startswith("python"):
        return False
    rest = words[1:]
    while rest and rest[0].startswith("-") and rest[0] != "-m":
        rest = rest[1:]
    if rest[:1] == ["-m"] and len(rest) > 1:
        script = rest[1].rsplit(".", 1)[-1]
    elif rest:
        script = rest[0].rsplit("/", 1)[-1]
    else:
        return False
    return "train" in script.lower() or script in LAUNCHERS


# A save is "due" until this many intervals have passed without one: a trainer that is late
# by less than that may still be running (saving a checkpoint takes time too).
DUE_MARGIN = 1.5


def training_signals(view: ServerView, procs: Procs | None, pattern: str | None, now: float) -> list[str]:
    """Reasons to think the trainer is still running. Pure: `now` is the server's clock."""
    reasons = []
    busy = [c for c in view.checkpoints if not c.complete and not c.abandoned and not c.restored]
    if busy:
        reasons.append(f"{busy[0].name} is still being written ({busy[0].reason})")
    interval = save_interval(view.checkpoints)
    newest = next((c for c in view.checkpoints if c.complete), None)
    if interval and newest is not None and now - newest.mtime < interval * DUE_MARGIN:
        due = interval - (now - newest.mtime)
        when = f"is due in ~{due / 60:.0f} min" if due >= 60 else "is due now"
        reasons.append(f"a checkpoint is saved every ~{interval / 60:.0f} min; the next one {when}")
    if procs is None:
        return reasons
    if procs.gpu:
        reasons.append(f"{len(procs.gpu)} GPU process(es) running: {procs.gpu[0]}")
    if pattern and procs.matched:
        pid, cmd = procs.matched[0]
        reasons.append(f"process matching '{pattern}' is running (pid {pid}: {cmd[:60]})")
    if procs.open_under:
        pid, cmd, path = procs.open_under[0]
        reasons.append(f"pid {pid} ({cmd[:60]}) has {path} open")
    trainers = [(pid, cmd) for pid, cmd in procs.trainers if looks_like_trainer(cmd)]
    if trainers:
        pid, cmd = trainers[0]
        reasons.append(f"a training process is running (pid {pid}: {cmd[:60]})")
    return reasons


class Checklist:
    def __init__(self, target: Target, rep: Reporter = QUIET) -> None:
        self.target = target
        self.rep = rep
        self.store = Store(target.local_dir)
        self.result = ChecklistResult(target.label, target.describe(), str(target.local_dir))

    def add(self, name: str, ok: bool, detail: str, fix: str = "") -> None:
        self.result.checks.append(Check(name, ok, detail, "" if ok else fix))

    # What differs for a bucket store (see s3/checks.py): how the backup runs, where the
    # manifests are read, how a backup is re-checked.

    def backup(self) -> None:
        run_backup(self.target, BackupOptions(max_checkpoints=1, include_best=True), self.rep)

    def reading(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def verify(self, name: str) -> tuple[bool, str, str]:
        """(ok, detail, fix) of re-checking the stored copy of `name` now."""
        bad = run_verify(self.target, [name], rep=self.rep).failed
        if not bad:
            return True, f"{name}: every file re-read and matches its manifest", ""
        return (False, f"{name}: {bad[0].status}: " + ", ".join(p.path for p in bad[0].problems[:3]),
                f"{self.target.command('verify', '--repair', name)}   (fetches the damaged files again)")

    def run(self, backup_first: bool, now: float | None = None) -> ChecklistResult:
        if backup_first:
            self.rep.info("running the backup first")
            self.backup()
            self.result.backup_ran = True
        with self.reading():
            return self._run(now)

    def _run(self, now: float | None) -> ChecklistResult:
        t = self.target
        try:
            with open_server(t) as server:
                self.add("server reachable", True, f"{server.describe()}, Python {server.hello.python}")
                view = scan_server(server, t.remote_dir, t.settle_seconds)
                procs = server.procs(t.train_process or "", view.root)
                extra = self._extra_stat(server, view)
                # Strict: a backup made before inodes were recorded is hashed before it counts.
                self._manifests = self.store.manifests()
                self._current = judge_view(server, view, self._manifests, CHECK)
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
        signals = training_signals(view, procs, t.train_process, view.now if now is None else now)
        detail = "; ".join(signals) or "no checkpoint in progress, no training process"
        if not procs.open_checked:
            detail += f" (open files under {view.root} not checked: {procs.open_error or 'unknown reason'})"
        self.add("training stopped", not signals, detail,
                 "stop training (or wait for the next checkpoint), then run the checklist again")
        for c in view.checkpoints:
            if c.abandoned:
                self.result.warnings.append(f"{c.name} is abandoned (incomplete: {c.reason}); it cannot be "
                                            "backed up and does not block deleting the instance")
        newest = next((c for c in view.checkpoints if c.complete), None)
        if empty is not None:
            self.add("newest checkpoint backed up", False,
                     empty.young_text if empty.young else f"{empty.message}: {empty.detail}",
                     empty.command or "nothing to save yet")
        elif newest is None:
            self.add("newest checkpoint backed up", False, f"no complete checkpoint in {t.remote_dir}",
                     "nothing to save yet")
        else:
            self._backed_up("newest checkpoint backed up", view, newest)
        best = next((c for c in view.checkpoints if c.is_best and c.complete), None)
        if best is not None and best is not newest:
            self._backed_up("best checkpoint backed up", view, best)
        self._runs(runs)
        self._extras(extra)
        self._last_run(now)
        return self.result

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
            self.add("newer run backed up", False,
                     f"{r.path}: newest checkpoint {r.newest} not backed up ({r.checkpoints} complete)",
                     self.target.command("backup", "--follow-runs"))

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
                     f"{t.command('backup', '--checkpoint', c.name)}   (or: {t.command('checklist', '--backup')})")
            return
        self.add(title, True, f"{c.name} (step {c.step}), {human(m.size)}")
        ok, detail, fix = self.verify(c.name)
        if ok:
            detail += "; size equals the server's"
        self.add(title.replace("backed up", "verifies") if title.startswith("best") else "backup verifies",
                 ok and m.size == c.size, detail, fix)

    def _extra_stat(self, server, view: ServerView) -> dict:
        if not self.target.extra_files:
            return {}
        return server.stat(view.root, list(self.target.extra_files))

    def _extras(self, stat: dict) -> None:
        if not self.target.extra_files:
            return
        m = self.store.load(EXTRA)
        stored = {f.source: (f.size, f.mtime_ns) for f in (m.files if m else [])}
        missing, differs = [], []
        for src in self.target.extra_files:
            info = stat.get(src)
            if info is None:
                continue  # not on the server: nothing to lose
            if src not in stored:
                missing.append(src)
            elif (info.size, info.mtime_ns) != stored[src]:
                differs.append(src)
        problems = [f"{p}: not backed up" for p in missing] + [f"{p}: changed since the backup" for p in differs]
        self.add("extra files backed up", not problems,
                 "; ".join(problems) or f"{len(stored)} file(s) identical to the server's",
                 self.target.command("backup"))

    def _last_run(self, now: float | None) -> None:
        status = self.store.status()
        fix = self.target.command("backup")
        if status is None:
            self.add("last backup succeeded", False, "no backup has run for this target", fix)
            return
        age = (time.time() if now is None else now) - float(status.get("time", 0))
        when = f"{age / 60:.0f} min ago" if age < 7200 else f"{age / 3600:.1f} h ago"
        ok, summary = last_run_summary(status)
        self.add("last backup succeeded", ok, f"{when}: {summary}", fix)


def run_checklist(target: Target, backup_first: bool = False, rep: Reporter = QUIET,
                  now: float | None = None) -> ChecklistResult:
    if target.store_url:
        from ckptsync.s3.checks import BucketChecklist

        return BucketChecklist(target, rep).run(backup_first, now)
    return Checklist(target, rep).run(backup_first, now)

