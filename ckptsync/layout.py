"""Turn a flat listing of the server's checkpoint directory into checkpoints.

Pure functions, no I/O: the agent walks ``remote_dir`` and reads the small
metadata files; this module only looks at names, sizes, mtimes and that
metadata.  Nothing in here raises for odd input: problems end up in
``Checkpoint.reason`` or ``Checkpoint.meta_error``.

Decisions worth knowing:

* Only the top level of ``remote_dir`` is searched, and only names that match
  a known layout count, so hidden entries, ``tmp-checkpoint-N/`` and
  ``latest.pt.tmp`` never do (``training.temporary_saves`` names those: saves
  in progress, for the checklist).  Anything under a ``.ckptsync*`` component is
  dropped.  Hidden files *inside* a checkpoint directory are kept, because
  FSDP's sharded state (``pytorch_model_fsdp_0/.metadata``) cannot be loaded
  without them.
* Settling is judged per file against the server's clock: a file dated more
  than ``CLOCK_TOLERANCE`` after it was not stamped by a write happening now,
  so only the layout's completion markers decide for it.
* Where the server shows who writes (``Writers``: the files open for writing,
  seen through ``/proc/*/fdinfo``), a checkpoint whose layout markers are there
  and none of whose files is open for writing is complete at once; settling
  is then waited for only by files changed after the writers were looked at,
  and by checkpoints behind a symlink (their writers are not seen).
* A ``_SUCCESS`` or ``.complete`` file at the top of a checkpoint directory
  (``SAVE_MARKERS``) is its writer's word that the save finished: with one,
  settling is never waited for; the checkpoint is complete when none of its
  files is open for writing (where writers are seen) and none was modified
  after the marker (a save into the directory again).  Once a checkpoint has
  a marker, every later one of the same name pattern (``checkpoint-N``,
  ``step_N``, ...) waits for its own: a save that crashed before it is never
  taken for a finished one.  The layout's other checks still apply.
* The top-level DeepSpeed ``latest`` file belongs to no checkpoint: it moves
  on with every save, and ``global_stepN/`` loads with an explicit tag.
* RNG state is required for an *exact* resume: when it is absent it is listed
  in ``missing`` and ``content`` is ``"no-rng"`` instead of ``"full"``, but the
  checkpoint stays ``resumable`` (the Trainer and the hand-written managers
  resume without it; only the data order is no longer bit-identical).
  DeepSpeed engine checkpoints have no place for RNG, so none is asked for.
* ``resumable`` also needs the checkpoint to be complete and its metadata
  readable: a checkpoint still being written, or one whose
  ``trainer_state.json`` cannot be parsed, is never offered for resume.
* With DeepSpeed the LR scheduler lives in the engine state, so a missing
  ``scheduler.pt`` is not reported for checkpoints that have a
  ``global_stepN/`` directory.
* A path the server could not list or read (``Listing.unseen``) belongs to
  the checkpoint its top-level name makes it part of, which is then incomplete
  with ``unreadable`` set (never abandoned); a checkpoint known only by such a
  name (a dangling ``checkpoint-300`` link) is listed with unknown contents,
  never left out.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field, replace
from typing import Iterable

from ckptsync.policy import newest_first


@dataclass(frozen=True)
class FileEntry:
    path: str  # POSIX path relative to remote_dir
    size: int
    mtime: float  # seconds since the epoch, server clock
    mode: int  # permission bits


@dataclass(frozen=True)
class Listing:
    files: tuple[FileEntry, ...]
    meta: dict  # relative path -> parsed JSON, text of `latest`, {"__pt__": ...} or {"__error__": msg}
    now: float  # the server's clock when it listed
    unseen: tuple[tuple[str, str, float], ...] = ()  # (path, why, its mtime or 0) the server could not list or read


@dataclass(frozen=True)
class Writers:
    """Who writes under remote_dir, as the server saw it at `since` (its clock): the paths open
    for writing, and the symlinked paths, whose files' writers it cannot tell."""

    open: frozenset[str]
    since: float
    linked: tuple[str, ...] = ()

    def blind_to(self, path: str) -> bool:
        return any(path == p or path.startswith(p + "/") for p in self.linked)


