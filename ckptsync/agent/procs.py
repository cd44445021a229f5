"""Who may still be training: this run's processes, other trainers, GPU apps, writes under the root.

A process is this run's when it holds a file open under the root, its command line names the
root or contains the configured pattern, or it is this user's and works inside the root or in
a directory above it (not `/`, the home directory or above, or a shared directory like /tmp).
ckptsync's own processes are told by the program they run, never by a word in an argument.
"""

import os
import re
import shutil
import stat

from ckptsync.agent.paths import resolve
from ckptsync.agent.scan import stamp_now

MAX_LISTED = 50
MAX_CMDLINE = 200
# Launchers and entry points that start training, with the subcommand that does (None: any).
LAUNCHERS = {"torchrun": None, "deepspeed": None, "accelerate": "launch", "llamafactory-cli": "train",
             "lmf": "train", "axolotl": "train", "tune": "run"}
LAUNCHER_MODULES = ("torch.distributed.run", "torch.distributed.launch", "accelerate.commands.launch",
                    "deepspeed.launcher.runner", "axolotl.cli.train", "llamafactory.launcher")
# A script, module or program whose own name says it trains (not "constraints.py").
TRAIN_NAME = re.compile(r"(^|[^a-z])((pre|post)?train|sft($|[^a-z]))|fine_?tun", re.I)
PYTHON = re.compile(r"(python|pypy)[0-9.]*[a-z]?")
# How the first stage of ckptsync's agent ends (transport/base.py STAGE1): `python3 -c STAGE1`.
AGENT_STAGE_END = 'exec(compile(zlib.decompress(i.read(n)),"ckptsync-agent","exec"))'


def program(argv):
    """(how, name, rest): how is "exe", "script", "module", "code" (-c) or "python" (no program)."""
    base = os.path.basename(argv[0]) if argv else ""
    if not PYTHON.fullmatch(base):
        return "exe", base, argv[1:]
    i = 1
    while i < len(argv):
        word = argv[i]
        if word == "--":
            i += 1
            break
        if not word.startswith("-") or word == "-":
            break
        if word.startswith("--"):
            i += 2 if word == "--check-hash-based-pycs" else 1
            continue
        for k, letter in enumerate(word[1:], 1):  # a cluster of short options: -u, -um, -Wignore
            value = word[k + 1:]
            if letter in "mc":
                name = value or (argv[i + 1] if i + 1 < len(argv) else "")
                rest = argv[i + 1:] if value else argv[i + 2:]
                return ("module" if letter == "m" else "code"), name, rest
            if letter in "WX":
                i += 0 if value else 1  # its value is the next word
                break
        i += 1
    if i < len(argv):
        return "script", os.path.basename(argv[i]), argv[i + 1:]
    return "python", base, []


def shown(argv):
    """The command line as a person would type it: programs by name, not by their full path."""
    words = [os.path.basename(argv[0])] + list(argv[1:])
    how, name, rest = program(argv)
    if how == "script":
        at = len(argv) - len(rest) - 1
        words[at] = name
    return " ".join(words)


def first_word(words):
    return next((w for w in words if not w.startswith("-")), "")


def is_ckptsync(argv):
    """ckptsync itself: its agent's exact first stage, or the ckptsync program or module."""
    if len(argv) == 3 and argv[1] == "-c" and argv[2].startswith("import sys,zlib;") \
            and argv[2].endswith(AGENT_STAGE_END):
        return True
    how, name, _rest = program(argv)
    return (name == "ckptsync" and how in ("exe", "script")) or (how == "module" and name.split(".")[0] == "ckptsync")


def is_trainer(argv):
    """A launcher (torchrun, accelerate launch, ...), or a program whose own name says it trains."""
    how, name, rest = program(argv)
    if how in ("exe", "script") and name in LAUNCHERS:
        sub = LAUNCHERS[name]
        return sub is None or first_word(rest) == sub
    if how == "module" and name in LAUNCHER_MODULES:
        return True
    if how in ("script", "module") and first_word(rest) == "train":   # python -m llamafactory.cli train
        return True
    return how in ("exe", "script", "module") and bool(TRAIN_NAME.search(name))


