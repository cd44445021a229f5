"""Read-only operations: list a checkpoint tree with its metadata, stat, hash, free space."""

import json
import os
import pickletools
import stat
import time
import zipfile

from ckptsync.agent.frames import LOCK_NAME, Failure, os_failure, tick
from ckptsync.agent.hashing import hash_file, hash_names
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


def walk_error(exc):
    return "cannot list %s: %s" % (getattr(exc, "filename", "") or "a directory", exc.strerror or exc)


def op_scan(req):
    root = resolve(req["root"])
    max_files = int(req.get("max_files", 200000))
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
    files = []
    meta = {}
    errors = []
    unreadable = {}  # relative path -> why: the client must not call what holds it complete

    def on_error(exc):
        errors.append(walk_error(exc))
        rel = os.path.relpath(getattr(exc, "filename", "") or root, root)
        if rel != "." and not rel.startswith(".."):
            unreadable[rel.replace(os.sep, "/")] = exc.strerror or str(exc)

    truncated = False
    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error):
        if truncated:
            break
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".ckptsync"))
        tick(1 + len(filenames))
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir
        hidden = []  # names a directory lists but whose files this user may not look at
        for name in sorted(filenames):
            if not rel_dir and name == LOCK_NAME:
                continue  # a restore's lock, not the trainer's
            full = os.path.join(dirpath, name)
            rel = os.path.join(rel_dir, name) if rel_dir else name
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue  # deleted since the directory was read
            except OSError as exc:
                hidden.append((name, exc))
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            # ctime and inode let the client see a rename or rewrite that kept size and mtime.
            files.append([rel, st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode), st.st_ctime_ns, st.st_ino])
            if name in META_NAMES or name == "latest":
                meta[rel] = read_meta(full, name)
            elif name.endswith(".pt") and (not rel_dir or name == "state.pt") and req.get("pt_meta", True):
                summary = pt_summary(full)
                if summary is not None:
                    meta[rel] = {"__pt__": summary}
            if len(files) >= max_files:
                errors.append("listing truncated at %d files" % max_files)
                truncated = True
                break
        for name, exc in hidden:
            unreadable[os.path.join(rel_dir, name).replace(os.sep, "/") if rel_dir else name] = exc.strerror or str(exc)
        if hidden:
            name, exc = hidden[0]
            more = " and %d more" % (len(hidden) - 1) if len(hidden) > 1 else ""
            errors.append("cannot look at %s%s in %s: %s" % (name, more, dirpath, exc.strerror or exc))
    return {"root": os.path.abspath(root), "files": files, "meta": meta, "now": time.time(), "errors": errors,
            "unreadable": unreadable}


def op_stat(req):
    out = {}
    for rel in req["paths"]:
        try:
            st = os.stat(resolve(req["root"], rel))
            out[rel] = [st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode), stat.S_ISDIR(st.st_mode),
                        st.st_ctime_ns, st.st_ino]
        except OSError:
            out[rel] = None
    return {"stat": out}


def op_hash(req):
    alg = req.get("alg", hash_names()[0])
    out = {}
    for rel in req["paths"]:
        try:
            out[rel] = hash_file(resolve(req["root"], rel), alg)
        except OSError as exc:
            out[rel] = {"__error__": str(os_failure(exc, rel))}
    return {"alg": alg, "hashes": out}


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
        st = os.statvfs(probe or "/")
    except OSError as exc:
        raise os_failure(exc, probe)
    return {"free": st.f_bavail * st.f_frsize, "path": probe}
