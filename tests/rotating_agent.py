"""The real agent, with one twist: right after answering a scan (or, with "send", right after the
stream of a send that read the directory has ended) it deletes a directory, as a trainer's checkpoint
rotation would between ckptsync's listing and its transfer (or just after the transfer).

Usage (as the remote command of an instance): python rotating_agent.py REPO VICTIM_DIR [scan|send]
"""

import importlib
import os
import shutil
import sys

sys.path.insert(0, sys.argv[1])
VICTIM = sys.argv[2]
AFTER = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] in ("scan", "send") else "scan"

from ckptsync import agent  # noqa: E402

serve_module = importlib.import_module("ckptsync.agent.serve")
real_scan = serve_module.SIMPLE["scan"]
real_send = serve_module.STREAMING["send"]


def scan_then_rotate(req):
    reply = real_scan(req)
    shutil.rmtree(VICTIM)
    return reply


def send_then_rotate(chan, req, memory):
    reply = real_send(chan, req, memory)  # every byte and record sent, the stream ended
    name = os.path.basename(VICTIM)
    members = [e["member"] if isinstance(e, dict) else e[1] for e in req["files"]]
    if os.path.isdir(VICTIM) and any(m.startswith(name + "/") for m in members):
        shutil.rmtree(VICTIM)
    return reply


if AFTER == "scan":
    serve_module.SIMPLE["scan"] = scan_then_rotate
else:
    serve_module.STREAMING["send"] = send_then_rotate

out, inp = sys.stdout.buffer, sys.stdin.buffer
out.write(b"\nCKPTSYNC-AGENT-READY\n")
out.flush()
inp.read(int(inp.readline()))  # the shipped payload: this wrapper runs the repository's agent instead
serve_module.serve(agent.Channel(inp, out))
