"""Writing on the server: receive into staging, commit, inspect or discard staging, remove, mkdir, lock."""

import errno
import json
import os
import shutil
import sys
import tarfile

try:
    import fcntl
except ImportError:  # Windows, where the local agent of a laptop runs
    fcntl = None
try:
    import msvcrt
except ImportError:
    msvcrt = None
from ckptsync.agent.frames import CHUNK, LOCK_NAME, STAGING_PREFIX, TRASH_PREFIX, Failure, os_failure, tick
from ckptsync.agent.hashing import fsync_dir, fsync_file, hash_names, new_hash, start_writeback
from ckptsync.agent.hashing import WRITEBACK_STEP, writeback_range
from ckptsync.agent.direct import NewFile, direct_buffer
from ckptsync.agent.paths import resolve, safe_member
from ckptsync.agent.reader import FrameReader
from ckptsync.agent.tar import TarStream


def staging_dir(root, name):
    """root/.ckptsync-staging-<name>, for a name that is one plain path component."""
    if not safe_member(name) or "/" in name:
        raise Failure("bad_path", "bad staging name %r" % (name,))
    return os.path.join(root, STAGING_PREFIX + name)


def within(outer, inner):
    outer, inner = os.path.abspath(outer), os.path.abspath(inner)
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def move_target(root, staging, member, dest):
    """Where one commit move lands, after checking both of its names."""
    if not isinstance(member, str) or (member and not safe_member(member)):
        raise Failure("bad_path", "bad staged member %r" % (member,))
    if not isinstance(dest, str) or not dest or "\x00" in dest:
        raise Failure("bad_path", "bad destination %r" % (dest,))
    outside = dest.startswith("/") or ".." in dest.split("/")
    if not outside and not safe_member(dest):
        raise Failure("bad_path", "bad destination %r" % (dest,))
    target = resolve(root, dest)
    # Extra files may live outside the root ("../../config.json" or absolute), but no move
    # may replace the root or a directory holding it, nor land inside the staging directory.
    if within(target, root) or within(staging, target):
        raise Failure("bad_path", "refusing to move onto %s" % target, target)
    return target


def open_part(tmp, offset, h, buf=None, size=None):
    """A member's .part: a new one (written from `buf`, see direct.py), or (offset > 0) the first
    offset bytes an earlier try left, fed to h so that the member's hash is still the whole file's."""
    if not offset:
        return NewFile(tmp, buf, size)
    out = open(tmp, "r+b")
    try:
        left = offset
        while left:
            block = out.read(min(CHUNK, left))
            if not block:
                raise Failure("protocol", "resumed at byte %d, but the staged part is shorter" % offset, tmp)
            h.update(block)
            left -= len(block)
            tick()
        out.truncate(offset)
        out.seek(offset)
    except BaseException:
        out.close()
        raise
    return out


