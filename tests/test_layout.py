from __future__ import annotations

import json
import os
import pickletools
import random
import zipfile
from pathlib import Path

import pytest

from ckptsync.checkpoint_names import RESTORED_MARKER
from ckptsync.layout import Checkpoint, Listing, Writers, best_checkpoint, discover, find_best, resume_files
from ckptsync.server import FileStat
from helpers import FIXTURES

pytestmark = pytest.mark.laptop  # pure tables: the macOS and Windows jobs run them too

NOW = 1_700_000_000.0
OLD = NOW - 3600

LORA = ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
        "rng_state.pth", "trainer_state.json", "training_args.bin", "README.md")
FULL = ("model.safetensors", "config.json", "generation_config.json", "optimizer.pt", "scheduler.pt",
        "rng_state.pth", "trainer_state.json", "training_args.bin")
STATE = {"global_step": 500, "epoch": 1.0, "log_history": []}


def entry(path: str, size: int = 100, mtime: float = OLD, mode: int = 0o644) -> FileStat:
    return FileStat(path, size, round(mtime * 1e9), mode)


def listing(*files: FileStat, meta: dict | None = None, now: float = NOW) -> Listing:
    return Listing(tuple(files), meta or {}, now)


def in_dir(directory: str, names, **kwargs) -> list[FileStat]:
    return [entry(f"{directory}/{name}", **kwargs) for name in names]


def trainer(names, directory: str = "checkpoint-500", state: dict | None = None, **kwargs) -> Listing:
    meta = {f"{directory}/trainer_state.json": STATE if state is None else state}
    return listing(*in_dir(directory, names), meta=meta, **kwargs)


def only(checkpoints: list[Checkpoint]) -> Checkpoint:
    assert len(checkpoints) == 1, [c.name for c in checkpoints]
    return checkpoints[0]


def pt(*keys: str, step: int | None = None, epoch: int | None = None) -> dict:
    return {"__pt__": {"keys": list(keys), "step": step, "epoch": epoch}}


# ---------------------------------------------------------------- Trainer checkpoint-N


@pytest.mark.parametrize("names, content, missing", [
    (LORA, "full", ()),
    (tuple(n.replace(".safetensors", ".bin") for n in LORA), "full", ()),
    (FULL, "full", ()),
    (("pytorch_model.bin",) + FULL[1:], "full", ()),
    (("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
      "model.safetensors.index.json") + FULL[1:], "full", ()),
    (("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
      "pytorch_model.bin.index.json") + FULL[1:], "full", ()),
    (tuple(n for n in LORA if n != "rng_state.pth") + ("rng_state_0.pth", "rng_state_1.pth"), "full", ()),
    (tuple(n for n in LORA if n != "rng_state.pth"), "no-rng", ("rng_state.pth",)),
    (("adapter_model.safetensors", "adapter_config.json", "trainer_state.json"), "adapter-only",
     ("optimizer.pt", "scheduler.pt", "rng_state.pth")),
    (("model.safetensors", "config.json", "trainer_state.json", "rng_state.pth"), "weights-only",
     ("optimizer.pt", "scheduler.pt")),
    (("optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth"), "optimizer-only", ("model weights",)),
    (tuple(n for n in LORA if n != "adapter_config.json"), "partial", ("adapter_config.json",)),
    (tuple(n for n in LORA if n != "scheduler.pt"), "partial", ("scheduler.pt",)),
    (("adapter_model.safetensors", "adapter_config.json", "scheduler.pt", "rng_state.pth", "trainer_state.json",
      "latest", "global_step500/mp_rank_00_model_states.pt",
      "global_step500/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_to_fp32.py"), "full", ()),
    # DeepSpeed keeps the LR scheduler inside its engine state: no scheduler.pt needed.
    (("model.safetensors", "rng_state.pth", "trainer_state.json", "latest",
      "global_step500/mp_rank_00_model_states.pt", "global_step500/zero_pp_rank_0_mp_rank_00_optim_states.pt"),
     "full", ()),
    (("pytorch_model_fsdp_0/__0_0.distcp", "pytorch_model_fsdp_0/.metadata", "optimizer_0/__0_0.distcp",
      "optimizer_0/.metadata", "scheduler.pt", "rng_state_0.pth", "trainer_state.json"), "full", ()),
    (("pytorch_model_fsdp.bin", "optimizer.bin", "scheduler.pt", "rng_state.pth", "trainer_state.json"), "full", ()),
])
def test_trainer_contents(names, content, missing):
    meta = {"checkpoint-500/latest": "global_step500"}
    meta["checkpoint-500/trainer_state.json"] = STATE
    c = only(discover(listing(*in_dir("checkpoint-500", names), meta=meta)))
    assert (c.name, c.layout, c.kind, c.step) == ("checkpoint-500", "trainer", "rolling", 500)
    assert c.complete and c.reason == ""
    assert c.content == content
    assert c.missing == missing
    assert c.resumable == (content in ("full", "no-rng"))
    assert c.meta_error is None


