"""A trainer the tests drive one save at a time: it writes checkpoint-N as the Transformers Trainer
does (the model, optimizer, scheduler and RNG files, then trainer_state.json last) and rotates
with save_total_limit (3). It is a process of its own, working in the run directory, so the
server sees a training process of this run until it is stopped.

`python3 fake_trainer.py RUN_DIR [LIMIT [SHARD_BYTES]]` reads commands on stdin and answers each
on stdout once it is done: `save N` (a whole save, then the rotation) -> `saved N`; `files N`
(a save's files but trainer_state.json, leaving the last one open for writing) -> `writing N`;
`state N` (close it, write trainer_state.json, rotate) -> `saved N`. It exits at the end of stdin.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

FILES = ("adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
         "training_args.bin")


def content(name: str, step: int, size: int = 2048) -> bytes:
    """Bytes of one file of one step: different for every step and file."""
    seed = f"{name}:{step}:".encode()
    return (seed * (size // len(seed) + 1))[:size]


class Saver:
    """The trainer's side, in the trainer's process."""

    def __init__(self, run: Path, limit: int = 3, shard_bytes: int = 0) -> None:
        self.run, self.limit, self.shard_bytes = run, limit, shard_bytes
        self.open = None

    def files(self, step: int) -> None:
        d = self.run / f"checkpoint-{step}"
        d.mkdir(parents=True)
        for name in FILES:
            (d / name).write_bytes(content(name, step))
        last = d / ("shard.bin" if self.shard_bytes else "pytorch_model_extra.bin")
        self.open = open(last, "wb")
        if self.shard_bytes:
            self.open.write(os.urandom(self.shard_bytes))
        else:
            self.open.write(content("extra", step))
        self.open.flush()

    def state(self, step: int) -> None:
        if self.open is not None:
            self.open.close()
            self.open = None
        state = {"global_step": step, "epoch": step / 100, "best_model_checkpoint": None,
                 "log_history": [{"loss": 1.0 / step, "step": step}]}
        (self.run / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps(state))
        self.rotate()

    def rotate(self) -> None:
        steps = sorted(int(p.name.split("-")[1]) for p in self.run.glob("checkpoint-*"))
        for old in steps[:-self.limit] if len(steps) > self.limit else []:
            shutil.rmtree(self.run / f"checkpoint-{old}")


def main() -> None:
    run = Path(sys.argv[1])
    os.chdir(run)   # a trainer works in its output directory: the server tells it is this run's
    saver = Saver(run, int(sys.argv[2]) if len(sys.argv) > 2 else 3, int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    for line in sys.stdin:
        word, step = line.split()
        if word in ("save", "files"):
            saver.files(int(step))
        if word in ("save", "state"):
            saver.state(int(step))
        sys.stdout.write(("writing" if word == "files" else "saved") + f" {step}\n")
        sys.stdout.flush()


class FakeTrainer:
    """The test's side: each call returns once the trainer has done it."""

    def __init__(self, run: Path, limit: int = 3, shard_bytes: int = 0) -> None:
        run.mkdir(parents=True, exist_ok=True)
        self.run = run
        self.proc = subprocess.Popen([sys.executable, __file__, str(run), str(limit), str(shard_bytes)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def _do(self, word: str, step: int, answer: str) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{word} {step}\n")
        self.proc.stdin.flush()
        got = self.proc.stdout.readline().strip()
        assert got == f"{answer} {step}", got

    def save(self, *steps: int) -> None:
        for step in steps:
            self._do("save", step, "saved")

    def start_save(self, step: int) -> None:
        """Every file but trainer_state.json; the last one stays open for writing."""
        self._do("files", step, "writing")

    def end_save(self, step: int) -> None:
        self._do("state", step, "saved")

    def checkpoint(self, step: int) -> Path:
        return self.run / f"checkpoint-{step}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


if __name__ == "__main__":
    main()
