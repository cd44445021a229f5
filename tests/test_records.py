"""The typed records at the edges: what the agent says of a sent file, and what staging's progress
file keeps of a verified one, read from the wire or the file and written back unchanged."""

from __future__ import annotations

import json
import os

import pytest

from ckptsync.agent import hash_file
from ckptsync.commit import record, staged_copy, usable_staged
from ckptsync.policy import RunStatus, run_status
from ckptsync.server import FileStat, Sent
from ckptsync.server.remote import sent_record
from ckptsync.stores.directory import DirectoryStore
from ckptsync.stores.manifest import FileRecord, Manifest, Verified
from helpers import run_cli

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


# -------------------------------------------------- a run's status record (status.json)

# As this version and the ones before it wrote status.json, key for key: the first version's
# backup, a directory backup now, a bucket backup, a watch's cycle, and one run by cron.
FIRST = {"command": "backup", "time": 1_796_000_000.5, "exit_code": 0, "ok": True, "error": "", "target": "local",
         "server": "this machine", "fetched": ["checkpoint-8"], "failed": {}, "up_to_date": [],
         "skipped": {"checkpoint-12": "in progress"}, "raw_bytes": 10, "wire_bytes": 7, "seconds": 0.25}
NOW = {**FIRST, "scheduled": False, "restamped": [], "generations": ["checkpoint-4@1"], "not_backed_up": ["checkpoint-2"],
       "deleted_on_server": []}
BUCKET = {"command": "backup", "time": 1_796_000_000.5, "exit_code": 3, "ok": False, "error": "checkpoint-8: gone",
          "target": "t", "server": "tnr-0", "fetched": [], "failed": {"checkpoint-8": "gone"}, "up_to_date": ["c"],
          "scheduled": True, "store": "s3://b/t", "sent_bytes": 0, "copied_bytes": 5, "seconds": 1}
STATUSES = [FIRST, NOW, BUCKET, {**NOW, "command": "watch"}, {**NOW, "scheduled": True},
            {"time": 100, "exit_code": 11, "ok": False, "error": "in use"},    # as notices and old tests wrote it
            {**NOW, "resumed": ["checkpoint-8"], "agent": {"python": "3.8"}},  # keys a later version added
            {**NOW, "error": None, "store": None}]                             # known keys as null
STATUS_IDS = ["first-version", "directory", "bucket", "watch", "scheduled", "minimal", "unknown-keys", "nulls"]


@pytest.mark.parametrize("old", STATUSES, ids=STATUS_IDS)
def test_a_run_status_is_read_and_written_back_unchanged(tmp_path, old):
    status = RunStatus.from_dict(old)
    assert status is not None and status.to_dict() == old
    assert status.to_json() == json.dumps(old, indent=1, sort_keys=True)
    store = DirectoryStore(tmp_path)
    store.record_status(status)
    meta = tmp_path / ".ckptsync"
    assert (meta / "status.json").read_text() == json.dumps(old, indent=1, sort_keys=True)
    assert (meta / f"status-{'scheduled' if old.get('scheduled') else 'manual'}.json").read_bytes() == \
        (meta / "status.json").read_bytes()
    assert (meta / "history.jsonl").read_text() == json.dumps(old, sort_keys=True) + "\n"
    assert store.status() == status and store.status(status.kind) == status


def test_a_run_status_from_the_file_has_its_fields():
    status = RunStatus.from_dict({**NOW, "resumed": ["x"]})
    assert status == RunStatus(time=1_796_000_000.5, exit_code=0, ok=True, command="backup", error="", target="local",
                               server="this machine", scheduled=False, fetched=("checkpoint-8",), up_to_date=(),
                               not_backed_up=("checkpoint-2",), restamped=(), generations=("checkpoint-4@1",),
                               deleted_on_server=(), failed={}, skipped={"checkpoint-12": "in progress"},
                               raw_bytes=10, wire_bytes=7, seconds=0.25, extra={"resumed": ["x"]})
    assert status.kind == "manual" and RunStatus.from_dict(BUCKET).kind == "scheduled"
    assert RunStatus.from_dict(FIRST).scheduled is None and RunStatus.from_dict(FIRST).not_backed_up is None


def test_what_a_backup_run_records_is_what_it_recorded_before():
    status = run_status(1_796_000_000.5, 0, "", "local", "this machine", ["checkpoint-8"], {}, [], False,
                        restamped=[], generations=["checkpoint-4@1"], skipped={"checkpoint-12": "in progress"},
                        not_backed_up=["checkpoint-2"], deleted_on_server=[], raw_bytes=10, wire_bytes=7, seconds=0.25,
                        command="backup")
    assert status.to_dict() == NOW
    assert run_status(1_796_000_000.5, 3, "checkpoint-8: gone", "t", "tnr-0", [], {"checkpoint-8": "gone"}, ["c"],
                      True, store="s3://b/t", sent_bytes=0, copied_bytes=5, seconds=1).to_dict() == BUCKET


