"""Read-only operations: list a checkpoint tree with its metadata, stat, hash, free space."""

import errno
import json
import os
import shutil
import stat
import time

from ckptsync.agent.frames import HOLD_DIR, LOCK_NAME, Failure, os_failure, tick
from ckptsync.agent.hashing import hash_file, hash_listed, hash_names
from ckptsync.agent.direct import Prefetcher
from ckptsync.agent.paths import resolve

META_NAMES = ("trainer_state.json", "metadata.json")
MAX_META = 16 << 20


def read_meta(path, name):
    try:
        if os.path.getsize(path) > MAX_META:
            return {"__error__": "too large to read"}
        with open(path, "rb") as f:
            data = f.read()
        if name == "latest":
            return data.decode("utf-8", "replace").strip()
        return json.loads(data.decode("utf-8"))
    except (OSError, ValueError) as exc:
        return {"__error__": str(exc)}


def pt_summary(path):
    """String keys and step/epoch found in a torch.save pickle, read without unpickling."""
    import pickletools  # here, not at the top: every start of the agent would pay for them
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith("data.pkl")]
            if not names:
                return None
            info = zf.getinfo(names[0])
            if info.file_size > (8 << 20):
                return None
            data = zf.read(names[0])
    except (OSError, zipfile.BadZipFile, KeyError, ValueError):
        return None
    keys = []
    found = {}
    last = None
    try:
        for op, arg, _pos in pickletools.genops(data):
            if isinstance(arg, str) and op.name.endswith("UNICODE"):
                if len(keys) < 512 and len(arg) <= 64 and arg.isprintable() and arg not in keys:
                    keys.append(arg)
                last = arg
            elif op.name in ("BININT", "BININT1", "BININT2", "LONG1") and last in ("step", "epoch", "global_step"):
                found.setdefault(last, arg)
                last = None
            else:
                last = None if op.name not in ("MEMOIZE", "BINPUT", "LONG_BINPUT") else last
    except Exception:  # a truncated pickle still tells us what it had so far
        pass
    return {"keys": keys, "step": found.get("step", found.get("global_step")), "epoch": found.get("epoch")}


def blocked_at(path):
    """The first directory on the way to `path` this user may not enter, or ''."""
    current = os.sep
    for part in os.path.abspath(path).split(os.sep)[1:-1]:
        current = os.path.join(current, part)
        if not os.access(current, os.X_OK):
            return current
    return ""


def stamp_now():
    """What the kernel stamps on a file written now: a new pipe's mtime. Files are dated by that
    clock, so their ages are measured against it even where this process's clock is shifted
    (libfaketime); time.time() where a pipe carries no time."""
    try:
        r, w = os.pipe()
    except OSError:
        return time.time()
    try:
        stamped = os.fstat(r).st_mtime
    finally:
        os.close(r)
        os.close(w)
    return stamped if stamped > 0 else time.time()


# How far a scan goes. Directories deeper than MAX_DEPTH below the root are not entered; a scan
# stops after MAX_FILES files or once its reply would pass MAX_REPLY bytes (a frame holds 64 MiB).
# What is left out is reported as unseen, never dropped.
MAX_DEPTH = 64
MAX_FILES = 200000
MAX_REPLY = 48 << 20
KINDS = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
         (stat.S_ISBLK, "a block device"))


def os_why(exc, path):
    return "%s: %s" % (exc.strerror or exc, getattr(exc, "filename", None) or path)


def link_why(full, what):
    try:
        target = os.readlink(full)
    except OSError:
        target = "?"
    return "symlink to %s, %s" % (target, what)


def mtime_of(path):
    try:
        return os.lstat(path).st_mtime_ns
    except OSError:
        return None


