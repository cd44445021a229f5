"""What a restore takes from the backup directory: which checkpoint, which of its files, and hints when none fits."""

from __future__ import annotations

import posixpath
import re
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ckptsync.errors import NotFound, UsageError
from ckptsync.policy import named, newest_first as _newest
from ckptsync.progress import QUIET, Reporter
from ckptsync.stores.directory import Generation, DirectoryStore as Store
from ckptsync.stores.manifest import EXTRA, FileRecord, Manifest
from ckptsync.verify import check_files, inspect_files

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
        raise NotFound(f"no earlier versions of {name} in {store.location}",
                       hint="an earlier version is kept when a newer one replaces it under the same name")
    for i, g in enumerate(gens, 1):
        if wanted in (str(i), g.id):
            return g
    have = ", ".join(f"{i} ({g.id})" for i, g in enumerate(gens, 1))
    raise NotFound(f"no generation {wanted} of {name} (there are: {have})")


def files_text(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def verify_files(root: Path, files: list[FileRecord], rep: Reporter = QUIET, read: bool = True) -> list[str]:
    """Re-read the stored copies: what does not match the manifest, one phrase per file. `read`
    False: presence, type and size only (for files whose bytes the send checks as it reads them)."""
    found = check_files(root, files, rep) if read else inspect_files(root, files)[0]
    return [f"{p.path} ({p.kind}{': ' + p.detail if p.detail else ''})" for p in found]


def files_to_send(m: Manifest, adapter_only: bool) -> tuple[list[FileRecord], list[str]]:
    """The files of `m` a restore sends, by path, and warnings on what the restored copy can do."""
    warnings = []
    if not adapter_only:
        files = list(m.files)
    elif m.layout == "single-file" or not has_weights(m):
        raise UsageError(f"--adapter-only: {m.name} has no separate adapter or model weight files",
                         hint="restore it whole (without --adapter-only)")
    else:
        files = weight_files(m)
        warnings.append(f"--adapter-only: only the weights and configs of {m.name} are sent; you can "
                        "fine-tune from these weights, but the run cannot be resumed exactly "
                        "(no optimizer, scheduler or RNG state)")
    if not adapter_only:
        missing = ", ".join(m.missing) or "nothing listed"
        if lacks_training_state(m):
            warnings.append(f"{m.name} has no optimizer or scheduler state (missing: {missing}): you can "
                            "fine-tune from these weights, but the run cannot be resumed exactly")
        elif not m.resumable:
            warnings.append(f"{m.name} cannot resume the run exactly (content: {m.content}; "
                            f"missing: {missing})")
        elif NO_RNG & set(m.missing):
            warnings.append(f"{m.name} has no RNG state: the run resumes, but its data order "
                            "will not be bit-identical")
    return sorted(files, key=lambda f: f.path), warnings


def older_hint(root: Path, m: Manifest | None, ordered: list[Manifest], adapter_only: bool,
               restore_command: Callable[[str], str]) -> str:
    """The next older backup that verifies (with m None: the newest one), as a command."""
    older = ordered[ordered.index(m) + 1:] if m is not None else ordered
    for other in older:
        if not (has_weights(other) if adapter_only else other.resumable):
            continue
        files = weight_files(other) if adapter_only else other.files
        if not verify_files(root, files):
            which = "the next older backup" if m is not None else "the newest backup that"
            return f"{which} verifies: {restore_command(other.name)}"
    if m is None:
        return "no other backup verifies" if older else "there is no other backup"
    return "no older backup verifies either" if older else "there is no older backup"


def elsewhere_hint(root: Path, target) -> str:
    """Where the backups are when `root` holds none: the directories inside it or beside it."""
    try:  # the parent of the backup directories (<local_dir>, not <local_dir>/instance-N)?
        inside = sorted(p for p in root.iterdir() if (p / ".ckptsync" / "manifests").is_dir())
    except OSError:
        inside = []
    if inside:
        names = ", ".join(p.name for p in inside[:5]) + (", ..." if len(inside) > 5 else "")
        return (f"{root} holds backup directories ({names}), not a backup itself: choose one, e.g. "
                + target.printed.command_with("--local-dir", str(inside[0].absolute()), "restore"))
    try:
        found = sorted(str(p) for p in root.parent.iterdir()
                       if p != root and (p / ".ckptsync" / "manifests").is_dir())
    except OSError:
        found = []
    if found:
        return f"backups exist in {', '.join(found[:3])}: choose one with --local-dir"
    return "give the backup directory with --local-dir"
