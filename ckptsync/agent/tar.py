"""The tar format as the agent writes and reads it: regular files, PAX and GNU long names."""

import tarfile

from ckptsync.agent.frames import CHUNK, Failure

NUL_BLOCK = bytes(tarfile.BLOCKSIZE)


def tar_header(name, size, mtime_ns, mode, offset=0, start=None):
    """A PAX header; `offset`: the member's data starts that far into the file (a resumed one);
    `start`: the member is the byte range of the file that begins there."""
    pax = {"ckptsync.mtime_ns": str(mtime_ns)}
    if offset:
        pax["ckptsync.offset"] = str(offset)
    if start is not None:
        pax["ckptsync.start"] = str(start)
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) <= 100 and encoded.isascii() and 0 <= size < USTAR_MAX and 0 <= mtime_ns < USTAR_MAX * 10**9:
        records = b"".join(_pax_record(k, v) for k, v in pax.items())
        return (_ustar(b"././@PaxHeader", 0, len(records), 0, b"x") + _padded(records)
                + _ustar(encoded, mode, size, mtime_ns // 1000000000, b"0"))
    return _tarfile_header(name, size, mtime_ns, mode, pax)


# tarfile builds such a header through general code (any type, format and field width) at about
# 30 us a member; for the usual member, a short ASCII name and sizes that fit the ustar fields,
# the same bytes are put together here directly. tests/test_agent_modules.py compares the two.
USTAR_MAX = 8 ** 11   # the largest size or mtime a 12-byte octal field holds, plus one


def _octal(n, width):
    return b"%0*o\0" % (width - 1, n)


def _ustar(name, mode, size, mtime, kind):
    head = b"".join((name.ljust(100, b"\0"), _octal(mode & 0o7777, 8), _octal(0, 8), _octal(0, 8),
                     _octal(size, 12), _octal(mtime, 12), b"        ", kind, bytes(100), b"ustar\x0000",
                     bytes(64 + 16 + 155))).ljust(tarfile.BLOCKSIZE, b"\0")   # no device numbers: a regular file
    return head[:148] + b"%06o\0" % sum(head) + head[155:]


def _pax_record(key, value):
    body = b" %s=%s\n" % (key.encode("utf-8"), value.encode("utf-8"))
    n = len(body) + 1
    while len(body) + len(str(n)) != n:   # the length counts its own digits
        n = len(body) + len(str(n))
    return b"%d" % n + body


def _padded(data):
    return data + bytes(-len(data) % tarfile.BLOCKSIZE)


def _tarfile_header(name, size, mtime_ns, mode, pax):
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime_ns // 1000000000
    info.mode = mode
    info.type = tarfile.REGTYPE
    info.uname = info.gname = ""
    info.pax_headers = pax
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


class TarStream:
    """A minimal streaming tar reader: regular files only, PAX and GNU long names understood.

    Members are read in order and their data is handed out in pieces as it
    arrives, without the buffering copies of tarfile's stream mode.
    """

    def __init__(self, src):
        self.src = src
        self.head = b""

    def _exact(self, n):
        parts, got = [], 0
        if self.head:
            parts.append(self.head[:n])
            got = len(parts[0])
            self.head = self.head[n:]
        while got < n:
            piece = self.src.read(n - got)
            if not piece:
                break
            parts.append(piece)
            got += len(piece)
        return b"".join(parts)

    def members(self):
        pax = {}
        longname = None
        while True:
            block = self._exact(tarfile.BLOCKSIZE)
            if len(block) < tarfile.BLOCKSIZE:
                raise Failure("protocol", "the tar stream ended without its end marker")
            if block == NUL_BLOCK:
                return
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.HeaderError as exc:
                raise Failure("protocol", "broken tar header: %s" % exc)
            if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE):
                data = self._exact(info.size + (-info.size % tarfile.BLOCKSIZE))[: info.size]
                if info.type == tarfile.XHDTYPE:
                    pax.update(parse_pax(data))
                continue
            if info.type == tarfile.GNUTYPE_LONGNAME:
                data = self._exact(info.size + (-info.size % tarfile.BLOCKSIZE))[: info.size]
                longname = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
                continue
            info.name = pax.get("path", longname or info.name)
            if "size" in pax:
                info.size = int(pax["size"])
            info.pax_headers = dict(pax)
            pax, longname = {}, None
            yield info

    def data(self, size):
        """The member's bytes in pieces, then its padding is skipped."""
        left = size
        if self.head:
            piece = self.head[:left]
            self.head = self.head[len(piece):]
            left -= len(piece)
            if piece:
                yield piece
        while left:
            piece = self.src.read(min(CHUNK, left))
            if not piece:
                raise Failure("protocol", "the stream ended %d bytes before the end of a file" % left)
            if len(piece) > left:
                self.head, piece = piece[left:], piece[:left]
            left -= len(piece)
            yield piece
        pad = -size % tarfile.BLOCKSIZE
        if pad and len(self._exact(pad)) != pad:
            raise Failure("protocol", "the tar stream ended inside a file's padding")


def parse_pax(data):
    out, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            raise Failure("protocol", "broken PAX header")
        record = data[space + 1 : pos + length - 1]
        key, _, value = record.partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        if length <= 0:
            break
        pos += length
    return out
