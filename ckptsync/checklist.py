"""`ckptsync checklist`: may I delete this instance now? The seed's pre-shutdown checklist as checks."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

from ckptsync.backup import BackupOptions, run_backup
from ckptsync.config import Target
from ckptsync.errors import OK, PARTIAL, CkptsyncError
from ckptsync.layout import Checkpoint
from ckptsync.progress import QUIET, Reporter
from ckptsync.remote import Remote
from ckptsync.scan import ServerView, scan_server
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


def training_signals(view: ServerView, procs: dict, pattern: str | None) -> list[str]:
    """Reasons to think the trainer is still running. Pure."""
    reasons = []
    busy = [c for c in view.checkpoints if not c.complete]
    if busy:
        reasons.append(f"{busy[0].name} is still being written ({busy[0].reason})")
    interval = save_interval(view.checkpoints)
    newest = next((c for c in view.checkpoints if c.complete), None)
    if interval and newest is not None and view.now - newest.mtime < interval:
        due = interval - (view.now - newest.mtime)
        reasons.append(f"a checkpoint is saved every ~{interval / 60:.0f} min; the next one is due in "
                       f"~{due / 60:.0f} min")
    gpu = procs.get("gpu") or []
    if gpu:
        reasons.append(f"{len(gpu)} GPU process(es) running: {gpu[0]}")
    if pattern and procs.get("procs"):
        pid, cmd = procs["procs"][0]
        reasons.append(f"process matching '{pattern}' is running (pid {pid}: {cmd[:60]})")
    return reasons


class Checklist:
    def __init__(self, target: Target, rep: Reporter = QUIET) -> None:
        self.target = target
        self.rep = rep
        self.store = Store(target.local_dir)
        self.result = ChecklistResult(target.label, target.describe(), str(target.local_dir))

    def add(self, name: str, ok: bool, detail: str, fix: str = "") -> None:
        self.result.checks.append(Check(name, ok, detail, "" if ok else fix))

    def run(self, backup_first: bool) -> ChecklistResult:
        t = self.target
        how = f"ckptsync backup {self._target_args()}"
        if backup_first:
            self.rep.info("running the backup first")
            run_backup(t, BackupOptions(max_checkpoints=1), self.rep)
            self.result.backup_ran = True
        try:
            with Remote(t.transport) as remote:
                view = scan_server(remote, t.remote_dir, t.settle_seconds)
                procs = remote.call("procs", pattern=t.train_process or "")
                extra = self._extra_stat(remote, view)
        except CkptsyncError as exc:
            self.add("server reachable", False, exc.message, "check the connection, or back up before the server is gone")
            self._last_run()
            return self.result
        self.add("server reachable", True, f"{remote.describe()}, Python {remote.hello.get('python')}")
        signals = training_signals(view, procs, t.train_process)
        self.add("training stopped", not signals, "; ".join(signals) or "no checkpoint in progress, no training process",
                 "stop training (or wait for the next checkpoint), then run the checklist again")
        newest = next((c for c in view.checkpoints if c.complete), None)
        if newest is None:
            self.add("newest checkpoint backed up", False, f"no complete checkpoint in {t.remote_dir}",
                     "nothing to save yet")
        else:
            self._newest(view, newest, how)
        self._extras(extra, how)
        self._last_run()
        return self.result

    def _target_args(self) -> str:
        t = self.target
        if t.label.startswith("instance-"):
            return f"--instance {t.label[len('instance-'):]}"
        return "" if t.label == "local" else f"--host {t.describe()}"

    def _newest(self, view: ServerView, c: Checkpoint, how: str) -> None:
        m = self.store.load(c.name)
        server = {f.path: view.exact[f.path][:2] for f in c.files}
        if m is None or {f.path: (f.size, f.mtime_ns) for f in m.files} != server:
            state = "not backed up" if m is None else "backup is older than the server's copy"
            self.add("newest checkpoint backed up", False, f"{c.name} (step {c.step}): {state}",
                     f"{how} --checkpoint {c.name}   (or: ckptsync checklist --backup)")
            return
        self.add("newest checkpoint backed up", True, f"{c.name} (step {c.step}), {human(m.size)}")
        check = run_verify(self.target, [c.name], rep=self.rep)
        bad = check.failed
        detail = (f"{c.name}: every file re-read and matches its manifest; size equals the server's"
                  if not bad else f"{c.name}: {bad[0].status}: " + ", ".join(p.path for p in bad[0].problems[:3]))
        self.add("backup verifies", not bad and m.size == c.size, detail,
                 f"{how} --checkpoint {c.name} after moving the damaged copy aside")

    def _extra_stat(self, remote: Remote, view: ServerView) -> dict:
        if not self.target.extra_files:
            return {}
        return remote.call("stat", root=view.root, paths=list(self.target.extra_files)).get("stat", {})

    def _extras(self, stat: dict, how: str) -> None:
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
            elif (info[0], info[1]) != stored[src]:
                differs.append(src)
        problems = [f"{p}: not backed up" for p in missing] + [f"{p}: changed since the backup" for p in differs]
        self.add("extra files backed up", not problems,
                 "; ".join(problems) or f"{len(stored)} file(s) identical to the server's", how)

    def _last_run(self) -> None:
        status = self.store.status()
        if status is None:
            self.add("last backup succeeded", False, "no backup has run for this target",
                     f"ckptsync backup {self._target_args()}")
            return
        age = time.time() - float(status.get("time", 0))
        when = f"{age / 60:.0f} min ago" if age < 7200 else f"{age / 3600:.1f} h ago"
        ok = bool(status.get("ok"))
        self.add("last backup succeeded", ok, f"{when}: " + ("ok" if ok else f"exit {status.get('exit_code')}: "
                                                              f"{status.get('error', '')}"),
                 f"ckptsync backup {self._target_args()}")


def run_checklist(target: Target, backup_first: bool = False, rep: Reporter = QUIET) -> ChecklistResult:
    return Checklist(target, rep).run(backup_first)


def human(n: float) -> str:
    from ckptsync.backup import human as fmt

    return fmt(n)
