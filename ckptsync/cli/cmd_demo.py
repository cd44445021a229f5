"""ckptsync demo: the whole loop on a sample tree, with the real commands."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ckptsync.cli.context import output, settings
from ckptsync.output import Output, command_lines

if TYPE_CHECKING:
    from ckptsync.demo import DemoResult

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
     "staged, checked and renamed into place in one step. The run directory there is a new\n"
     "one, so the config files kept beside it go where --extra-files-to says (../.. of it).",
     ["restore", "--remote-dir", "{fresh}", "--local-dir", "{backups}", "--extra-files-to", "../.."]),
]


def demo_cmd(
    directory: Annotated[Optional[str], typer.Option("--dir", metavar="DIR", help="Where to build the demo (default: a new temp directory).", show_default=False)] = None,
    keep: Annotated[bool, typer.Option("--keep", help="Keep the demo files afterwards.")] = False,
) -> int:
    """Build a sample training run in a temp directory and run list, backup, verify and restore on it."""
    import tempfile

    from ckptsync.demo import DemoResult, make_server_tree

    out = output()
    base = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="ckptsync-demo-"))
    server_root = base / "server" / "socrates-training"
    paths = {"server": str(server_root / "models" / "socrates-qwen-full-dataset"),
             "backups": str(base / "backups" / "instance-0"),
             "fresh": str(base / "new-server" / "socrates-training" / "models" / "socrates-qwen-full-dataset")}
    out.paragraph(f"{base} ...", first="Building a sample training run in ", indent="  ")
    make_server_tree(server_root)
    out.paragraph(paths["server"], first="  server checkpoint directory: ", indent="    ")
    out.paragraph(paths["backups"], first="  backup directory:            ", indent="    ")
    out.result("")
    env = dict(os.environ)
    env["CKPTSYNC_CONFIG"] = str(_demo_config(base, paths["server"]))
    result = DemoResult(base=str(base), kept=bool(keep or directory))
    for title, text, args in STEPS:
        argv = [a.format(**paths) for a in args]
        out.result(f"--- {title} " + "-" * max(0, 60 - len(title)))
        out.paragraph(" ".join(text.split()))   # the text's own line breaks give way to the width
        for line in command_lines(" ".join(shlex.quote(a) for a in ["ckptsync", *argv]), out.width, "$ ", "    "):
            out.result(line)
        out.flush()  # before the child writes to the same stdout
        # The child runs in this run's mode (--json, --quiet, --log-file, --debug); under --json
        # its JSON becomes part of this one.
        res = subprocess.run([sys.executable, "-m", "ckptsync", *settings().argv(), *argv], env=env,
                             stdout=subprocess.PIPE if out.json_mode else None, text=True)
        step = {"title": title, "command": ["ckptsync", *argv], "exit_code": res.returncode}
        if out.json_mode:
            step["output"] = _json_or_text(res.stdout)
        result.steps.append(step)
        out.result("")
    if not result.kept:
        shutil.rmtree(base, ignore_errors=True)
    return out.render(result, show_demo)


def show_demo(out: Output, r: DemoResult) -> None:
    out.paragraph("That is the whole loop. On a real GPU server use --instance N (the SSH alias tnr-N) "
                  "or --host user@host, and --remote-dir where the trainer writes checkpoints.")
    if r.kept:
        out.paragraph(r.base, first="Demo files kept in ")


def _json_or_text(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _demo_config(base: Path, server: str) -> Path:
    path = base / "ckptsync.yaml"
    path.write_text(
        "# the demo's own config: extra files live two levels above the checkpoint directory\n"
        "extra_files: [../../config_full_dataset.json, ../../deepspeed_config.json]\n"
        "settle_seconds: 60\n", encoding="utf-8")
    return path
