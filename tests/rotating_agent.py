"""The real agent, with one twist: right after answering a scan it deletes a directory, as a trainer's
checkpoint rotation would between ckptsync's listing and its transfer.

Usage (as the remote command of an instance): python rotating_agent.py REPO VICTIM_DIR
"""

import importlib
import shutil
import sys

sys.path.insert(0, sys.argv[1])
VICTIM = sys.argv[2]

from ckptsync import agent  # noqa: E402

serve_module = importlib.import_module("ckptsync.agent.serve")
real_scan = serve_module.SIMPLE["scan"]


def scan_then_rotate(req):
    reply = real_scan(req)
    shutil.rmtree(VICTIM)
    return reply


serve_module.SIMPLE["scan"] = scan_then_rotate

out, inp = sys.stdout.buffer, sys.stdin.buffer
out.write(b"\nCKPTSYNC-AGENT-READY\n")
out.flush()
inp.read(int(inp.readline()))  # the shipped payload: this wrapper runs the repository's agent instead
serve_module.serve(agent.Channel(inp, out))
