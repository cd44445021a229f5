"""`ckptsync archive`: one .tar.zst of a backup directory, read back before anything is removed."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from ckptsync.archive_read import open_archive_as_store
from ckptsync.errors import IntegrityError
from ckptsync.stores.directory import DirectoryStore
from helpers import digest_diff, run_cli, tree_digest

LOCK = ".ckptsync/lock"


def _env(tmp_path: Path) -> dict[str, str | None]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {"HOME": str(home), "CKPTSYNC_CONFIG": None}


def cli(tmp_path: Path, *args):
    return run_cli(*args, env=_env(tmp_path), cwd=tmp_path)


@pytest.fixture
def store(tmp_path: Path, server_tree: Path) -> Path:
    # dedup: link keeps identical files hard-linked, so the archive's link handling is exercised
    (tmp_path / "ckptsync.yaml").write_text("dedup: link\n")
    dest = tmp_path / "backups" / "run"
    r = cli(tmp_path, "backup", "--all", "--remote-dir", server_tree, "--local-dir", dest)
    assert r.returncode == 0, r.stderr
    return dest


def digest(path: Path) -> dict:
    d = tree_digest(path)
    d.pop(LOCK, None)   # holder info of whoever ran last; not part of the backups
    return d


def extract_with_tools(archive: Path, into: Path) -> None:
    into.mkdir()
    unzstd = subprocess.Popen(["zstd", "-dc", str(archive)], stdout=subprocess.PIPE)
    tar = subprocess.run(["tar", "-xpf", "-", "-C", str(into)], stdin=unzstd.stdout, capture_output=True, timeout=60)
    unzstd.stdout.close()
    assert unzstd.wait(timeout=60) == 0 and tar.returncode == 0, tar.stderr


def archive_name(dest: Path) -> list[Path]:
    # Around midnight the date can move on during the run.
    days = {time.strftime("%Y%m%d", time.localtime(time.time() + d)) for d in (-60, 0)}
    return [dest.parent / f"{dest.name}-{day}.tar.zst" for day in sorted(days)]


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x20
    path.write_bytes(bytes(data))


def test_archive_round_trips_byte_identically(tmp_path: Path, store: Path) -> None:
    before = digest(store)
    r = cli(tmp_path, "archive", "--local-dir", store)
    assert r.returncode == 0, r.stderr
    archive = next(p for p in archive_name(store) if p.exists())
    assert sorted(p.name for p in store.parent.iterdir()) == sorted([store.name, archive.name])   # no .part left
    assert "read back and verified" in r.stdout
    assert "the originals can now be removed with --remove" in r.stdout
    assert digest(store) == before   # nothing removed without --remove

    out = tmp_path / "extracted"
    extract_with_tools(archive, out)
    assert digest_diff(digest(out / store.name), before) == []
    assert LOCK not in tree_digest(out / store.name)
    # Identical files were hard links in the store; they are hard links again, each path whole.
    a, b = out / store.name / "checkpoint-4" / "training_args.bin", out / store.name / "checkpoint-12" / "training_args.bin"
    assert os.stat(a).st_ino == os.stat(b).st_ino and a.read_bytes() == b.read_bytes()
    assert os.stat(store / "checkpoint-12" / "optimizer.pt").st_mtime_ns == \
        os.stat(out / store.name / "checkpoint-12" / "optimizer.pt").st_mtime_ns

    js = cli(tmp_path, "archive", "--local-dir", store, "--json")   # exists already: read back, not rewritten
    assert js.returncode == 0, js.stderr
    data = json.loads(js.stdout)
    assert data["reused"] is True and data["verified"] is True and data["removed"] == []
    assert data["entries"] == ["checkpoint-12", "checkpoint-4", "checkpoint-8"]
    assert data["archive_bytes"] == archive.stat().st_size


def test_remove_only_after_the_read_back(tmp_path: Path, store: Path) -> None:
    before = digest(store)
    output = tmp_path / "archives" / "run.tar.zst"
    r = cli(tmp_path, "archive", "--local-dir", store, "--output", output, "--remove", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["verified"] is True and data["reused"] is False
    assert data["removed"] == ["checkpoint-12", "checkpoint-4", "checkpoint-8"]
    assert data["linked"] > 0 and data["files"] == len(before)
    left = sorted(p.relative_to(store).as_posix() for p in store.rglob("*") if p.is_file())
    assert left == sorted([LOCK, ".ckptsync/history.jsonl", ".ckptsync/status.json", ".ckptsync/status-manual.json"])
    assert not any((store / ".ckptsync" / "manifests").iterdir())
    assert sorted(p.name for p in output.parent.iterdir()) == ["run.tar.zst"]

    out = tmp_path / "extracted"
    extract_with_tools(output, out)
    assert digest_diff(digest(out / store.name), before) == []

    listed = cli(tmp_path, "list", "--local", "--local-dir", store, "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout)["checkpoints"] == []


def test_corrupted_archive_is_caught_and_nothing_is_removed(tmp_path: Path, store: Path) -> None:
    before = digest(store)
    output = tmp_path / "run.tar.zst"
    assert cli(tmp_path, "archive", "--local-dir", store, "--output", output).returncode == 0
    flip_middle_byte(output)
    damaged = output.read_bytes()

    r = cli(tmp_path, "archive", "--local-dir", store, "--output", output, "--remove")
    assert r.returncode == 30, r.stdout + r.stderr
    assert "nothing was removed" in r.stderr and "Traceback" not in r.stderr
    assert digest(store) == before
    assert output.read_bytes() == damaged


def test_a_damaged_backup_is_not_archived(tmp_path: Path, store: Path) -> None:
    victim = store / "checkpoint-8" / "optimizer.pt"
    data = bytearray(victim.read_bytes())
    data[100] ^= 1
    victim.write_bytes(bytes(data))
    before = digest(store)
    r = cli(tmp_path, "archive", "--local-dir", store, "--remove")
    assert r.returncode == 30
    assert "checkpoint-8/optimizer.pt does not match its manifest" in r.stderr
    assert digest(store) == before
    assert sorted(p.name for p in store.parent.iterdir()) == [store.name]   # no archive, no .part


def test_refusals(tmp_path: Path, store: Path) -> None:
    inside = cli(tmp_path, "archive", "--local-dir", store, "--output", store / "x.tar.zst")
    assert inside.returncode == 2 and "inside the backup directory" in inside.stderr
    suffix = cli(tmp_path, "archive", "--local-dir", store, "--output", tmp_path / "x.tar.gz")
    assert suffix.returncode == 2
    empty = cli(tmp_path, "archive", "--local-dir", tmp_path / "nothing")
    assert empty.returncode == 10 and not (tmp_path / "nothing").exists()
    with DirectoryStore(store).lock("test"):
        locked = cli(tmp_path, "archive", "--local-dir", store)
    assert locked.returncode == 11 and "in use by 'test'" in locked.stderr
    assert not any(p.name.endswith(".tar.zst") for p in store.parent.iterdir())


def test_open_archive_as_store(tmp_path: Path, store: Path) -> None:
    before = digest(store)
    output = tmp_path / "arch" / "run.tar.zst"
    assert cli(tmp_path, "archive", "--local-dir", store, "--output", output).returncode == 0
    with open_archive_as_store(output) as opened:
        assert opened.root.name == store.name and opened.root.parent.parent == output.parent
        assert sorted(opened.manifests()) == ["checkpoint-12", "checkpoint-4", "checkpoint-8"]
        assert digest_diff(digest(opened.root), before) == []
    assert sorted(p.name for p in output.parent.iterdir()) == ["run.tar.zst"]   # cleaned up

    flip_middle_byte(output)
    with pytest.raises(IntegrityError):
        with open_archive_as_store(output):
            pass
    assert sorted(p.name for p in output.parent.iterdir()) == ["run.tar.zst"]

    truncated = tmp_path / "arch" / "short.tar.zst"
    truncated.write_bytes(output.read_bytes()[: output.stat().st_size // 3])
    with pytest.raises(IntegrityError):
        with open_archive_as_store(truncated):
            pass


def test_archive_cut_between_members_is_caught(tmp_path: Path, store: Path) -> None:
    import io
    import tarfile

    import zstandard

    output = tmp_path / "run.tar.zst"
    assert cli(tmp_path, "archive", "--local-dir", store, "--output", output).returncode == 0
    raw = subprocess.run(["zstd", "-dc", str(output)], capture_output=True, check=True, timeout=60).stdout
    last = tarfile.open(fileobj=io.BytesIO(raw)).getmembers()[-1]
    cut = tmp_path / "cut.tar.zst"   # a valid zstd frame of a tar that simply stops before its last file
    cut.write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(raw[:last.offset]))
    with pytest.raises(IntegrityError, match="truncated"):
        with open_archive_as_store(cut):
            pass


def test_verify_and_restore_accept_an_archive(tmp_path: Path, store: Path, server_tree: Path) -> None:
    out = tmp_path / "run.tar.zst"
    assert cli(tmp_path, "archive", "--local-dir", store, "--output", out, "--remove").returncode == 0
    assert not (store / "checkpoint-12").exists()
    v = cli(tmp_path, "verify", "--local-dir", out, "--json")
    assert v.returncode == 0, v.stderr
    assert {e["name"] for e in json.loads(v.stdout)["entries"]} >= {"checkpoint-4", "checkpoint-8", "checkpoint-12"}
    fresh = tmp_path / "fresh" / "models" / "run"
    r = cli(tmp_path, "restore", "--local-dir", out, "--remote-dir", fresh, "--checkpoint", "checkpoint-8")
    assert r.returncode == 0, r.stderr
    assert digest(fresh / "checkpoint-8") == digest(server_tree / "checkpoint-8")
    assert not list(tmp_path.glob(".ckptsync-extract-*"))
    flip_middle_byte(out)
    bad = cli(tmp_path, "verify", "--local-dir", out)
    assert bad.returncode == 30 and "Traceback" not in bad.stderr


def test_list_show_and_compare_read_an_archive(tmp_path: Path, store: Path) -> None:
    before = {args[0]: json.loads(cli(tmp_path, *args, "--local-dir", store, "--json").stdout)
              for args in (["list", "--local"], ["show", "checkpoint-8"], ["compare", "checkpoint-4", "checkpoint-12"])}
    out = tmp_path / "run.tar.zst"
    assert cli(tmp_path, "archive", "--local-dir", store, "--output", out, "--remove").returncode == 0
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**_env(tmp_path), "TMPDIR": str(scratch)}
    for args in (["list", "--local"], ["show", "checkpoint-8"], ["compare", "checkpoint-4", "checkpoint-12"]):
        r = run_cli(*args, "--local-dir", out, "--json", env=env, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        got, want = json.loads(r.stdout), before[args[0]]
        where = "backup_dir" if args[0] == "list" else "location"
        assert got.pop(where) == str(out)
        want.pop(where)
        assert got == want, args
        human = run_cli(*args, "--local-dir", out, env=env, cwd=tmp_path)
        assert human.returncode == 0 and str(out) in human.stdout and ".ckptsync-" not in human.stdout + human.stderr
    assert list(scratch.iterdir()) == []   # the index read from the archive is gone
    missing = run_cli("show", "checkpoint-5", "--local-dir", out, env=env, cwd=tmp_path)
    assert missing.returncode == 10 and f"not in the backup directory {out} " in missing.stderr
    assert ".ckptsync-" not in missing.stderr and "Traceback" not in missing.stderr


def test_verify_and_restore_name_the_archive(tmp_path: Path, store: Path, server_tree: Path) -> None:
    (tmp_path / "ckptsync.yaml").write_text("dedup: link\nextra_files: [../../config_full_dataset.json]\n")
    assert cli(tmp_path, "backup", "--remote-dir", server_tree, "--local-dir", store).returncode == 0
    out = tmp_path / "run.tar.zst"
    assert cli(tmp_path, "archive", "--local-dir", store, "--output", out).returncode == 0
    for json_mode in ([], ["--json"]):
        v = cli(tmp_path, "verify", "--local-dir", out, *json_mode)
        assert v.returncode == 0, v.stderr
        assert ".ckptsync-extract" not in v.stdout + v.stderr and str(out) in v.stdout
    assert json.loads(cli(tmp_path, "verify", "--local-dir", out, "--json").stdout)["dest"] == str(out)
    fresh = tmp_path / "fresh" / "run"
    r = cli(tmp_path, "restore", "--local-dir", out, "--remote-dir", fresh, "--checkpoint", "checkpoint-8", "--json")
    assert r.returncode == 0, r.stderr
    assert ".ckptsync-extract" not in r.stdout + r.stderr
    data = json.loads(r.stdout)
    assert data["source"] == str(out)
    [extra] = data["extras"]   # outside the new run's directory: not sent, and kept in the archive
    assert extra["kept_at"] == f"{out}/extra-files/config_full_dataset.json"


def test_archive_remove_makes_each_entry_gone_durable_before_its_manifest_goes(store: Path, tmp_path: Path,
                                                                                 monkeypatch) -> None:
    # The order of one removal, as prune does it too (DirectoryStore.remove_entry): the entry leaves its
    # name, that rename is fsynced, and only then its manifest goes. A crash between never leaves
    # a manifest-less entry under its name.
    import ckptsync.archive as archive
    import ckptsync.stores.directory as store_module
    from ckptsync.archive import ArchiveOptions, run_archive

    events = []
    real_fsync, real_drop = store_module.fsync_dir, DirectoryStore.drop_manifest

    def fsync_dir(path):
        events.append(("fsync", Path(path), tuple(sorted(p.name for p in Path(path).iterdir()))))
        real_fsync(path)

    def drop_manifest(self, name):
        events.append(("drop", name))
        real_drop(self, name)

    monkeypatch.setattr(store_module, "fsync_dir", fsync_dir)
    monkeypatch.setattr(archive, "fsync_dir", fsync_dir)
    monkeypatch.setattr(DirectoryStore, "drop_manifest", drop_manifest)
    result = run_archive(store, ArchiveOptions(output=tmp_path / "run.tar.zst", remove=True))
    assert result.removed and result.removed == result.entries
    for name in result.removed:
        dropped = events.index(("drop", name))
        synced = [e for e in events[:dropped] if e[0] == "fsync" and e[1] == store and name not in e[2]]
        assert synced, (name, events)   # the store's directory was fsynced after the rename, before the drop
    assert not (store / ".ckptsync" / "trash").exists()
    assert not any(os.path.lexists(store / name) for name in result.removed)


def test_an_archive_is_a_read_only_store_read_through_its_members(tmp_path: Path, store: Path, server_tree: Path,
                                                                  monkeypatch) -> None:
    import tempfile

    from ckptsync.stores import ability, open_store

    out = tmp_path / "arch" / "run.tar.zst"
    assert cli(tmp_path, "archive", "--local-dir", store, "--output", out).returncode == 0
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    directory, archived = DirectoryStore(store), open_store(out)
    assert archived.location == str(out) and archived.kind == "an archive"
    assert archived.manifests() == directory.manifests() and archived.status() == directory.status()
    linked = 0
    for m in directory.manifests().values():
        for f in m.files:     # hard-linked copies (dedup: link) are read from the member they link to
            assert archived.read_file(f.path, 1 << 30) == (store / f.path).read_bytes(), f.path
            linked += (store / f.path).stat().st_nlink > 1
    assert linked
    checked = list(ability(archived, "check_objects")([], False, lambda n: None))
    assert sorted(name for name, _m, _p in checked) == sorted(directory.manifests())
    assert all(problems == [] for _n, _m, problems in checked)
    for name in ("commit", "remove_entry", "lock", "record_status", "trim_generations"):
        assert ability(archived, name) is None, name
    assert list(scratch.iterdir()) == [] and sorted(p.name for p in out.parent.iterdir()) == ["run.tar.zst"]

    refusals = {("prune", "--keep-last", "1"): "error: prune does not work on an archive",
                ("verify", "--repair", "--remote-dir", server_tree): "error: --repair does not work on an archive",
                ("verify", "--remote", "--remote-dir", server_tree): "error: --remote does not work on an archive",
                ("backup", "--remote-dir", server_tree): "error: backup does not work on an archive"}
    before = out.read_bytes()
    for args, line in refusals.items():
        r = cli(tmp_path, *args, "--local-dir", out)
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [line], (args, r.stderr)
    assert out.read_bytes() == before
