"""Writing a new file's bytes straight to the disk, past the page cache, where the system allows it.

A received file is fsynced before it counts, so its bytes reach the disk anyway. Written the
ordinary way they are first copied into newly allocated cache pages, which the fsync then writes
out; that copy and allocation was most of the receiving end's CPU. With O_DIRECT the disk reads
them from one aligned buffer: whole blocks go that way, the last partial one the ordinary way.
Only local disk filesystems are written that way: over NFS and the like every direct write
would wait for its round trip, and one that refuses O_DIRECT gets ordinary writes too.
"""

import errno
import mmap
import os

from ckptsync.agent.frames import CHUNK

DIRECT = getattr(os, "O_DIRECT", 0)
BLOCK = 1 << 20   # bytes per direct write: page-aligned, a multiple of any disk's block size


# Filesystems on a local block device, where a direct write costs the disk's time and no more.
DISK_FILESYSTEMS = frozenset(("ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "bcachefs", "jfs"))
MOUNTINFO = "/proc/self/mountinfo"
_KINDS = {}   # (mountinfo, st_dev) -> filesystem type, read once per device


def filesystem_kinds(text):
    """(major, minor) -> filesystem type, from the text of /proc/self/mountinfo. Pure."""
    out = {}
    for line in text.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 3:
            continue
        major, _, minor = fields[2].partition(":")
        kind = line.split(" - ", 1)[1].split()
        if kind and major.isdigit() and minor.isdigit():
            out.setdefault((int(major), int(minor)), kind[0])
    return out


def on_local_disk(directory):
    """Whether files in `directory` live on a local disk filesystem (DISK_FILESYSTEMS)."""
    try:
        key = (MOUNTINFO, os.stat(directory).st_dev)
    except OSError:
        return False
    if key not in _KINDS:
        try:
            with open(MOUNTINFO) as f:
                kinds = filesystem_kinds(f.read())
        except OSError:   # no /proc (macOS has no O_DIRECT either)
            kinds = {}
        _KINDS[key] = kinds.get((os.major(key[1]), os.minor(key[1])), "")
    return _KINDS[key] in DISK_FILESYSTEMS


def direct_buffer():
    """An aligned buffer for NewFile; one serves files written one after another."""
    return mmap.mmap(-1, BLOCK) if DIRECT else None


class NewFile:
    """A file created (or emptied) and written in order from its first byte; file-like."""

    def __init__(self, path, buf=None, size=None):
        """`size`: the bytes to be written, when known. A file smaller than one block has no whole
        block to write past the cache, so it is opened the ordinary way from the start."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)
        self.path = path
        self.fd = -1
        self.view = None
        self.used = 0
        self.closed = False
        if DIRECT and buf is not None and (size is None or size >= BLOCK) and on_local_disk(os.path.dirname(path) or "."):
            try:
                self.fd = os.open(path, flags | DIRECT, 0o666)
                self.view = memoryview(buf)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
        if self.fd < 0:
            self.fd = os.open(path, flags, 0o666)

    def fileno(self):
        return self.fd

    def write(self, data):
        if self.view is None:
            _write_all(self.fd, data)
            return
        data = memoryview(data)
        pos, size = 0, len(data)
        while pos < size:
            take = min(BLOCK - self.used, size - pos)
            self.view[self.used:self.used + take] = data[pos:pos + take]
            self.used += take
            pos += take
            if self.used == BLOCK:
                self._write_block()
                if self.view is None:  # refused: the rest the ordinary way
                    _write_all(self.fd, data[pos:])
                    return

    def _write_block(self):
        self.used = 0   # written or failed: a failed file is not flushed again at its close
        try:
            done = os.write(self.fd, self.view)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            done = 0  # the filesystem took the flag but not the write: the ordinary way then
        if done != BLOCK:
            rest = self._ordinary()[done:]
            _write_all(self.fd, rest)

    def _ordinary(self):
        """Ordinary writes from here on: the last partial block, or all of it after a refusal."""
        fd = os.open(self.path, os.O_WRONLY | getattr(os, "O_BINARY", 0))
        try:
            os.lseek(fd, os.lseek(self.fd, 0, os.SEEK_CUR), os.SEEK_SET)
        except OSError:
            os.close(fd)
            raise
        os.close(self.fd)
        self.fd = fd
        view, self.view = self.view, None
        return view

    def flush(self):
        if self.view is not None and self.used:
            tail = self._ordinary()[:self.used]
            self.used = 0
            _write_all(self.fd, tail)

    def close(self):
        if self.closed:
            return
        self.closed = True
        try:
            self.flush()
        finally:
            self.view = None
            os.close(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _write_all(fd, data):
    data = memoryview(data)
    while data:
        data = data[os.write(fd, data):]


# Reading ahead. A file read block by block from a cold cache waits on the disk at each block
# the kernel's own readahead has not reached; asking for the next READ_AHEAD bytes while the
# current block is hashed, compressed and sent keeps the disk busy during that work.
READ_AHEAD = 8 << 20
_FADVISE = getattr(os, "posix_fadvise", None)


def read_ahead(fd, offset, length=READ_AHEAD):
    """Ask the kernel to start reading [offset, offset + length) of fd into the cache, without
    waiting for it; nothing where the system has no posix_fadvise."""
    if _FADVISE is None or length <= 0:
        return
    try:
        _FADVISE(fd, offset, length, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass


def ahead_of(done, block, total, window=READ_AHEAD):
    """The range (offset, length) to ask for after reading bytes up to `done` of a file read from
    0 to `total` in blocks of `block`: the block just past the window that the first request,
    [0, window), and the ones before it have asked for; None past the end. Pure."""
    offset = done + window - block
    if offset >= total or offset < window:
        return None
    return offset, min(block, total - offset)


class ReadAhead:
    """Keeps READ_AHEAD bytes asked for ahead of one reader of `total` bytes of fd from `at`, told
    of each block it reads (`read`). fd None (a file in memory) asks for nothing."""

    def __init__(self, fd, at, total):
        self.fd, self.at, self.total, self.done = fd, at, total, 0
        if fd is not None:
            read_ahead(fd, at, min(total, READ_AHEAD))

    def read(self, n):
        if self.fd is None:
            return
        self.done += n
        more = ahead_of(self.done, CHUNK, self.total)
        if more is not None:
            read_ahead(self.fd, self.at + more[0], more[1])


def prefetch(path, offset=0, length=READ_AHEAD):
    """Start reading `length` bytes from `offset` of the file at path into the cache; nothing if
    it cannot be opened (its own read reports that)."""
    if _FADVISE is None:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except (OSError, ValueError):
        return
    try:
        read_ahead(fd, offset, length)
    finally:
        os.close(fd)


# Files read one after another (a send, a batch of hashes): many small ones from a cold cache
# would each wait on the disk in turn. The first bytes of the next few are asked for while one is
# read, so the disk reads several at once: up to PREFETCH_BYTES (each counted as the part of it
# prefetch asks for) and PREFETCH_FILES files past the one being read.
PREFETCH_BYTES = 32 << 20
PREFETCH_FILES = 32


def files_to_ask(weights, reading, asked, most_bytes=PREFETCH_BYTES, most_files=PREFETCH_FILES):
    """How far the files asked for should reach once file `reading` is being read: the new
    `asked` (files [0, asked) have been asked for), given each file's weight (the bytes its
    prefetch asks for). At least one file past `reading` when there is one. Pure."""
    asked = max(asked, reading + 1)
    held = sum(weights[reading + 1:asked])
    while asked < len(weights) and asked - reading <= most_files and held < most_bytes:
        held += weights[asked]
        asked += 1
    return asked


class Prefetcher:
    """Asks for the files of `items` ahead of their reader, as files_to_ask says. `items`: (path
    or None, offset, size or None) in reading order; None paths are skipped (their own read
    reports what is wrong)."""

    def __init__(self, items):
        self.items = items
        self.weights = [READ_AHEAD if size is None else max(0, min(size, READ_AHEAD)) for _p, _o, size in items]
        self.asked = 0

    def reading(self, i):
        """File i is about to be read."""
        if _FADVISE is None:
            return
        upto = files_to_ask(self.weights, i, self.asked)
        for k in range(max(self.asked, i + 1), upto):
            path, offset, _size = self.items[k]
            if path is not None and self.weights[k]:
                prefetch(path, offset, self.weights[k])
        self.asked = max(self.asked, upto)
