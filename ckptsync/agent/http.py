"""File bytes between the server's disk and presigned URLs of a bucket, over http.client.

The client sends URLs that expire, never a key: each item names a byte range of a
file (an upload or one part of a multipart upload) or a staged member (a download)
and the URL to move it through. Items run on a few threads; each reply says, per
item, what the bucket answered (the ETag) and the MD5 and hash of the bytes moved.
"""

# http.client is imported inside the functions that use it: it brings ssl and email, a large
# part of the agent's start-up on the server, and most runs never talk to a bucket.
import hashlib
import os
import re
import threading

from ckptsync.agent.frames import CHUNK, Failure, os_failure, tick
from ckptsync.agent.hashing import fsync_dir, new_hash, start_writeback
from ckptsync.agent.paths import resolve, safe_member
from ckptsync.agent.fileops import staging_dir

HTTP_TIMEOUT = 120
MAX_WORKERS = 16
ERROR_CODE = re.compile(r"<Code>([^<]{1,64})</Code>")


def _endpoint(url):
    import urllib.parse  # here, not at the top: only a bucket's transfers need it

    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Failure("bad_url", "not an http(s) URL")
    return parts


def _where(parts):
    return "%s://%s" % (parts.scheme, parts.netloc)


class Connections:
    """One keep-alive connection per endpoint for one worker thread."""

    def __init__(self):
        self.open = {}

    def get(self, parts):
        import http.client

        key = (parts.scheme, parts.netloc)
        conn = self.open.get(key)
        if conn is None:
            cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
            conn = cls(parts.hostname, parts.port, timeout=HTTP_TIMEOUT)
            try:
                conn.connect()
            except OSError as exc:   # a timeout too
                raise Failure("unreachable", "cannot reach %s from this server: %s" % (_where(parts), exc))
            self.open[key] = conn
        return conn

    def drop(self, parts):
        conn = self.open.pop((parts.scheme, parts.netloc), None)
        if conn is not None:
            conn.close()

    def close(self):
        for conn in self.open.values():
            conn.close()
        self.open.clear()


def _answer(resp, parts, method):
    body = resp.read()
    if 200 <= resp.status < 300:
        return body
    code = ERROR_CODE.search(body.decode("utf-8", "replace"))
    raise Failure("http", "%s %s answered %d %s" % (method, _where(parts), resp.status,
                                                     code.group(1) if code else resp.reason))


def _exchange(conns, url, method, send_body, on_response):
    """One request; a kept-alive connection the bucket closed meanwhile is opened again once."""
    import http.client

    parts = _endpoint(url)
    target = parts.path + ("?" + parts.query if parts.query else "")
    for attempt in (0, 1):
        fresh = (parts.scheme, parts.netloc) not in conns.open
        conn = conns.get(parts)
        try:
            send_body(conn, target)
            resp = conn.getresponse()
            return on_response(resp, parts)
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            conns.drop(parts)
            if fresh or attempt:
                raise
        except (http.client.HTTPException, OSError):
            conns.drop(parts)
            raise


def put_range(conns, root, item, alg):
    path = resolve(root, item["path"])
    offset, length = int(item.get("offset", 0)), int(item["length"])
    sums = {}

    def send_body(conn, target):
        md5 = sums["md5"] = hashlib.md5()  # afresh for a retried request
        h = sums["hash"] = new_hash(alg) if alg else None
        conn.putrequest("PUT", target, skip_accept_encoding=True)
        conn.putheader("Content-Length", str(length))
        conn.endheaders()
        with open(path, "rb") as f:
            f.seek(offset)
            left = length
            while left:
                block = f.read(min(CHUNK, left))
                if not block:
                    raise Failure("changed", "the file became shorter while it was sent", item["path"])
                left -= len(block)
                md5.update(block)
                if h is not None:
                    h.update(block)
                conn.send(block)
                tick()

    def on_response(resp, parts):
        _answer(resp, parts, "PUT")
        return resp.getheader("ETag") or ""

    etag = _exchange(conns, item["url"], "PUT", send_body, on_response)
    out = {"etag": etag, "md5": sums["md5"].hexdigest(), "size": length}
    if sums["hash"] is not None:
        out["hash"] = sums["hash"].hexdigest()
    return out