class Tree(object):
    """One scan's walk: every regular file under root, symlinks followed, and what it could not see.

    A symlink is followed to its target (a file's bytes, a directory's files) wherever it points;
    a link to a directory that contains it (a loop), a dangling link, a directory that cannot be
    listed, a file that cannot be read, anything that is not a regular file or directory and a
    directory deeper than max_depth become `unseen` entries: [relative path, why, mtime_ns or None].
    """

    def __init__(self, root, max_files, max_depth, max_reply, pt_meta):
        self.root = root
        self.max_files = max_files
        self.max_depth = max_depth
        self.max_reply = max_reply
        self.pt_meta = pt_meta
        self.files = []
        self.meta = {}
        self.unseen = []
        self.stopped = ""
        self.size = 0
        self.links = []         # symlinks followed: writers to their targets are not seen under root

    def miss(self, rel, why, full):
        self.unseen.append([rel, why, mtime_of(full)])

    def walk(self, root_st):
        # Depth first, in name order; each entry carries the directories above it (device, inode).
        stack = [("", self.root, 0, frozenset([(root_st.st_dev, root_st.st_ino)]))]
        while stack:
            rel_dir, full_dir, depth, above = stack.pop()
            try:
                with os.scandir(full_dir) as it:
                    names = sorted(entry.name for entry in it)
            except OSError as exc:
                if not rel_dir:
                    raise os_failure(exc, full_dir)
                self.miss(rel_dir, os_why(exc, full_dir), full_dir)
                continue
            tick(1 + len(names))  # long walks count as progress: the client's stall limit waits
            below = []
            for i, name in enumerate(names):
                if not rel_dir and name == LOCK_NAME:
                    continue  # a restore's lock, not the trainer's
                rel = rel_dir + "/" + name if rel_dir else name
                full = os.path.join(full_dir, name)
                st = self.look(rel, full)
                if st is None:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    if name.startswith(".ckptsync"):
                        continue
                    if (st.st_dev, st.st_ino) in above:
                        self.miss(rel, link_why(full, "a directory that contains it (a loop)"), full)
                    elif depth + 1 > self.max_depth:
                        self.miss(rel, "more than %d directories deep; not listed" % self.max_depth, full)
                    else:
                        below.append((rel, full, depth + 1, above | {(st.st_dev, st.st_ino)}))
                elif stat.S_ISREG(st.st_mode):
                    self.add(rel, name, full, st, top=not rel_dir)
                    if self.stopped:
                        self.stop(rel_dir, full_dir, names[i + 1:], below + stack)
                        return
                else:
                    kind = next((word for test, word in KINDS if test(st.st_mode)), "an unknown kind of file")
                    self.miss(rel, kind + ", not a regular file", full)
            stack.extend(reversed(below))

    def stop(self, rel_dir, full_dir, rest, pending):
        """The listing ends here: what it did not reach is unseen. Inside a directory below the
        root, that directory stands for the rest of it; in the root, each name left does."""
        why = "not listed: " + self.stopped
        if rel_dir:
            self.miss(rel_dir, "not listed completely: " + self.stopped, full_dir)
        else:
            for name in rest:
                self.miss(name, why, os.path.join(full_dir, name))
        for entry in pending:
            if not rel_dir or not entry[0].startswith(rel_dir + "/"):
                self.miss(entry[0], why, entry[1])

    def look(self, rel, full):
        """The file's stat, its target's for a symlink; None (and an unseen entry) when it cannot be had."""
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            return None  # deleted since the directory was read
        except OSError as exc:
            self.miss(rel, os_why(exc, full), full)
            return None
        if not stat.S_ISLNK(st.st_mode):
            return st
        self.links.append(rel)
        try:
            return os.stat(full)
        except FileNotFoundError:
            self.miss(rel, link_why(full, "which does not exist"), full)
        except OSError as exc:
            self.miss(rel, link_why(full, "which cannot be reached: " + os_why(exc, full)), full)
        return None

    def add(self, rel, name, full, st, top):
        # ctime and inode let the client see a rename or rewrite that kept size and mtime.
        self.files.append([rel, st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode), st.st_ctime_ns, st.st_ino,
                           st.st_nlink])
        self.size += len(rel.encode("utf-8", "surrogateescape")) + 80
        if not os.access(full, os.R_OK):
            self.miss(rel, "%s: %s" % (os.strerror(errno.EACCES), full), full)
        if name in META_NAMES or name == "latest":
            self.meta[rel] = read_meta(full, name)
        elif name.endswith(".pt") and (top or name == "state.pt") and self.pt_meta:
            summary = pt_summary(full)
            if summary is not None:
                self.meta[rel] = {"__pt__": summary}
        if rel in self.meta:
            self.size += len(json.dumps(self.meta[rel])) + len(rel) + 8
        if len(self.files) >= self.max_files:
            self.stopped = "the listing stopped at %d files, the most one scan lists" % len(self.files)
        elif self.size >= self.max_reply:
            self.stopped = "the listing stopped at %d files, the most one reply holds" % len(self.files)


