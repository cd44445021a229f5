"""A sample "server" tree laid out like the Hugging Face Trainer writes it, made from nothing."""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import struct
import time
import zipfile
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from ckptsync.result import Result

RUN = "models/socrates-qwen-full-dataset"


@dataclass
class DemoResult(Result):
    """What `ckptsync demo` ran: the worst of its steps' exit codes is its own."""

    base: str
    kept: bool
    steps: list[dict] = field(default_factory=list)   # title, command, exit_code (and output, with --json)

    @property
    def exit_code(self) -> int:
        return max((s["exit_code"] for s in self.steps), default=0)


def _floats(rng: random.Random, n: int, scale: float) -> bytes:
    return array("f", (rng.gauss(0.0, scale) for _ in range(n))).tobytes()


def _safetensors(tensors: dict[str, tuple[list[int], bytes]]) -> bytes:
    """The safetensors format: u64 header length, JSON header, raw little-endian data."""
    header, offset, blobs = {}, 0, []
    for name, (shape, data) in tensors.items():
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def _torch_like(obj: dict, extra: dict[str, bytes]) -> bytes:
    """A zip laid out like torch.save output (archive/data.pkl + archive/data/N)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2))
        for name, data in extra.items():
            zf.writestr(f"archive/data/{name}", data)
        zf.writestr("archive/version", "3\n")
    return buf.getvalue()


def _write(path: Path, data: bytes | str, mtime: float, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    os.chmod(path, mode)
    os.utime(path, (mtime, mtime))


def make_server_tree(root: Path, steps: tuple[int, ...] = (100, 200, 300), in_progress: int | None = 400,
                     width: int = 256, seed: int = 0) -> Path:
    """Write <root>/models/socrates-qwen-full-dataset/checkpoint-N/ and the run's config files.

    Returns the checkpoint directory (the remote_dir). The last checkpoint
    (`in_progress`) lacks trainer_state.json and was "just written", as a
    Trainer mid-save leaves it.
    """
    rng = random.Random(seed)
    run = root / RUN
    now = time.time()
    _write(root / "config_full_dataset.json", json.dumps({
        "model_name": "Qwen/Qwen2.5-7B-Instruct", "output_dir": RUN, "save_steps": 100,
        "save_total_limit": 3, "learning_rate": 2e-4, "lora": {"r": 16, "alpha": 32}}, indent=2), now - 7200)
    _write(root / "deepspeed_config.json", json.dumps({"zero_optimization": {"stage": 2}}, indent=2), now - 7200)
    base = {f"layers.{i}.lora_A.weight": _floats(rng, width * 16, 0.02) for i in range(4)}
    history, best = [], (None, 1e9)
    all_steps = steps + ((in_progress,) if in_progress else ())
    for k, step in enumerate(all_steps):
        when = now - 600 * (len(all_steps) - k) if step != in_progress else now - 5
        for s in range(max(1, step - 99), step + 1, 10):
            loss = 2.4 * (0.5 ** (s / 300)) + 0.9 + rng.uniform(-0.05, 0.05)
            lr = 2e-4 * max(0.0, 1 - s / 1000)
            history.append({"step": s, "loss": round(loss, 4), "learning_rate": lr, "epoch": round(s / 400, 4)})
        eval_loss = 2.2 * (0.5 ** (step / 300)) + 1.0
        history.append({"step": step, "eval_loss": round(eval_loss, 4), "epoch": round(step / 400, 4)})
        name = f"checkpoint-{step}"
        if eval_loss < best[1]:
            best = (f"{RUN}/{name}", eval_loss)
        d = run / name
        drift = {n: bytes(b ^ (step & 0x0F) if i % 97 == 0 else b for i, b in enumerate(v[:4096])) + v[4096:]
                 for n, v in base.items()}
        tensors = {n: ([width, 16], v) for n, v in drift.items()}
        _write(d / "adapter_model.safetensors", _safetensors(tensors), when, 0o600)
        _write(d / "adapter_config.json", json.dumps({"r": 16, "lora_alpha": 32, "peft_type": "LORA",
                                                      "target_modules": ["q_proj", "v_proj"]}, indent=2), when)
        moments = {f"{i}": _floats(rng, width * 16, 0.001) for i in range(8)}
        _write(d / "optimizer.pt", _torch_like({"state": {"step": step}, "param_groups": [{"lr": 2e-4}]}, moments), when)
        _write(d / "scheduler.pt", _torch_like({"last_epoch": step, "_last_lr": [2e-4]}, {}), when)
        _write(d / "rng_state.pth", _torch_like({"python": step, "numpy": step, "cpu": step}, {"0": os.urandom(5000)}), when)
        _write(d / "training_args.bin", _torch_like({"output_dir": RUN, "save_steps": 100}, {}), now - 7200)
        if step == in_progress:
            continue
        state = {"global_step": step, "epoch": round(step / 400, 4), "best_metric": best[1],
                 "best_model_checkpoint": best[0], "log_history": history, "max_steps": 1200,
                 "save_steps": 100, "is_world_process_zero": True}
        _write(d / "trainer_state.json", json.dumps(state, indent=2), when + 1)
    return run