def test_trainer_sizes_mtime_and_files():
    files = [entry("checkpoint-8/optimizer.pt", 300, OLD), entry("checkpoint-8/adapter_model.safetensors", 200, OLD + 5),
             entry("checkpoint-8/trainer_state.json", 10, OLD + 9)]
    c = only(discover(listing(*files, meta={"checkpoint-8/trainer_state.json": {}})))
    assert c.size == 510
    assert c.mtime == OLD + 9
    assert [f.path for f in c.files] == sorted(f.path for f in files)


IN_PROGRESS = [
    (tuple(n for n in LORA if n != "trainer_state.json"), {}, "trainer_state.json not written yet"),
    (("model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors", "model.safetensors.index.json")
     + FULL[1:], {}, "shard model-00002-of-00003.safetensors missing"),
    (("pytorch_model-01-of-02.bin",) + FULL[1:], {}, "shard pytorch_model-02-of-02.bin missing"),
    (("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors") + FULL[1:], {},
     "model.safetensors.index.json not written yet"),
    (LORA + ("latest", "global_step500/mp_rank_00_model_states.pt"), {"checkpoint-500/latest": "global_step9\n"},
     "latest names global_step9 which is missing"),
    (LORA + ("global_step500/mp_rank_00_model_states.pt",), {}, "latest not written yet"),
    (("pytorch_model_fsdp_0/__0_0.distcp", "optimizer.pt", "scheduler.pt", "trainer_state.json"), {},
     "pytorch_model_fsdp_0/.metadata not written yet"),
]


@pytest.mark.parametrize("names, meta, reason", IN_PROGRESS)
def test_trainer_in_progress(names, meta, reason):
    c = only(discover(listing(*in_dir("checkpoint-500", names), meta=meta)))
    assert not c.complete
    assert c.reason == reason
    assert not c.resumable


def test_trainer_without_state_lists_it_missing():
    c = only(discover(trainer(tuple(n for n in LORA if n != "trainer_state.json"))))
    assert c.missing == ("trainer_state.json",)
    assert c.content == "partial"


@pytest.mark.parametrize("age, settle, reason", [
    (12.4, 60, "optimizer.pt modified 12s ago (settle 60s)"),
    (59.9, 60, "optimizer.pt modified 59s ago (settle 60s)"),
    (60.0, 60, ""),
    (12.0, 5, ""),
    (1.0, 2.5, "optimizer.pt modified 1s ago (settle 2.5s)"),
    (-30.0, 60, "optimizer.pt modified 0s ago (settle 60s)"),  # mtime ahead of the clock
    (-0.004, 0, ""),   # no settle time: a file stamped a clock tick past the listing is not waited for
    (0.0, 0, ""),
])
def test_settle_time(age, settle, reason):
    files = in_dir("checkpoint-500", LORA) + [entry("checkpoint-500/optimizer.pt", mtime=NOW - age)]
    files = [f for f in files if f.path != "checkpoint-500/optimizer.pt" or f.mtime != OLD]
    c = only(discover(listing(*files, meta={"checkpoint-500/trainer_state.json": STATE}), settle_seconds=settle))
    assert c.reason == reason
    assert c.complete == (reason == "")
    assert c.resumable == (reason == "")


@pytest.mark.parametrize("age, open_, since_age, linked, reason", [
    # Writers seen: a checkpoint nobody writes is complete at once, however new its files.
    (1.0, (), 0.5, (), ""),
    (1.0, ("checkpoint-500/optimizer.pt",), 0.5, (), "optimizer.pt is open for writing"),
    (1.0, ("checkpoint-500/scheduler.pt",), 0.5, (), "scheduler.pt is open for writing"),
    (3600.0, ("checkpoint-500/optimizer.pt",), 0.5, (), "optimizer.pt is open for writing"),
    # modified after the processes were looked at: a writer may have come since, settle decides
    (0.2, (), 0.5, (), "optimizer.pt modified 0s ago (settle 60s)"),
    # behind a symlink, its writers are not seen: settle decides
    (1.0, (), 0.5, ("checkpoint-500",), "optimizer.pt modified 1s ago (settle 60s)"),
    (1.0, (), 0.5, ("checkpoint-500/optimizer.pt",), "optimizer.pt modified 1s ago (settle 60s)"),
    (1.0, (), 0.5, ("checkpoint-50",), ""),
])
def test_where_writers_are_seen_nobody_writing_is_complete(age, open_, since_age, linked, reason):
    files = [f for f in in_dir("checkpoint-500", LORA) if f.path != "checkpoint-500/optimizer.pt"]
    files.append(entry("checkpoint-500/optimizer.pt", mtime=NOW - age))
    writers = Writers(frozenset(open_), NOW - since_age, linked)
    c = only(discover(listing(*files, meta={"checkpoint-500/trainer_state.json": STATE}), 60, writers))
    assert c.reason == reason
    assert c.complete == (reason == "")


def test_where_writers_are_seen_the_layouts_own_markers_still_decide():
    files = [f for f in in_dir("checkpoint-500", LORA) if not f.path.endswith("trainer_state.json")]
    c = only(discover(listing(*files), 60, Writers(frozenset(), NOW)))
    assert not c.complete and c.reason == "trainer_state.json not written yet"


# ---------------------------------------------------------------- save markers (_SUCCESS, .complete)