@dataclass(frozen=True)
class Checkpoint:
    name: str
    layout: str  # "trainer", "deepspeed", "single-file", "step-dir"
    kind: str  # "rolling", "best", "epoch", "emergency", "latest", "backup"
    step: int | None
    files: tuple[FileEntry, ...]
    size: int
    mtime: float
    complete: bool
    reason: str
    content: str  # "full", "no-rng", "partial", "adapter-only", "weights-only", "optimizer-only", "unknown"
    resumable: bool
    missing: tuple[str, ...]
    is_best: bool
    state: dict
    meta_error: str | None
    abandoned: bool = False  # incomplete, and untouched for far longer than a save takes
    unreadable: str = ""     # a path under it the server could not list or read, and why
    restored: bool = False   # weights only, put there by `restore --adapter-only` (RESTORED_MARKER)


# What `restore --adapter-only` leaves in the checkpoint directory it writes: the directory holds
# weights, not a save in progress, and is never waited for or backed up again.
RESTORED_MARKER = ".ckptsync-restored"

TRAINER_DIR = re.compile(r"checkpoint-(\d+)")
DEEPSPEED_DIR = re.compile(r"global_step(\d+)")
STEP_DIR = re.compile(r"step_(\d+)")
EPOCH_DIR = re.compile(r"epoch_?(\d+)")
SHARD = re.compile(r"(model|pytorch_model)-(\d+)-of-(\d+)\.(safetensors|bin)")
RNG_FILE = re.compile(r"rng_state(_\d+)?\.pth")
FSDP_MODEL_DIR = re.compile(r"pytorch_model_fsdp_\d+")
FSDP_OPTIM_DIR = re.compile(r"optimizer_\d+")

# Files a writer puts in a checkpoint directory once its save has finished (Hadoop and Spark
# write _SUCCESS); the first one present counts.
SAVE_MARKERS = ("_SUCCESS", ".complete")

# Where a directory layout's name gives the step (epoch_N/ gives an epoch, not a step).
STEP_PATTERN = {"trainer": TRAINER_DIR, "deepspeed": DEEPSPEED_DIR, "step-dir": STEP_DIR}

# Top-level directories that are checkpoints: (pattern, layout, kind).
DIR_LAYOUTS = (
    (TRAINER_DIR, "trainer", "rolling"),
    (DEEPSPEED_DIR, "deepspeed", "rolling"),
    (STEP_DIR, "step-dir", "rolling"),
    (EPOCH_DIR, "step-dir", "epoch"),
)

# Files of a Trainer checkpoint that `--resume_from_checkpoint` reads.
TRAINER_RESUME_FILE = re.compile(
    r"adapter_model\.(safetensors|bin)|adapter_config\.json"
    r"|model\.safetensors|pytorch_model\.bin|(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)"
    r"|(model\.safetensors|pytorch_model\.bin)\.index\.json|pytorch_model_fsdp(_\d+)?\.bin"
    r"|optimizer\.(pt|bin)|scheduler\.pt|scaler\.pt|trainer_state\.json|rng_state(_\d+)?\.pth|latest"
)
TRAINER_RESUME_DIR = re.compile(r"global_step\d+|pytorch_model_fsdp_\d+|optimizer_\d+")

# Single-file names written by the CheckpointManager of seeds 001/004:
# (pattern, kind, what the number in the name is).
SINGLE_FILES = (
    (re.compile(r"latest\.pt"), "latest", None),
    (re.compile(r"latest_backup\.pt"), "backup", None),
    (re.compile(r"rolling_step_(\d+)\.pt"), "rolling", "step"),
    (re.compile(r"rolling_last_backup\.pt"), "backup", None),
    (re.compile(r"best_model\.pt"), "best", None),
    (re.compile(r"best_model_(?:backup|previous)\.pt"), "backup", None),
    (re.compile(r"epoch_(\d+)\.pt"), "epoch", "epoch"),
    (re.compile(r"emergency_step_(\d+)_\d{8}_\d{6}\.pt"), "emergency", "step"),
)

