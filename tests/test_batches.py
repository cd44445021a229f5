"""A run that kept every checkpoint: small checkpoints travel together and are committed one by one."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import xxhash

from ckptsync.backup import Backup, BackupOptions, run_backup
from ckptsync.backup_status import run_job
from ckptsync.errors import OK, PARTIAL, Interrupted
from ckptsync.policy import BATCH_BYTES, batches
from ckptsync.server.inprocess import Hooks, InProcessServer
from helpers import tree_digest
from test_partial import StopAt
from test_server_boundary import always, make_target

COUNT = 30
OWN = ("optimizer.pt", "trainer_state.json")   # the files each copy in `many` gets its own bytes of


@pytest.mark.parametrize("sizes, expect", [
    ([("a", 10), ("b", 20), ("c", 30)], [["a", "b", "c"]]),
    # a batch closes before it would pass the limit
    ([("a", 40), ("b", 30), ("c", 20)], [["a"], ["b", "c"]]),
    # a checkpoint as large as the limit goes alone, and the next starts a new batch
    ([("a", 10), ("big", 64), ("b", 10), ("c", 54)], [["a"], ["big"], ["b", "c"]]),
    ([], []),
])
def test_batches_keep_order_and_stay_within_the_limit(sizes, expect):
    assert batches(sizes, limit=64) == expect


def test_the_default_limit_groups_adapters_but_not_full_checkpoints():
    adapters = [(f"checkpoint-{i}", 250_000) for i in range(200)]
    assert batches(adapters) == [[n for n, _s in adapters]]
    full = [(f"checkpoint-{i}", 300_000_000) for i in range(3)]
    assert batches(full) == [[n] for n, _s in full]
    assert BATCH_BYTES < 300_000_000


@pytest.fixture
def many(server_tree: Path) -> Path:
    """COUNT copies of checkpoint-12, each with its own OWN files; the others keep checkpoint-12's
    bytes, mode and mtime, as an adapter's config and README do in a real run."""
    src = server_tree / "checkpoint-12"
    stamp = src.stat().st_mtime_ns
    rng = random.Random(7)
    for i in range(1, COUNT + 1):
        d = server_tree / f"checkpoint-{100 + i}"
        shutil.copytree(src, d)
        opt = bytearray((d / "optimizer.pt").read_bytes())
        opt[100:116] = rng.randbytes(16)
        (d / "optimizer.pt").write_bytes(bytes(opt))
        state = json.loads((d / "trainer_state.json").read_text())
        state["global_step"] = 100 + i
        (d / "trainer_state.json").write_text(json.dumps(state))
        for p in d.iterdir():
            os.utime(p, ns=(stamp, stamp))
        os.utime(d, ns=(stamp, stamp))
    return server_tree


def checkpoints(tree: Path) -> list[str]:
    return sorted(p.name for p in tree.iterdir() if p.name.startswith("checkpoint-"))


def counting_server(sent: list[list[str]], hooks: Hooks | None = None) -> InProcessServer:
    hooks = hooks or Hooks()
    hooks.on_before("send", lambda args: sent.append([member for _src, member in args["pairs"]]))
    return InProcessServer(hooks=hooks)


def test_many_small_checkpoints_go_over_one_transfer(many, tmp_path):
    dest = tmp_path / "b"
    sent: list[list[str]] = []
    result = run_backup(make_target(many, dest), BackupOptions(all=True), connect=always(counting_server(sent)))
    names = checkpoints(many)
    assert result.exit_code == OK, result.failed
    assert sorted(result.fetched) == names and len(names) == COUNT + 3
    assert len(sent) == 1   # one transfer for every checkpoint
    # each content crossed once; the other copies of it were placed from that one
    for base in sorted({p.name for n in names for p in (many / n).iterdir()}):
        contents = {xxhash.xxh3_128_hexdigest((many / n / base).read_bytes()) for n in names}
        assert sum(1 for m in sent[0] if m.endswith("/" + base)) == len(contents), base
    files = sum(1 for n in names for _p in (many / n).iterdir())
    assert len(sent[0]) + result.linked_files + result.copied_files + result.reflinked_files == files
    # the copies' shared files show the same mode and mtime: hard links to one inode
    shared = len([p for p in (many / "checkpoint-12").iterdir() if p.name not in OWN])
    assert result.linked_files >= (COUNT - 1) * shared
    assert os.stat(dest / "checkpoint-101" / "README.md").st_ino == os.stat(dest / "checkpoint-130" / "README.md").st_ino
    for name in names:
        assert tree_digest(dest / name) == tree_digest(many / name), name
        m = json.loads((dest / ".ckptsync" / "manifests" / f"{name}.json").read_text())
        assert sorted(f["path"] for f in m["files"]) == sorted(
            f"{name}/{p.name}" for p in (many / name).iterdir())
    assert not list((dest / ".ckptsync" / "staging").glob("*"))
    again = run_backup(make_target(many, dest), BackupOptions(all=True), connect=always(counting_server(sent)))
    assert again.exit_code == OK and again.fetched == [] and len(sent) == 1