def marked(marker: str | None, marker_age: float, optimizer_age: float, directory: str = "checkpoint-500",
           age: float = 3600) -> list[FileStat]:
    """A LoRA checkpoint written `age` ago, its optimizer.pt `optimizer_age` ago and its marker
    (empty, as writers leave it) `marker_age` ago."""
    files = [entry(f"{directory}/{n}", mtime=NOW - age) for n in LORA if n != "optimizer.pt"]
    files.append(entry(f"{directory}/optimizer.pt", mtime=NOW - optimizer_age))
    if marker:
        files.append(entry(f"{directory}/{marker}", size=0, mtime=NOW - marker_age))
    return files


@pytest.mark.parametrize("marker, marker_age, optimizer_age, writers, reason", [
    # where writers are not seen, a marker put down after every other file ends the save: no settle
    ("_SUCCESS", 1.0, 2.0, None, ""),
    (".complete", 1.0, 2.0, None, ""),
    ("_SUCCESS", 1.0, 1.0, None, ""),   # stamped in the same clock tick
    # a file modified after the marker: a save into the directory again is not finished
    ("_SUCCESS", 2.0, 1.0, None, "optimizer.pt modified after _SUCCESS"),
    (".complete", 3000.0, 1.0, None, "optimizer.pt modified after .complete"),
    # where writers are seen: the marker and nothing open for writing, however new the files
    ("_SUCCESS", 0.1, 0.2, Writers(frozenset(), NOW - 0.5), ""),
    ("_SUCCESS", 0.1, 0.2, Writers(frozenset({"checkpoint-500/optimizer.pt"}), NOW - 0.5),
     "optimizer.pt is open for writing"),
    ("_SUCCESS", 0.2, 0.1, Writers(frozenset(), NOW - 0.5), "optimizer.pt modified after _SUCCESS"),
    # behind a symlink, writers are not seen: the marker decides as above
    ("_SUCCESS", 0.1, 0.2, Writers(frozenset(), NOW - 0.5, ("checkpoint-500",)), ""),
    # no marker: settle_seconds, as before
    (None, 0.0, 2.0, None, "optimizer.pt modified 2s ago (settle 60s)"),
])
def test_a_save_marker_ends_the_save_without_settling(marker, marker_age, optimizer_age, writers, reason):
    files = marked(marker, marker_age, optimizer_age)
    c = only(discover(listing(*files, meta={"checkpoint-500/trainer_state.json": STATE}), 60, writers))
    assert c.reason == reason
    assert c.complete == c.resumable == (reason == "")


def test_a_save_marker_does_not_stand_for_the_layouts_own_checks():
    files = [f for f in marked("_SUCCESS", 1.0, 2.0) if not f.path.endswith("trainer_state.json")]
    c = only(discover(listing(*files)))
    assert (c.complete, c.reason) == (False, "trainer_state.json not written yet")
    # only at the top of the checkpoint: a .complete further down is some other file
    files = marked(None, 0, 2.0) + [entry("checkpoint-500/sub/.complete", mtime=NOW - 1)]
    c = only(discover(listing(*files, meta={"checkpoint-500/trainer_state.json": STATE})))
    assert c.reason == "sub/.complete modified 1s ago (settle 60s)"


def test_an_empty_marker_is_not_an_empty_file():
    meta = {"step_100/metadata.json": {"step": 100}, "step_100/state.pt": pt("model", "optimizer")}
    files = in_dir("step_100", STEP_FILES) + [entry("step_100/_SUCCESS", size=0, mtime=OLD + 1)]
    c = only(discover(listing(*files, meta=meta)))
    assert (c.complete, c.reason) == (True, "")


def run_with_markers(marks: dict[str, str | None], age: float = 3600) -> dict[str, Checkpoint]:
    """Checkpoints named in `marks`, each with that marker or none, all written `age` ago."""
    files = []
    meta = {}
    for name, marker in marks.items():
        if name.startswith("step_"):
            files += in_dir(name, STEP_FILES + ((marker,) if marker else ()), mtime=NOW - age)
            meta[f"{name}/metadata.json"] = {"step": 100}
        else:
            files += marked(marker, age, age, directory=name, age=age)
            meta[f"{name}/trainer_state.json"] = STATE
    return {c.name: c for c in discover(listing(*files, meta=meta), 60)}


@pytest.mark.parametrize("marks, waiting", [
    # the run's writer puts _SUCCESS down: the newest without one is a save not finished, however old
    ({"checkpoint-100": "_SUCCESS", "checkpoint-200": "_SUCCESS", "checkpoint-300": None},
     {"checkpoint-300": "no _SUCCESS yet (the run's other checkpoints have one)"}),
    ({"checkpoint-100": ".complete", "checkpoint-300": None, "checkpoint-200": ".complete"},
     {"checkpoint-300": "no .complete yet (the run's other checkpoints have one)"}),
    # from the first checkpoint with a marker on: earlier ones were saved before the writer wrote any
    ({"checkpoint-50": None, "checkpoint-100": "_SUCCESS", "checkpoint-200": None},
     {"checkpoint-200": "no _SUCCESS yet (the run's other checkpoints have one)"}),
    # per name pattern: step_N directories with markers ask nothing of checkpoint-N
    ({"step_100": "_SUCCESS", "checkpoint-300": None}, {}),
    # no marker anywhere: settle_seconds alone, as before
    ({"checkpoint-100": None, "checkpoint-200": None}, {}),
])
def test_once_a_checkpoint_has_a_marker_later_ones_wait_for_theirs(marks, waiting):
    found = run_with_markers(marks)
    assert {n: c.reason for n, c in found.items() if not c.complete} == waiting
    assert all(c.resumable != (c.name in waiting) for c in found.values() if c.layout == "trainer")