# String constants in a torch.save pickle that show what it holds.
MODEL_KEYS = {"model", "model_state_dict", "model_state"}
OPTIMIZER_KEYS = {"optimizer", "optimizer_state_dict", "optimizer_state"}
SCHEDULER_KEYS = {"scheduler", "lr_scheduler", "scheduler_state_dict", "scheduler_state"}
RNG_KEYS = {"rng", "rng_state", "rng_states", "rng_state_dict"}
RNG_LABELS = {"rng_state.pth", "rng"}
RESUMABLE_CONTENT = {"full", "no-rng"}


@dataclass
class _Analysis:
    """What one layout-specific pass found; turned into a Checkpoint by _finish."""

    weights: str | None = None  # "adapter" or "full"
    has_optimizer: bool = False
    needs: list[tuple[str, bool]] = field(default_factory=list)  # (label, present)
    problems: list[str] = field(default_factory=list)  # reasons it is still in progress
    known: bool = True  # False when the contents cannot be told
    state: dict = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    step: int | None = None


def discover(listing: Listing, settle_seconds: float = 60, writers: Writers | None = None) -> list[Checkpoint]:
    """Checkpoints found at the top level of remote_dir, newest first.

    A checkpoint is complete when its layout's own markers say the save
    finished and none of its files changed within settle_seconds of
    listing.now; with `writers`, when none of its files is open for writing
    (see the module's note).  Order: policy.newest_first.
    """
    meta = _normalised_meta(listing.meta)
    groups: dict[tuple[str, str, str], list[tuple[FileEntry, str]]] = {}  # (name, layout, kind) -> files
    has_latest = False  # top-level DeepSpeed `latest` file
    restored = set()
    for entry in listing.files:
        parts = _split(entry.path)
        if parts and parts[1:] == [RESTORED_MARKER]:
            restored.add(parts[0])
        if not parts or any(p.startswith(".ckptsync") for p in parts):
            continue
        has_latest = has_latest or parts == ["latest"]
        key = _owner(parts, in_dir=len(parts) > 1)
        if key is not None:
            groups.setdefault(key, []).append((entry, "/".join(parts[1:]) or parts[0]))
    unseen = _sort_unseen(listing.unseen)[0]
    expected = _markers_expected(groups)

    checkpoints = []
    best_sources = []  # (step, trainer_state mtime, best_model_checkpoint)
    for (name, layout, kind), members in groups.items():
        rel = {r: e for e, r in members}
        if layout == "trainer":
            found = _analyse_trainer(name, rel, meta)
            path = found.state.get("best_model_checkpoint")  # only set when trainer_state.json was readable
            if isinstance(path, str):
                best_sources.append((found.step or 0, rel["trainer_state.json"].mtime, path))
        elif layout == "deepspeed":
            found = _analyse_deepspeed(name, rel, has_latest, meta.get("latest"))
        elif layout == "step-dir":
            found = _analyse_step_dir(name, rel, meta)
        else:
            found = _analyse_single_file(name, meta)
        checkpoint = _finish(name, layout, kind, rel, found, listing.now, settle_seconds, writers,
                             expected.get((name, layout, kind)))
        if (name, layout, kind) in unseen:
            checkpoint = _not_seen_whole(checkpoint, unseen.pop((name, layout, kind)))
        checkpoints.append(checkpoint)
    for (name, layout, kind), missed in unseen.items():
        checkpoints.append(_not_seen_at_all(name, layout, kind, missed))

    best_name = best_checkpoint(best_sources)
    checkpoints = [
        replace(c, is_best=True) if c.name == best_name or (c.layout == "single-file" and c.kind == "best") else c
        for c in checkpoints
    ]
    checkpoints = [_as_restored(c) if c.name in restored else c for c in checkpoints]
    # Steps order checkpoints more reliably than mtimes, which copies and
    # checkouts rewrite; mtime breaks ties (latest.pt vs rolling_step_N.pt).
    checkpoints = mark_abandoned(newest_first(checkpoints), listing.now)
    return checkpoints


def _save_marker(rel) -> str | None:
    """The save marker at the top of a checkpoint directory, from the paths inside it. Pure."""
    return next((m for m in SAVE_MARKERS if m in rel), None)


