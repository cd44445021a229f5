"""ckptsync verify: backups re-read against their manifests, and the server's copy against the backup."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import run_cli, tree_digest

MANIFESTS = Path(".ckptsync") / "manifests"


def backup(source: Path, dest: Path, *args: str, dedup: str | None = None) -> Path:
    env = None
    if dedup:
        cfg = dest.parent / "dedup.yaml"
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(f"dedup: {dedup}\n")
        env = {"CKPTSYNC_CONFIG": str(cfg)}
    result = run_cli("backup", "--remote-dir", source, "--local-dir", dest, *args, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return dest


@pytest.fixture
def store(tmp_path: Path, server_tree: Path) -> Path:
    """checkpoint-4/8/12 backed up through the local transport, every verified_at set to 1.0.

    With `dedup: link`, so identical files are hard links whatever their mtimes (read once by verify)."""
    dest = backup(server_tree, tmp_path / "backups", "--all", dedup="link")
    for path in (dest / MANIFESTS).glob("*.json"):
        data = json.loads(path.read_text())
        data["verified_at"] = 1.0
        path.write_text(json.dumps(data))
    return dest


def manifest(store: Path, name: str) -> dict:
    return json.loads((store / MANIFESTS / f"{name}.json").read_text())


def verify(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("verify", "--local-dir", store, *args)


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Change one byte in place: same inode, size and mtime."""
    st = path.stat()
    at = st.st_size // 2 if offset is None else offset
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_ok_exits_0_and_records_verified_at(store: Path) -> None:
    before = tree_digest(store / "checkpoint-12")
    others = {n: manifest(store, n) for n in ("checkpoint-4", "checkpoint-8", "checkpoint-12")}

    result = verify(store)

    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("checkpoint-12", "checkpoint-8", "checkpoint-4"):
        assert f"ok      {name} (8 files" in result.stdout
        after = manifest(store, name)
        assert after["verified_at"] > 1_000_000_000
        assert {**after, "verified_at": 0} == {**others[name], "verified_at": 0}
    assert "3 ok, 0 failed" in result.stdout
    assert tree_digest(store / "checkpoint-12") == before


def test_flipped_byte_is_corrupt(store: Path) -> None:
    target = store / "checkpoint-8" / "optimizer.pt"
    assert target.stat().st_nlink == 1, "the fixture's optimizer.pt should not be shared"
    flip_byte(target)

    result = verify(store)

    assert result.returncode == 30, result.stdout + result.stderr
    assert "FAILED  checkpoint-8: corrupt" in result.stdout
    assert "corrupt: checkpoint-8/optimizer.pt (content differs" in result.stdout
    assert "integrity check failed: checkpoint-8 (corrupt)" in result.stderr
    assert "ok      checkpoint-12" in result.stdout
    assert manifest(store, "checkpoint-8")["verified_at"] == 1.0
    assert manifest(store, "checkpoint-12")["verified_at"] > 1.0