@pytest.mark.parametrize("zero, reason", [
    (("optimizer.pt",), "optimizer.pt is empty"),
    (LORA, "empty"),
    (("README.md",), ""),  # not needed for resume
])
def test_empty_files(zero, reason):
    files = [entry(f"checkpoint-500/{n}", size=0 if n in zero else 100) for n in LORA]
    c = only(discover(listing(*files, meta={"checkpoint-500/trainer_state.json": STATE})))
    assert c.reason == reason


def test_trainer_structural_reason_comes_before_settle():
    files = in_dir("checkpoint-500", [n for n in LORA if n != "trainer_state.json"], mtime=NOW - 1)
    c = only(discover(listing(*files)))
    assert c.reason == "trainer_state.json not written yet"


def test_trainer_state_summary():
    state = {"global_step": 12, "epoch": 0.19, "best_metric": 6.05, "best_model_checkpoint": "out/checkpoint-12",
             "max_steps": 12, "trial_name": None, "log_history": [
                 {"loss": 6.1, "learning_rate": 0.001, "step": 11},
                 {"loss": 6.0, "learning_rate": 0.0005, "step": 12},
                 {"eval_loss": 6.05, "step": 12}]}
    c = only(discover(trainer(LORA, directory="checkpoint-12", state=state)))
    assert c.state == {"global_step": 12, "epoch": 0.19, "best_metric": 6.05, "max_steps": 12,
                       "best_model_checkpoint": "out/checkpoint-12", "loss": 6.0, "learning_rate": 0.0005,
                       "eval_loss": 6.05}


# ---------------------------------------------------------------- unreadable metadata


@pytest.mark.parametrize("value, error", [
    ({"__error__": "Expecting value: line 1 column 1 (char 0)"},
     "trainer_state.json unreadable: Expecting value: line 1 column 1 (char 0)"),
    (["not", "an", "object"], "trainer_state.json unreadable: not a JSON object"),
    ("text", "trainer_state.json unreadable: not a JSON object"),
])
def test_unreadable_trainer_state(value, error):
    c = only(discover(listing(*in_dir("checkpoint-700", LORA), meta={"checkpoint-700/trainer_state.json": value})))
    assert c.name == "checkpoint-700" and c.step == 700
    assert c.complete and c.reason == ""
    assert c.meta_error == error
    assert c.state == {}
    assert c.content == "full"
    assert not c.resumable


def test_trainer_state_not_read_by_agent_is_not_an_error():
    c = only(discover(listing(*in_dir("checkpoint-700", LORA))))
    assert c.complete and c.resumable and c.meta_error is None and c.state == {}


# ---------------------------------------------------------------- top-level DeepSpeed


def deepspeed_dir(step: int, optim: bool = True) -> list[FileStat]:
    names = ["mp_rank_00_model_states.pt"] + (["zero_pp_rank_0_mp_rank_00_optim_states.pt"] if optim else [])
    return in_dir(f"global_step{step}", names)


@pytest.mark.parametrize("latest, meta, expected", [
    (True, "global_step300\n", {"global_step200": "", "global_step300": "", "global_step400":
                                "latest still names global_step300"}),
    (True, None, {"global_step200": "", "global_step300": "", "global_step400": ""}),
    (False, None, {name: "latest not written yet" for name in ("global_step200", "global_step300", "global_step400")}),
])
def test_deepspeed_completeness(latest, meta, expected):
    files = deepspeed_dir(200) + deepspeed_dir(300) + deepspeed_dir(400) + ([entry("latest", 14)] if latest else [])
    found = discover(listing(*files, entry("zero_to_fp32.py"), meta={"latest": meta} if meta else {}))
    assert {c.name: c.reason for c in found} == expected
    assert [c.step for c in found] == [400, 300, 200]
    assert {(c.layout, c.kind) for c in found} == {("deepspeed", "rolling")}
    assert all(c.content == "full" and c.missing == () for c in found)


def test_deepspeed_weights_only_and_unreadable_latest():
    files = deepspeed_dir(100, optim=False) + [entry("latest")]
    c = only(discover(listing(*files, meta={"latest": {"__error__": "Permission denied"}})))
    assert c.content == "weights-only"
    assert c.missing == ("*optim_states.pt",)
    assert c.meta_error == "latest unreadable: Permission denied"
    assert c.complete and not c.resumable


# ---------------------------------------------------------------- single-file .pt