def _markers_expected(groups: dict) -> dict[tuple[str, str, str], str]:
    """(name, layout, kind) -> the marker a directory checkpoint lacks while an earlier one of its
    name pattern (a lower number) has one: that run's writer puts one down when a save ends."""
    patterns = {(layout, kind): pattern for pattern, layout, kind in DIR_LAYOUTS}
    found = {}  # (name, layout, kind) -> (number in the name, its marker or None)
    first: dict[tuple[str, str], tuple[int, str]] = {}  # (layout, kind) -> the lowest number with a marker
    for (name, layout, kind), members in groups.items():
        if layout == "single-file":
            continue
        number = _number_in(patterns[(layout, kind)], name) or 0
        marker = _save_marker({r for _e, r in members})
        found[(name, layout, kind)] = (number, marker)
        if marker and ((layout, kind) not in first or number < first[(layout, kind)][0]):
            first[(layout, kind)] = (number, marker)
    return {key: first[key[1:]][1] for key, (number, marker) in found.items()
            if marker is None and key[1:] in first and number > first[key[1:]][0]}


def best_checkpoint(sources: list[tuple[int, float, str]]) -> str | None:
    """The name of the best checkpoint, from (step, trainer_state.json mtime, best_model_checkpoint)
    of each checkpoint that names one: the newest state's word counts. Pure."""
    if not sources:
        return None
    best_path = max(sources, key=lambda s: (s[0], s[1]))[2]
    return re.split(r"[\\/]", best_path.rstrip("/\\"))[-1] or None


def _as_restored(c: Checkpoint) -> Checkpoint:
    """A directory `restore --adapter-only` wrote: weights to load, not a save still running."""
    what = "adapter" if c.content == "adapter-only" else "weights"
    return replace(c, complete=False, resumable=False, restored=True, reason=f"{what} only, restored")


# An incomplete checkpoint untouched for this many save intervals (and at least ABANDON_MIN_S)
# is a crashed save, not one in progress.
ABANDON_INTERVALS = 3
ABANDON_MIN_S = 1800.0


def save_interval(checkpoints: list[Checkpoint]) -> float | None:
    """The typical time between two saves, for training's cadence and abandon_after. Pure. The median
    gap between complete checkpoints: a pause (an eval, a restart) or an extra save does not move it."""
    times = sorted(c.mtime for c in checkpoints if c.complete)
    gaps = [b - a for a, b in zip(times, times[1:]) if b > a]
    return statistics.median(gaps) if gaps else None


def abandon_after(checkpoints: list[Checkpoint]) -> float:
    """Seconds after which an unfinished save that stopped changing is a crashed one. Pure."""
    return max(ABANDON_INTERVALS * (save_interval(checkpoints) or 0.0), ABANDON_MIN_S)


def mark_abandoned(checkpoints: list[Checkpoint], now: float) -> list[Checkpoint]:
    """Flag incomplete checkpoints whose files stopped changing long ago. Pure."""
    limit = abandon_after(checkpoints)
    out = []
    for c in checkpoints:
        if not c.complete and not c.unreadable and not c.restored and now - c.mtime > limit:
            c = replace(c, abandoned=True)
        out.append(c)
    return out


# A file dated further than this after the server's clock was not stamped by a write happening
# now (a copy that kept another machine's times, a network filesystem with its own clock):
# its age says nothing, so it neither holds a checkpoint back nor counts as being written.
CLOCK_TOLERANCE = 120.0


def written_recently(mtime: float, now: float, seconds: float) -> bool:
    """Modified within `seconds` before `now`, by the clock that stamps the files; never with
    no settle time (a file may be stamped a clock tick past `now`). Pure."""
    return seconds > 0 and -CLOCK_TOLERANCE <= now - mtime < seconds


def dated_ahead(mtimes: Iterable[float], now: float) -> tuple[int, float]:
    """(how many, by how much at most) files are dated past CLOCK_TOLERANCE after `now`. Pure."""
    ahead = [m - now for m in mtimes if m - now > CLOCK_TOLERANCE]
    return len(ahead), max(ahead, default=0.0)


def checkpoint_of(path: str) -> str | None:
    """The checkpoint a path under remote_dir belongs to by its name (`checkpoint-50/x.bin` ->
    checkpoint-50), or None. Pure."""
    parts = [p for p in path.split("/") if p]
    found = (_owner(parts, True) or (_owner(parts, False) if len(parts) == 1 else None)) if parts else None
    return found[0] if found else None


