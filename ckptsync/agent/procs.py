"""Signs that training is still running: matching processes, trainers, open files under the root, GPU apps."""

import os
import shutil
import subprocess

from ckptsync.agent.paths import resolve

MAX_LISTED = 50
MAX_CMDLINE = 200
LAUNCHERS = ("torchrun", "deepspeed", "accelerate")
TRAIN_WORDS = ("train",) + LAUNCHERS
AGENT_MARKS = ("ckptsync-agent", "CKPTSYNC-AGENT-READY")


def process_ids():
    """The pids in /proc, or None where there is no /proc."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    return sorted(int(n) for n in names if n.isdigit())


def read_cmdline(pid):
    """(argv[0], the command line with spaces) or None: gone, not ours, or a kernel thread."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    if not raw.strip(b"\x00"):
        return None
    argv0 = raw.split(b"\x00", 1)[0].decode("utf-8", "replace")
    return argv0, raw.replace(b"\x00", b" ").decode("utf-8", "replace").strip()


def is_trainer(argv0, cmd):
    lowered = cmd.lower()
    pythonish = os.path.basename(argv0).startswith("python") or any(w in lowered for w in LAUNCHERS)
    return pythonish and any(w in lowered for w in TRAIN_WORDS)


def open_under(root, pids, me, cmdlines):
    """[[pid, cmdline, path], ...] of other processes with something open under root.

    Returns (found, checked, why): a fd directory can only be read for our
    own processes (or as root), so when none could be read, an empty list
    means nothing.
    """
    real = os.path.realpath(root)
    prefix = real.rstrip("/") + "/"
    found = []
    readable = 0
    for pid in pids:
        if pid == me:
            continue
        fd_dir = "/proc/%d/fd" % pid
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        readable += 1
        seen = set()
        for fd in fds:
            try:
                link = os.readlink(fd_dir + "/" + fd)
            except OSError:
                continue
            if (link == real or link.startswith(prefix)) and link not in seen:
                seen.add(link)
                cmd = cmdlines.get(pid)
                found.append([pid, cmd[1][:MAX_CMDLINE] if cmd else "", link])
                if len(found) >= MAX_LISTED:
                    return found, True, ""
    if not readable:
        return found, False, "could not read the open files of any other process (that needs the same user or root)"
    return found, True, ""


def gpu_apps():
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        res = subprocess.run(
            [smi, "--query-compute-apps=pid,process_name,used_memory", "--format=csv,noheader"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return [line.strip() for line in res.stdout.decode("utf-8", "replace").splitlines() if line.strip()]


def op_procs(req):
    """Processes matching `pattern`, likely trainers, and (given `root`) who has files open under it."""
    pattern = req.get("pattern") or ""
    root = req.get("root") or ""
    me = os.getpid()
    pids = process_ids()
    cmdlines = {}
    for pid in pids or []:
        if pid != me:
            cmd = read_cmdline(pid)
            if cmd is not None:
                cmdlines[pid] = cmd
    found = []
    trainers = []
    for pid, (argv0, cmd) in sorted(cmdlines.items()):
        if any(mark in cmd for mark in AGENT_MARKS):
            continue  # another ckptsync connection, not training
        if pattern and pattern in cmd and len(found) < MAX_LISTED:
            found.append([pid, cmd[:MAX_CMDLINE]])
        if is_trainer(argv0, cmd) and len(trainers) < MAX_LISTED:
            trainers.append([pid, cmd[:MAX_CMDLINE]])
    reply = {"procs": found, "gpu": gpu_apps(), "trainers": trainers, "open": [], "open_checked": False}
    if pids is None:
        reply["open_error"] = "no /proc on this server"
    elif not root:
        reply["open_error"] = "no root given"
    else:
        reply["open"], reply["open_checked"], why = open_under(resolve(root), pids, me, cmdlines)
        if why:
            reply["open_error"] = why
    return reply