@pytest.mark.parametrize("name, meta, kind, step, is_best", [
    ("latest.pt", pt(step=300), "latest", 300, False),
    ("latest_backup.pt", pt(step=250), "backup", 250, False),
    ("rolling_step_000050.pt", pt(step=999), "rolling", 50, False),
    ("rolling_last_backup.pt", None, "backup", None, False),
    ("best_model.pt", pt(step=150), "best", 150, True),
    ("best_model_backup.pt", None, "backup", None, False),
    ("best_model_previous.pt", pt(step=100), "backup", 100, False),
    ("epoch_00002.pt", pt(step=200, epoch=2), "epoch", 200, False),
    ("emergency_step_000287_20251106_143022.pt", None, "emergency", 287, False),
])
def test_single_file_names(name, meta, kind, step, is_best):
    c = only(discover(listing(entry(name), meta={name: meta} if meta else {})))
    assert (c.name, c.layout, c.kind, c.step, c.is_best) == (name, "single-file", kind, step, is_best)
    assert c.complete
    assert resume_files(c) == (name,)


def test_epoch_file_takes_epoch_from_name():
    c = only(discover(listing(entry("epoch_00007.pt"))))
    assert c.step is None
    assert c.state == {"epoch": 7}


@pytest.mark.parametrize("name", [
    "latest.pt.tmp", "latest.pt.tmp.123", "model.pt", "weights.pth", "best_model.pth", "rolling_step_abc.pt",
    "emergency_step_5.pt", "epoch_.pt", "notes.txt", "config_full_dataset.json", "training.log",
    ".latest.pt", "tmp-checkpoint-500/optimizer.pt", "checkpoint-abc/optimizer.pt", "checkpoint-12",
    "runs/Nov01/events.out.tfevents", "models/x/checkpoint-4/trainer_state.json", "step_/state.pt",
    ".ckptsync-staging/checkpoint-4/optimizer.pt", ".ipynb_checkpoints/latest.pt", "../checkpoint-1/x.pt",
    "/abs/latest.pt",
])
def test_not_checkpoints(name):
    assert discover(listing(entry(name))) == []


@pytest.mark.parametrize("meta, content, missing, resumable", [
    (pt("model", "optimizer", "scheduler", "rng", "step"), "full", (), True),
    (pt("model_state_dict", "optimizer_state_dict", "lr_scheduler"), "no-rng", ("rng",), True),
    (pt("model", "step", "val_loss"), "weights-only", ("optimizer", "scheduler", "rng"), False),
    (pt("optimizer", "state", "param_groups"), "optimizer-only", ("model", "scheduler", "rng"), False),
    (pt("model", "optimizer", "rng"), "partial", ("scheduler",), False),
    (None, "unknown", (), False),
    ({"__pt__": "garbage"}, "unknown", (), False),
])
def test_single_file_contents(meta, content, missing, resumable):
    c = only(discover(listing(entry("latest.pt"), meta={"latest.pt": meta} if meta else {})))
    assert c.complete and c.reason == ""
    assert (c.content, c.missing, c.resumable) == (content, missing, resumable)


def test_single_file_unreadable_and_empty():
    bad = only(discover(listing(entry("latest.pt"), meta={"latest.pt": {"__error__": "bad zip"}})))
    assert bad.meta_error == "latest.pt unreadable: bad zip"
    assert bad.complete and bad.content == "unknown" and not bad.resumable
    empty = only(discover(listing(entry("rolling_step_000010.pt", size=0))))
    assert (empty.complete, empty.reason) == (False, "empty")


def test_tmp_file_beside_latest_does_not_hide_it():
    found = discover(listing(entry("latest.pt"), entry("latest.pt.tmp", mtime=NOW - 1)))
    assert [(c.name, c.complete) for c in found] == [("latest.pt", True)]


def test_single_file_settling():
    c = only(discover(listing(entry("latest.pt", mtime=NOW - 3))))
    assert c.reason == "latest.pt modified 3s ago (settle 60s)"


# ---------------------------------------------------------------- directory per step


STEP_FILES = ("state.pt", "metadata.json", "config.json")


@pytest.mark.parametrize("directory, metadata, kind, step, epoch", [
    ("step_100", {"step": 100, "epoch": 1, "timestamp": 1.5}, "rolling", 100, 1),
    ("epoch5", {"step": 500, "epoch": 5}, "epoch", 500, 5),
    ("epoch_3", {"step": 300}, "epoch", 300, 3),
    ("epoch_4", {}, "epoch", None, 4),
])
def test_step_dirs(directory, metadata, kind, step, epoch):
    meta = {f"{directory}/metadata.json": metadata, f"{directory}/state.pt": pt("model", "optimizer", "scheduler")}
    c = only(discover(listing(*in_dir(directory, STEP_FILES), meta=meta)))
    assert (c.name, c.layout, c.kind, c.step) == (directory, "step-dir", kind, step)
    assert c.state.get("epoch") == epoch
    assert c.complete and c.content == "no-rng" and c.missing == ("rng",) and c.resumable
    assert resume_files(c) == tuple(sorted(f"{directory}/{n}" for n in STEP_FILES))


