"""The ckptsync agent: runs on the server, stdlib only, Python 3.8+.

It is sent over the channel at every connection and executed from memory,
so nothing is left on the server. It imports nothing from ckptsync.

Protocol: frames on stdin/stdout, each a 5-byte header (type byte,
big-endian u32 length) and a payload. Requests and replies are JSON ("J");
errors are JSON ("X"); bulk data travels as "D" (raw tar bytes), "Z" (one
complete zstd frame of tar bytes), "Y" (a zstd frame of tar bytes split into
byte lanes, see split_lanes) or "S" (a piece of one continuous zstd stream),
then "E" ends the data. "H" carries one file's checksum record
while a tar stream is being sent. Paths only ever travel inside frames.
"""

import hashlib
import json
import os
import pickletools
import queue
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zipfile

PROTOCOL = 1
CHUNK = 1 << 20
HEADER = struct.Struct(">cI")
STAGING_PREFIX = ".ckptsync-staging-"
TRASH_PREFIX = ".ckptsync-trash-"

try:
    import xxhash  # type: ignore
except ImportError:
    xxhash = None
try:
    import zstandard  # type: ignore
except ImportError:
    zstandard = None


class Failure(Exception):
    def __init__(self, kind, message, path=""):
        Exception.__init__(self, message)
        self.kind = kind
        self.message = message
        self.path = path


def os_failure(exc, path):
    kinds = {
        "FileNotFoundError": "not_found",
        "PermissionError": "permission",
        "IsADirectoryError": "is_dir",
        "NotADirectoryError": "not_dir",
        "FileExistsError": "exists",
    }
    kind = kinds.get(type(exc).__name__, "os")
    if getattr(exc, "errno", None) == 28:
        kind = "no_space"
    return Failure(kind, "%s: %s" % (exc.strerror or exc, path), path)


# ---------------------------------------------------------------- framing


class Channel:
    def __init__(self, rfile, wfile):
        self.rfile = rfile
        self.wfile = wfile
        self.lock = threading.Lock()

    def send(self, kind, payload=b""):
        with self.lock:
            self.wfile.write(HEADER.pack(kind, len(payload)))
            if payload:
                self.wfile.write(payload)
            self.wfile.flush()

    def send_json(self, obj, kind=b"J"):
        self.send(kind, json.dumps(obj).encode("utf-8"))

    def recv(self):
        head = self._exact(HEADER.size)
        if head is None:
            return None, None
        kind, size = HEADER.unpack(head)
        body = self._exact(size) if size else b""
        if body is None:
            raise Failure("protocol", "connection closed mid-frame")
        return kind, body

    def _exact(self, n):
        parts = []
        while n:
            piece = self.rfile.read(n)
            if not piece:
                if parts:
                    raise Failure("protocol", "connection closed mid-frame")
                return None
            parts.append(piece)
            n -= len(piece)
        return b"".join(parts)


# ---------------------------------------------------------------- hashing


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


def zstd_binary():
    return shutil.which("zstd")


def hash_file(path, alg="xxh3_128", on_block=None):
    h = new_hash(alg)
    with open(path, "rb") as f:
        while True:
            block = f.read(CHUNK)
            if not block:
                break
            h.update(block)
            if on_block is not None:
                on_block(len(block))
    return h.hexdigest()


# ---------------------------------------------------------------- paths


def resolve(root, rel=""):
    base = os.path.expanduser(root)
    if not rel:
        return base
    if "\x00" in rel:
        raise Failure("bad_path", "path contains a NUL byte")
    return os.path.normpath(os.path.join(base, os.path.expanduser(rel)))


def safe_member(name):
    """A tar member name we accept for writing: relative, no '..', no empties."""
    if not name or name.startswith("/") or "\x00" in name:
        return False
    parts = name.split("/")
    return all(p not in ("", ".", "..") for p in parts)


# ---------------------------------------------------------------- scanning

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