@pytest.mark.parametrize("damaged", [
    ["backup", 0], "ok", 3, None, {},
    {k: v for k, v in NOW.items() if k != "time"}, {k: v for k, v in NOW.items() if k != "ok"},
    {**NOW, "time": "yesterday"}, {**NOW, "time": None}, {**NOW, "time": True}, {**NOW, "exit_code": "0"},
    {**NOW, "exit_code": 0.0}, {**NOW, "ok": "yes"}, {**NOW, "scheduled": 1}, {**NOW, "error": ["x"]},
    {**NOW, "fetched": "checkpoint-8"}, {**NOW, "not_backed_up": 3}, {**NOW, "fetched": [8]},
    {**NOW, "failed": {"checkpoint-8": 1}}, {**NOW, "skipped": ["checkpoint-12"]}, {**NOW, "raw_bytes": 1.5},
    {**NOW, "seconds": "1"},
], ids=["list", "text", "number", "null", "empty", "no-time", "no-ok", "time-text", "time-null", "time-bool",
        "code-text", "code-float", "ok-text", "scheduled-int", "error-list", "fetched-text", "left-number",
        "fetched-numbers", "failed-numbers", "skipped-list", "bytes-float", "seconds-text"])
def test_a_damaged_run_status_is_no_status(tmp_path, damaged):
    assert RunStatus.from_dict(damaged) is None
    (tmp_path / ".ckptsync").mkdir()
    (tmp_path / ".ckptsync" / "status.json").write_text(json.dumps(damaged))
    assert DirectoryStore(tmp_path).status() is None


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe{}", b'{"time": 1, "exit_code": 0, "ok": true', b"[" * 100_000])
def test_a_status_file_that_is_not_json_is_no_status(tmp_path, raw):
    (tmp_path / ".ckptsync").mkdir()
    (tmp_path / ".ckptsync" / "status.json").write_bytes(raw)
    assert DirectoryStore(tmp_path).status() is None and RunStatus.from_json(raw) is None


@pytest.mark.parametrize("damaged", [["backup", 0], {**NOW, "time": "yesterday"}, {**NOW, "not_backed_up": 3},
                                     {**NOW, "fetched": "checkpoint-8"}],
                         ids=["list", "time-text", "left-number", "fetched-text"])
def test_commands_read_a_damaged_status_file_as_no_backup_recorded(server_tree, tmp_path, damaged):
    """list and checklist over a backup whose status.json was damaged: no traceback, and each says
    what it says when no run was recorded (cron show: test_cron.py)."""
    env = {"HOME": str(tmp_path), "CKPTSYNC_CONFIG": None, "CKPTSYNC_SCHEDULED": None}
    dest = tmp_path / "b"
    where = ["--remote-dir", server_tree, "--local-dir", dest]
    assert run_cli("backup", *where, env=env).returncode == 0
    status = dest / ".ckptsync" / "status.json"
    for name in ("status.json", "status-manual.json"):
        (dest / ".ckptsync" / name).write_text(json.dumps(damaged))

    listed = run_cli("list", *where, env=env)
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    assert "last backup:" not in listed.stdout and "checkpoint-12" in listed.stdout
    as_json = run_cli("--json", "list", *where, env=env)
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["last_backup"] is None, as_json.stderr
    checked = json.loads(run_cli("--json", "checklist", *where, env=env).stdout)
    assert {"name": "last backup succeeded", "ok": False,
            "detail": "no backup has run for this target"}.items() <= next(
        c for c in checked["checks"] if c["name"] == "last backup succeeded").items()
    assert status.read_text() == json.dumps(damaged)    # read, never rewritten


def test_keys_a_later_version_recorded_are_in_list_json(server_tree, tmp_path):
    env = {"HOME": str(tmp_path), "CKPTSYNC_CONFIG": None, "CKPTSYNC_SCHEDULED": None}
    dest = tmp_path / "b"
    where = ["--remote-dir", server_tree, "--local-dir", dest]
    assert run_cli("backup", *where, env=env).returncode == 0
    status = dest / ".ckptsync" / "status.json"
    later = {**json.loads(status.read_text()), "resumed": ["checkpoint-8"], "agent": {"python": "3.8"}, "error": None}
    status.write_text(json.dumps(later))
    listed = run_cli("--json", "list", *where, env=env)
    assert json.loads(listed.stdout)["last_backup"] == later
    assert "last backup: " in run_cli("list", *where, env=env).stdout


def test_a_manifest_as_a_dict_is_every_field_in_order_and_a_copy():
    from dataclasses import asdict

    from ckptsync.stores.manifest import FileRecord, Manifest

    m = Manifest("checkpoint-1", "hf-trainer", "full", 1,
                 [FileRecord("checkpoint-1/a", 1, 0o644, 5, "x" * 32),
                  FileRecord("checkpoint-1/b", 2, 0o600, 6, "y" * 32, hashes={"sha1": "z" * 40})],
                 state={"log": {"loss": [1.0, 0.5]}}, source={"host": "tnr-0"})
    want = asdict(m)
    del want["files"][0]["hashes"]   # xxh3-128 only: written as before other hashes existed
    got = m.to_dict()
    assert got == want
    assert list(got) == list(want) and [list(f) for f in got["files"]] == [list(f) for f in want["files"]]
    got["state"]["log"]["loss"].append(0.1)
    got["files"][1]["hashes"]["md5"] = "w"
    assert m.state == {"log": {"loss": [1.0, 0.5]}} and m.files[1].hashes == {"sha1": "z" * 40}
    assert Manifest.from_dict(m.to_dict()) == m