def process_ids():
    """The pids in /proc, or None where there is no /proc."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    return sorted(int(n) for n in names if n.isdigit())


def read_argv(pid):
    """(argv or None, denied): None for a process gone, a kernel thread or a zombie. A process in
    the middle of an exec has no command line yet: it is named by its program's name."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            raw = f.read()
    except PermissionError:
        return None, True
    except OSError:
        return None, False
    if not raw.strip(b"\x00"):
        return mid_exec(pid), False
    return [w.decode("utf-8", "replace") for w in raw.rstrip(b"\x00").split(b"\x00")], False


def mid_exec(pid):
    """[its name] for a user process whose command line is empty (an exec under way), else None."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
        name = data[data.index(b"(") + 1:data.rindex(b")")].decode("utf-8", "replace")
        state, ppid = data[data.rindex(b")") + 2:].split()[:2]
        os.readlink("/proc/%d/exe" % pid)   # a kernel thread has no program
    except (OSError, ValueError):
        return None
    if state == b"Z" or int(ppid) == 2 or pid == 2:
        return None
    return [name]


def parent_of(pid):
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def ancestors(pid):
    """This process's parents up to init: the ckptsync (or ssh session) that started this agent."""
    out = set()
    pid = parent_of(pid)
    while pid > 1 and pid not in out:
        out.add(pid)
        pid = parent_of(pid)
    return out


def is_under(path, root):
    return path == root or path.startswith(root.rstrip("/") + "/")


def above_root(root):
    """The directories above root a trainer of this run may work in: not /, not the home
    directory or anything above it, not a directory every user shares (sticky and world-writable)."""
    home = os.path.realpath(os.path.expanduser("~"))
    out = set()
    path = os.path.dirname(root)
    while path and path != "/":
        try:
            mode = os.stat(path).st_mode
        except OSError:
            mode = 0
        shared = mode & stat.S_ISVTX and mode & stat.S_IWOTH
        if not is_under(home, path) and not shared:
            out.add(path)
        path = os.path.dirname(path)
    return out


def open_files(pid, root):
    """([(path, writing)] of files open under root, readable): readable is False when this user
    may not look at the process's open files (another user's, unless root)."""
    fd_dir = "/proc/%d/fd" % pid
    try:
        fds = os.listdir(fd_dir)
    except PermissionError:
        return [], False
    except OSError:
        return [], True   # it ended while the processes were looked at: it holds nothing open
    found = {}
    for fd in fds:
        try:
            link = os.readlink(fd_dir + "/" + fd)
        except OSError:
            continue
        if is_under(link, root):
            found[link] = found.get(link, False) or opened_for_writing(pid, fd)
    return sorted(found.items()), True


def opened_for_writing(pid, fd):
    """Whether the descriptor was opened for writing (O_WRONLY or O_RDWR)."""
    try:
        with open("/proc/%d/fdinfo/%s" % (pid, fd)) as f:
            for line in f:
                if line.startswith("flags:"):
                    return int(line.split()[1], 8) & 3 in (1, 2)
    except (OSError, ValueError, IndexError):
        pass
    return False


def names_root(argv, cwd, root):
    """The first argument that is root or a path under it; a relative one, read from cwd, must
    be root or exist (any word is a path under root to a process working there)."""
    for word in argv[1:]:
        for part in (word, word.partition("=")[2]):
            if not part or part.startswith("-") or not (os.path.isabs(part) or cwd):
                continue
            path = os.path.normpath(os.path.join(cwd or "/", part))
            if is_under(path, root) and (os.path.isabs(part) or path == root or os.path.exists(path)):
                return part
    return ""


def hidden_by_hidepid():
    """Whether /proc hides other users' processes from this user (mounted with hidepid)."""
    if getattr(os, "geteuid", lambda: -1)() == 0:
        return False
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[4] == "/proc":
                    found = re.search(r"hidepid=(\w+)", line)
                    return bool(found) and found.group(1) not in ("0", "off")
    except OSError:
        pass
    return False