def op_scan(req):
    root = resolve(req["root"])
    max_files = int(req.get("max_files", 200000))
    if not os.path.exists(root):
        raise Failure("not_found", "remote directory does not exist: %s" % root, root)
    if not os.path.isdir(root):
        raise Failure("not_dir", "not a directory: %s" % root, root)
    if not os.access(root, os.R_OK | os.X_OK):
        raise Failure("permission", "permission denied: %s" % root, root)
    files = []
    meta = {}
    errors = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: errors.append(str(e))):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".ckptsync"))
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.join(rel_dir, name) if rel_dir else name
            try:
                st = os.lstat(full)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            files.append([rel, st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode)])
            if name in META_NAMES or name == "latest":
                meta[rel] = read_meta(full, name)
            elif name.endswith(".pt") and (not rel_dir or name == "state.pt") and req.get("pt_meta", True):
                summary = pt_summary(full)
                if summary is not None:
                    meta[rel] = {"__pt__": summary}
            if len(files) >= max_files:
                errors.append("listing truncated at %d files" % max_files)
                break
    return {"root": os.path.abspath(root), "files": files, "meta": meta, "now": time.time(), "errors": errors}


def op_stat(req):
    out = {}
    for rel in req["paths"]:
        try:
            st = os.stat(resolve(req["root"], rel))
            out[rel] = [st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode), stat.S_ISDIR(st.st_mode)]
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


