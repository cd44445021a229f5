"""Finishing files that arrived as byte ranges over several channels."""

import os

from ckptsync.agent.frames import Failure, os_failure
from ckptsync.agent.hashing import fsync_dir, hash_file, hash_names
from ckptsync.agent.paths import resolve, safe_member
from ckptsync.agent.fileops import staging_dir


def op_assemble(req):
    """For each {member, size, mode, mtime_ns}: cut the staged .part to its size, hash it whole,
    make it durable, give it its mode and mtime and rename it to the member's name. The client
    compares each hash with the backup's before it commits."""
    root = resolve(req["root"])
    staging = staging_dir(root, req["name"])
    alg = req.get("alg") or hash_names()[0]
    out = []
    for item in req["files"]:
        member = item.get("member")
        if not isinstance(member, str) or not safe_member(member):
            raise Failure("bad_path", "bad staged member %r" % (member,))
        target = os.path.join(staging, *member.split("/"))
        tmp = target + ".part"
        try:
            size = int(item["size"])
            with open(tmp, "r+b") as f:
                if os.fstat(f.fileno()).st_size < size:
                    raise Failure("protocol", "%s: ranges missing (%d of %d bytes)"
                                  % (member, os.fstat(f.fileno()).st_size, size), member)
                f.truncate(size)
                f.flush()
                os.fsync(f.fileno())
            digest = hash_file(tmp, alg)
            os.chmod(tmp, int(item["mode"]) & 0o7777)
            mtime_ns = int(item["mtime_ns"])
            os.utime(tmp, ns=(mtime_ns, mtime_ns))
            os.replace(tmp, target)
            fsync_dir(os.path.dirname(target))
        except OSError as exc:
            raise os_failure(exc, tmp)
        out.append({"member": member, "size": size, "hash": digest})
    return {"files": out}
