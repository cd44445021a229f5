"""The typed records at the edges: what the agent says of a sent file, and what staging's progress
file keeps of a verified one, read from the wire or the file and written back unchanged."""

from __future__ import annotations

import json
import os

import pytest

from ckptsync.agent import hash_file
from ckptsync.commit import record, staged_copy, usable_staged
from ckptsync.server import FileStat, Sent
from ckptsync.server.remote import sent_record
from ckptsync.stores.directory import DirectoryStore
from ckptsync.stores.manifest import FileRecord, Manifest, Verified

WHOLE = {"member": "c/a.bin", "source": "c/a.bin", "size": 10, "mtime_ns": 5, "mode": 0o644, "hash": "ab",
         "offset": 4}


@pytest.mark.parametrize("wire, want", [
    (WHOLE, Sent("c/a.bin", size=10, hash="ab", mtime_ns=5, mode=0o644, offset=4)),
    ({**WHOLE, "start": 0, "file_size": 30},
     Sent("c/a.bin", size=10, hash="ab", mtime_ns=5, mode=0o644, offset=4, start=0, file_size=30)),
    ({**WHOLE, "changed": "modified while being read"},
     Sent("c/a.bin", size=10, hash="ab", mtime_ns=5, mode=0o644, offset=4, changed="modified while being read")),
    ({"member": "c/a.bin", "source": "c/a.bin", "error": "No such file: c/a.bin", "kind": "not_found"},
     Sent("c/a.bin", error="No such file: c/a.bin", kind="not_found")),
    ({**WHOLE, "size": "10"}, None),
    ({**WHOLE, "size": True}, None),
    ({**WHOLE, "hash": 7}, None),
    ({**WHOLE, "start": "0"}, None),
    ({**WHOLE, "error": ["x"]}, None),
], ids=["whole", "range", "changed", "unopened", "size-text", "size-bool", "hash-number", "start-text",
        "error-list"])
def test_a_send_record_from_the_wire(wire, want):
    assert sent_record(wire) == want


@pytest.mark.parametrize("sent, failed", [
    (Sent("m", size=1, hash="h"), ""),
    (Sent("m", changed="grew while being read"), "grew while being read"),
    (Sent("m", error="Permission denied: m", kind="permission"), "Permission denied: m"),
])
def test_a_send_record_says_why_its_bytes_cannot_be_kept(sent, failed):
    assert sent.failed == failed


LISTED = FileStat("c/a.bin", 3, 7, 0o644, ctime_ns=9, inode=11)
# As this version and the ones before it wrote progress files, key for key.
WRITTEN = [
    (record(3, 0o644, 7, "x", LISTED, hashes={}),
     {"size": 3, "mode": 0o644, "mtime_ns": 7, "xxh3_128": "x", "inode": 11, "ctime_ns": 9, "hashes": {}}),
    (record(3, 0o644, 7, "x", LISTED, placed="link", hashes={"sha1": "s"}),
     {"size": 3, "mode": 0o644, "mtime_ns": 7, "xxh3_128": "x", "inode": 11, "ctime_ns": 9, "placed": "link",
      "hashes": {"sha1": "s"}}),
]


@pytest.mark.parametrize("verified, old", WRITTEN, ids=["fetched", "placed"])
def test_a_progress_record_is_written_as_before_and_read_back(tmp_path, verified, old):
    store = DirectoryStore(tmp_path)
    (tmp_path / ".ckptsync" / "staging").mkdir(parents=True)
    store.save_progress("c", {"c/a.bin": verified})
    assert store.progress_path("c").read_text() == json.dumps({"c/a.bin": old})
    assert store.load_progress("c") == {"c/a.bin": verified}
    assert Verified.from_dict(old) == verified and verified.to_dict() == old


@pytest.mark.parametrize("old, want", [
    # before inode and ctime were recorded, and before hashes and placed existed
    ({"size": 3, "mode": 420, "mtime_ns": 7, "xxh3_128": "x"}, Verified(3, 420, 7, "x")),
    ({"size": 3, "mode": 420, "mtime_ns": 7, "xxh3_128": "x", "hashes": {"sha1": "s"}, "placed": "reflink"},
     Verified(3, 420, 7, "x", placed="reflink", hashes={"sha1": "s"})),
    ({"size": 3, "mode": 420, "mtime_ns": 7, "xxh3_128": "x", "hashes": None}, Verified(3, 420, 7, "x")),
    ({"size": 3, "mode": 420, "mtime_ns": 7}, None),
    ({"size": "3", "mode": 420, "mtime_ns": 7, "xxh3_128": "x"}, None),
    ({"size": 3, "mode": 420, "mtime_ns": 7, "xxh3_128": "x", "hashes": ["s"]}, None),
    (["c/a.bin", 3], None),
], ids=["oldest", "hashes-placed", "hashes-null", "no-hash", "size-text", "hashes-list", "not-an-object"])
def test_a_progress_record_from_the_file(old, want):
    assert Verified.from_dict(old) == want


def test_staging_left_by_an_older_version_is_committed_from_its_progress_file(tmp_path):
    """A progress file in the oldest format (no inode, ctime, hashes or placed), one record in it
    damaged: the intact files are still trusted, and the entry commits once every file is."""
    store = DirectoryStore(tmp_path)
    staged = store.staging("c") / "c"
    staged.mkdir(parents=True)
    files = {"c/a.bin": b"abc", "c/b.bin": b"hello"}
    for p, data in files.items():
        (store.staging("c") / p).write_bytes(data)
        os.utime(store.staging("c") / p, ns=(7, 7))
    old = {p: {"size": len(d), "mode": 0o644, "mtime_ns": 7, "xxh3_128": hash_file(store.staging("c") / p)}
           for p, d in files.items()}
    planned = Manifest(name="c", layout="trainer", kind="full", step=1,
                       files=[FileRecord(p, len(d), 0o644, 7, "") for p, d in files.items()])
    store.save_pending(planned)
    store.progress_path("c").write_text(json.dumps({**old, "c/b.bin": ["damaged"]}))
    assert set(usable_staged(store, "c", {f.path: f for f in planned.files}, check_hash=True)) == {"c/a.bin"}
    assert staged_copy(store, "c") is None

    store.progress_path("c").write_text(json.dumps(old))
    m = staged_copy(store, "c")
    assert m is not None
    assert [(f.path, f.size, f.xxh3_128) for f in m.files] == [(p, r["size"], r["xxh3_128"]) for p, r in old.items()]
