"""The real agent, stopped (SIGSTOP) part way into a transfer, as a server whose agent was stopped:
the connection stays open and nothing more comes, for as long as the test leaves it stopped.

Usage (as the remote command of an instance): python stopping_agent.py REPO PIDFILE OP BYTES
  OP send: stops once BYTES of tar data have gone out; OP receive: once BYTES have come in.
The agent writes its pid to PIDFILE (a line each, several channels may stop) just before it stops.
"""

import importlib
import os
import signal
import sys

sys.path.insert(0, sys.argv[1])
PIDFILE, OP, LIMIT = sys.argv[2], sys.argv[3], int(sys.argv[4])

from ckptsync import agent  # noqa: E402
from ckptsync.agent import DATA_FRAMES  # noqa: E402

serve_module = importlib.import_module("ckptsync.agent.serve")
moved = [0]


def stop_after(nbytes):
    moved[0] += nbytes
    if moved[0] >= LIMIT:
        with open(PIDFILE, "a") as f:
            f.write("%d\n" % os.getpid())
        os.kill(os.getpid(), signal.SIGSTOP)


class StoppingChannel(agent.Channel):
    def send(self, kind, payload=b""):
        agent.Channel.send(self, kind, payload)
        if OP == "send" and kind in DATA_FRAMES:
            stop_after(len(payload))

    def recv(self):
        kind, body = agent.Channel.recv(self)
        if OP == "receive" and kind in DATA_FRAMES:
            stop_after(len(body))
        return kind, body


out, inp = sys.stdout.buffer, sys.stdin.buffer
out.write(b"\nCKPTSYNC-AGENT-READY\n")
out.flush()
inp.read(int(inp.readline()))  # the shipped payload: this wrapper runs the repository's agent instead
serve_module.serve(StoppingChannel(inp, out))
