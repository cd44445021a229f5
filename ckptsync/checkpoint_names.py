"""Which checkpoint a path under remote_dir belongs to by its name, and the save markers a run's writer puts down."""

from __future__ import annotations

import re

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


def checkpoint_of(path: str) -> str | None:
    """The checkpoint a path under remote_dir belongs to by its name (`checkpoint-50/x.bin` ->
    checkpoint-50), or None. Pure."""
    parts = [p for p in path.split("/") if p]
    found = (owner(parts, True) or (owner(parts, False) if len(parts) == 1 else None)) if parts else None
    return found[0] if found else None


def owner(parts: list[str], in_dir: bool) -> tuple[str, str, str] | None:
    """(name, layout, kind) of the checkpoint a path belongs to by its top-level name (`in_dir`:
    a path inside a directory, so only the directory layouts), or None."""
    if in_dir:
        return next(((parts[0], layout, kind) for pattern, layout, kind in DIR_LAYOUTS
                     if pattern.fullmatch(parts[0])), None)
    single = single_file_kind(parts[0])
    return (parts[0], "single-file", single[0]) if single else None


def single_file_kind(name: str) -> tuple[str, str | None, int | None] | None:
    """(kind, what the number in the name is, that number) for a seed-style .pt name."""
    for pattern, kind, number in SINGLE_FILES:
        m = pattern.fullmatch(name)
        if m:
            return kind, number, int(m[1]) if number else None
    return None


def split_path(path) -> list[str] | None:
    """Path components, or None for paths that do not stay inside remote_dir."""
    if not isinstance(path, str) or path.startswith("/"):
        return None
    parts = [p for p in path.split("/") if p not in ("", ".")]
    return None if ".." in parts else parts


def number_in(pattern: re.Pattern, name: str) -> int | None:
    m = pattern.fullmatch(name)
    return int(m[1]) if m else None


def save_marker(rel) -> str | None:
    """The save marker at the top of a checkpoint directory, from the paths inside it. Pure."""
    return next((m for m in SAVE_MARKERS if m in rel), None)


def markers_expected(groups: dict) -> dict[tuple[str, str, str], str]:
    """(name, layout, kind) -> the marker a directory checkpoint lacks while an earlier one of its
    name pattern (a lower number) has one: that run's writer puts one down when a save ends."""
    patterns = {(layout, kind): pattern for pattern, layout, kind in DIR_LAYOUTS}
    found = {}  # (name, layout, kind) -> (number in the name, its marker or None)
    first: dict[tuple[str, str], tuple[int, str]] = {}  # (layout, kind) -> the lowest number with a marker
    for (name, layout, kind), members in groups.items():
        if layout == "single-file":
            continue
        number = number_in(patterns[(layout, kind)], name) or 0
        marker = save_marker({r for _e, r in members})
        found[(name, layout, kind)] = (number, marker)
        if marker and ((layout, kind) not in first or number < first[(layout, kind)][0]):
            first[(layout, kind)] = (number, marker)
    return {key: first[key[1:]][1] for key, (number, marker) in found.items()
            if marker is None and key[1:] in first and number > first[key[1:]][0]}


def sort_unseen(unseen) -> tuple[dict[tuple[str, str, str], list[tuple[str, str, float]]], list[tuple[str, str]]]:
    """The unseen paths by the checkpoint they belong to, and (path, why) of those in none. A
    top-level entry that could not be looked at may be a directory or a file: both are tried."""
    owned: dict[tuple[str, str, str], list[tuple[str, str, float]]] = {}
    outside = []
    for path, why, mtime in sorted(unseen):
        parts = split_path(path)
        if not parts or any(p.startswith(".ckptsync") for p in parts):
            continue
        key = owner(parts, in_dir=True) or (owner(parts, in_dir=False) if len(parts) == 1 else None)
        if key is None:
            outside.append(("/".join(parts), why))
        else:
            owned.setdefault(key, []).append(("/".join(parts), why, mtime))
    return owned, outside


def unseen_outside(unseen) -> list[tuple[str, str]]:
    """(path, why) of the unseen paths in no checkpoint (a log directory, a stray socket): by its
    name nothing there would be backed up, so the caller only names them. Pure."""
    return sort_unseen(unseen)[1]