def _owner(parts: list[str], in_dir: bool) -> tuple[str, str, str] | None:
    """(name, layout, kind) of the checkpoint a path belongs to by its top-level name (`in_dir`:
    a path inside a directory, so only the directory layouts), or None."""
    if in_dir:
        return next(((parts[0], layout, kind) for pattern, layout, kind in DIR_LAYOUTS
                     if pattern.fullmatch(parts[0])), None)
    single = _single_file_kind(parts[0])
    return (parts[0], "single-file", single[0]) if single else None


def _sort_unseen(unseen) -> tuple[dict[tuple[str, str, str], list[tuple[str, str, float]]], list[tuple[str, str]]]:
    """The unseen paths by the checkpoint they belong to, and (path, why) of those in none. A
    top-level entry that could not be looked at may be a directory or a file: both are tried."""
    owned: dict[tuple[str, str, str], list[tuple[str, str, float]]] = {}
    outside = []
    for path, why, mtime in sorted(unseen):
        parts = _split(path)
        if not parts or any(p.startswith(".ckptsync") for p in parts):
            continue
        key = _owner(parts, in_dir=True) or (_owner(parts, in_dir=False) if len(parts) == 1 else None)
        if key is None:
            outside.append(("/".join(parts), why))
        else:
            owned.setdefault(key, []).append(("/".join(parts), why, mtime))
    return owned, outside


def unseen_outside(unseen) -> list[tuple[str, str]]:
    """(path, why) of the unseen paths in no checkpoint (a log directory, a stray socket): by its
    name nothing there would be backed up, so the caller only names them. Pure."""
    return _sort_unseen(unseen)[1]


def _unseen_text(missed: list[tuple[str, str, float]]) -> str:
    path, why, _mtime = missed[0]
    more = f" and {len(missed) - 1} more" if len(missed) > 1 else ""
    return f"{path}: {why}{more}"


def _not_seen_whole(c: Checkpoint, missed: list[tuple[str, str, float]]) -> Checkpoint:
    """A checkpoint part of which could not be listed or read cannot be copied whole."""
    why = _unseen_text(missed)
    return replace(c, complete=False, resumable=False, unreadable=why,
                   reason=f"could not be read on the server ({why})")


def _not_seen_at_all(name: str, layout: str, kind: str, missed: list[tuple[str, str, float]]) -> Checkpoint:
    """A checkpoint known only by its name (a dangling symlink, a directory that cannot be listed)."""
    why = _unseen_text(missed)
    if layout == "single-file":
        single = _single_file_kind(name)
        step = single[2] if single and single[1] == "step" else None
    else:
        step = _number_in(STEP_PATTERN[layout], name)
    return Checkpoint(name=name, layout=layout, kind=kind, step=step, files=(), size=0,
                      mtime=max(m for _p, _w, m in missed), complete=False,
                      reason=f"could not be read on the server ({why})", content="unknown", resumable=False,
                      missing=(), is_best=False, state={}, meta_error=None, unreadable=why)


def resume_files(checkpoint: Checkpoint) -> tuple[str, ...]:
    """Paths (relative to remote_dir) of the files an exact resume reads.

    For a Trainer checkpoint that is the weights or adapter, optimizer,
    scheduler, scaler, trainer_state.json, RNG files and any DeepSpeed/FSDP
    state directories; README, training_args.bin and configs are left out.
    The other layouts are read whole by their loaders, so all files count.
    """
    if checkpoint.layout != "trainer":
        return tuple(sorted(f.path for f in checkpoint.files))
    inside = {f.path: "/".join((_split(f.path) or [])[1:]) for f in checkpoint.files}
    return tuple(sorted(path for path, rel in inside.items() if _is_trainer_resume_file(rel)))


def find_best(checkpoints: list[Checkpoint]) -> str | None:
    """Name of the first checkpoint marked best, or None."""
    for checkpoint in checkpoints:
        if checkpoint.is_best:
            return checkpoint.name
    return None


# ---------------------------------------------------------------- layouts