def write_range(tmp, start, pieces, h):
    """Write pieces into tmp from byte `start` on, creating it but never truncating it: the
    file's other ranges may be arriving over other channels at the same time."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        at = mark = start
        for block in pieces:
            h.update(block)
            view = memoryview(block)
            while view:
                n = os.pwrite(fd, view, at)
                at += n
                view = view[n:]
            if at - mark >= WRITEBACK_STEP:
                writeback_range(fd, mark, at - mark)
                mark = at
    finally:
        os.close(fd)


def op_receive(chan, req, _memory=None):
    """Write an incoming tar into root/.ckptsync-staging-<name>/, hashing each file."""
    root = resolve(req["root"])
    staging = staging_dir(root, req["name"])
    alg = req.get("alg") or hash_names()[0]
    new_hash(alg)
    try:
        os.makedirs(staging, exist_ok=True)
    except OSError as exc:
        raise os_failure(exc, staging)
    chan.send_json({"ok": True, "alg": alg, "staging": staging})
    reader = FrameReader(chan)
    results = []
    failure = None
    written = []
    ranged = []   # the .part files ranges went into: assemble finishes them
    made = set()  # folders made (or found) for this stream's files
    buf = direct_buffer()
    try:
        stream = TarStream(reader)
        for member in stream.members():
            if not member.isreg() or not safe_member(member.name):
                raise Failure("bad_member", "refusing tar member %r" % member.name, member.name)
            target = os.path.join(staging, *member.name.split("/"))
            folder = os.path.dirname(target)
            if folder not in made:
                os.makedirs(folder, exist_ok=True)
                made.add(folder)
            h = new_hash(alg)
            tmp = target + ".part"
            offset = int(member.pax_headers.get("ckptsync.offset", 0) or 0)
            start = member.pax_headers.get("ckptsync.start")
            if start is not None:  # one byte range of a file other channels write too
                if offset:
                    raise Failure("protocol", "a byte range cannot resume", member.name)
                start = int(start)
                write_range(tmp, start, stream.data(member.size), h)
                ranged.append(tmp)
                results.append({"member": member.name, "start": start, "size": member.size, "hash": h.hexdigest()})
                continue
            with open_part(tmp, offset, h, buf, offset + member.size) as out:
                for block in stream.data(member.size):
                    h.update(block)
                    out.write(block)
                out.flush()
                start_writeback(out.fileno(), offset + member.size)
            os.chmod(tmp, member.mode & 0o7777)
            mtime_ns = int(member.pax_headers.get("ckptsync.mtime_ns", int(member.mtime) * 1000000000))
            os.utime(tmp, ns=(mtime_ns, mtime_ns))
            os.replace(tmp, target)
            written.append(target)
            results.append({"member": member.name, "size": offset + member.size, "hash": h.hexdigest()})
    except Failure as exc:
        failure = exc
    except OSError as exc:
        failure = os_failure(exc, staging)
    except (tarfile.TarError, ValueError, EOFError) as exc:
        failure = Failure("protocol", "broken stream: %s" % exc)
    if failure is not None:
        reader.drain()
        raise failure
    reader.drain()
    for path in written + sorted(set(ranged)):  # everything reaches the disk before the client may commit
        fsync_file(path)
        tick()
    for dirpath, _dirs, _files in os.walk(staging):
        fsync_dir(dirpath)
        tick()
    return {"files": results, "staging": staging}


def op_commit(req):
    """Move a staged directory (or staged files) into place, atomically per item."""
    root = resolve(req["root"])
    staging = staging_dir(root, req["name"])
    force = bool(req.get("force"))
    moves = []
    for move in req["moves"]:
        if not isinstance(move, (list, tuple)) or len(move) != 2:
            raise Failure("bad_path", "a move is [member, destination], got %r" % (move,))
        member, dest = move
        moves.append((member, dest, move_target(root, staging, member, dest)))
    done = []
    kept = []
    for member, dest, target in moves:  # all checked before the first one moves
        src = os.path.join(staging, *member.split("/")) if member else staging
        parent = os.path.dirname(target)
        try:
            os.makedirs(parent, exist_ok=True)
            if os.path.lexists(target):
                if not force:
                    kept.append(dest)
                    continue
                aside = os.path.join(parent, TRASH_PREFIX + os.path.basename(target) + "-%d" % os.getpid())
                os.rename(target, aside)
                os.rename(src, target)
                remove_tree(aside)
            else:
                os.rename(src, target)
            if os.path.isdir(target) and not os.path.islink(target):
                stamp_dirs(target)
            fsync_dir(parent)
            done.append(dest)
        except OSError as exc:
            raise os_failure(exc, target)
    if os.path.isdir(staging) and not os.listdir(staging):
        os.rmdir(staging)
    return {"moved": done, "kept": kept, "staging_left": os.path.lexists(staging)}


def stamp_dirs(top):
    """Give each directory of a moved tree the newest mtime inside it. Files carry their own
    mtimes; a directory's was lost when staging made it, and the newest entry is what it had."""
    for dirpath, dirnames, filenames in os.walk(top, topdown=False):  # children before parents
        newest = 0
        for name in dirnames + filenames:
            try:
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime_ns)
            except OSError:
                continue
        if newest:
            try:
                os.utime(dirpath, ns=(newest, newest))
            except OSError:
                pass  # a timestamp is not worth failing a restore that is already in place


def remove_tree(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def op_staged(req):
    """What an earlier, interrupted receive left in staging: member -> [size, mtime_ns].

    "partial" lists members whose ".part" file was left half-written.
    """
    root = resolve(req["root"])
    staging = staging_dir(root, req["name"])
    out = {}
    partial = []
    for dirpath, _dirs, files in os.walk(staging):
        for name in files:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, staging).replace(os.sep, "/")
            if name.endswith(".part"):
                partial.append(rel[: -len(".part")])
                continue
            st = os.stat(full)
            out[rel] = [st.st_size, st.st_mtime_ns]
    return {"staged": out, "partial": partial}