def test_step_dir_summary_renames_step():
    meta = {"step_100/metadata.json": {"step": 100, "epoch": 1, "loss": 0.5, "nested": {"x": 1}}}
    c = only(discover(listing(*in_dir("step_100", STEP_FILES), meta=meta)))
    assert c.state == {"global_step": 100, "epoch": 1, "loss": 0.5}


def test_step_dir_component_files_count_as_weights():
    names = STEP_FILES + ("encoder.pt", "adapter_llama.pt", "adapter_qwen.pt", "training_stats.json")
    meta = {"step_100/state.pt": pt("optimizer", "scheduler", "rng"), "step_100/metadata.json": {"step": 100}}
    c = only(discover(listing(*in_dir("step_100", names), meta=meta)))
    assert (c.content, c.missing, c.resumable) == ("full", (), True)


@pytest.mark.parametrize("names, meta, reason", [
    (("state.pt", "config.json"), {}, "metadata.json not written yet"),
    (("metadata.json", "config.json"), {}, "state.pt not written yet"),
    (("config.json",), {}, "metadata.json not written yet"),
])
def test_step_dir_in_progress(names, meta, reason):
    c = only(discover(listing(*in_dir("step_200", names), meta=meta)))
    assert (c.complete, c.reason, c.resumable) == (False, reason, False)


def test_step_dir_unreadable_metadata():
    meta = {"step_200/metadata.json": {"__error__": "Unterminated string"}, "step_200/state.pt": pt("model")}
    c = only(discover(listing(*in_dir("step_200", STEP_FILES), meta=meta)))
    assert c.complete and c.step == 200
    assert c.meta_error == "metadata.json unreadable: Unterminated string"


def test_step_dir_without_pt_meta_is_unknown():
    c = only(discover(listing(*in_dir("step_200", STEP_FILES))))
    assert (c.complete, c.content, c.missing, c.resumable) == (True, "unknown", (), False)


# ---------------------------------------------------------------- best


def three_checkpoints(states: dict[int, object]) -> Listing:
    files, meta = [], {}
    for step in (4, 8, 12):
        files += in_dir(f"checkpoint-{step}", LORA)
        if step in states:
            meta[f"checkpoint-{step}/trainer_state.json"] = states[step]
    return listing(*files, meta=meta)


def best_of(path):
    return {"global_step": 0, "best_model_checkpoint": path}


@pytest.mark.parametrize("states, best", [
    ({4: best_of("models/x/checkpoint-4"), 12: best_of("models/x/checkpoint-12")}, "checkpoint-12"),
    ({12: best_of("/home/ubuntu/socrates/models/x/checkpoint-8/")}, "checkpoint-8"),
    ({12: best_of("C:\\runs\\out\\checkpoint-4")}, "checkpoint-4"),
    ({8: best_of("out/checkpoint-8"), 12: {"__error__": "truncated"}}, "checkpoint-8"),
    ({4: best_of("out/checkpoint-4"), 12: best_of(None)}, "checkpoint-4"),
    ({12: best_of("out/checkpoint-2")}, None),  # deleted by rotation elsewhere
    ({12: {"best_model_checkpoint": 5}}, None),
    ({}, None),
])
def test_best_from_trainer_state(states, best):
    found = discover(three_checkpoints(states))
    assert find_best(found) == best
    assert [c.name for c in found if c.is_best] == ([best] if best else [])


def test_best_uses_highest_step_not_listing_order():
    files = in_dir("checkpoint-12", LORA, mtime=OLD - 100) + in_dir("checkpoint-4", LORA)
    meta = {"checkpoint-12/trainer_state.json": best_of("x/checkpoint-12"),
            "checkpoint-4/trainer_state.json": best_of("x/checkpoint-4")}
    assert find_best(discover(listing(*files, meta=meta))) == "checkpoint-12"


def test_best_single_file():
    found = discover(listing(entry("latest.pt"), entry("best_model.pt"), entry("best_model_previous.pt")))
    assert find_best(found) == "best_model.pt"
    assert find_best([]) is None


# ---------------------------------------------------------------- ordering


def test_order_with_a_step_less_entry_is_by_mtime():
    # latest.pt has no step and is the newest save: one rule for every list (policy.newest_first).
    files = [entry("latest.pt", mtime=OLD + 50), entry("rolling_step_000100.pt"), entry("rolling_step_000200.pt"),
             entry("best_model.pt"), entry("best_model_backup.pt"), entry("epoch_00001.pt", mtime=OLD - 10)]
    meta = {"best_model.pt": pt(step=150)}
    assert [c.name for c in discover(listing(*files, meta=meta))] == [
        "latest.pt", "rolling_step_000200.pt", "rolling_step_000100.pt",
        "best_model_backup.pt", "best_model.pt", "epoch_00001.pt"]


def test_order_when_every_entry_has_a_step_is_step_then_mtime_then_name():
    files = [entry("rolling_step_000100.pt", mtime=OLD + 50), entry("rolling_step_000200.pt"),
             entry("best_model.pt", mtime=OLD + 10), entry("epoch_00001.pt", mtime=OLD - 10)]
    meta = {"best_model.pt": pt(step=200), "epoch_00001.pt": pt(step=50)}
    assert [c.name for c in discover(listing(*files, meta=meta))] == [
        "best_model.pt", "rolling_step_000200.pt", "rolling_step_000100.pt", "epoch_00001.pt"]