def _analyse_trainer(name: str, rel: dict[str, FileEntry], meta: dict) -> _Analysis:
    found = _Analysis(step=_number_in(TRAINER_DIR, name))
    top = {r for r in rel if "/" not in r}
    subdirs = {r.split("/", 1)[0] for r in rel if "/" in r}

    # DeepSpeed inside a Trainer checkpoint: `latest` names the engine's state directory.
    ds_dirs = {d for d in subdirs if DEEPSPEED_DIR.fullmatch(d)}
    tag = None
    if "latest" in top:
        value = meta.get(f"{name}/latest")
        if isinstance(value, str) and value.strip():
            tag = value.strip()
            if tag not in subdirs:
                found.problems.append(f"latest names {tag} which is missing")
        elif _error_of(value) is not None:
            found.errors.append(f"latest unreadable: {_error_of(value)}")
    elif ds_dirs:
        found.problems.append("latest not written yet")
    engine = [r for r in rel if r.split("/", 1)[0] in ({tag} if tag in ds_dirs else ds_dirs)]
    engine_weights = any(r.endswith("model_states.pt") for r in engine)
    engine_optimizer = any(r.endswith("optim_states.pt") for r in engine)

    shards = [m for m in map(SHARD.fullmatch, sorted(top)) if m]
    fsdp = [d for d in subdirs if FSDP_MODEL_DIR.fullmatch(d)]
    if "adapter_model.safetensors" in top or "adapter_model.bin" in top:
        found.weights = "adapter"
    elif ({"model.safetensors", "pytorch_model.bin", "pytorch_model_fsdp.bin"} & top
          or shards or fsdp or engine_weights):
        found.weights = "full"
    found.problems.extend(_shard_problems(shards, top))
    for d in sorted(fsdp + [d for d in subdirs if FSDP_OPTIM_DIR.fullmatch(d)]):
        # torch.distributed.checkpoint writes .metadata after all the shards.
        if any(r.startswith(d + "/") and r.endswith(".distcp") for r in rel) and f"{d}/.metadata" not in rel:
            found.problems.append(f"{d}/.metadata not written yet")

    found.has_optimizer = bool(
        {"optimizer.pt", "optimizer.bin"} & top
        or any(FSDP_OPTIM_DIR.fullmatch(d) for d in subdirs)
        or engine_optimizer
    )
    found.needs = [("model weights", found.weights is not None)]
    if found.weights == "adapter":
        found.needs.append(("adapter_config.json", "adapter_config.json" in top))
    found.needs += [
        ("optimizer.pt", found.has_optimizer),
        ("scheduler.pt", "scheduler.pt" in top or bool(ds_dirs)),
        ("trainer_state.json", "trainer_state.json" in top),
        ("rng_state.pth", any(RNG_FILE.fullmatch(r) for r in top)),
    ]

    if "trainer_state.json" not in top:
        # The Trainer writes trainer_state.json last, so without it the save is still running.
        found.problems.insert(0, "trainer_state.json not written yet")
    else:
        value = meta.get(f"{name}/trainer_state.json")
        if isinstance(value, dict) and "__error__" not in value:
            found.state = _trainer_summary(value)
        elif value is not None:
            found.errors.append(f"trainer_state.json unreadable: {_error_of(value) or 'not a JSON object'}")
    return found


def _analyse_deepspeed(name: str, rel: dict[str, FileEntry], has_latest: bool, latest) -> _Analysis:
    found = _Analysis(step=_number_in(DEEPSPEED_DIR, name))
    found.weights = "full" if any(r.endswith("model_states.pt") for r in rel) else None
    found.has_optimizer = any(r.endswith("optim_states.pt") for r in rel)
    found.needs = [("*model_states.pt", found.weights is not None), ("*optim_states.pt", found.has_optimizer)]
    if not has_latest:
        found.problems.append("latest not written yet")
    elif isinstance(latest, str):
        # DeepSpeed rewrites `latest` only after a save has finished.
        latest_step = _number_in(DEEPSPEED_DIR, latest.strip())
        if latest_step is not None and found.step is not None and found.step > latest_step:
            found.problems.append(f"latest still names {latest.strip()}")
    elif latest is not None:
        found.errors.append(f"latest unreadable: {_error_of(latest) or 'not text'}")
    return found


