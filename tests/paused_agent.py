"""The real agent, held once mid-transfer: when it has sent BYTES of file data it waits at the
helpers.Gate in DIR (it writes that count into DIR/reached, then waits for the test's lock on
DIR/gate). The test does its fault (fills a disk, sends a signal) while the transfer is under way
at that known point, then releases it.

Usage (as the command of an instance): python paused_agent.py REPO DIR BYTES [ignored launcher args]
"""

import fcntl
import os
import sys

sys.path.insert(0, sys.argv[1])
GATE, AT = sys.argv[2], int(sys.argv[3])

from ckptsync import agent  # noqa: E402
from ckptsync.agent.codec import DATA_FRAMES  # noqa: E402
from ckptsync.agent.serve import serve, stdio_channel  # noqa: E402


class PausingChannel(agent.Channel):
    sent = 0

    def send(self, kind, payload=b""):
        agent.Channel.send(self, kind, payload)
        if kind in DATA_FRAMES and self.sent < AT:
            self.sent += len(payload)
            if self.sent >= AT:
                with open(os.path.join(GATE, "reached"), "w") as f:
                    f.write("%d\n" % self.sent)
                with open(os.path.join(GATE, "gate")) as f:
                    fcntl.flock(f, fcntl.LOCK_EX)   # until the test releases it


out, inp = sys.stdout.buffer, sys.stdin.buffer
out.write(b"\nCKPTSYNC-AGENT-READY\n")
out.flush()
inp.read(int(inp.readline()))  # the shipped payload: this wrapper runs the repository's agent instead
serve(stdio_channel(PausingChannel))
