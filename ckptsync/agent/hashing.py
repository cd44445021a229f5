"""File hashes, and the fsync and write-back helpers that go with writing files safely."""

import hashlib
import os

from ckptsync.agent.frames import CHUNK, Failure, tick

try:
    import xxhash  # type: ignore
except ImportError:
    xxhash = None


def hash_names():
    names = []
    if xxhash is not None:
        names.append("xxh3_128")
    names.extend(["sha1", "md5"])
    return names


def new_hash(name):
    if name == "xxh3_128":
        if xxhash is None:
            raise Failure("unsupported", "xxhash is not available on this server")
        return xxhash.xxh3_128()
    if name in ("sha1", "md5", "sha256", "blake2b"):
        return hashlib.new(name)
    raise Failure("unsupported", "unknown hash %s" % name)


def hash_file(path, alg="xxh3_128", on_block=None, limit=None):
    """The file's hash; with `limit`, of its first `limit` bytes only."""
    h = new_hash(alg)
    left = limit
    with open(path, "rb") as f:
        while left is None or left > 0:
            block = f.read(CHUNK if left is None else min(CHUNK, left))
            if not block:
                break
            if left is not None:
                left -= len(block)
            h.update(block)
            tick()
            if on_block is not None:
                on_block(len(block))
    return h.hexdigest()


def unlike_listing(stamp, st):
    """Whether an open file's fstat differs from the listing's stamp [size, mtime_ns, inode, ctime_ns]
    (an inode or ctime of 0: not known). Any write, rename over, truncation, chmod or unlink since
    the listing moves one of them; equal stamps mean the bytes are the listed file's. A fifth item,
    the names the file had when listed (several: a held file), lets a ctime move that comes with
    one of them gone while another stays (the trainer deleting a checkpoint that is held)."""
    size, mtime_ns, inode, ctime_ns = (int(v) for v in stamp[:4])
    if st.st_size != size or st.st_mtime_ns != mtime_ns or bool(inode and st.st_ino != inode):
        return True
    if not ctime_ns or st.st_ctime_ns == ctime_ns:
        return False
    return not (len(stamp) > 4 and 0 < st.st_nlink < int(stamp[4]))


def hash_listed(path, alg, stamp, limit=None):
    """The file's hash (with `limit`, of its first `limit` bytes), or None when the open file is not
    (or stops being) the one listed with `stamp`."""
    h = new_hash(alg)
    with open(path, "rb", buffering=0) as f:
        st = os.fstat(f.fileno())
        if unlike_listing(stamp, st):
            return None
        # The listed size is read, no more: a file that grew or shrank fails the stamp below. Each
        # read is sized to what is left, since a read of CHUNK allocates CHUNK bytes for a small file.
        left = st.st_size if limit is None else min(st.st_size, limit)
        while left > 0:
            block = f.read(min(CHUNK, left))
            if not block:
                break
            h.update(block)
            left -= len(block)
        if unlike_listing(stamp, os.fstat(f.fileno())):
            return None
    return h.hexdigest()


WRITEBACK_MIN = 1 << 20
# A file written in ranges has each span of this many bytes handed to the disk as it is done: the
# disk then works while the link does, and the fsync before the commit finds little left.
WRITEBACK_STEP = 8 << 20


def start_writeback(fd, size=None):
    """Start writing the file out now without waiting; the fsync before commit then finds little to do.
    Not for a file of `size` under WRITEBACK_MIN: its few pages cost that fsync less than this call."""
    if size is not None and size < WRITEBACK_MIN:
        return
    writeback_range(fd, 0, 0)


def writeback_range(fd, offset, length):
    """start_writeback for bytes [offset, offset + length) of a file (length 0: to its end)."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def fsync_file(path):
    """Flush one file, named by path, to the disk. Windows (a local directory as the server)
    flushes only through a handle that may write, and a read-only file gives none."""
    try:
        fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    except PermissionError:
        if os.name == "nt":
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