def test_an_interrupted_batch_keeps_what_it_committed_and_the_next_run_sends_the_rest(many, tmp_path):
    dest = tmp_path / "b"
    names = checkpoints(many)
    total = sum(p.stat().st_size for n in names for p in (many / n).iterdir())
    with pytest.raises(Interrupted) as caught:
        run_backup(make_target(many, dest), BackupOptions(all=True, compress="off"),
                   StopAt(f"{len(names)} checkpoints", total // 2), connect=always(InProcessServer()))
    assert "verified files kept" in caught.value.message
    # each checkpoint was committed as soon as all of it had arrived, the newest first: those are
    # whole; none of the others is visible under its name, and what arrived of them is kept
    newest_first = sorted(names, key=lambda n: int(n.split("-")[1]), reverse=True)
    committed = [n for n in newest_first if (dest / n).exists()]
    assert 0 < len(committed) < len(names) and committed == newest_first[:len(committed)]
    assert "committed " + ", ".join(committed) in caught.value.message
    for name in committed:
        assert tree_digest(dest / name) == tree_digest(many / name), name
    kept = {p.name.removesuffix(".progress.json"): json.loads(p.read_text())
            for p in (dest / ".ckptsync" / "staging").glob("*.progress.json")}
    assert not set(kept) & set(committed)
    assert 0 < sum(len(v) for v in kept.values()) < sum(len(list((many / n).iterdir())) for n in names)
    again = run_backup(make_target(many, dest), BackupOptions(all=True, compress="off"),
                       connect=always(InProcessServer()))
    assert again.exit_code == OK and sorted(again.fetched) == sorted(set(names) - set(committed))
    assert again.raw_bytes < total
    for name in names:
        assert tree_digest(dest / name) == tree_digest(many / name), name


def test_a_checkpoint_rotated_away_mid_batch_fails_alone(many, tmp_path):
    """The newest checkpoint holds the copies of the shared files the others are placed from:
    its deletion after the plan must cost only itself."""
    dest = tmp_path / "b"
    newest = max(checkpoints(many), key=lambda n: int(n.split("-")[1]))
    hooks = Hooks()
    hooks.on_before("send", lambda _args: shutil.rmtree(many / newest), times=1)
    sent: list[list[str]] = []
    result = run_backup(make_target(many, dest), BackupOptions(all=True), connect=always(counting_server(sent, hooks)))
    assert not (many / newest).exists()   # the fault happened after the plan, during the transfer
    assert result.exit_code == PARTIAL
    assert list(result.failed) == [newest] and "deleted" in result.failed[newest]
    assert not (dest / newest).exists()
    # the others' copies of the shared files, meant to be placed from the deleted checkpoint's,
    # were fetched after all
    assert len(sent) == 2 and sent[1] and all(m.rsplit("/", 1)[1] not in OWN for m in sent[1])
    assert not any(m.startswith(newest + "/") for m in sent[1])
    for name in checkpoints(many):
        assert tree_digest(dest / name) == tree_digest(many / name), name


def test_every_checkpoint_is_durable_before_its_name_and_the_commits_share_their_fsyncs(many, tmp_path, monkeypatch):
    """The disk calls of a backup of the batch, in order: each checkpoint's files, its directory
    and its manifest are fsynced before it is renamed to its final name, and the backup directory
    after. Groups of checkpoints share the fsyncs of the directories; the staging bookkeeping,
    checked whenever it is read, is not fsynced."""
    import ckptsync.disk as disk
    import ckptsync.stores.directory as store_mod

    dest = tmp_path / "b"
    events: list[tuple[str, str, int]] = []
    real_file, real_dir, real_rename, real_replace = disk.fsync_file, disk.fsync_dir, os.rename, os.replace

    def inode(path) -> int:
        return os.stat(path).st_ino

    def fsync_file(path):
        events.append(("fsync", str(path), inode(path)))
        real_file(path)

    def fsync_dir(path):
        events.append(("fsync", str(path), inode(path)))
        real_dir(path)

    def rename(src, dst):
        real_rename(src, dst)
        events.append(("rename", str(dst), inode(dst)))

    def replace(src, dst):
        real_replace(src, dst)
        events.append(("rename", str(dst), inode(dst)))

    monkeypatch.setattr(disk, "fsync_file", fsync_file)
    monkeypatch.setattr(disk, "fsync_dir", fsync_dir)
    monkeypatch.setattr(store_mod, "fsync_dir", fsync_dir)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    result = run_backup(make_target(many, dest), BackupOptions(all=True, compress="off"),
                        connect=always(InProcessServer()))
    monkeypatch.undo()
    names = checkpoints(many)
    assert result.exit_code == OK and sorted(result.fetched) == names
    synced = [(i, ino) for i, (kind, _p, ino) in enumerate(events) if kind == "fsync"]
    manifests = dest / ".ckptsync" / "manifests"
    for name in names:
        final = dest / name
        at = next(i for i, (kind, p, _ino) in enumerate(events) if kind == "rename" and p == str(final))
        before = {ino for i, ino in synced if i < at}
        for f in final.rglob("*"):
            assert f.stat().st_ino in before, f"{f} renamed into place before it was fsynced"
        assert final.stat().st_ino in before
        made = next(i for i, (kind, p, _ino) in enumerate(events)
                    if kind == "rename" and p == str(manifests / f"{name}.json"))
        assert made < at and (manifests / f"{name}.json").stat().st_ino in before
        assert any(kind == "fsync" and p == str(manifests) and made < i < at for i, (kind, p, _n) in enumerate(events))
        assert any(kind == "fsync" and p == str(dest) and i > at for i, (kind, p, _n) in enumerate(events))
    assert tree_digest(dest / names[0]) == tree_digest(many / names[0])
    # shared: one fsync of the backup directory per group, not per checkpoint; a file linked into
    # every checkpoint of a group is flushed once for the group
    roots = sum(1 for kind, p, _n in events if kind == "fsync" and p == str(dest))
    assert roots < len(names) // 4
    readme = sum(1 for kind, p, _n in events if kind == "fsync" and p.endswith("/README.md"))
    assert readme < len(names) // 4
    assert not [p for kind, p, _n in events if kind == "fsync" and (".progress.json" in p or ".manifest.json" in p)]


def test_whole_checkpoints_of_a_group_cut_short_are_committed_by_the_next_run_without_a_transfer(many, tmp_path):
    """Stopped half way with a group larger than the batch: nothing is under a final name yet, the
    checkpoints that arrived whole wait in staging, every file verified and recorded, and the next
    run commits them without fetching a byte of them."""
    dest = tmp_path / "b"
    names = checkpoints(many)
    total = sum(p.stat().st_size for n in names for p in (many / n).iterdir())
    job = Backup(make_target(many, dest), BackupOptions(all=True, compress="off"),
                 StopAt(f"{len(names)} checkpoints", total // 2), connect=always(InProcessServer()))
    job.commit_group = 100
    with pytest.raises(Interrupted):
        run_job(job)
    assert not [n for n in names if (dest / n).exists()]
    staging = dest / ".ckptsync" / "staging"
    whole = [n for n in names if (staging / f"{n}.progress.json").is_file() and sorted(
        json.loads((staging / f"{n}.progress.json").read_text())) == sorted(
        f"{n}/{p.name}" for p in (many / n).iterdir())]
    assert whole
    sent: list[list[str]] = []
    again = run_backup(make_target(many, dest), BackupOptions(all=True, compress="off"),
                       connect=always(counting_server(sent)))
    assert again.exit_code == OK and sorted(again.fetched) == names
    assert not [m for members in sent for m in members if m.split("/")[0] in whole]
    for name in names:
        assert tree_digest(dest / name) == tree_digest(many / name), name
