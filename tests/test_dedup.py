"""Identical files across checkpoints: stored once where the filesystem allows, each showing its own mtime and mode."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from ckptsync.backup import BackupOptions, run_backup
from ckptsync.backup_plan import BackupResult
from ckptsync.config import RunPolicy, Target, load_config, resolve_target
from ckptsync.errors import OK, ConfigError
from ckptsync.server.inprocess import InProcessServer
from ckptsync.dedup import place_copy
from ckptsync.verify import run_verify
from helpers import digest_diff, set_mtime, tree_digest

CHECKPOINTS = ("checkpoint-4", "checkpoint-8", "checkpoint-12")
SHARED = ("README.md", "adapter_config.json", "training_args.bin")


class Sha1OnlyServer(InProcessServer):
    """A server without xxhash: it hashes with sha1, and the store is compared in sha1 too."""

    def open(self) -> None:
        super().open()
        self.hello = dataclasses.replace(self.hello, hashes=("sha1",))


def make_target(remote_dir: Path, local_dir: Path, dedup: str = "reflink") -> Target:
    return Target(label="instance-0", transport=None, remote_dir=str(remote_dir), local_dir=local_dir,
                  policy=RunPolicy(dedup=dedup))


def backup_all(server_tree: Path, dest: Path, dedup: str = "reflink", hashes: bool = True) -> BackupResult:
    server = InProcessServer() if hashes else Sha1OnlyServer()
    result = run_backup(make_target(server_tree, dest, dedup), BackupOptions(all=True), connect=lambda: server)
    assert result.exit_code == OK, result.failed
    assert sorted(result.fetched) == sorted(CHECKPOINTS)
    return result


@pytest.fixture
def reflinks(tmp_path: Path) -> bool:
    """Whether this filesystem clones files (btrfs, xfs, APFS), as place_copy itself finds out."""
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "a").write_bytes(b"x" * 8192)
    os.chmod(probe / "a", 0o644)
    set_mtime(probe / "a", 1_000_000)
    how = place_copy(probe / "a", probe / "b", 2_000_000_000_000_000, 0o600, "reflink")
    assert how in ("reflink", "copy")
    return how == "reflink"


def total_bytes(server_tree: Path) -> int:
    return sum(p.stat().st_size for c in CHECKPOINTS for p in (server_tree / c).iterdir())


def shared_bytes(server_tree: Path) -> int:
    """Bytes of the shared files in one checkpoint."""
    return sum((server_tree / "checkpoint-4" / n).stat().st_size for n in SHARED)


def ino(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def assert_trees_equal(server_tree: Path, dest: Path) -> None:
    for c in CHECKPOINTS:
        assert digest_diff(tree_digest(server_tree / c), tree_digest(dest / c)) == [], c


def mtime_warnings(result) -> dict[str, str]:
    return {w.split(":", 1)[0]: w for w in result.warnings if "local mtime" in w}


def test_fixture_shares_content_with_different_mtimes(server_tree: Path) -> None:
    for name in SHARED:
        files = [server_tree / c / name for c in CHECKPOINTS]
        assert len({f.read_bytes() for f in files}) == 1, name
        assert len({f.stat().st_mtime_ns for f in files}) == 3, name
        assert len({f.stat().st_mode for f in files}) == 1, name


@pytest.mark.parametrize("hashes", [True, False], ids=["xxh3-server", "sha1-server"])
def test_default_keeps_every_files_own_mtime_and_mode(server_tree: Path, tmp_path: Path, reflinks: bool,
                                                      hashes: bool) -> None:
    dest = tmp_path / "b"
    result = backup_all(server_tree, dest, hashes=hashes)

    assert_trees_equal(server_tree, dest)
    for name in SHARED:
        assert len({ino(dest / c / name) for c in CHECKPOINTS}) == 3, name  # nothing hard-linked

    total, shared = total_bytes(server_tree), shared_bytes(server_tree)
    saved = 2 * shared  # checkpoint-12 is fetched first; 8 and 4 find its copies
    assert result.linked_files == result.linked_bytes == 0
    if reflinks:
        assert (result.reflinked_files, result.reflinked_bytes) == (6, saved)
        assert result.disk_bytes == total - saved
    else:
        assert (result.reflinked_files, result.reflinked_bytes) == (0, 0)
        assert result.disk_bytes == total
    if not reflinks:  # copied here instead of fetched
        assert (result.copied_files, result.copied_bytes) == (6, saved)
    else:
        assert (result.copied_files, result.copied_bytes) == (0, 0)
    assert result.raw_bytes == total - saved

    verified = run_verify(make_target(server_tree, dest), [])
    assert verified.exit_code == OK
    assert mtime_warnings(verified) == {}


@pytest.mark.parametrize("hashes", [True, False], ids=["xxh3-server", "sha1-server"])
def test_dedup_link_hard_links_and_verify_warns(server_tree: Path, tmp_path: Path, hashes: bool) -> None:
    dest = tmp_path / "b"
    result = backup_all(server_tree, dest, dedup="link", hashes=hashes)

    for name in SHARED:
        assert len({ino(dest / c / name) for c in CHECKPOINTS}) == 1, name
        # The newest checkpoint came first; the others show its mtime, their manifests their own.
        assert (dest / "checkpoint-4" / name).stat().st_mtime_ns == \
            (server_tree / "checkpoint-12" / name).stat().st_mtime_ns
    total, shared = total_bytes(server_tree), shared_bytes(server_tree)
    assert (result.linked_files, result.linked_bytes) == (6, 2 * shared)
    assert result.reflinked_files == result.reflinked_bytes == result.copied_files == result.copied_bytes == 0
    assert result.disk_bytes == total - 2 * shared
    assert result.raw_bytes == total - 2 * shared

    verified = run_verify(make_target(server_tree, dest), [])
    assert verified.exit_code == OK
    assert all(not e.failed for e in verified.entries)
    warned = mtime_warnings(verified)
    assert sorted(warned) == ["checkpoint-4", "checkpoint-8"]
    assert warned["checkpoint-4"] == ("checkpoint-4: 3 files' local mtimes differ from the manifest "
                                      "(hard-linked to identical files, as with dedup: link): "
                                      "README.md, adapter_config.json, training_args.bin")


@pytest.mark.parametrize("hashes", [True, False], ids=["xxh3-server", "sha1-server"])
def test_same_content_mode_and_mtime_is_shared_under_the_default(server_tree: Path, tmp_path: Path,
                                                                 reflinks: bool, hashes: bool) -> None:
    for name in SHARED:  # checkpoint-12's copies now carry checkpoint-8's mtimes
        os.utime(server_tree / "checkpoint-12" / name,
                 ns=(os.stat(server_tree / "checkpoint-8" / name).st_mtime_ns,) * 2)
    dest = tmp_path / "b"
    result = backup_all(server_tree, dest, hashes=hashes)

    assert_trees_equal(server_tree, dest)
    for name in SHARED:
        same_8_12 = ino(dest / "checkpoint-8" / name) == ino(dest / "checkpoint-12" / name)
        assert same_8_12 == (not reflinks), name  # a reflink is preferred: its own inode
        assert ino(dest / "checkpoint-4" / name) != ino(dest / "checkpoint-12" / name), name

    total, shared = total_bytes(server_tree), shared_bytes(server_tree)
    if reflinks:
        assert (result.reflinked_files, result.reflinked_bytes) == (6, 2 * shared)
        assert result.linked_files == result.copied_files == 0
        assert result.disk_bytes == total - 2 * shared
    else:
        assert (result.linked_files, result.linked_bytes) == (3, shared)  # checkpoint-8's
        assert result.reflinked_files == 0
        # checkpoint-4's differ in mtime: copied instead of fetched, or kept as fetched
        assert (result.copied_files, result.copied_bytes) == (3, shared)
        assert result.disk_bytes == total - shared

    verified = run_verify(make_target(server_tree, dest), [])
    assert verified.exit_code == OK and mtime_warnings(verified) == {}


WHEN = 1_700_000_000_123_456_789


def stored_file(folder: Path, size: int) -> Path:
    """folder/stored.bin: `size` random bytes, mode 0644, mtime WHEN."""
    src = folder / "stored.bin"
    src.write_bytes(os.urandom(size))
    os.chmod(src, 0o644)
    os.utime(src, ns=(WHEN, WHEN))
    return src


def test_place_copy_reports_what_it_did(tmp_path: Path, reflinks: bool) -> None:
    src, when = stored_file(tmp_path, 100_000), WHEN

    same = tmp_path / "same.bin"
    how = place_copy(src, same, when, 0o644, "reflink")
    assert how == ("reflink" if reflinks else "link")
    assert (ino(same) == ino(src)) == (how == "link")
    assert same.stat().st_mtime_ns == when and same.stat().st_mode & 0o7777 == 0o644

    other = tmp_path / "other.bin"
    other.write_bytes(b"an older staged file, replaced")
    later = when + 5_000_000_000
    how = place_copy(src, other, later, 0o600, "reflink")
    assert how == ("reflink" if reflinks else "copy")
    assert ino(other) != ino(src)
    assert other.read_bytes() == src.read_bytes()
    assert other.stat().st_mtime_ns == later and other.stat().st_mode & 0o7777 == 0o600
    assert src.stat().st_mtime_ns == when and src.stat().st_mode & 0o7777 == 0o644  # the stored file untouched

    linked = tmp_path / "linked.bin"
    assert place_copy(src, linked, later, 0o644, "link") == "link"
    assert ino(linked) == ino(src) and src.stat().st_mtime_ns == when  # a hard link keeps the inode's stamp
    assert sorted(p.name for p in tmp_path.glob("*.bin")) == ["linked.bin", "other.bin", "same.bin", "stored.bin"]
    assert not list(tmp_path.glob(".*"))  # no temporary name left behind


@pytest.mark.parametrize("policy", ["reflink", "link"])
def test_a_link_replaces_what_is_at_its_name_and_leaves_no_temporary(tmp_path: Path, reflinks: bool,
                                                                     policy: str) -> None:
    """A hard link goes straight to a free name; an occupied one (a stale staged copy, a
    killed run's temporary beside it) is replaced in one rename."""
    here = tmp_path / "here"   # apart from what the reflinks fixture leaves in tmp_path
    here.mkdir()
    src = stored_file(here, 10_000)
    taken = here / "taken.bin"
    taken.write_bytes(b"stale")
    (here / ".ckptsync-place-taken.bin").write_bytes(b"left by a killed run")
    how = place_copy(src, taken, WHEN, 0o644, policy)
    assert how == ("reflink" if reflinks and policy == "reflink" else "link")
    assert taken.read_bytes() == src.read_bytes()
    assert (ino(taken) == ino(src)) == (how == "link")
    assert sorted(p.name for p in here.iterdir()) == ["stored.bin", "taken.bin"]
    with pytest.raises(FileNotFoundError):
        place_copy(here / "gone.bin", here / "new.bin", WHEN, 0o644, policy)
    assert not (here / "new.bin").exists()


def test_config_key_reaches_the_target(tmp_path: Path) -> None:
    cfg = tmp_path / "ckptsync.yaml"
    cfg.write_text("dedup: link\ninstances:\n  1: {host: a}\n  2: {host: b, dedup: reflink}\n")
    config = load_config(str(cfg))
    assert resolve_target(config, instance="1", need_remote=False).policy.dedup == "link"
    assert resolve_target(config, instance="2", need_remote=False).policy.dedup == "reflink"
    cfg.write_text("instances:\n  1: {host: a}\n")
    assert resolve_target(load_config(str(cfg)), instance="1", need_remote=False).policy.dedup == "reflink"
    cfg.write_text("dedup: symlink\n")
    with pytest.raises(ConfigError, match="dedup: expected reflink or link"):
        load_config(str(cfg))
