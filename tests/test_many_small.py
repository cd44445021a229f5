"""A first backup of many small checkpoints through a real sshd: compressible data crosses compressed.

Such a backup is one stream of thousands of short chunks (a tar header, a file's data); the
sender must not judge raw against compressed on bytes that only filled the pipe and the ssh
window, which made these go raw whatever the link.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from helpers import FIXTURES, run_cli, set_tree_mtime
from test_generations import write_config

LORA = FIXTURES / "socrates-training" / "models" / "socrates-qwen-full-dataset" / "checkpoint-12"
COUNT = 40  # about 10 MB: shorter than the sender's warm-up and first probe


def many_checkpoints(run: Path, count: int) -> None:
    """`count` LoRA checkpoints made from the fixture's checkpoint-12: each its own step, and 8 bytes
    in every 4 KiB of its tensor files drawn at random (seeded), so that no two share those files'
    bytes while they pack as the real one does."""
    rng = random.Random(27)
    for i in range(1, count + 1):
        d = run / f"checkpoint-{4 * i}"
        d.mkdir(parents=True)
        for f in sorted(LORA.iterdir()):
            data = bytearray(f.read_bytes())
            if f.name == "trainer_state.json":
                state = json.loads(data)
                state["global_step"] = 4 * i
                data = bytearray(json.dumps(state, indent=2).encode())
            elif f.suffix in (".safetensors", ".pt", ".pth") and f.name != "scheduler.pt":
                for off in range(512, len(data) - 8, 4096):
                    data[off:off + 8] = rng.randbytes(8)
            (d / f.name).write_bytes(bytes(data))
    set_tree_mtime(run, time.time() - 3600)


@pytest.mark.parametrize("instance", ["1", "8"])  # a stock server's Python (L frames), and one with zstandard
def test_a_first_backup_of_many_small_checkpoints_crosses_compressed(ssh_home, tmp_path, instance):
    run = tmp_path / "server" / "output"
    many_checkpoints(run, COUNT)
    write_config(ssh_home, run, tmp_path / "backups")
    res = run_cli("backup", "--all", "-i", instance, "--config", str(ssh_home / "ckptsync.yaml"), "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads(res.stdout)
    assert out["exit_code"] == 0 and len(out["fetched"]) == COUNT
    # Every chunk packed: 0.85 of the tar bytes in L frames, 0.88 in zstd frames; every chunk raw, a little over 1.
    assert out["wire_bytes"] < 0.91 * out["raw_bytes"], (out["wire_bytes"], out["raw_bytes"])
