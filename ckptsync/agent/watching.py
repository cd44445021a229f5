"""Waiting for a change under remote_dir: inotify through ctypes on Linux, else comparing walks.

One watcher per root lives as long as the connection. The first `wait` on a root sets it up and
returns at once; from then on it collects what changes between two calls, so nothing that
happens while the client lists or copies is missed. Names starting with `.ckptsync` (ckptsync's
own holds and staging) are not watched.
"""

import errno
import os
import select
import stat
import struct
import sys
import time

from ckptsync.agent.frames import tick
from ckptsync.agent.paths import resolve

IN_CLOSE_WRITE = 0x08
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x1000000
IN_ISDIR = 0x40000000
WATCHED = IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF
INOTIFY_EVENT = struct.Struct("iIII")
QUIET = 0.2         # a burst of events (a save writing its files) is over after this long without one
BURST_MAX = 1.0     # but a wait returns at most this long after its first event
WAIT_MAX = 300.0
WATCH_DEPTH = 64
POLL_FILES = 200000
CHANGED_MAX = 200   # paths named in one reply; more are summed up as the root itself
SLICE = 1.0         # seconds of waiting between two counts of work (frames.tick)


class NoInotify(Exception):
    pass


def own_name(name):
    return name.startswith(".ckptsync")


def inotify_calls():
    """libc's inotify functions, or NoInotify with the reason."""
    if not sys.platform.startswith("linux"):
        raise NoInotify("no inotify on %s" % sys.platform)
    import ctypes  # here and below, not at the top: only a watch needs it, and every start would pay

    try:
        libc = ctypes.CDLL(None, use_errno=True)   # the process's own symbols: libc's
        init, add = libc.inotify_init1, libc.inotify_add_watch
    except (OSError, AttributeError) as exc:
        raise NoInotify("inotify cannot be called: %s" % exc)
    init.argtypes = [ctypes.c_int]
    add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    return init, add


