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
  than ``settle.CLOCK_TOLERANCE`` after it was not stamped by a write happening now,
  so only the layout's completion markers decide for it.
* Where the server shows who writes (``Writers``: the files open for writing,
  seen through ``/proc/*/fdinfo``), a checkpoint whose layout markers are there
  and none of whose files is open for writing is complete at once; settling
  is then waited for only by files changed after the writers were looked at,
  and by checkpoints behind a symlink (their writers are not seen).
* A ``_SUCCESS`` or ``.complete`` file at the top of a checkpoint directory
  (``checkpoint_names.SAVE_MARKERS``) is its writer's word that the save finished: with one,
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
from dataclasses import dataclass, replace

from ckptsync.checkpoint_names import (
    RESTORED_MARKER, SAVE_MARKERS, STEP_PATTERN, markers_expected, number_in, owner, save_marker, single_file_kind,
    sort_unseen, split_path,
)
from ckptsync.contents import (
    RESUMABLE_CONTENT, Analysis, analyse_deepspeed, analyse_single_file, analyse_step_dir, analyse_trainer,
    content_of, is_trainer_resume_file,
)
from ckptsync.policy import newest_first
from ckptsync.server.types import FileStat
from ckptsync.settle import mark_abandoned, written_recently


@dataclass(frozen=True)
class Listing:
    files: tuple[FileStat, ...]
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
    files: tuple[FileStat, ...]
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


def discover(listing: Listing, settle_seconds: float = 60, writers: Writers | None = None) -> list[Checkpoint]:
    """Checkpoints found at the top level of remote_dir, newest first.

    A checkpoint is complete when its layout's own markers say the save
    finished and none of its files changed within settle_seconds of
    listing.now; with `writers`, when none of its files is open for writing
    (see the module's note).  Order: policy.newest_first.
    """
    meta = _normalised_meta(listing.meta)
    groups: dict[tuple[str, str, str], list[tuple[FileStat, str]]] = {}  # (name, layout, kind) -> files
    has_latest = False  # top-level DeepSpeed `latest` file
    restored = set()
    for entry in listing.files:
        parts = split_path(entry.path)
        if parts and parts[1:] == [RESTORED_MARKER]:
            restored.add(parts[0])
        if not parts or any(p.startswith(".ckptsync") for p in parts):
            continue
        has_latest = has_latest or parts == ["latest"]
        key = owner(parts, in_dir=len(parts) > 1)
        if key is not None:
            groups.setdefault(key, []).append((entry, "/".join(parts[1:]) or parts[0]))
    unseen = sort_unseen(listing.unseen)[0]
    expected = markers_expected(groups)

    checkpoints = []
    best_sources = []  # (step, trainer_state mtime, best_model_checkpoint)
    for (name, layout, kind), members in groups.items():
        rel = {r: e for e, r in members}
        if layout == "trainer":
            found = analyse_trainer(name, rel, meta)
            path = found.state.get("best_model_checkpoint")  # only set when trainer_state.json was readable
            if isinstance(path, str):
                best_sources.append((found.step or 0, rel["trainer_state.json"].mtime, path))
        elif layout == "deepspeed":
            found = analyse_deepspeed(name, rel, has_latest, meta.get("latest"))
        elif layout == "step-dir":
            found = analyse_step_dir(name, rel, meta)
        else:
            found = analyse_single_file(name, meta)
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


def _finish(name, layout, kind, rel, found: Analysis, now, settle_seconds, writers: Writers | None,
            expected_marker: str | None = None) -> Checkpoint:
    files = tuple(sorted(rel.values(), key=lambda e: e.path))
    size = sum(e.size for e in files)
    problems = list(found.problems)
    if size == 0:
        problems.insert(0, "empty")
    else:
        for r in sorted(rel):
            if rel[r].size == 0 and r not in SAVE_MARKERS and (layout != "trainer" or is_trainer_resume_file(r)):
                problems.append(f"{r} is empty")
                break
    mtime = max(e.mtime for e in rel.values())
    seen = writers is not None and not any(writers.blind_to(e.path) for e in rel.values())
    if seen:
        written = [r for r in sorted(rel) if rel[r].path in writers.open]
        if written:
            problems.append(f"{written[0]} is open for writing")
    marker = save_marker(rel)
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

    content = content_of(found)
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
        single = single_file_kind(name)
        step = single[2] if single and single[1] == "step" else None
    else:
        step = number_in(STEP_PATTERN[layout], name)
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
    inside = {f.path: "/".join((split_path(f.path) or [])[1:]) for f in checkpoint.files}
    return tuple(sorted(path for path, rel in inside.items() if is_trainer_resume_file(rel)))


def find_best(checkpoints: list[Checkpoint]) -> str | None:
    """Name of the first checkpoint marked best, or None."""
    for checkpoint in checkpoints:
        if checkpoint.is_best:
            return checkpoint.name
    return None


def _normalised_meta(meta) -> dict:
    if not isinstance(meta, dict):
        return {}
    out = {}
    for key, value in meta.items():
        parts = split_path(key)
        if parts:
            out["/".join(parts)] = value
    return out
