"""ckptsync demo: the whole loop on a sample tree, with the real commands."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

from ckptsync.cli.app import app
from ckptsync.demo import make_server_tree
from ckptsync.output import Output

STEPS = [
    ("list",
     "What is on the \"server\"? ckptsync reads the checkpoint directory through its agent and\n"
     "tells complete checkpoints from one still being written (checkpoint-400 has no\n"
     "trainer_state.json yet: the Trainer writes that file last).",
     ["list", "--remote-dir", "{server}", "--local-dir", "{backups}"]),
    ("backup",
     "Back up the two newest complete checkpoints and the run's config files. Each file is\n"
     "hashed on both sides; a checkpoint appears in the backup directory only when all of it\n"
     "arrived and matched. checkpoint-400 is skipped: it is still in progress.",
     ["backup", "--remote-dir", "{server}", "--local-dir", "{backups}"]),
    ("backup again",
     "Run it again, as cron would every 30 minutes: nothing new, nothing transferred.",
     ["backup", "--remote-dir", "{server}", "--local-dir", "{backups}"]),
    ("verify",
     "Re-read every backed-up file and compare it with its manifest.",
     ["verify", "--local-dir", "{backups}"]),
    ("list",
     "Server and backups side by side: which checkpoints are safe.",
     ["list", "--remote-dir", "{server}", "--local-dir", "{backups}"]),
    ("restore",
     "The instance died. Put the newest resumable checkpoint on a fresh \"server\"; it is\n"
     "staged, checked and renamed into place in one step.",
     ["restore", "--remote-dir", "{fresh}", "--local-dir", "{backups}"]),
]


@app.command("demo")
def demo_cmd(
    directory: Annotated[Optional[str], typer.Option("--dir", help="Where to build the demo (default: a new temp directory).", show_default=False)] = None,
    keep: Annotated[bool, typer.Option("--keep", help="Keep the demo files afterwards.")] = False,
) -> int:
    """Build a sample training run in a temp directory and run list, backup, verify and restore on it."""
    out = Output()
    base = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="ckptsync-demo-"))
    server_root = base / "server" / "socrates-training"
    paths = {"server": str(server_root / "models" / "socrates-qwen-full-dataset"),
             "backups": str(base / "backups" / "instance-0"),
             "fresh": str(base / "new-server" / "socrates-training" / "models" / "socrates-qwen-full-dataset")}
    out.result(f"Building a sample training run in {base} ...")
    make_server_tree(server_root)
    out.result(f"  server checkpoint directory: {paths['server']}\n  backup directory:            {paths['backups']}\n")
    env = dict(os.environ)
    env["CKPTSYNC_CONFIG"] = str(_demo_config(base, paths["server"]))
    worst = 0
    for title, text, args in STEPS:
        argv = [a.format(**paths) for a in args]
        out.result(f"--- {title} " + "-" * max(0, 60 - len(title)))
        out.result(text)
        out.result("$ ckptsync " + " ".join(shlex.quote(a) for a in argv))
        sys.stdout.flush()
        res = subprocess.run([sys.executable, "-m", "ckptsync", *argv], env=env)
        worst = max(worst, res.returncode)
        out.result("")
    out.result("That is the whole loop. On a real GPU server use --instance N (the SSH alias tnr-N)\n"
               "or --host user@host, and --remote-dir where the trainer writes checkpoints.")
    if keep or directory:
        out.result(f"Demo files kept in {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    return worst


def _demo_config(base: Path, server: str) -> Path:
    path = base / "ckptsync.yaml"
    path.write_text(
        "# the demo's own config: extra files live two levels above the checkpoint directory\n"
        "extra_files: [../../config_full_dataset.json, ../../deepspeed_config.json]\n"
        "settle_seconds: 60\n", encoding="utf-8")
    return path