def _analyse_step_dir(name: str, rel: dict[str, FileEntry], meta: dict) -> _Analysis:
    found = _Analysis(step=_number_in(STEP_DIR, name))
    if "state.pt" in rel:
        _read_pt(found, meta.get(f"{name}/state.pt"), "state.pt")
    else:
        found.known = False
        found.problems.append("state.pt not written yet")
    # Seed 003 may save model parts beside state.pt (encoder.pt, adapter_*.pt).
    if found.known and found.weights is None and any(
        r == "encoder.pt" or re.fullmatch(r"adapter_.*\.pt", r) for r in rel
    ):
        found.weights = "full"
        found.needs[0] = ("model", True)
    found.needs.append(("metadata.json", "metadata.json" in rel))
    if "metadata.json" not in rel:
        found.problems.insert(0, "metadata.json not written yet")
    else:
        value = meta.get(f"{name}/metadata.json")
        if isinstance(value, dict) and "__error__" not in value:
            found.state.update(_metadata_summary(value))
        elif value is not None:
            found.errors.append(f"metadata.json unreadable: {_error_of(value) or 'not a JSON object'}")
    if found.step is None and is_int(found.state.get("global_step")):
        found.step = found.state["global_step"]
    if EPOCH_DIR.fullmatch(name) and "epoch" not in found.state:
        found.state["epoch"] = _number_in(EPOCH_DIR, name)
    return found


def _analyse_single_file(name: str, meta: dict) -> _Analysis:
    found = _Analysis()
    _read_pt(found, meta.get(name), name)
    kind = _single_file_kind(name)
    if kind and kind[1] == "step":
        found.step = kind[2]
    elif is_int(found.state.get("global_step")):
        found.step = found.state["global_step"]
    if kind and kind[1] == "epoch":
        found.state["epoch"] = kind[2]
    return found


def _read_pt(found: _Analysis, value, label: str) -> None:
    """Fill weights/optimizer/needs from the agent's scan of a torch.save pickle."""
    info = value.get("__pt__") if isinstance(value, dict) else None
    if not isinstance(info, dict):
        found.known = False
        if _error_of(value) is not None:
            found.errors.append(f"{label} unreadable: {_error_of(value)}")
        return
    keys = info.get("keys")
    keys = {k for k in keys if isinstance(k, str)} if isinstance(keys, (list, tuple)) else set()
    found.weights = "full" if keys & MODEL_KEYS else None
    found.has_optimizer = bool(keys & OPTIMIZER_KEYS)
    found.needs = [
        ("model", found.weights is not None),
        ("optimizer", found.has_optimizer),
        ("scheduler", bool(keys & SCHEDULER_KEYS)),
        ("rng", bool(keys & RNG_KEYS)),
    ]
    if is_int(info.get("step")):
        found.state["global_step"] = info["step"]
    if is_int(info.get("epoch")):
        found.state["epoch"] = info["epoch"]


# ---------------------------------------------------------------- shared steps


def _finish(name, layout, kind, rel, found: _Analysis, now, settle_seconds, writers: Writers | None,
            expected_marker: str | None = None) -> Checkpoint:
    files = tuple(sorted(rel.values(), key=lambda e: e.path))
    size = sum(e.size for e in files)
    problems = list(found.problems)
    if size == 0:
        problems.insert(0, "empty")
    else:
        for r in sorted(rel):
            if rel[r].size == 0 and r not in SAVE_MARKERS and (layout != "trainer" or _is_trainer_resume_file(r)):
                problems.append(f"{r} is empty")
                break
    mtime = max(e.mtime for e in rel.values())
    seen = writers is not None and not any(writers.blind_to(e.path) for e in rel.values())
    if seen:
        written = [r for r in sorted(rel) if rel[r].path in writers.open]
        if written:
            problems.append(f"{written[0]} is open for writing")
    marker = _save_marker(rel)
    if marker:
        after = [r for r in rel if rel[r].mtime > rel[marker].mtime]
        if after:
            problems.append(f"{max(after, key=lambda r: rel[r].mtime)} modified after {marker}")
    elif expected_marker:
        problems.append(f"no {expected_marker} yet (the run's other checkpoints have one)")
    # The marker says the save finished, so nothing waits to settle; where writers are seen, only
    # a file changed after they were looked at does.
    recent = [r for r in rel if not marker and written_recently(rel[r].mtime, now, settle_seconds)
              and not (seen and rel[r].mtime < writers.since)]
    if recent:
        newest_rel = max(recent, key=lambda r: rel[r].mtime)
        age = now - rel[newest_rel].mtime
        problems.append(f"{newest_rel} modified {int(max(age, 0))}s ago (settle {settle_seconds:g}s)")

    content = _content(found)
    meta_error = "; ".join(found.errors) or None
    complete = not problems
    return Checkpoint(
        name=name,
        layout=layout,
        kind=kind,
        step=found.step,
        files=files,
        size=size,
        mtime=mtime,
        complete=complete,
        reason=problems[0] if problems else "",
        content=content,
        resumable=complete and content in RESUMABLE_CONTENT and meta_error is None,
        missing=tuple(label for label, present in found.needs if not present) if found.known else (),
        is_best=False,
        state=found.state,
        meta_error=meta_error,
    )


