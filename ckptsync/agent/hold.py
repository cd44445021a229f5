"""Holding checkpoints against the trainer's rotation: hard links in <root>/.ckptsync-hold/.

A hold is `.ckptsync-hold/<name>/<path as under root>`: the same inodes as the checkpoint's files
(same filesystem, no copy), under a name the trainers' globs do not match, so deleting the
checkpoint leaves its bytes there until the client has copied them and releases the hold. A
hold is made in a directory of its own and renamed into place, so it is whole or absent.
"""

import os
import shutil
import stat

from ckptsync.agent.frames import HOLD_DIR, Failure
from ckptsync.agent.paths import resolve, safe_member

NEW_PREFIX = ".ckptsync-new-"
GONE_PREFIX = ".ckptsync-gone-"


def hold_name(name):
    if not safe_member(name) or "/" in name or name.startswith("."):
        raise Failure("bad_path", "bad checkpoint name %r" % (name,))
    return name


def drop_tree(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def link_all(root, tmp, name, files):
    """Hard-link every listed file of `name` under tmp; [path, size, mtime_ns, mode, ctime_ns, inode,
    nlink] of each link (the new ctime: linking moves it), or the reason it cannot be held."""
    rows = []
    for path, size, mtime_ns, inode in files:
        if not safe_member(path) or (path != name and not path.startswith(name + "/")):
            raise Failure("bad_path", "bad member %r of %s" % (path, name))
        dest = os.path.join(tmp, path)
        parent = os.path.dirname(dest)
        if not os.path.isdir(parent):
            os.makedirs(parent)
        try:
            os.link(resolve(root, path), dest, follow_symlinks=True)
        except FileNotFoundError:
            return None, "%s is gone" % path
        except OSError as exc:
            return None, "%s cannot be linked: %s" % (path, exc.strerror or exc)
        st = os.stat(dest)
        if (st.st_size, st.st_mtime_ns, st.st_ino) != (size, mtime_ns, inode):
            return None, "%s changed since the listing" % path
        rows.append([path, st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode), st.st_ctime_ns, st.st_ino,
                     st.st_nlink])
    return rows, ""


def op_hold(req):
    """Hold checkpoints: "make" is {name: [[path, size, mtime_ns, inode], ...]} as listed. Returns
    {"held": {name: rows (see link_all)}, "refused": {name: why}}."""
    root = resolve(req["root"])
    base = os.path.join(root, HOLD_DIR)
    held, refused = {}, {}
    for name, files in sorted((req.get("make") or {}).items()):
        hold_name(name)
        final = os.path.join(base, name)
        if os.path.lexists(final):
            refused[name] = "already held"
            continue
        tmp = os.path.join(base, NEW_PREFIX + name)
        drop_tree(tmp)
        try:
            os.makedirs(tmp)
            rows, why = link_all(root, tmp, name, files)
            if rows is not None:
                os.rename(tmp, final)
                held[name] = rows
            else:
                refused[name] = why
        except OSError as exc:
            refused[name] = "%s: %s" % (exc.strerror or exc, getattr(exc, "filename", "") or final)
        finally:
            drop_tree(tmp)
    return {"held": held, "refused": refused}


def op_release(req):
    """Remove holds (renamed aside first, so none is ever half there): "names", or every hold
    with "all". Returns the names released."""
    root = resolve(req["root"])
    base = os.path.join(root, HOLD_DIR)
    if not os.path.isdir(base):
        return {"released": []}
    names = sorted(n for n in os.listdir(base) if not n.startswith(".")) if req.get("all") \
        else [hold_name(n) for n in req.get("names") or []]
    released = []
    for name in names:
        final = os.path.join(base, name)
        if not os.path.lexists(final):
            continue
        aside = os.path.join(base, "%s%s-%d" % (GONE_PREFIX, name, os.getpid()))
        os.rename(final, aside)
        drop_tree(aside)
        released.append(name)
    for leftover in os.listdir(base):
        if leftover.startswith(NEW_PREFIX) or leftover.startswith(GONE_PREFIX):
            drop_tree(os.path.join(base, leftover))
    try:
        os.rmdir(base)   # only when no hold is left
    except OSError:
        pass
    return {"released": released}