def test_truncated_file(store: Path) -> None:
    target = store / "checkpoint-12" / "adapter_model.safetensors"
    size = target.stat().st_size
    os.truncate(target, size // 2)

    result = verify(store)

    assert result.returncode == 30
    assert (f"corrupt: checkpoint-12/adapter_model.safetensors (truncated: {size // 2} bytes, "
            f"the backup had {size})") in result.stdout


def test_missing_optimizer(store: Path) -> None:
    (store / "checkpoint-4" / "optimizer.pt").unlink()

    result = verify(store)

    assert result.returncode == 30
    assert "FAILED  checkpoint-4: missing files" in result.stdout
    assert "missing: checkpoint-4/optimizer.pt (needed to resume)" in result.stdout


def test_unexpected_file_and_ignored_names(store: Path) -> None:
    (store / "checkpoint-12" / "notes.txt").write_text("mine\n")
    (store / "checkpoint-12" / ".ckptsync-marker").write_text("ignored\n")

    result = verify(store)

    assert result.returncode == 30
    assert "unexpected: checkpoint-12/notes.txt" in result.stdout
    assert ".ckptsync-marker" not in result.stdout + result.stderr
    assert "checkpoint-12 (unexpected files)" in result.stderr


def test_names_limit_the_check_and_unknown_names_exit_10(store: Path) -> None:
    flip_byte(store / "checkpoint-8" / "optimizer.pt")

    only = verify(store, "checkpoint-12")
    assert only.returncode == 0, only.stdout + only.stderr
    assert "checkpoint-8" not in only.stdout

    unknown = verify(store, "checkpoint-99")
    assert unknown.returncode == 10
    assert "checkpoint-99" in unknown.stderr
    assert "checkpoint-12, checkpoint-8, checkpoint-4" in unknown.stderr


def test_empty_backup_directory_exits_10(tmp_path: Path) -> None:
    result = verify(tmp_path / "nothing-here")
    assert result.returncode == 10
    assert "no backups in" in result.stderr


def test_json_and_hard_links_read_once(store: Path) -> None:
    flip_byte(store / "checkpoint-4" / "scheduler.pt")
    inodes: dict[tuple[int, int], int] = {}
    logical = 0
    for name in ("checkpoint-4", "checkpoint-8", "checkpoint-12"):
        for path in (store / name).iterdir():
            st = path.stat()
            inodes[(st.st_dev, st.st_ino)] = st.st_size
            logical += st.st_size
    assert len(inodes) < 24, "backup should have hard-linked identical files"

    result = verify(store, "--json")

    assert result.returncode == 30
    data = json.loads(result.stdout)
    assert data["exit_code"] == 30
    assert data["bytes_read"] == sum(inodes.values()) < logical
    status = {e["name"]: (e["status"], e["failed"]) for e in data["entries"]}
    assert status == {"checkpoint-12": ("ok", False), "checkpoint-8": ("ok", False),
                      "checkpoint-4": ("corrupt", True)}
    bad = next(e for e in data["entries"] if e["failed"])
    assert bad["problems"] == [{"path": "checkpoint-4/scheduler.pt", "kind": "corrupt",
                                "detail": "content differs from the backup's checksum"}]


def test_extra_files_entry_is_verified(tmp_path: Path, server_tree: Path) -> None:
    config = tmp_path / "ckptsync.yaml"
    config.write_text("extra_files: [../../config_full_dataset.json]\n")
    dest = backup(server_tree, tmp_path / "backups", "--all", "--config", str(config))
    extra = dest / "extra-files" / "config_full_dataset.json"
    assert extra.is_file()

    ok = verify(dest)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ok      extra-files (1 files" in ok.stdout

    flip_byte(extra, 1)
    bad = verify(dest)
    assert bad.returncode == 30
    assert "corrupt: extra-files/config_full_dataset.json" in bad.stdout


# ------------------------------------------------------------------ --remote


def remote_verify(server_tree: Path, dest: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("verify", "--remote", "--instance", "1", "--remote-dir", server_tree,
                   "--local-dir", dest, *args)


def test_remote_through_sshd(ssh_home: Path, server_tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "backups"
    backup(server_tree, dest, "--instance", "1", "--checkpoint", "checkpoint-12", "--checkpoint", "checkpoint-8")

    same = remote_verify(server_tree, dest)
    assert same.returncode == 0, same.stdout + same.stderr
    assert "ok      checkpoint-12" in same.stdout
    assert "note    checkpoint-4: only on the server" in same.stdout

    shutil.rmtree(server_tree / "checkpoint-8")
    flip_byte(server_tree / "checkpoint-12" / "optimizer.pt")
    differs = remote_verify(server_tree, dest)
    assert differs.returncode == 30, differs.stdout + differs.stderr
    assert "FAILED  checkpoint-12: differs" in differs.stdout
    assert ("differs: checkpoint-12/optimizer.pt (same size and mtime, different content: "
            "one of the copies is damaged)") in differs.stdout
    assert "note    checkpoint-8: only in the backup" in differs.stdout
    assert "checkpoint-12/adapter_model.safetensors" not in differs.stdout

    named = remote_verify(server_tree, dest, "checkpoint-8", "--json")
    assert named.returncode == 30
    data = json.loads(named.stdout)
    assert [(e["name"], e["status"]) for e in data["entries"]] == [("checkpoint-8", "only in the backup")]


def test_remote_with_server_hash_other_than_xxh3(tmp_path: Path, server_tree: Path) -> None:
    """A server python without xxhash hashes with sha1: the laptop hashes its copy the same way."""
    python = Path("/usr/bin/python3")
    if not python.exists():
        pytest.skip("no /usr/bin/python3 to play a server without xxhash")
    has_xxhash = subprocess.run([str(python), "-c", "import xxhash"], capture_output=True).returncode == 0
    config = tmp_path / "ckptsync.yaml"
    config.write_text('instances:\n  "9":\n    command: [env, "PATH=/usr/bin:/bin"]\n')
    dest = backup(server_tree, tmp_path / "backups", "--all")
    args = ("verify", "--remote", "--config", config, "--instance", "9", "--remote-dir", server_tree,
            "--local-dir", dest, "--json")

    ok = run_cli(*args)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout)["alg"] == ("xxh3_128" if has_xxhash else "sha1")

    flip_byte(server_tree / "checkpoint-8" / "scheduler.pt")
    bad = run_cli(*args)
    assert bad.returncode == 30
    failed = [e for e in json.loads(bad.stdout)["entries"] if e["failed"]]
    assert [(e["name"], [p["path"] for p in e["problems"]]) for e in failed] == [
        ("checkpoint-8", ["checkpoint-8/scheduler.pt"])]
