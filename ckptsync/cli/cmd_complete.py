"""ckptsync __complete-checkpoints: the checkpoint names a shell completion script offers.

Hidden; the scripts in completions/ call it with the --config, --instance and --local-dir typed
so far. It reads the backup directory's manifests only (no network), and prints nothing on any
error: a completion must never print a message into the user's command line.
"""

from __future__ import annotations

from typing import Annotated

import typer

from ckptsync.cli import options as o

NAME = "__complete-checkpoints"


def complete_checkpoints(
    prefix: Annotated[str, typer.Argument(help="What has been typed of the name.")] = "",
    instance: o.Instance = None, local_dir: o.LocalDir = None, config: o.Config = None,
) -> int:
    """Checkpoint names in the backup directory, newest first, one a line."""
    try:
        from ckptsync.config import load_config, resolve_target
        from ckptsync.policy import newest_first
        from ckptsync.stores import describe, open_store
        from ckptsync.stores.manifest import EXTRA

        t = resolve_target(load_config(config), instance=instance, local_dir=local_dir, need_remote=False)
        store = describe(t)  # without opening it: a store elsewhere would need the network, and its client
        if not store.can("files_here") or not t.local_dir.is_dir():
            return 0
        names = [m.name for m in newest_first(open_store(t).manifests().values()) if m.name != EXTRA]
    except Exception:  # a completion stays silent: a broken config is reported by the real command
        return 0
    for name in names:
        if name.startswith(prefix):
            print(name)
    return 0