def gpu_apps():
    """{pid: "pid, name, memory"} of nvidia-smi's compute apps, or None where it cannot be asked."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    import subprocess  # here, not at the top: only a server with nvidia-smi needs it

    try:
        res = subprocess.run(
            [smi, "--query-compute-apps=pid,process_name,used_memory", "--format=csv,noheader"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    apps = {}
    for line in res.stdout.decode("utf-8", "replace").splitlines():
        head = line.split(",", 1)[0].strip()
        if head.isdigit():
            apps[int(head)] = line.strip()
    return apps


def process_record(pid, argv, real, above, pattern, me_uid):
    """This process as the client sees it, and the files it writes under `real` (the root)."""
    cmd = " ".join(argv)
    try:
        uid = os.stat("/proc/%d" % pid).st_uid
    except OSError:
        uid = -1
    try:
        cwd = os.path.realpath(os.readlink("/proc/%d/cwd" % pid))
    except OSError:
        cwd = ""
    opened, readable = open_files(pid, real) if real else ([], True)
    mine = uid == me_uid
    named = names_root(argv, cwd, real) if real else ""
    run = ""
    if opened:
        path, wrote = opened[0]
        run = ("writes %s" if wrote else "has %s open") % path
    elif pattern and pattern in cmd:
        run = "matches '%s'" % pattern
    elif named:
        run = "names %s" % named
    elif mine and cwd and real and is_under(cwd, real):
        run = "works in %s" % cwd
    elif mine and cwd in above:
        run = "works in %s, above the run's directory" % cwd
    return {"pid": pid, "cmd": shown(argv)[:MAX_CMDLINE], "mine": mine, "run": run,
            "trainer": is_trainer(argv) or bool(pattern and pattern in cmd),
            "python": program(argv)[0] != "exe", "seen": readable}, \
        [[pid, shown(argv)[:MAX_CMDLINE], path] for path, wrote in opened if wrote]


def op_procs(req):
    """This run's processes, trainer-like and GPU processes of anyone, files being written under
    `root`, and what could not be seen."""
    pattern = req.get("pattern") or ""
    root = resolve(req["root"]) if req.get("root") else ""
    real = os.path.realpath(root) if root else ""
    # Taken before the processes are listed: a file changed after it may have a writer not seen.
    now = stamp_now()
    gpu = gpu_apps()
    pids = process_ids()
    reply = {"processes": [], "writing": [], "gpu": None if gpu is None else sorted(gpu.values()), "blind": [],
             "now": now, "root": real}
    if pids is None:
        reply["blind"].append("no /proc on this server: its processes cannot be seen")
        return reply
    me = os.getpid()
    skip = ancestors(me) | {me}
    above = above_root(real) if real else set()
    me_uid = getattr(os, "geteuid", lambda: -1)()
    denied = 0
    seen_pids = set()
    found = []
    writing_total = 0
    for pid in pids:
        if pid in skip:
            seen_pids.add(pid)
            continue
        argv, refused = read_argv(pid)
        denied += refused
        if argv is None:
            continue
        seen_pids.add(pid)
        if is_ckptsync(argv):
            continue
        proc, wrote = process_record(pid, argv, real, above, pattern, me_uid)
        proc["gpu"] = gpu is not None and pid in gpu
        writing_total += len(wrote)
        reply["writing"].extend(wrote[:MAX_LISTED - len(reply["writing"])])
        if proc["run"] or proc["trainer"] or proc["gpu"]:
            found.append(proc)
    # This run's first: on a busy server, others' trainers must not crowd them out.
    reply["processes"] = sorted(found, key=lambda p: not p["run"])[:MAX_LISTED]
    reply["writing_total"] = writing_total
    if denied:
        reply["blind"].append("%d processes could not be read by this user" % denied)
    if hidden_by_hidepid():
        reply["blind"].append("/proc hides other users' processes from this user (hidepid)")
    for pid in sorted(set(gpu or ()) - seen_pids):
        reply["blind"].append("a GPU is in use by pid %d, which is not among this server's processes "
                              "(another container?)" % pid)
    return reply