def test_mixed_layouts_in_one_directory():
    files = (in_dir("checkpoint-10", LORA) + in_dir("step_20", STEP_FILES) + deepspeed_dir(30)
             + [entry("latest"), entry("rolling_step_000040.pt"), entry("train.log")])
    found = discover(listing(*files, meta={"latest": "global_step30"}))
    assert [(c.name, c.layout) for c in found] == [
        ("rolling_step_000040.pt", "single-file"), ("global_step30", "deepspeed"), ("step_20", "step-dir"),
        ("checkpoint-10", "trainer")]


# ---------------------------------------------------------------- ignored entries and resume_files


def test_staging_and_hidden_files_inside_a_checkpoint():
    files = in_dir("checkpoint-500", LORA + (".ckptsync-part/optimizer.pt", "optimizer.pt.ckptsync-tmp"))
    files.append(entry("checkpoint-500/.ckptsync.lock"))
    c = only(discover(listing(*files, meta={"checkpoint-500/trainer_state.json": STATE})))
    paths = {f.path for f in c.files}
    assert "checkpoint-500/.ckptsync.lock" not in paths
    assert "checkpoint-500/.ckptsync-part/optimizer.pt" not in paths
    assert "checkpoint-500/optimizer.pt.ckptsync-tmp" in paths  # only path components starting with .ckptsync


def test_resume_files_trainer_lora():
    c = only(discover(trainer(LORA + ("scaler.pt",))))
    assert resume_files(c) == tuple(sorted(f"checkpoint-500/{n}" for n in (
        "adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt", "scaler.pt",
        "rng_state.pth", "trainer_state.json")))


def test_resume_files_trainer_deepspeed_and_fsdp():
    names = ("model.safetensors", "config.json", "latest", "zero_to_fp32.py", "trainer_state.json",
             "global_step9/mp_rank_00_model_states.pt", "global_step9/zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "pytorch_model_fsdp_0/.metadata", "pytorch_model_fsdp_0/__0_0.distcp", "optimizer_0/.metadata",
             "runs/events.out")
    c = only(discover(trainer(names, directory="checkpoint-9")))
    assert resume_files(c) == tuple(sorted(f"checkpoint-9/{n}" for n in names if n not in (
        "config.json", "zero_to_fp32.py", "runs/events.out")))


def test_resume_files_sharded():
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
             "model.safetensors.index.json", "config.json", "trainer_state.json")
    c = only(discover(trainer(names)))
    assert resume_files(c) == tuple(sorted(f"checkpoint-500/{n}" for n in names if n != "config.json"))


# ---------------------------------------------------------------- no exceptions for any input


WEIRD_META = [None, 5, "x", [], {}, {"__error__": None}, {"__pt__": "x"}, {"__pt__": {"keys": "abc", "step": "3"}},
              {"__pt__": {"keys": [1, None, "model"], "step": True}}, {"log_history": "x"},
              {"log_history": [1, None, {"loss": "x"}, {"loss": True}]}, {"best_model_checkpoint": 5},
              {"best_model_checkpoint": ""}, {"global_step": [1]}, "global_step", "../../etc", "global_step-1"]
WEIRD_PATHS = ["checkpoint-1/trainer_state.json", "checkpoint-1/latest", "checkpoint-1/global_step1/x_optim_states.pt",
               "checkpoint-2/model-00001-of-99999999.safetensors", "checkpoint-2/model-00000-of-00000.bin",
               "latest", "global_step3/mp_rank_00_model_states.pt", "step_4/state.pt", "step_4/metadata.json",
               "epoch5/state.pt", "latest.pt", "best_model.pt", "epoch_00001.pt", "", "/", ".", "./latest.pt",
               "a//b", "checkpoint-1//optimizer.pt", "../x", "checkpoint-1/pytorch_model_fsdp_0/a.distcp"]


@pytest.mark.parametrize("seed", range(40))
def test_discover_never_raises(seed):
    rng = random.Random(seed)
    files = [entry(rng.choice(WEIRD_PATHS), size=rng.choice([0, 1, 10**12]), mtime=rng.choice([OLD, NOW, NOW + 99]))
             for _ in range(rng.randint(0, 12))]
    meta = {p: rng.choice(WEIRD_META) for p in rng.sample(WEIRD_PATHS, 8)}
    meta[rng.choice([None, 5, ("a",), "x"])] = rng.choice(WEIRD_META)  # keys need not be strings
    found = discover(listing(*files, meta=meta), settle_seconds=rng.choice([0, 60]))
    for c in found:
        assert c.complete == (c.reason == "")
        assert not c.resumable or c.complete
        assert set(resume_files(c)) <= {f.path for f in c.files}
    find_best(found)


# ---------------------------------------------------------------- the real fixture trees


def pickle_strings(path: Path) -> list[str]:
    """String constants of a torch.save zip, as the agent reports them."""
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    return sorted({arg for _, arg, _ in pickletools.genops(data) if isinstance(arg, str) and len(arg) < 100})


