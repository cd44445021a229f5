"""The real agent, paused once mid-transfer: when it has sent BYTES of file data it writes that
count into the FIFO DIR/reached, then waits until the test opens DIR/go. The test does its fault
(fills a disk, sends a signal) at that known point, while the transfer is under way.

Usage (as the command of an instance): python paused_agent.py REPO DIR BYTES [ignored launcher args]
"""

import os
import sys

sys.path.insert(0, sys.argv[1])
FIFOS, AT = sys.argv[2], int(sys.argv[3])

from ckptsync import agent  # noqa: E402
from ckptsync.agent.codec import DATA_FRAMES  # noqa: E402
from ckptsync.agent.serve import serve  # noqa: E402


class PausingChannel(agent.Channel):
    sent = 0

    def send(self, kind, payload=b""):
        agent.Channel.send(self, kind, payload)
        if kind in DATA_FRAMES and self.sent < AT:
            self.sent += len(payload)
            if self.sent >= AT:
                with open(os.path.join(FIFOS, "reached"), "w") as f:
                    f.write("%d\n" % self.sent)
                with open(os.path.join(FIFOS, "go")) as f:
                    f.read()


out, inp = sys.stdout.buffer, sys.stdin.buffer
out.write(b"\nCKPTSYNC-AGENT-READY\n")
out.flush()
inp.read(int(inp.readline()))  # the shipped payload: this wrapper runs the repository's agent instead
serve(PausingChannel(inp, out))