def get_member(conns, staging, item, alg):
    member = item["member"]
    if not safe_member(member):
        raise Failure("bad_path", "bad member %r" % (member,))
    target_path = os.path.join(staging, *member.split("/"))
    tmp = target_path + ".part"
    os.makedirs(os.path.dirname(target_path), exist_ok=True)
    h = new_hash(alg)
    size = [0]

    def send_body(conn, target):
        conn.putrequest("GET", target, skip_accept_encoding=True)
        conn.endheaders()

    def on_response(resp, parts):
        if not 200 <= resp.status < 300:
            _answer(resp, parts, "GET")
        with open(tmp, "wb") as out:
            while True:
                block = resp.read(CHUNK)
                if not block:
                    break
                size[0] += len(block)
                h.update(block)
                out.write(block)
                tick()
            out.flush()
            start_writeback(out.fileno())
            os.fsync(out.fileno())

    _exchange(conns, item["url"], "GET", send_body, on_response)
    digest = h.hexdigest()
    if size[0] != int(item["size"]) or (item.get("hash") and digest != item["hash"]):
        os.unlink(tmp)
        raise Failure("integrity", "%s: the bucket sent %d bytes hashing %s, the manifest says %s bytes hashing %s"
                      % (member, size[0], digest, item["size"], item.get("hash")), member)
    os.chmod(tmp, int(item.get("mode", 0o644)) & 0o7777)
    mtime_ns = int(item.get("mtime_ns", 0))
    if mtime_ns:
        os.utime(tmp, ns=(mtime_ns, mtime_ns))
    os.replace(tmp, target_path)
    return {"member": member, "size": size[0], "hash": digest}


def run_items(items, workers, work):
    """work(conns, item) for every item on up to `workers` threads; results in item order, each
    a dict or {"error": kind, "message": ...}. Unreachable endpoints stop the whole call."""
    import http.client

    results = [None] * len(items)
    lock = threading.Lock()
    todo = list(range(len(items)))
    todo.reverse()

    def worker():
        conns = Connections()
        try:
            while True:
                with lock:
                    if not todo:
                        return
                    i = todo.pop()
                try:
                    results[i] = work(conns, items[i])
                except Failure as exc:
                    results[i] = {"error": exc.kind, "message": exc.message, "path": exc.path}
                except (http.client.HTTPException, OSError) as exc:
                    results[i] = {"error": "http", "message": "%s: %s" % (type(exc).__name__, exc)}
        finally:
            conns.close()

    count = max(1, min(int(workers or 1), MAX_WORKERS, len(items) or 1))
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if r is not None and r.get("error") == "unreachable":
            raise Failure("unreachable", r["message"])
    return results


def op_http_put(req):
    """Upload byte ranges of files under root to presigned PUT URLs."""
    root = req["root"]
    alg = req.get("alg") or ""
    return {"results": run_items(req.get("items") or [], req.get("workers", 4),
                                 lambda conns, item: put_range(conns, root, item, alg))}


def op_http_get(req):
    """Download objects through presigned GET URLs into the staging directory `name`, checking
    each against its size and hash before it counts as staged."""
    root = resolve(req["root"])
    staging = staging_dir(root, req["name"])
    alg = req.get("alg") or "xxh3_128"
    new_hash(alg)
    try:
        os.makedirs(staging, exist_ok=True)
    except OSError as exc:
        raise os_failure(exc, staging)
    results = run_items(req.get("items") or [], req.get("workers", 4),
                        lambda conns, item: get_member(conns, staging, item, alg))
    for dirpath, _dirs, _files in os.walk(staging):
        fsync_dir(dirpath)
    return {"results": results, "staging": staging}


def op_range_hash(req):
    """Hashes of byte ranges [path, offset, length]: which parts an interrupted upload already holds."""
    root = req["root"]
    alg = req.get("alg") or "md5"
    out = []
    for path, offset, length in req.get("ranges") or []:
        h = new_hash(alg)
        try:
            with open(resolve(root, path), "rb") as f:
                f.seek(int(offset))
                left = int(length)
                while left:
                    block = f.read(min(CHUNK, left))
                    if not block:
                        break
                    left -= len(block)
                    h.update(block)
                    tick()
            out.append(h.hexdigest() if not left else {"__error__": "shorter than the range"})
        except OSError as exc:
            out.append({"__error__": "%s" % (exc.strerror or exc)})
    return {"hashes": out}
