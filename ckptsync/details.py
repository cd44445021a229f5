"""`ckptsync show` and `ckptsync compare`: what one checkpoint holds, and how two differ.

Both read the backup directory by default (manifests plus the backed-up
trainer_state.json / metadata.json; no network). `show --remote` asks the
server instead, through the agent's scan, which already returns the parsed
trainer_state.json of every checkpoint.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ckptsync.config import Target
from ckptsync.errors import NotFound
from ckptsync.contents import is_int, is_number
from ckptsync.layout import Checkpoint, find_best, resume_files
from ckptsync.digests import LocalDigests
from ckptsync.freshness import judge
from ckptsync.policy import named, newest_first
from ckptsync.result import Result
from ckptsync.scan import scan_server
from ckptsync.server import Server, open_server
from ckptsync.stores import Store, ability, open_store
from ckptsync.stores.directory import DirectoryStore
from ckptsync.stores.manifest import EXTRA, Manifest

STATE_FILES = ("trainer_state.json", "metadata.json")
MAX_STATE_BYTES = 16 << 20
# Numbers that show and compare report, in display order.
VALUE_KEYS = ("step", "epoch", "loss", "eval_loss", "learning_rate")


@dataclass
class FileRow:
    path: str          # relative to the checkpoint; a single-file checkpoint's own name
    size: int
    resume: bool       # read by an exact resume


@dataclass
class Curve:
    """log_history of trainer_state.json as (step, value) series."""

    train: list[tuple[int, float]] = field(default_factory=list)
    eval: list[tuple[int, float]] = field(default_factory=list)
    learning_rate: list[tuple[int, float]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.train or self.eval)


@dataclass
class ShowResult(Result):
    name: str
    source: str                      # "backup" or "server"
    location: str                    # the backup directory, or server:remote_dir
    layout: str
    kind: str
    step: int | None
    epoch: float | None
    max_steps: int | None
    loss: float | None               # last training loss in log_history
    loss_step: int | None
    eval_loss: float | None
    eval_step: int | None
    learning_rate: float | None
    best_checkpoint: str | None      # which checkpoint of the run is the best one
    best_metric: float | None
    is_best: bool
    content: str
    resumable: bool
    missing: list[str]
    files: list[FileRow]
    complete: bool | None = None     # server only: None for a backup
    reason: str = ""
    backed_up_at: float = 0.0
    verified_at: float = 0.0
    backup: str = ""                 # server only: "yes", "no" or "outdated"
    curve: Curve = field(default_factory=Curve)
    notes: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def resume_size(self) -> int:
        return sum(f.size for f in self.files if f.resume)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.update(size=self.size, resume_size=self.resume_size)
        return out


@dataclass
class Change:
    key: str
    a: Any
    b: Any
    delta: float | None


@dataclass
class FileChange:
    path: str
    a_size: int | None
    b_size: int | None


@dataclass
class CompareResult(Result):
    a: str
    b: str
    location: str
    values: list[Change] = field(default_factory=list)
    differ: list[FileChange] = field(default_factory=list)
    only_a: list[FileChange] = field(default_factory=list)
    only_b: list[FileChange] = field(default_factory=list)
    identical: list[FileChange] = field(default_factory=list)


# ---------------------------------------------------------------- pure helpers


def facts(state: dict, full: dict | None) -> dict[str, Any]:
    """Step, epoch, losses, learning rate, best: from the full state file when there is one,
    else from the summary kept in the manifest (or in the server's Checkpoint)."""
    out: dict[str, Any] = {}
    for key in ("epoch", "max_steps", "best_metric", "best_model_checkpoint", "loss", "eval_loss",
                "learning_rate"):
        if _is_value(state.get(key)):
            out[key] = state[key]
    if is_int(state.get("global_step")):
        out["step"] = state["global_step"]
    if full:
        for key in ("epoch", "max_steps", "best_metric", "best_model_checkpoint"):
            if _is_value(full.get(key)):
                out[key] = full[key]
        if is_int(full.get("global_step")):
            out["step"] = full["global_step"]
        elif is_int(full.get("step")):
            out["step"] = full["step"]
        history = full.get("log_history")
        for entry in reversed(history if isinstance(history, list) else []):
            if not isinstance(entry, dict):
                continue
            for key in ("loss", "eval_loss", "learning_rate"):
                if f"{key}_step" not in out and is_number(entry.get(key)):
                    out[key] = entry[key]
                    out[f"{key}_step"] = entry.get("step") if is_int(entry.get("step")) else None
    return out


def curve_of(full: dict | None) -> Curve:
    curve = Curve()
    history = full.get("log_history") if isinstance(full, dict) else None
    for entry in history if isinstance(history, list) else []:
        if not isinstance(entry, dict) or not is_int(entry.get("step")):
            continue
        step = entry["step"]
        if is_number(entry.get("loss")):
            curve.train.append((step, float(entry["loss"])))
        if is_number(entry.get("eval_loss")):
            curve.eval.append((step, float(entry["eval_loss"])))
        if is_number(entry.get("learning_rate")):
            curve.learning_rate.append((step, float(entry["learning_rate"])))
    return curve


def best_of(candidates: Iterable[tuple[str, int | None, dict, bool]]) -> tuple[str | None, float | None]:
    """(name, best_metric) of the run's best checkpoint, from (name, step, state, is_best) tuples.

    The newest trainer_state.json knows best; without one, a checkpoint marked best (best_model.pt).
    """
    items = list(candidates)
    stated = [c for c in items if isinstance(c[2].get("best_model_checkpoint"), str)]
    if stated:
        newest = max(stated, key=lambda c: c[1] if c[1] is not None else -1)
        path = newest[2]["best_model_checkpoint"]
        metric = newest[2].get("best_metric")
        return re.split(r"[\\/]", path.rstrip("/\\"))[-1], metric if is_number(metric) else None
    flagged = [c for c in items if c[3]]
    return (flagged[0][0], None) if flagged else (None, None)


def describe_resume(content: str, resumable: bool, missing: list[str]) -> str:
    """One line on what this checkpoint can be used for."""
    lacking = ", ".join(missing)
    if content == "full":
        return "resumable: exact resume (weights, optimizer, scheduler and RNG state present)" if resumable \
            else "full contents, but not offered for resume (see the notes)"
    if content == "no-rng":
        return f"resumable, not exact: missing {lacking or 'RNG state'} (the data order will differ)"
    if content in ("adapter-only", "weights-only"):
        what = "adapter" if content == "adapter-only" else "weights"
        return f"{what} only: fine-tune from it; an exact resume also needs {lacking or 'the optimizer state'}"
    if content == "partial":
        return f"not resumable: missing {lacking or 'part of the training state'}"
    if content == "optimizer-only":
        return "optimizer state only: no weights"
    return "contents unknown" + (f" (missing {lacking})" if lacking else "")


def file_rows(name: str, paths: Iterable[tuple[str, int]], resume: Iterable[str]) -> list[FileRow]:
    needed = set(resume)
    return [FileRow(relative(name, p), size, p in needed) for p, size in sorted(paths)]


def relative(name: str, path: str) -> str:
    return path[len(name) + 1:] if path.startswith(name + "/") else path


def diff_files(a: Manifest, b: Manifest) -> tuple[list[FileChange], list[FileChange], list[FileChange], list[FileChange]]:
    """(differ, only in a, only in b, identical) by content: xxh3-128 and size."""
    single = a.layout == "single-file" and b.layout == "single-file"
    key = (lambda m, p: "(single file)") if single else (lambda m, p: relative(m.name, p))
    fa = {key(a, f.path): f for f in a.files}
    fb = {key(b, f.path): f for f in b.files}
    differ, only_a, only_b, same = [], [], [], []
    for path in sorted(set(fa) | set(fb)):
        x, y = fa.get(path), fb.get(path)
        change = FileChange(path, x.size if x else None, y.size if y else None)
        if y is None:
            only_a.append(change)
        elif x is None:
            only_b.append(change)
        elif (x.xxh3_128, x.size) == (y.xxh3_128, y.size):
            same.append(change)
        else:
            differ.append(change)
    return differ, only_a, only_b, same


def value_changes(fa: dict, fb: dict) -> list[Change]:
    out = []
    for key in VALUE_KEYS:
        a, b = fa.get(key), fb.get(key)
        if a is None and b is None:
            continue
        delta = b - a if is_number(a) and is_number(b) else None
        out.append(Change(key, a, b, delta))
    return out


# ---------------------------------------------------------------- the backup directory


def _pick(store: Store, name: str | None) -> tuple[Manifest, dict[str, Manifest]]:
    manifests = store.manifests()
    if name is None:
        runs = [m for m in manifests.values() if m.name != EXTRA]
        if not runs:
            raise NotFound(f"no backups in {store.location}", hint="run 'ckptsync backup' first")
        return max(runs, key=lambda m: (m.step if m.step is not None else -1, m.mtime)), manifests
    name = named(name, ((m.name, m.step) for m in manifests.values() if m.name != EXTRA))
    if name in manifests:
        return manifests[name], manifests
    have = ", ".join(_ordered(manifests)) or "none"
    raise NotFound(f"{name} is not in the backup directory {store.location} (backed up there: {have})",
                   hint="see 'ckptsync list --local'")


def _ordered(manifests: dict[str, Manifest]) -> list[str]:
    return [m.name for m in newest_first(manifests.values())]


def read_state_file(store: Store, m: Manifest) -> tuple[dict | None, str]:
    """The backed-up trainer_state.json (or metadata.json) of a checkpoint, parsed; and a note if unreadable."""
    for f in m.files:
        if relative(m.name, f.path) not in STATE_FILES:
            continue
        try:
            raw = store.read_file(f.path, MAX_STATE_BYTES)
            if raw is None:
                return None, f"{f.path} is too large to read"
            data = json.loads(raw.decode("utf-8"))
        except (OSError, ValueError) as exc:
            return None, f"{f.path} unreadable: {exc}"
        return (data, "") if isinstance(data, dict) else (None, f"{f.path} is not a JSON object")
    return None, ""


def show_backup(root: Path, name: str | None) -> ShowResult:
    """One backed-up checkpoint; root may be an archive (read through its index, nothing extracted)."""
    return show_stored(open_store(root), name)


def show_stored(store: Store, name: str | None) -> ShowResult:
    m, manifests = _pick(store, name)
    full, note = read_state_file(store, m)
    f = facts(m.state, full)
    best, metric = best_of((x.name, x.step, x.state, x.is_best) for x in manifests.values())
    result = _result(m.name, "backup", store.location, m.layout, m.kind, m.step, f, best, metric,
                     m.content, m.resumable, list(m.missing),
                     file_rows(m.name, ((x.path, x.size) for x in m.files), m.resume_files), curve_of(full))
    result.backed_up_at, result.verified_at = m.backed_up_at, m.verified_at
    if note:
        result.notes.append(note)
    return result


def compare_backups(root: Path, a: str, b: str) -> CompareResult:
    return compare_stored(open_store(root), a, b)


def compare_stored(store: Store, a: str, b: str) -> CompareResult:
    ma, _ = _pick(store, a)
    mb, _ = _pick(store, b)
    fa = facts(ma.state, read_state_file(store, ma)[0])
    fb = facts(mb.state, read_state_file(store, mb)[0])
    fa.setdefault("step", ma.step)
    fb.setdefault("step", mb.step)
    differ, only_a, only_b, same = diff_files(ma, mb)
    return CompareResult(a=ma.name, b=mb.name, location=store.location, values=value_changes(fa, fb),
                         differ=differ, only_a=only_a, only_b=only_b, identical=same)


# ---------------------------------------------------------------- the server


def show_server(target: Target, name: str | None, store: Store | None = None,
                connect: Callable[[], Server] | None = None) -> ShowResult:
    """One checkpoint on the server, and whether the backups (the target's store) hold it as it
    is now. A store whose files are elsewhere (a bucket) is compared by its manifests only.
    `connect`: gives the server (see open_server)."""
    store = store or DirectoryStore(target.local_dir)
    with open_server(target, connect) as server:
        view = scan_server(server, target.remote_dir, target.policy.settle_seconds)
        where = f"{target.describe()}:{view.root}"
        if name is None:
            if not view.checkpoints:
                raise NotFound(f"no checkpoints on {where}")
            c = next((x for x in view.checkpoints if x.complete), view.checkpoints[0])
        else:
            name = named(name, ((x.name, x.step) for x in view.checkpoints))
            c = view.find(name)
            if c is None:
                have = ", ".join(x.name for x in view.checkpoints) or "none"
                raise NotFound(f"{name} is not on {where} (checkpoints there: {have})")
        m = store.manifests().get(c.name)
        local = LocalDigests(store if ability(store, "files_here") else None)
        current = judge(server, view.root, m.files if m else None, view.files_of(c), local=local).current
        local.save()
    full = _raw_state(view.meta, c)
    f = facts(c.state, full)
    best = find_best(view.checkpoints)
    _, metric = best_of((x.name, x.step, x.state, x.is_best) for x in view.checkpoints)
    result = _result(c.name, "server", where, c.layout, c.kind, c.step, f, best, metric, c.content,
                     c.resumable, list(c.missing),
                     file_rows(c.name, ((x.path, x.size) for x in c.files), resume_files(c)), curve_of(full))
    result.complete, result.reason = c.complete, c.reason
    if c.meta_error:
        result.notes.append(c.meta_error)
    _backup_state(result, store, c, current)
    return result


def _raw_state(meta: dict, c: Checkpoint) -> dict | None:
    for file in STATE_FILES:
        value = meta.get(f"{c.name}/{file}")
        if isinstance(value, dict) and "__error__" not in value:
            return value
    return None


def _backup_state(result: ShowResult, store: Store, c: Checkpoint, current: bool) -> None:
    m = store.manifests().get(c.name)
    if m is None:
        result.backup = "no"
        return
    result.backup = "yes" if current else "outdated"
    result.backed_up_at, result.verified_at = m.backed_up_at, m.verified_at


def _result(name, source, location, layout, kind, step, f, best, metric, content, resumable, missing,
            files, curve) -> ShowResult:
    result = ShowResult(
        name=name, source=source, location=location, layout=layout, kind=kind,
        step=step if step is not None else f.get("step"), epoch=f.get("epoch"), max_steps=f.get("max_steps"),
        loss=f.get("loss"), loss_step=f.get("loss_step"), eval_loss=f.get("eval_loss"),
        eval_step=f.get("eval_loss_step"), learning_rate=f.get("learning_rate"),
        best_checkpoint=best, best_metric=metric if metric is not None else f.get("best_metric"),
        is_best=best == name, content=content, resumable=resumable, missing=missing, files=files, curve=curve,
    )
    if not curve:
        result.notes.append("no loss curve: this checkpoint has no log_history (only a Trainer's "
                            "trainer_state.json records one)")
    return result


def _is_value(value) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)
