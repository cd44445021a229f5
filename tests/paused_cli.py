"""The real CLI, held once at a known point: the first call of MODULE:NAME (a function, or a
Class.method) with an argument containing MATCH waits at the helpers.Gate in DIR before it goes
on into the call. A test sends its signal there (SIGTERM and SIGINT both raise KeyboardInterrupt,
as the CLI sets them up), then releases the gate.

Usage: python paused_cli.py MODULE:NAME MATCH DIR ckptsync-arguments...
"""

import fcntl
import functools
import importlib
import os
import sys

where, match, gate, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
module_name, path = where.split(":")
owner = importlib.import_module(module_name)
*outer, name = path.split(".")
for part in outer:
    owner = getattr(owner, part)
real = getattr(owner, name)
held = []


@functools.wraps(real)
def hold_then_call(*a, **k):
    hit = next((str(v) for v in a if match in str(v)), None)
    if not held and hit is not None:
        held.append(hit)
        with open(os.path.join(gate, "reached"), "w") as f:
            f.write("%s\n" % hit)
        with open(os.path.join(gate, "gate")) as f:
            fcntl.flock(f, fcntl.LOCK_EX)   # until the test releases it
    return real(*a, **k)


setattr(owner, name, hold_then_call)

from ckptsync.cli import main  # noqa: E402

main(args)
