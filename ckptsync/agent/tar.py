"""The tar format as the agent writes and reads it: regular files, PAX and GNU long names."""

import tarfile

from ckptsync.agent.frames import CHUNK, Failure

NUL_BLOCK = bytes(tarfile.BLOCKSIZE)


def tar_header(name, size, mtime_ns, mode, offset=0, start=None):
    """A PAX header; `offset`: the member's data starts that far into the file (a resumed one);
    `start`: the member is the byte range of the file that begins there."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime_ns // 1000000000
    info.mode = mode
    info.type = tarfile.REGTYPE
    info.uname = info.gname = ""
    info.pax_headers = {"ckptsync.mtime_ns": str(mtime_ns)}
    if offset:
        info.pax_headers["ckptsync.offset"] = str(offset)
    if start is not None:
        info.pax_headers["ckptsync.start"] = str(start)
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