def op_procs(req):
    pattern = req.get("pattern") or ""
    found = []
    if pattern:
        me = os.getpid()
        for pid in os.listdir("/proc") if os.path.isdir("/proc") else []:
            if not pid.isdigit() or int(pid) == me:
                continue
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as f:
                    cmd = f.read().replace(b"\x00", b" ").decode("utf-8", "replace").strip()
            except OSError:
                continue
            if pattern in cmd and "ckptsync-agent" not in cmd:
                found.append([int(pid), cmd[:200]])
    gpu = None
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            res = subprocess.run(
                [smi, "--query-compute-apps=pid,process_name,used_memory", "--format=csv,noheader"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=20,
            )
            gpu = [line.strip() for line in res.stdout.decode("utf-8", "replace").splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            gpu = None
    return {"procs": found, "gpu": gpu}


# ---------------------------------------------------------------- sending

LANES = 4
DATA_FRAMES = (b"D", b"Z", b"Y", b"S")


def split_lanes(chunk):
    """Byte k of every 4-byte word, for k = 0..3, one lane after another.

    Checkpoints are mostly fp32/bf16 tensors: the sign and exponent bytes of
    neighbouring values are nearly alike, and grouped together they compress
    far better than interleaved with mantissa noise.
    """
    return b"".join(chunk[k::LANES] for k in range(LANES))


def join_lanes(data):
    n = len(data)
    out = bytearray(n)
    view = memoryview(data)
    pos = 0
    for k in range(LANES):
        size = (n - k + LANES - 1) // LANES
        out[k::LANES] = view[pos:pos + size]
        pos += size
    return out


class Sender:
    """Frames a tar byte stream, compressing it when that makes it arrive sooner.

    With a receiver that decompresses with the zstandard module, each chunk
    is sent raw ("D") or as its own zstd frame ("Z", or "Y" when splitting
    it into byte lanes first packs it smaller), chosen per chunk from
    measured compression and link rates. A receiver with only the zstd
    binary gets raw chunks, then at most one switch to a continuous "S"
    stream, which keeps its bytes in order through the binary.
    """

    WARMUP = 16     # chunks sent compressed, untimed, until the pipe and window are full
    PROBE = 16      # chunks timed per mode when probing
    EXPLOIT = 192   # chunks sent in the faster mode before probing again; doubles while the same mode
    MAX_EXPLOIT = 1536  # keeps winning, since every probe of the slower mode costs time
    SETTLE = 8      # untimed chunks after a switch: the queue and the channel still drain the other mode
    LANE_CHECK = 32  # every so many compressed chunks, try both with and without byte lanes
    learned = None   # the last stream's verdict: the next one on this connection starts from it

    def __init__(self, chan, compress, receiver_zstd="module"):
        self.chan = chan
        self.compress = compress  # "off", "auto" or an int level
        self.buf = bytearray()
        self.queue = queue.Queue(maxsize=4)
        self.write_seconds = 1e-9
        self.wire_bytes = 0
        self.raw_bytes = 0
        self.comp_rate = None
        self.ratio = None
        self.chunks = 0
        self.error = None
        self.stream = None
        self.zc = None
        self.plan_mode = "raw"
        self.seg_len = self.PROBE
        self.seg_start = None
        self.seg_bytes = 0
        self.seg_chunks = 0
        self.settle = self.SETTLE  # warm-up chunks are zstd; the first probe is raw
        self.lanes = None          # is splitting into byte lanes worth it? None: not tried yet
        self.packed_chunks = 0
        self.rates = {}
        self.exploiting = False
        self.exploit = self.EXPLOIT
        self.winner = None
        self.warmup = self.WARMUP
        if compress == "auto" and Sender.learned is not None:
            self.winner, self.exploit, self.lanes = Sender.learned
            self.plan_mode, self.seg_len, self.exploiting = self.winner, self.exploit, True
            self.warmup, self.settle = 0, 0
        level = 1 if compress == "auto" else (0 if compress == "off" else int(compress))
        self.level = max(1, min(level, 19))
        can_local = zstandard is not None or zstd_binary() is not None
        self.per_chunk = receiver_zstd == "module" and zstandard is not None
        self.enabled = compress != "off" and receiver_zstd is not None and can_local
        if self.enabled and self.per_chunk:
            self.zc = zstandard.ZstdCompressor(level=self.level)
        self.writer = threading.Thread(target=self._write_loop)
        self.writer.daemon = True
        self.writer.start()
        if self.enabled and not self.per_chunk and compress != "auto":
            self._start_stream()

    def _write_loop(self):
        while True:
            item = self.queue.get()
            if item is None:
                return
            kind, payload = item
            start = time.perf_counter()
            try:
                self.chan.send(kind, payload)
            except Exception as exc:
                self.error = exc
                continue
            if kind in DATA_FRAMES:
                self.write_seconds += time.perf_counter() - start
                self.wire_bytes += len(payload)

    def _put(self, kind, payload):
        if self.error is not None:
            raise Failure("protocol", "connection lost: %s" % self.error)
        self.queue.put((kind, bytes(payload)))

    def _start_stream(self):
        if zstandard is not None:
            self.stream = ZstdStream(zstandard.ZstdCompressor(level=self.level, threads=-1).compressobj(), self._put)
        else:
            self.stream = BinaryStream(self.level, self._put)

    def write(self, data):
        if not self.buf and len(data) == CHUNK:
            self._emit(data)  # whole chunks of file data pass through without a copy
            return
        self.buf += data
        while len(self.buf) >= CHUNK:
            self._emit(self.buf[:CHUNK])
            del self.buf[:CHUNK]

    def flush(self):
        if self.buf:
            self._emit(self.buf)
            self.buf = bytearray()

    def net_rate(self):
        return self.wire_bytes / self.write_seconds

    def _emit(self, chunk):
        self.raw_bytes += len(chunk)
        self.chunks += 1
        if self.stream is not None:
            self.stream.write(bytes(chunk))
        elif not self.enabled:
            self._put(b"D", chunk)
        elif not self.per_chunk:
            self._put(b"D", chunk)
            if self.chunks == 64:
                self._maybe_start_stream(chunk)
        elif self.compress != "auto":
            kind, packed = self._pack(chunk)
            self._put(kind, packed)
        else:
            self._adaptive(chunk)

    def _pack(self, chunk):
        """One zstd frame of the chunk, split into byte lanes when that has been packing smaller."""
        full = len(chunk) == CHUNK  # tar headers and file tails say little about the data
        if full:
            self.packed_chunks += 1
        if full and (self.lanes is None or self.packed_chunks % self.LANE_CHECK == 0):
            plain = self.zc.compress(bytes(chunk))
            laned = self.zc.compress(split_lanes(chunk))
            self.lanes = len(laned) < 0.97 * len(plain)
            return (b"Y", laned) if self.lanes else (b"Z", plain)
        if self.lanes:
            return b"Y", self.zc.compress(split_lanes(chunk))
        return b"Z", self.zc.compress(bytes(chunk))

    def _measure(self, chunk, packed, spent):
        rate = len(chunk) / max(spent, 1e-9)
        ratio = len(packed) / float(len(chunk))
        self.comp_rate = rate if self.comp_rate is None else 0.7 * self.comp_rate + 0.3 * rate
        self.ratio = ratio if self.ratio is None else 0.7 * self.ratio + 0.3 * ratio

    def _worth(self):
        # For the one-way switch to a stream: compressing must outrun the link and save bytes.
        return self.ratio is not None and self.ratio < 0.97 and self.comp_rate > 1.25 * self.net_rate()

    def _adaptive(self, chunk):
        """Per chunk, raw or zstd, by the throughput each has actually achieved.

        Both ends share CPU with ssh's own crypto, so a rule based on
        compression speed alone misjudges fast links. Instead, short
        segments of each mode are timed end to end (back-pressure from the
        bounded send queue makes the time reflect the whole pipeline), the
        faster mode is used for a long stretch, then both are probed again.
        """
        now = time.perf_counter()
        if self.seg_start is None:
            self.seg_start = now
        mode = self.plan_mode
        if self.chunks <= self.warmup:
            # Until the buffers between here and the link are full, sends return at
            # once and any timing flatters whichever mode goes first.
            mode = "zstd"
            self.seg_start = now
        if mode == "zstd":
            start = time.perf_counter()
            kind, packed = self._pack(chunk)
            self._measure(chunk, packed, time.perf_counter() - start)
            if len(packed) < len(chunk):
                self._put(kind, packed)
            else:
                self._put(b"D", chunk)
        else:
            self._put(b"D", chunk)
        if self.chunks <= self.warmup:
            return
        if self.settle:
            self.settle -= 1
            self.seg_start = time.perf_counter()
            return
        self.seg_bytes += len(chunk)
        self.seg_chunks += 1
        if self.seg_chunks >= self.seg_len:
            self._next_segment(time.perf_counter())

    def _next_segment(self, now):
        before = self.plan_mode
        self._plan(now)
        if self.plan_mode != before:
            self.settle = self.SETTLE

    def _plan(self, now):
        rate = self.seg_bytes / max(now - self.seg_start, 1e-9)
        self.rates[self.plan_mode] = rate
        self.seg_start, self.seg_bytes, self.seg_chunks = now, 0, 0
        if self.ratio is not None and self.ratio > 0.97:
            # incompressible data: stop trying for a while
            self.plan_mode, self.seg_len, self.exploiting = "raw", self.EXPLOIT, True
            self.rates.pop("zstd", None)
            self.ratio = None
            return
        missing = [m for m in ("raw", "zstd") if m not in self.rates]
        if missing:
            self.plan_mode, self.seg_len, self.exploiting = missing[0], self.PROBE, False
            return
        if self.exploiting:
            # re-probe the other mode; conditions (link, CPU, data) change
            other = "raw" if self.plan_mode == "zstd" else "zstd"
            self.rates.pop(other, None)
            self.plan_mode, self.seg_len, self.exploiting = other, self.PROBE, False
            return
        winner = "zstd" if self.rates["zstd"] > 1.05 * self.rates["raw"] else "raw"
        self.exploit = min(2 * self.exploit, self.MAX_EXPLOIT) if winner == self.winner else self.EXPLOIT
        self.winner = winner
        self.plan_mode, self.seg_len, self.exploiting = winner, self.exploit, True

    def _maybe_start_stream(self, sample):
        start = time.perf_counter()
        if zstandard is not None:
            packed = zstandard.ZstdCompressor(level=self.level).compress(bytes(sample))
        else:
            try:
                packed = subprocess.run(
                    [zstd_binary(), "-q", "-c", "-%d" % self.level], input=bytes(sample),
                    stdout=subprocess.PIPE, timeout=30,
                ).stdout
            except (OSError, subprocess.SubprocessError):
                return
        self._measure(sample, packed, time.perf_counter() - start)
        if self._worth():
            self._start_stream()

    def close(self):
        self.flush()
        if self.stream is not None:
            self.stream.close()
        self.queue.put(None)
        self.writer.join()
        if self.winner is not None:
            Sender.learned = (self.winner, self.exploit, self.lanes)
        if self.error is not None:
            raise Failure("protocol", "connection lost: %s" % self.error)


class ZstdStream:
    def __init__(self, cobj, put):
        self.cobj = cobj
        self.put = put

    def write(self, data):
        out = self.cobj.compress(data)
        if out:
            self.put(b"S", out)

    def close(self):
        out = self.cobj.flush()
        if out:
            self.put(b"S", out)


class BinaryStream:
    """A zstd process compressing our tar bytes; a thread frames its output."""

    def __init__(self, level, put):
        self.proc = subprocess.Popen(
            [zstd_binary(), "-q", "-c", "-%d" % level, "-T0"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        self.put = put
        self.failed = None
        self.thread = threading.Thread(target=self._pump)
        self.thread.daemon = True
        self.thread.start()

    def _pump(self):
        try:
            while True:
                block = self.proc.stdout.read1(CHUNK)
                if not block:
                    return
                self.put(b"S", block)
        except Exception as exc:
            self.failed = exc

    def write(self, data):
        self.proc.stdin.write(data)

    def close(self):
        self.proc.stdin.close()
        self.thread.join()
        self.proc.wait()
        if self.failed is not None:
            raise Failure("protocol", "compression failed: %s" % self.failed)


def tar_header(name, size, mtime_ns, mode):
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime_ns // 1000000000
    info.mode = mode
    info.type = tarfile.REGTYPE
    info.uname = info.gname = ""
    info.pax_headers = {"ckptsync.mtime_ns": str(mtime_ns)}
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def send_one(sender, chan, source, member, alg):
    record = {"member": member, "source": source}
    try:
        f = open(source, "rb")
    except OSError as exc:
        record["error"] = str(os_failure(exc, source))
        record["kind"] = os_failure(exc, source).kind
        chan_put_record(sender, record)
        return
    with f:
        before = os.fstat(f.fileno())
        size = before.st_size
        sender.write(tar_header(member, size, before.st_mtime_ns, stat.S_IMODE(before.st_mode)))
        sender.flush()  # so the file's data starts on a chunk boundary
        h = new_hash(alg)
        left = size
        while left:
            block = f.read(min(CHUNK, left))
            if not block:
                break
            h.update(block)
            sender.write(block)
            left -= len(block)
        if left:
            sender.write(b"\x00" * left)  # the file shrank under us: keep the tar well-formed
        if f.read(1):
            record["changed"] = "grew while being read"
        after = os.fstat(f.fileno())
        try:
            now = os.stat(source)
            if now.st_ino != before.st_ino:
                record["changed"] = "replaced while being read"
        except OSError:
            record["changed"] = "deleted while being read"
        if left:
            record["changed"] = "shrank while being read"
        elif after.st_mtime_ns != before.st_mtime_ns or after.st_size != before.st_size:
            record.setdefault("changed", "modified while being read")
        pad = (-size) % tarfile.BLOCKSIZE
        if pad:
            sender.write(b"\x00" * pad)
    record.update(size=size, mtime_ns=before.st_mtime_ns, mode=stat.S_IMODE(before.st_mode), hash=h.hexdigest())
    chan_put_record(sender, record)


def chan_put_record(sender, record):
    sender.flush()
    sender._put(b"H", json.dumps(record).encode("utf-8"))


def op_send(chan, req):
    """Stream files as one tar: [[source relative to root or absolute, member name], ...]."""
    alg = req.get("alg") or hash_names()[0]
    new_hash(alg)
    root = req["root"]
    chan.send_json({"ok": True, "alg": alg})
    sender = Sender(chan, req.get("compress", "auto"), "module")
    for source, member in req["files"]:
        send_one(sender, chan, resolve(root, source), member, alg)
    sender.write(b"\x00" * (2 * tarfile.BLOCKSIZE))
    sender.close()
    chan.send(b"E")
    return {"raw_bytes": sender.raw_bytes, "wire_bytes": sender.wire_bytes, "chunks": sender.chunks}


# ---------------------------------------------------------------- receiving


class FrameReader:
    """File-like view of the tar bytes arriving as D/Z/S frames until E."""

    def __init__(self, chan, other=None):
        self.chan = chan
        self.other = other
        self.pending = bytearray()
        self.done = False
        self.dz = zstandard.ZstdDecompressor() if zstandard is not None else None
        self.dstream = None
        self.proc = None
        self.proc_out = queue.Queue()

    def _start_proc(self):
        binary = zstd_binary()
        if binary is None:
            raise Failure("unsupported", "no zstd on this server to decompress the stream")
        self.proc = subprocess.Popen([binary, "-q", "-d", "-c"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)

        def pump():
            while True:
                block = self.proc.stdout.read1(CHUNK) if hasattr(self.proc.stdout, "read1") else self.proc.stdout.read(CHUNK)
                self.proc_out.put(block)
                if not block:
                    return

        t = threading.Thread(target=pump)
        t.daemon = True
        t.start()

    def _fill(self):
        if self.proc is not None and self.done:
            block = self.proc_out.get()
            if block:
                self.pending += block
                return True
            return False
        if self.done:
            return False
        kind, body = self.chan.recv()
        if kind is None:
            raise Failure("protocol", "connection closed during transfer")
        self._absorb(kind, body)
        return True

    def _absorb(self, kind, body):
        if kind == b"D":
            self.pending += body
        elif kind == b"Z":
            if self.dz is not None:
                self.pending += self.dz.decompress(body)
            else:
                if self.proc is None:
                    self._start_proc()
                self.proc.stdin.write(body)
        elif kind == b"Y":
            if self.dz is None:
                raise Failure("protocol", "byte-lane frame sent to a receiver without the zstandard module")
            self.pending += join_lanes(self.dz.decompress(body))
        elif kind == b"S":
            if self.dz is not None:
                if self.dstream is None:
                    self.dstream = self.dz.decompressobj()
                self.pending += self.dstream.decompress(body)
            else:
                if self.proc is None:
                    self._start_proc()
                self.proc.stdin.write(body)
        elif kind == b"E":
            self.done = True
            if self.proc is not None:
                self.proc.stdin.close()
        elif self.other is not None:
            self.other(kind, body)
        else:
            raise Failure("protocol", "unexpected frame %r during transfer" % kind)
        if self.proc is not None:
            while not self.proc_out.empty():
                block = self.proc_out.get()
                if block:
                    self.pending += block
                else:
                    self.proc_out.put(block)
                    break

    def read(self, n=-1):
        want = n if n is not None and n >= 0 else 1 << 62
        if not self.pending and self.proc is None and not self.done:
            # Fast path: hand over a whole raw frame without copying it.
            kind, body = self._peek_raw()
            if kind == b"D" and len(body) <= want:
                return body
            if kind is not None:
                self._absorb(kind, body)
        while len(self.pending) < want and self._fill():
            pass
        out = bytes(self.pending[:want])
        del self.pending[:want]
        return out

    def _peek_raw(self):
        kind, body = self.chan.recv()
        if kind is None:
            raise Failure("protocol", "connection closed during transfer")
        return kind, body

    def drain(self):
        while not self.done:
            kind, body = self.chan.recv()
            if kind is None or kind == b"E":
                self.done = True
            elif kind not in DATA_FRAMES and self.other is not None:
                self.other(kind, body)


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


NUL_BLOCK = bytes(tarfile.BLOCKSIZE)


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


def start_writeback(fd):
    """Start writing the file out now without waiting; the fsync before commit then finds little to do."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


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


def op_receive(chan, req):
    """Write an incoming tar into root/.ckptsync-staging-<name>/, hashing each file."""
    root = resolve(req["root"])
    name = req["name"]
    if not safe_member(name) or "/" in name:
        raise Failure("bad_path", "bad staging name %r" % name)
    alg = req.get("alg") or hash_names()[0]
    new_hash(alg)
    staging = os.path.join(root, STAGING_PREFIX + name)
    try:
        os.makedirs(staging, exist_ok=True)
    except OSError as exc:
        raise os_failure(exc, staging)
    chan.send_json({"ok": True, "alg": alg, "staging": staging})
    reader = FrameReader(chan)
    results = []
    failure = None
    written = []
    try:
        stream = TarStream(reader)
        for member in stream.members():
            if not member.isreg() or not safe_member(member.name):
                raise Failure("bad_member", "refusing tar member %r" % member.name, member.name)
            target = os.path.join(staging, *member.name.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            h = new_hash(alg)
            tmp = target + ".part"
            with open(tmp, "wb") as out:
                for block in stream.data(member.size):
                    h.update(block)
                    out.write(block)
                out.flush()
                start_writeback(out.fileno())
            os.chmod(tmp, member.mode & 0o7777)
            mtime_ns = int(member.pax_headers.get("ckptsync.mtime_ns", int(member.mtime) * 1000000000))
            os.utime(tmp, ns=(mtime_ns, mtime_ns))
            os.replace(tmp, target)
            written.append(target)
            results.append({"member": member.name, "size": member.size, "hash": h.hexdigest()})
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
    for path in written:  # everything reaches the disk before the client may commit
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for dirpath, _dirs, _files in os.walk(staging):
        fsync_dir(dirpath)
    return {"files": results, "staging": staging}


def op_commit(req):
    """Move a staged directory (or staged files) into place, atomically per item."""
    root = resolve(req["root"])
    staging = os.path.join(root, STAGING_PREFIX + req["name"])
    force = bool(req.get("force"))
    done = []
    kept = []
    for member, dest in req["moves"]:
        src = os.path.join(staging, *member.split("/")) if member else staging
        target = resolve(root, dest)
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
            fsync_dir(parent)
            done.append(dest)
        except OSError as exc:
            raise os_failure(exc, target)
    if os.path.isdir(staging) and not os.listdir(staging):
        os.rmdir(staging)
    return {"moved": done, "kept": kept}


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
    staging = os.path.join(root, STAGING_PREFIX + req["name"])
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
    remove_tree(os.path.join(root, STAGING_PREFIX + req["name"]))
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


def op_hello(_req):
    zstd = "module" if zstandard is not None else ("binary" if zstd_binary() else None)
    return {
        "protocol": PROTOCOL,
        "python": "%d.%d.%d" % sys.version_info[:3],
        "zstd": zstd,
        "hashes": hash_names(),
        "hostname": socket.gethostname(),
        "home": os.path.expanduser("~"),
        "pid": os.getpid(),
        "now": time.time(),
    }


SIMPLE = {
    "hello": op_hello,
    "scan": op_scan,
    "stat": op_stat,
    "hash": op_hash,
    "df": op_df,
    "procs": op_procs,
    "commit": op_commit,
    "staged": op_staged,
    "discard": op_discard,
    "remove": op_remove,
    "mkdir": op_mkdir,
}
STREAMING = {"send": op_send, "receive": op_receive}


def serve(chan):
    while True:
        try:
            kind, body = chan.recv()
        except Failure:
            return
        if kind is None:
            return
        if kind != b"J":
            chan.send_json({"kind": "protocol", "message": "expected a request, got %r" % kind}, b"X")
            continue
        try:
            req = json.loads(body.decode("utf-8"))
            op = req.get("op")
            if op == "bye":
                chan.send_json({})
                return
            if op in SIMPLE:
                chan.send_json(SIMPLE[op](req))
            elif op in STREAMING:
                chan.send_json(STREAMING[op](chan, req))
            else:
                raise Failure("unknown_op", "unknown operation %r" % op)
        except Failure as exc:
            chan.send_json({"kind": exc.kind, "message": exc.message, "path": exc.path}, b"X")
        except OSError as exc:
            failure = os_failure(exc, getattr(exc, "filename", "") or "")
            chan.send_json({"kind": failure.kind, "message": failure.message, "path": failure.path}, b"X")
        except Exception as exc:  # report, keep serving: the client decides
            chan.send_json({"kind": "internal", "message": "%s: %s" % (type(exc).__name__, exc)}, b"X")


def main():
    serve(Channel(sys.stdin.buffer, sys.stdout.buffer))


if __name__ == "__main__":
    main()
