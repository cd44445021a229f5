"""The real agent on a server whose processes cannot be seen (no /proc, as on macOS or in some
containers): its `procs` says so, and completeness falls back to what the files show.

Usage (as the command of an instance): python blind_agent.py REPO [extra args ignored]
"""

import sys

sys.path.insert(0, sys.argv[1])

from ckptsync import agent  # noqa: E402
from ckptsync.agent import serve as serve_module  # noqa: E402


real_procs = serve_module.SIMPLE["procs"]


def blind_procs(req):
    reply = real_procs(req)
    reply.update(processes=[], writing=[], writing_total=0, blind=["no /proc on this server"])
    return reply


serve_module.SIMPLE["procs"] = blind_procs

out, inp = sys.stdout.buffer, sys.stdin.buffer
out.write(b"\nCKPTSYNC-AGENT-READY\n")
out.flush()
inp.read(int(inp.readline()))  # the shipped payload: this wrapper runs the repository's agent instead
serve_module.serve(agent.Channel(inp, out))