def op_discard(req):
    root = resolve(req["root"])
    remove_tree(staging_dir(root, req["name"]))
    return {}


def op_remove(req):
    """Delete checkpoints: rename aside first so no half-deleted one is ever visible."""
    root = resolve(req["root"])
    removed = []
    for leftover in os.listdir(root) if os.path.isdir(root) else []:
        if leftover.startswith(TRASH_PREFIX):
            remove_tree(os.path.join(root, leftover))
    for name in req["names"]:
        if not safe_member(name) or "/" in name:
            raise Failure("bad_path", "bad checkpoint name %r" % name)
        target = os.path.join(root, name)
        if not os.path.lexists(target):
            continue
        aside = os.path.join(root, TRASH_PREFIX + name)
        try:
            os.rename(target, aside)
            fsync_dir(root)
            remove_tree(aside)
        except OSError as exc:
            raise os_failure(exc, target)
        removed.append(name)
    return {"removed": removed}


def op_mkdir(req):
    path = resolve(req["path"])
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise os_failure(exc, path)
    return {"path": os.path.abspath(path)}


def op_lock(req, held):
    """Hold root/.ckptsync-lock (flock) until `unlock` or the end of the connection: one run at a time
    writes into a server directory. The asking run's `owner` (pid, host, command, since) goes into
    the file, so that a run refused gets it back; a lock this connection holds is granted again.
    With `create`, a missing root is made first (the run would make it anyway); the release removes
    what it made when it is still empty, and the lock file always."""
    root = resolve(req["root"])
    path = os.path.join(root, LOCK_NAME)
    if path in held:
        return {"path": path, "created": False}
    made = []
    if not os.path.isdir(root):
        if os.path.lexists(root):
            raise Failure("not_dir", "not a directory: %s" % root, root)
        if not req.get("create"):
            raise Failure("not_found", "no such directory: %s" % root, root)
        up = root
        while not os.path.lexists(up):
            made.append(up)
            up = os.path.dirname(up)
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as exc:
            raise os_failure(exc, root)
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            raise os_failure(exc, path)
        try:
            try_lock(fd)
        except OSError as exc:
            owner = read_owner(fd)
            os.close(fd)
            remove_made(made)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise os_failure(exc, path)
            raise Failure("locked", "%s is being written by another run" % root, root, info=owner)
        if same_file(fd, path):
            break
        os.close(fd)  # its holder removed it as it let go: the name is a new file now
    else:
        raise Failure("locked", "%s: its lock keeps changing hands" % root, root, info={})
    try:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(req.get("owner") or {}).encode("utf-8"))
    except OSError:
        pass  # the lock holds all the same; a run refused then cannot say who holds it
    held[path] = (fd, made)
    return {"path": path, "created": bool(made)}


def try_lock(fd):
    """An exclusive lock on fd, taken without waiting; OSError when another holds it. The system
    lets go when the process ends. Windows locks one byte far past the owner's text."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    elif msvcrt is not None:
        os.lseek(fd, 1 << 30, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)


def op_unlock(req, held):
    release(held, os.path.join(resolve(req["root"]), LOCK_NAME))
    return {}


def read_owner(fd):
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        owner = json.loads(os.read(fd, 65536).decode("utf-8") or "null")
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def same_file(fd, path):
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def remove_made(made):
    """The directories a lock made for a run that put nothing in them, deepest first."""
    for path in made:
        try:
            os.rmdir(path)
        except OSError:
            return


def release(held, path):
    """Remove the lock file while still holding it, then let go: whoever opened the old file and
    gets its lock next sees that the name is gone, and takes the new one instead."""
    if path not in held:
        return
    fd, made = held.pop(path)
    try:
        os.unlink(path)
    except OSError:
        pass
    try:
        os.close(fd)
    except OSError:
        pass
    remove_made(made)


def unlock_all(held):
    """The connection ended: its locks are released."""
    for path in list(held):
        release(held, path)


def widen_pipes(fds, size=1 << 20):
    """Give the pipes to sshd (or to the client) a 1 MiB buffer instead of 64 KiB, where Linux
    allows it: a 1 MiB frame then crosses in one or two reads and writes instead of sixteen."""
    if fcntl is None or not sys.platform.startswith("linux"):
        return
    for fd in fds:
        try:
            fcntl.fcntl(fd, 1031, size)   # F_SETPIPE_SZ; not a pipe (a socket), or over the limit: as it is
        except (OSError, ValueError):
            pass

