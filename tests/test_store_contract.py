"""One contract for every kind of store: the same assertions against a backup directory, a
bucket (a real SeaweedFS server, see test_s3.py) and an archive, through the methods of
stores.Store and its abilities only.

How an entry gets into a store differs by kind (a directory commits a staged entry, a bucket
writes its objects then its manifest, an archive is written again from a directory by
`ckptsync archive`): `put` below does that part, everything after it is the protocol. The cases
that write (trim, remove, lock, record status) run where the store has the ability to."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ckptsync.disk import new_hasher
from ckptsync.errors import Locked, NotFound
from ckptsync.policy import RunStatus
from ckptsync.stores import ability, is_archive, open_store
from ckptsync.stores.manifest import FileRecord, Manifest

boto3 = pytest.importorskip("boto3")

from test_s3 import ACCESS_KEY, SECRET_KEY, bucket, seaweed  # noqa: E402,F401  (fixtures)

KINDS = ["directory", "bucket", "archive"]
# What each kind can do beyond reading (stores/__init__.py): asked for by name, as the commands do.
ABILITIES = {"directory": {"files_here", "commit", "remove_entry", "drop_generation", "trim_generations", "lock",
                           "record_status", "clean_leftovers"},
             "bucket": {"check_objects", "remove_entry", "drop_generation", "trim_generations", "lock",
                        "record_status", "sweep"},
             "archive": {"files_here", "check_objects", "reads_data", "local_copy"}}


def manifest(name: str, data: bytes, when: float) -> Manifest:
    h = new_hasher()
    h.update(data)
    rec = FileRecord(path=f"{name}/model.pt", size=len(data), mode=0o644, mtime_ns=int(when * 1e9),
                     xxh3_128=h.hexdigest())
    return Manifest(name=name, layout="hf-trainer", kind="rolling", step=int(name.split("-")[-1]), files=[rec],
                    backed_up_at=when)


def put(store, name: str, data: bytes, when: float) -> None:
    """Store entry `name` (one file) as a backup of that kind does; a name in use is replaced and
    its earlier version kept."""
    m = manifest(name, data, when)
    if is_archive(store.location):    # an archive: its directory gets the entry, then is archived again
        from ckptsync.archive import ArchiveOptions, run_archive

        directory = open_store(store.location[:-len(".tar.zst")])
        put(directory, name, data, when)
        Path(store.location).unlink(missing_ok=True)
        run_archive(directory.root, ArchiveOptions(output=Path(store.location)))
        return
    if hasattr(store, "commit"):      # a directory: staged, then committed
        staged = store.staging(name) / name
        staged.mkdir(parents=True)
        (staged / "model.pt").write_bytes(data)
        store.commit(m)
        return
    from ckptsync.stores.bucket import Entry

    old = store.entries().get(name)
    if old is not None:
        store.keep_generation(old)
    etag = store.bucket.put(store.key(f"{name}/model.pt"), data)
    store.write_entry(Entry(m, {f"{name}/model.pt": etag}), replace=old is not None)


@pytest.fixture(params=KINDS)
def store(request, tmp_path, monkeypatch):
    if request.param == "directory":
        return open_store(tmp_path / "backups")
    if request.param == "archive":
        return open_store(tmp_path / "backups.tar.zst")
    server = request.getfixturevalue("seaweed")
    name = request.getfixturevalue("bucket")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    from ckptsync.config import Target

    t = Target(label="instance-0", transport=None, remote_dir="/srv", local_dir=Path("/nonexistent"),
               store_url=f"s3://{name}/team/instance-0", s3={"endpoint_url": server.endpoint, "lease_seconds": 30})
    return open_store(t)


def test_entries_and_their_manifests(store):
    if ability(store, "remove_entry"):      # a store that is written starts empty
        assert store.manifests() == {} and store.damaged() == {}
    else:                                   # a read-only one is there whole, or reading says it is not
        with pytest.raises(NotFound, match="no such archive"):
            store.manifests()
    put(store, "checkpoint-4", b"four", 1_800_000_000.0)
    put(store, "checkpoint-8", b"eight" * 100, 1_800_000_100.0)
    got = store.manifests()
    assert sorted(got) == ["checkpoint-4", "checkpoint-8"]
    assert got["checkpoint-8"].size == 500 and got["checkpoint-8"].files[0].path == "checkpoint-8/model.pt"
    assert got["checkpoint-4"] == manifest("checkpoint-4", b"four", 1_800_000_000.0)
    assert store.location.endswith(("backups", "backups.tar.zst")) or store.location.startswith("s3://")
    assert store.kind in ("a backup directory", "a bucket store", "an archive")


def needs(store, name: str) -> None:
    if ability(store, name) is None:
        pytest.skip(f"{store.kind} cannot {name}")


def test_a_replaced_entry_keeps_its_earlier_versions_newest_first_and_trims_them(store):
    needs(store, "trim_generations")
    for i, when in enumerate((1_800_000_000.0, 1_800_000_100.0, 1_800_000_200.0)):
        put(store, "checkpoint-4", b"version %d" % i, when)
    kept = store.generations()
    assert list(kept) == ["checkpoint-4"]
    assert [g.manifest.backed_up_at for g in kept["checkpoint-4"]] == [1_800_000_100.0, 1_800_000_000.0]
    assert [g.id for g in kept["checkpoint-4"]] == ["20270115-080140", "20270115-080000"]
    assert store.generations("checkpoint-4") == kept and store.generations("other") == {}
    assert store.manifests()["checkpoint-4"].backed_up_at == 1_800_000_200.0

    dropped = store.trim_generations("checkpoint-4", 1)
    assert [g.id for g in dropped] == ["20270115-080000"]
    assert [g.id for g in store.generations()["checkpoint-4"]] == ["20270115-080140"]
    store.drop_generation(store.generations()["checkpoint-4"][0])
    assert store.generations() == {}
    assert list(store.manifests()) == ["checkpoint-4"]     # the current version is untouched


def test_read_a_small_stored_file(store):
    put(store, "checkpoint-4", b"trainer state", 1_800_000_000.0)
    assert store.read_file("checkpoint-4/model.pt", 1 << 20) == b"trainer state"
    assert store.read_file("checkpoint-4/model.pt", 4) is None       # larger than the limit
    with pytest.raises(OSError):
        store.read_file("checkpoint-4/absent.json", 1 << 20)


def test_remove_an_entry_whole(store):
    needs(store, "remove_entry")
    put(store, "checkpoint-4", b"four", 1_800_000_000.0)
    put(store, "checkpoint-8", b"eight", 1_800_000_100.0)
    store.remove_entry("checkpoint-4")
    assert list(store.manifests()) == ["checkpoint-8"]
    store.remove_entry("checkpoint-4")      # already gone: nothing to do, no error
    assert list(store.manifests()) == ["checkpoint-8"]
    if hasattr(store, "root") and isinstance(store.root, Path):
        assert not os.path.lexists(store.root / "checkpoint-4")
    else:
        assert [k for k, _s, _e in store.bucket.list(store.key("checkpoint-4/"))] == []


def test_one_run_at_a_time(store):
    needs(store, "lock")
    with store.lock("ckptsync backup (the first run)"):
        with pytest.raises(Locked) as refused:
            with store.lock("ckptsync prune"):
                pass
        assert "held by" in str(refused.value) or "in use by" in str(refused.value)
    with store.lock("ckptsync prune"):      # released: the next run gets it
        pass


def test_status_of_the_last_run_and_of_each_kind(store):
    needs(store, "record_status")
    assert store.status() is None
    store.record_status(RunStatus(time=1_800_000_000.0, exit_code=0, ok=True, scheduled=True))
    store.record_status(RunStatus(time=1_800_000_100.0, exit_code=1, ok=False, scheduled=False))
    assert store.status().time == 1_800_000_100.0
    assert store.status("scheduled").time == 1_800_000_000.0
    assert store.status("manual").ok is False
    assert RunStatus.from_json(store.status().to_json()) == store.status()


def test_abilities_are_asked_for_by_name(store, request):
    kind = request.node.callspec.params["store"]
    for name in set().union(*ABILITIES.values()):
        assert (ability(store, name) is not None) == (name in ABILITIES[kind]), name
    assert ability(store, "no_such_ability") is None


LATER = {"time": 1_800_000_000.0, "exit_code": 0, "ok": True, "fetched": ["checkpoint-4"], "resumed": ["checkpoint-4"]}


@pytest.mark.parametrize("raw, want", [
    (json.dumps(LATER).encode(), RunStatus(time=1_800_000_000.0, exit_code=0, ok=True, fetched=("checkpoint-4",),
                                           extra={"resumed": ["checkpoint-4"]})),
    (b'["backup", 0]', None),
    (json.dumps({**LATER, "time": "yesterday"}).encode(), None),
    (b'{"time": 1, "ok"', None),
], ids=["later-version", "not-an-object", "time-text", "cut-short"])
def test_a_status_file_as_another_version_or_a_damaged_disk_left_it(store, raw, want):
    """Read as the record it holds, keys this version does not know kept; damaged, as no record."""
    put(store, "checkpoint-4", b"four", 1_800_000_000.0)
    if is_archive(store.location):
        from ckptsync.archive import ArchiveOptions, run_archive

        directory = open_store(store.location[:-len(".tar.zst")])
        (directory.meta / "status.json").write_bytes(raw)
        Path(store.location).unlink()
        run_archive(directory.root, ArchiveOptions(output=Path(store.location)))
    elif hasattr(store, "commit"):
        (store.meta / "status.json").write_bytes(raw)
    else:
        store.bucket.put(store.status_key(), raw)
    assert store.status() == want
    if want is not None:
        assert store.status().to_dict() == LATER
