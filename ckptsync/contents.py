"""What a checkpoint holds, from its file names and the agent's read of its metadata: one pass per layout."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ckptsync.checkpoint_names import (
    DEEPSPEED_DIR, EPOCH_DIR, FSDP_MODEL_DIR, FSDP_OPTIM_DIR, RNG_FILE, SHARD, STEP_DIR, TRAINER_DIR, number_in,
    single_file_kind,
)

if TYPE_CHECKING:
    from ckptsync.server.types import FileStat

# Files of a Trainer checkpoint that `--resume_from_checkpoint` reads.
TRAINER_RESUME_FILE = re.compile(
    r"adapter_model\.(safetensors|bin)|adapter_config\.json"
    r"|model\.safetensors|pytorch_model\.bin|(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)"
    r"|(model\.safetensors|pytorch_model\.bin)\.index\.json|pytorch_model_fsdp(_\d+)?\.bin"
    r"|optimizer\.(pt|bin)|scheduler\.pt|scaler\.pt|trainer_state\.json|rng_state(_\d+)?\.pth|latest"
)
TRAINER_RESUME_DIR = re.compile(r"global_step\d+|pytorch_model_fsdp_\d+|optimizer_\d+")

# String constants in a torch.save pickle that show what it holds.
MODEL_KEYS = {"model", "model_state_dict", "model_state"}
OPTIMIZER_KEYS = {"optimizer", "optimizer_state_dict", "optimizer_state"}
SCHEDULER_KEYS = {"scheduler", "lr_scheduler", "scheduler_state_dict", "scheduler_state"}
RNG_KEYS = {"rng", "rng_state", "rng_states", "rng_state_dict"}
RNG_LABELS = {"rng_state.pth", "rng"}
RESUMABLE_CONTENT = {"full", "no-rng"}


@dataclass
class Analysis:
    """What one layout-specific pass found; turned into a Checkpoint by layout.discover."""

    weights: str | None = None  # "adapter" or "full"
    has_optimizer: bool = False
    needs: list[tuple[str, bool]] = field(default_factory=list)  # (label, present)
    problems: list[str] = field(default_factory=list)  # reasons it is still in progress
    known: bool = True  # False when the contents cannot be told
    state: dict = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    step: int | None = None


def analyse_trainer(name: str, rel: dict[str, FileStat], meta: dict) -> Analysis:
    found = Analysis(step=number_in(TRAINER_DIR, name))
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


def analyse_deepspeed(name: str, rel: dict[str, FileStat], has_latest: bool, latest) -> Analysis:
    found = Analysis(step=number_in(DEEPSPEED_DIR, name))
    found.weights = "full" if any(r.endswith("model_states.pt") for r in rel) else None
    found.has_optimizer = any(r.endswith("optim_states.pt") for r in rel)
    found.needs = [("*model_states.pt", found.weights is not None), ("*optim_states.pt", found.has_optimizer)]
    if not has_latest:
        found.problems.append("latest not written yet")
    elif isinstance(latest, str):
        # DeepSpeed rewrites `latest` only after a save has finished.
        latest_step = number_in(DEEPSPEED_DIR, latest.strip())
        if latest_step is not None and found.step is not None and found.step > latest_step:
            found.problems.append(f"latest still names {latest.strip()}")
    elif latest is not None:
        found.errors.append(f"latest unreadable: {_error_of(latest) or 'not text'}")
    return found


def analyse_step_dir(name: str, rel: dict[str, FileStat], meta: dict) -> Analysis:
    found = Analysis(step=number_in(STEP_DIR, name))
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
        found.state["epoch"] = number_in(EPOCH_DIR, name)
    return found


def analyse_single_file(name: str, meta: dict) -> Analysis:
    found = Analysis()
    _read_pt(found, meta.get(name), name)
    kind = single_file_kind(name)
    if kind and kind[1] == "step":
        found.step = kind[2]
    elif is_int(found.state.get("global_step")):
        found.step = found.state["global_step"]
    if kind and kind[1] == "epoch":
        found.state["epoch"] = kind[2]
    return found


def _read_pt(found: Analysis, value, label: str) -> None:
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


def content_of(found: Analysis) -> str:
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


def is_trainer_resume_file(rel: str) -> bool:
    if "/" in rel:
        return bool(TRAINER_RESUME_DIR.fullmatch(rel.split("/", 1)[0]))
    return bool(TRAINER_RESUME_FILE.fullmatch(rel))


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