class Inotify(object):
    how = "inotify"
    why = ""

    def __init__(self, root):
        init, self.add_watch = inotify_calls()
        fd = init(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            import ctypes

            raise NoInotify("inotify_init1: %s" % os.strerror(ctypes.get_errno()))
        self.fd = fd
        self.root = root
        self.dirs = {}          # watch descriptor -> directory relative to root ("" for root)
        self.changed = set()
        self.lost = ""          # why inotify stopped working (the watch limit reached later)
        try:
            self.add_tree("", 0)
        except NoInotify:
            self.close()
            raise

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def add_tree(self, rel, depth):
        """Watch rel and the directories below it (not ckptsync's own)."""
        todo = [(rel, depth)]
        while todo:
            rel, depth = todo.pop()
            full = os.path.join(self.root, rel) if rel else self.root
            wd = self.add_watch(self.fd, os.fsencode(full), WATCHED | IN_ONLYDIR)
            if wd < 0:
                import ctypes

                err = ctypes.get_errno()
                if err == errno.ENOSPC:
                    raise NoInotify("the inotify watch limit is reached (sysctl fs.inotify.max_user_watches)")
                continue  # gone, or not a directory: the next listing sees it
            self.dirs[wd] = rel
            if depth >= WATCH_DEPTH:
                continue
            try:
                with os.scandir(full) as it:
                    below = [e.name for e in it if not own_name(e.name) and e.is_dir()]
            except OSError:
                continue
            todo.extend((rel + "/" + n if rel else n, depth + 1) for n in below)

    def read(self):
        try:
            data = os.read(self.fd, 1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        i = 0
        while i + INOTIFY_EVENT.size <= len(data):
            wd, mask, _cookie, size = INOTIFY_EVENT.unpack_from(data, i)
            name = os.fsdecode(data[i + INOTIFY_EVENT.size:i + INOTIFY_EVENT.size + size].rstrip(b"\0"))
            i += INOTIFY_EVENT.size + size
            if mask & IN_Q_OVERFLOW:
                self.changed.add("")
                continue
            rel = self.dirs.get(wd)
            if mask & IN_IGNORED:
                self.dirs.pop(wd, None)
            if rel is None or own_name(name) or mask & IN_IGNORED:
                continue
            path = (rel + "/" + name if rel else name) if name else rel
            self.changed.add(path)
            if mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
                try:
                    self.add_tree(path, path.count("/") + 1)
                except NoInotify as exc:
                    self.lost = str(exc)
                    self.changed.add("")

    def wait(self, timeout, interval):
        self.read()
        end = time.monotonic() + timeout
        while not self.changed:
            left = end - time.monotonic()
            if left <= 0:
                return []
            tick()   # waiting is this request's work: the heartbeat keeps the client's stall limit quiet
            if select.select([self.fd], [], [], min(left, SLICE))[0]:
                self.read()
        last = time.monotonic() + BURST_MAX
        while time.monotonic() < last and select.select([self.fd], [], [], QUIET)[0]:
            self.read()
        changed, self.changed = sorted(self.changed), set()
        return changed


def tree_state(root):
    """path -> (size, mtime_ns, is_dir) of everything under root but ckptsync's own; None when
    root is gone."""
    out = {}
    todo = [("", root, 0)]
    while todo and len(out) < POLL_FILES:
        rel, full, depth = todo.pop()
        try:
            with os.scandir(full) as it:
                entries = list(it)
        except OSError:
            if not rel:
                return None
            continue
        for e in entries:
            if own_name(e.name):
                continue
            path = rel + "/" + e.name if rel else e.name
            try:
                st = e.stat()
            except OSError:
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            out[path] = (st.st_size, st.st_mtime_ns, is_dir)
            if is_dir and depth < WATCH_DEPTH:
                todo.append((path, e.path, depth + 1))
    return out


class Poller(object):
    """Where inotify is not available: the tree is walked every `interval` and compared."""

    how = "poll"

    def __init__(self, root, why):
        self.root = root
        self.why = why
        self.state = tree_state(root)

    def close(self):
        pass

    def wait(self, timeout, interval):
        end = time.monotonic() + timeout
        walk = time.monotonic()
        while True:
            if time.monotonic() >= walk:
                now = tree_state(self.root)
                if now != self.state:
                    old, self.state = self.state or {}, now
                    if now is None:
                        return [""]
                    return sorted(p for p in set(old) | set(now) if old.get(p) != now.get(p))
                walk = time.monotonic() + max(interval, 0.05)
            left = end - time.monotonic()
            if left <= 0:
                return []
            tick()   # waiting is this request's work: the heartbeat keeps the client's stall limit quiet
            time.sleep(max(min(walk - time.monotonic(), left, SLICE), 0))


def op_wait(req, watchers):
    """Until something under root is created, written and closed, moved or deleted, or `timeout`
    seconds pass: {"how": inotify or poll, "why": why not inotify, "changed": paths}. The first
    call on a root starts watching and returns at once."""
    root = os.path.realpath(resolve(req["root"]))
    timeout = min(max(float(req.get("timeout", 0)), 0.0), WAIT_MAX)
    interval = float(req.get("interval", 2.0))
    watcher = watchers.get(root)
    if watcher is None:
        if not os.path.isdir(root):
            return {"how": "", "why": "", "changed": [""], "started": False}
        try:
            watcher = Inotify(root)
        except NoInotify as exc:
            watcher = Poller(root, str(exc))
        watchers[root] = watcher
        return {"how": watcher.how, "why": watcher.why, "changed": [], "started": True}
    changed = watcher.wait(timeout, interval)
    if getattr(watcher, "lost", ""):
        watcher.close()
        watcher = watchers[root] = Poller(root, watcher.lost)
    if len(changed) > CHANGED_MAX:
        changed = [""]
    return {"how": watcher.how, "why": watcher.why, "changed": changed, "started": False}


def close_watchers(watchers):
    for watcher in watchers.values():
        watcher.close()
    watchers.clear()