def _content(found: _Analysis) -> str:
    if not found.known:
        return "unknown"
    if found.weights is None:
        return "optimizer-only" if found.has_optimizer else "unknown"
    if not found.has_optimizer:
        return "adapter-only" if found.weights == "adapter" else "weights-only"
    missing = {label for label, present in found.needs if not present}
    if not missing:
        return "full"
    return "no-rng" if missing <= RNG_LABELS else "partial"


def _shard_problems(shards: list[re.Match], top: set[str]) -> list[str]:
    problems = []
    groups: dict[tuple[str, str, str], set[int]] = {}
    for m in shards:
        groups.setdefault((m[1], m[3], m[4]), set()).add(int(m[2]))
    for (prefix, total, ext), present in sorted(groups.items()):
        # Stops at the first gap, so a bogus "-of-99999999" cannot loop for long.
        for i in range(1, int(total) + 1):
            if i not in present:
                problems.append(f"shard {prefix}-{i:0{len(total)}d}-of-{total}.{ext} missing")
                break
        index = f"{prefix}.{ext}.index.json"
        if index not in top:
            problems.append(f"{index} not written yet")
    return problems


def _trainer_summary(data: dict) -> dict:
    keys = ("global_step", "epoch", "max_steps", "best_metric", "best_global_step", "best_model_checkpoint")
    summary = {k: data[k] for k in keys if _is_scalar(data.get(k))}
    history = data.get("log_history")
    for entry in reversed(history if isinstance(history, list) else []):
        if isinstance(entry, dict):
            for key in ("loss", "learning_rate", "eval_loss"):
                if key not in summary and is_number(entry.get(key)):
                    summary[key] = entry[key]
    return summary


def _metadata_summary(data: dict) -> dict:
    summary = {k: v for k, v in data.items() if isinstance(k, str) and _is_scalar(v)}
    if "step" in summary and "global_step" not in summary:
        summary["global_step"] = summary.pop("step")
    return summary


def _single_file_kind(name: str) -> tuple[str, str | None, int | None] | None:
    """(kind, what the number in the name is, that number) for a seed-style .pt name."""
    for pattern, kind, number in SINGLE_FILES:
        m = pattern.fullmatch(name)
        if m:
            return kind, number, int(m[1]) if number else None
    return None


def _is_trainer_resume_file(rel: str) -> bool:
    if "/" in rel:
        return bool(TRAINER_RESUME_DIR.fullmatch(rel.split("/", 1)[0]))
    return bool(TRAINER_RESUME_FILE.fullmatch(rel))


def _split(path) -> list[str] | None:
    """Path components, or None for paths that do not stay inside remote_dir."""
    if not isinstance(path, str) or path.startswith("/"):
        return None
    parts = [p for p in path.split("/") if p not in ("", ".")]
    return None if ".." in parts else parts


def _normalised_meta(meta) -> dict:
    if not isinstance(meta, dict):
        return {}
    out = {}
    for key, value in meta.items():
        parts = _split(key)
        if parts:
            out["/".join(parts)] = value
    return out


def _number_in(pattern: re.Pattern, name: str) -> int | None:
    m = pattern.fullmatch(name)
    return int(m[1]) if m else None


def _error_of(value) -> str | None:
    if isinstance(value, dict) and "__error__" in value:
        return str(value["__error__"])
    return None


def is_int(value) -> bool:   # a JSON integer of a state file; true and false are not steps
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_scalar(value) -> bool:
    return isinstance(value, (str, int, float, bool))