def op_scan(req):
    root = resolve(req["root"])
    try:
        root_st = os.stat(root)
    except (FileNotFoundError, NotADirectoryError):
        raise Failure("not_found", "remote directory does not exist: %s" % root, root)
    except PermissionError:
        # A parent this user may not enter hides the directory: say so, not "does not exist".
        blocker = blocked_at(root)
        raise Failure("permission", "permission denied: %s%s"
                      % (root, " (cannot enter %s)" % blocker if blocker else ""), root)
    except OSError as exc:
        raise os_failure(exc, root)
    if not stat.S_ISDIR(root_st.st_mode):
        raise Failure("not_dir", "not a directory: %s" % root, root)
    if not os.access(root, os.R_OK | os.X_OK):
        raise Failure("permission", "permission denied: %s" % root, root)
    tree = Tree(root, int(req.get("max_files", MAX_FILES)), int(req.get("max_depth", MAX_DEPTH)),
                int(req.get("max_reply", MAX_REPLY)), req.get("pt_meta", True))
    tree.walk(root_st)
    reply = {"root": os.path.abspath(root), "files": tree.files, "meta": tree.meta, "now": stamp_now(),
             "unseen": tree.unseen, "stopped": tree.stopped, "links": tree.links}
    if req.get("holds"):
        reply["held"] = held_files(root, req)
    return reply


def held_files(root, req):
    """What <root>/.ckptsync-hold holds, listed as a scan lists root: {files, meta, unseen};
    paths are <name>/<path under root>."""
    base = os.path.join(root, HOLD_DIR)
    try:
        st = os.stat(base)
    except OSError:
        return {"files": [], "meta": {}, "unseen": []}
    tree = Tree(base, int(req.get("max_files", MAX_FILES)), MAX_DEPTH, int(req.get("max_reply", MAX_REPLY)),
                req.get("pt_meta", True))
    tree.walk(st)
    return {"files": tree.files, "meta": tree.meta, "unseen": tree.unseen}


def op_stat(req):
    """[size, mtime_ns, mode, is_dir, ctime_ns, inode] of each path (symlinks followed); None when
    there is no such path, and also when it cannot be looked at, which `errors` then says why."""
    out = {}
    errors = {}
    for rel in req["paths"]:
        full = resolve(req["root"], rel)
        try:
            st = os.stat(full)
            out[rel] = [st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode), stat.S_ISDIR(st.st_mode),
                        st.st_ctime_ns, st.st_ino]
        except (FileNotFoundError, NotADirectoryError):
            out[rel] = None
        except OSError as exc:
            out[rel] = None
            errors[rel] = os_why(exc, full)
    return {"stat": out, "errors": errors}


def op_hash(req):
    """Hashes of files; a path given a listing's stamp in "stamps" is hashed only while its open
    file still matches that stamp (else an error entry: the bytes would not be the listed file's)."""
    alg = req.get("alg", hash_names()[0])
    stamps = req.get("stamps") or {}
    limit = req.get("limit")   # the first `limit` bytes of each file only
    out = {}
    ahead = Prefetcher([(_resolved(req["root"], rel), 0, _ahead_size(stamps.get(rel), limit))
                        for rel in req["paths"]])
    for i, rel in enumerate(req["paths"]):
        ahead.reading(i)
        try:
            if rel in stamps:
                digest = hash_listed(resolve(req["root"], rel), alg, stamps[rel], limit)
                out[rel] = digest if digest is not None else {"__error__": "changed since the listing: %s" % rel}
            else:
                out[rel] = hash_file(resolve(req["root"], rel), alg, limit=limit)
        except OSError as exc:
            out[rel] = {"__error__": str(os_failure(exc, rel))}
    return {"alg": alg, "hashes": out}


def _resolved(root, rel):
    try:
        return resolve(root, rel)
    except Failure:
        return None   # its own resolve reports it


def _ahead_size(stamp, limit):
    """The bytes of a file a batch of hashes reads, where the listing or the limit tells."""
    try:
        size = int(stamp[0])
    except (TypeError, IndexError, ValueError):
        size = None
    return limit if size is None or (limit is not None and limit < size) else size


def op_glob(req):
    """Directories matching shell patterns relative to root (run directories beside remote_dir)."""
    import glob

    root = resolve(req["root"])
    found = set()
    for pattern in req.get("patterns", []):
        for path in glob.glob(os.path.join(glob.escape(root), pattern)):
            rel = os.path.relpath(path, root)
            if os.path.isdir(path) and not rel.startswith(".."):
                found.add(rel.replace(os.sep, "/"))
    return {"root": os.path.abspath(root), "dirs": sorted(found)}


def op_df(req):
    path = resolve(req["path"])
    probe = path
    while probe and not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    try:
        usage = shutil.disk_usage(probe or "/")   # statvfs's f_bavail * f_frsize; Windows too
    except OSError as exc:
        raise os_failure(exc, probe)
    return {"free": usage.free, "path": probe, "total": usage.total}
