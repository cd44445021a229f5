"""The real CLI, paused once at a known point: the first call of MODULE:NAME (a function, or a
Class.method) with an argument containing MATCH writes that argument into the FIFO, then waits for
a signal, which lands inside that call as it would in the real one (SIGTERM and SIGINT both raise
there, as the CLI sets them up).

Usage: python paused_cli.py MODULE:NAME MATCH FIFO ckptsync-arguments...
"""

import functools
import importlib
import signal
import sys

where, match, fifo, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
module_name, path = where.split(":")
owner = importlib.import_module(module_name)
*outer, name = path.split(".")
for part in outer:
    owner = getattr(owner, part)
real = getattr(owner, name)
paused = []


@functools.wraps(real)
def pause_then_call(*a, **k):
    hit = next((str(v) for v in a if match in str(v)), None)
    if not paused and hit is not None:
        paused.append(hit)
        with open(fifo, "w") as f:
            f.write("%s\n" % hit)
        signal.pause()
    return real(*a, **k)


setattr(owner, name, pause_then_call)

from ckptsync.cli import main  # noqa: E402

main(args)