def walk_fixture(relative: str, scan_pt: bool = True) -> Listing:
    root = FIXTURES / relative
    files, meta = [], {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory, name)
            rel = path.relative_to(root).as_posix()
            files.append(entry(rel, path.stat().st_size))
            if name in ("trainer_state.json", "metadata.json"):
                meta[rel] = json.loads(path.read_text())
            elif name.endswith(".pt") and scan_pt and (rel.count("/") == 0 or name == "state.pt"):
                meta[rel] = {"__pt__": {"keys": pickle_strings(path), "step": None, "epoch": None}}
    return Listing(tuple(files), meta, NOW)


def test_fixture_socrates_lora():
    found = discover(walk_fixture("socrates-training/models/socrates-qwen-full-dataset"))
    assert [c.name for c in found] == ["checkpoint-12", "checkpoint-8", "checkpoint-4"]
    assert all((c.layout, c.content, c.complete, c.resumable) == ("trainer", "full", True, True) for c in found)
    assert find_best(found) == "checkpoint-12"
    assert found[0].state["global_step"] == 12
    assert {"loss", "learning_rate", "eval_loss", "best_metric"} <= set(found[0].state)
    assert "checkpoint-12/adapter_model.safetensors" in resume_files(found[0])
    assert "checkpoint-12/README.md" not in resume_files(found[0])


def test_fixture_checkpoints_are_only_found_at_the_top():
    assert discover(walk_fixture("socrates-training")) == []


def test_fixture_full_finetune():
    found = discover(walk_fixture("full-finetune/output"))
    assert [(c.name, c.step, c.content, c.resumable) for c in found] == [
        ("checkpoint-6", 6, "full", True), ("checkpoint-3", 3, "full", True)]
    assert find_best(found) == "checkpoint-6"
    assert "checkpoint-6/model.safetensors" in resume_files(found[0])


def test_fixture_single_file():
    found = discover(walk_fixture("seed-style/single_file"))
    kinds = {c.name: c.kind for c in found}
    assert len(found) == 14
    assert [kinds[n] for n in ("latest.pt", "latest_backup.pt", "best_model.pt", "best_model_previous.pt",
                               "epoch_00002.pt", "emergency_step_000287_20251106_143022.pt",
                               "rolling_step_000150.pt")] == [
        "latest", "backup", "best", "backup", "epoch", "emergency", "rolling"]
    assert [c.step for c in found if c.kind == "rolling"] == [300, 250, 200, 150, 100, 50]
    assert find_best(found) == "best_model.pt"
    assert all((c.complete, c.content, c.resumable) == (True, "full", True) for c in found)


def test_fixture_single_file_without_pt_scan():
    found = discover(walk_fixture("seed-style/single_file", scan_pt=False))
    assert len(found) == 14
    assert all((c.complete, c.content, c.resumable) == (True, "unknown", False) for c in found)


def test_fixture_step_dirs():
    found = discover(walk_fixture("seed-style/step_dirs"))
    assert [c.name for c in found] == ["step_300", "step_250", "step_200", "step_150", "step_100", "step_50"]
    assert all(c.layout == "step-dir" and c.complete for c in found)
    # seed 003's state.pt holds model, optimizer and scheduler but no RNG state
    assert all((c.content, c.missing, c.resumable) == ("no-rng", ("rng",), True) for c in found)
    assert found[0].state["global_step"] == 300 and found[0].state["epoch"] == 3


def test_fixture_fresh_checkout_is_settling():
    listing_ = walk_fixture("full-finetune/output")
    fresh = Listing(tuple(entry(f.path, f.size, NOW - 5, f.mode) for f in listing_.files), listing_.meta, NOW)
    assert all(not c.complete and c.reason.endswith("modified 5s ago (settle 60s)") for c in discover(fresh))


@pytest.mark.parametrize("names, age, restored, reason", [
    # what restore --adapter-only writes, hours later: restored, never abandoned
    (("adapter_model.safetensors", "adapter_config.json", RESTORED_MARKER), 5 * 3600, True, "adapter only, restored"),
    (("model.safetensors", "config.json", RESTORED_MARKER), 60, True, "weights only, restored"),
    # the same files without the marker: a save still being written
    (("adapter_model.safetensors", "adapter_config.json"), 600, False, "trainer_state.json not written yet"),
])
def test_a_restored_directory_is_not_a_save_in_progress(names, age, restored, reason):
    c = only(discover(listing(*in_dir("checkpoint-500", names, mtime=NOW - age))))
    assert (c.restored, c.complete, c.abandoned, c.reason) == (restored, False, False, reason)
    assert all(not f.path.endswith(RESTORED_MARKER) for f in c.files)


@pytest.mark.parametrize("sources, best", [
    ([], None),
    ([(8, OLD, "/run/checkpoint-8")], "checkpoint-8"),
    ([(8, OLD, "/run/checkpoint-4"), (12, OLD, "/run/checkpoint-12/")], "checkpoint-12"),  # the newest state's word
    ([(12, OLD, "C:\\run\\checkpoint-8"), (12, OLD - 1, "/run/checkpoint-4")], "checkpoint-8"),
])
def test_best_checkpoint_is_named_by_the_newest_state(sources, best):
    assert best_checkpoint(sources) == best
