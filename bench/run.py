#!/usr/bin/env python3
"""Benchmark ckptsync against rsync/scp/tar over a shaped SSH link.

A throwaway "GPU server" runs sshd inside a network namespace joined to the
host by a veth pair; the link is shaped with tbf on both ends, and the long link
also goes through bench/relay.py, which delays every byte. Every client
command is timed, its peak memory is measured, and every copy is checked
against the source tree. See bench/README.md.
"""
from __future__ import annotations

import argparse
import atexit
import datetime as _dt
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu  # noqa: E402  (bench/cpu.py: where each CPU second of a row goes)
import servers  # noqa: E402  (bench/servers.py: the server's python3, stock or equipped)

HOST_IP = "10.231.77.1"
NS_IP = "10.231.77.2"
PREFIX = 30
ALIAS = "benchsrv"

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_DATA = Path(os.path.expanduser("~")) / ".cache" / "ckptsync-bench"
DEFAULT_FIXTURE = REPO / "tests" / "fixtures" / "tools" / "make_hf_fixture.py"
FIXTURE_ARGS = ["--width", "1024", "--layers", "12", "--rank", "128", "--steps", "6", "--save", "2"]
VENV_PACKAGES = ["torch==2.13.0", "transformers", "peft", "accelerate"]
CHECKPOINTS = ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
RESTORE_CKPT = "checkpoint-6"

SPEEDS = {"200mbit": 200_000_000, "1gbit": 1_000_000_000, "1gbit-100ms": 1_000_000_000, "unshaped": None}
# speeds that also pass through bench/relay.py: seconds each byte is held per direction (RTT = twice that)
RELAY_DELAY = {"1gbit-100ms": 0.050}
RELAY_PORT = 2222           # in the namespace, in front of sshd's port 22
PROBE_PORT = 2223           # the relay's built-in echo/sink/source, for checking the delay without ssh
RELAY_MAX_HELD = 16 * 1024 * 1024  # per direction of a connection; 1 Gbit/s for 50 ms is 6.25 MB
TOOLS = ["rsync", "scp", "tar", "tarzstd", "ckptsync"]
TIME_BIN = "/usr/bin/time"
TBF_LATENCY = "50ms"

OPS = [
    ("backup", "full backup (3 checkpoints, cold destination)"),
    ("noop", "no-op backup (destination already complete)"),
    ("restore-all", "restore of every checkpoint (push to a new directory)"),
    ("restore-ckpt", f"restore push, {RESTORE_CKPT} only"),
    ("verify", "verify local copy (no network, warm cache)"),
    ("bwlimit", f"backup and restore of {RESTORE_CKPT} with --bwlimit: achieved wire rate against the limit"),
    ("many", "first backup of a run that kept every checkpoint (200 small LoRA checkpoints, 1,600 files)"),
]
MANY_SOURCE = REPO / "tests" / "fixtures" / "socrates-training" / "models" / "socrates-qwen-full-dataset" / "checkpoint-12"
MANY_COUNT = 200
BWLIMIT_SHARE = 4             # the limit is a quarter of the shaped link rate
BWLIMIT_UNSHAPED = 20_000_000  # bytes/s, when the link is not shaped
BWLIMIT_TOLERANCE = 0.05
RATIO_ANCHOR = {"backup": "best full-copy anchor", "noop": "rsync -a (no-op)",
                "restore-all": "rsync -a push (all)", "restore-ckpt": f"rsync -a push {RESTORE_CKPT}",
                "many": "rsync -a --fsync"}


def log(msg: str = "") -> None:
    print(msg, flush=True)


def run(argv, check=True, capture=True, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(argv, text=True, stdout=subprocess.PIPE if capture else None,
                         stderr=subprocess.PIPE if capture else None, **kw)
    if check and res.returncode != 0:
        err = (res.stderr or "").strip() if capture else ""
        raise RuntimeError(f"command failed ({res.returncode}): {shlex.join(map(str, argv))}\n{err}")
    return res


def q(path) -> str:
    return shlex.quote(str(path))


# ---------------------------------------------------------------- file trees

def tree_map(root: Path) -> dict[str, int]:
    """Relative path -> size for every regular file under root."""
    out: dict[str, int] = {}
    root = Path(root)
    if not root.is_dir():
        return out
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if not os.path.islink(p):
                out[os.path.relpath(p, root)] = st.st_size
    return out


def subtree(m: dict[str, int], prefix: str) -> dict[str, int]:
    pre = prefix.rstrip("/") + "/"
    return {k[len(pre):]: v for k, v in m.items() if k.startswith(pre)}


def compare(expected: dict[str, int], dest: Path, allow_extra: bool) -> tuple[bool, str]:
    got = tree_map(dest)
    missing = sorted(k for k in expected if k not in got)
    wrong = sorted(k for k in expected if k in got and got[k] != expected[k])
    extra = sorted(k for k in got if k not in expected)
    n_exp, b_exp = len(expected), sum(expected.values())
    n_got = len(got) - (len(extra) if allow_extra else 0)
    b_got = sum(v for k, v in got.items() if k in expected or not allow_extra)
    ok = not missing and not wrong and (allow_extra or not extra)
    msg = f"files {n_got}/{n_exp}, bytes {b_got}/{b_exp}"
    if extra:
        msg += f", {len(extra)} extra file(s){' (allowed)' if allow_extra else ''}: {extra[:3]}"
    if missing:
        msg += f", missing {len(missing)}: {missing[:3]}"
    if wrong:
        msg += f", size mismatch {len(wrong)}: {wrong[:3]}"
    return ok, msg


# ------------------------------------------------------------ memory sampling

PAGE = os.sysconf("SC_PAGE_SIZE")


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    kids.extend(int(x) for x in f.read().split())
            except OSError:
                pass
    except OSError:
        pass
    return kids


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def tree_rss(root: int, skip: set[int]) -> int:
    """Sum of resident memory over root and its descendants, minus wrappers."""
    total, stack, seen = 0, [root], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        stack.extend(_children(pid))
        if pid in skip or _comm(pid) == "time":
            continue
        total += _rss(pid)
    return total


# ------------------------------------------------------------- timed command

class Timer:
    def __init__(self, have_time: bool, sample_interval: float = 0.1):
        self.have_time = have_time
        self.interval = sample_interval
        self.counter = None  # callable -> bytes on the link so far, sampled with the memory

    def run(self, stages: list[list[str]], env=None, cwd=None, stdout_null=True) -> dict:
        """Run a pipeline of client-side stages; return wall time and memory."""
        tmpd = tempfile.mkdtemp(prefix="ckb-time-")
        try:
            files = [os.path.join(tmpd, f"stage{i}") for i in range(len(stages))]
            if self.have_time:
                wrapped = [[TIME_BIN, "-f", "%M", "-o", f] + list(map(str, st)) for st, f in zip(stages, files)]
            else:
                wrapped = [list(map(str, st)) for st in stages]
            if len(wrapped) == 1:
                argv = wrapped[0]
            else:
                argv = ["bash", "-c", "set -o pipefail; " + " | ".join(shlex.join(w) for w in wrapped)]
            errpath = os.path.join(tmpd, "stderr")
            with open(errpath, "w+") as errf:
                stop = threading.Event()
                peak = [0]
                wire: list[tuple[float, int]] = []
                t0 = time.monotonic()
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL if stdout_null else None,
                                        stderr=errf, env=env, cwd=cwd, start_new_session=True)
                skip = {proc.pid} if len(wrapped) > 1 else set()

                def sampler():
                    while not stop.is_set():
                        peak[0] = max(peak[0], tree_rss(proc.pid, skip))
                        if self.counter is not None:
                            wire.append((time.monotonic() - t0, self.counter()))
                        stop.wait(self.interval)

                th = threading.Thread(target=sampler, daemon=True)
                th.start()
                try:
                    rc = proc.wait()
                except BaseException:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except OSError:
                        pass
                    proc.wait()
                    raise
                finally:
                    stop.set()
                    th.join()
                wall = time.monotonic() - t0
                errf.seek(0)
                stderr = errf.read()
            rss_stages = []
            for f in files:
                val = None
                try:
                    with open(f) as fh:
                        lines = [ln.strip() for ln in fh if ln.strip()]
                    if lines and lines[-1].isdigit():
                        val = int(lines[-1])
                except OSError:
                    pass
                rss_stages.append(val)
            known = [v for v in rss_stages if v is not None]
            return {
                "wall_s": wall,
                "rc": rc,
                "stderr": stderr[-4000:],
                "rss_kb_stages": rss_stages,
                "rss_kb": sum(known) if known else None,
                "tree_peak_kb": peak[0] // 1024,
                "wire_samples": wire,
                "argv": argv,
            }
        finally:
            shutil.rmtree(tmpd, ignore_errors=True)


# ---------------------------------------------------------------- the lab

class Lab:
    """Network namespace + veth + sshd, torn down on close()."""

    def __init__(self, keep: bool):
        self.pid = os.getpid()
        self.ns = f"ckb-srv-{self.pid}"
        self.vh = f"ckbh{self.pid}"
        self.vn = f"ckbn{self.pid}"
        self.keep = keep
        self.tmp: Path | None = None
        self.sshd: subprocess.Popen | None = None
        self.ns_created = False
        self.closed = False
        self.extra_dirs: list[Path] = []
        self.shaping: dict = {}
        self.relay: subprocess.Popen | None = None
        self.relay_log = None
        self.port = 22
        self.bin: Path | None = None    # the server's python3 wrappers (bench/servers.py)
        self.server = servers.DEFAULT

    # paths
    @property
    def cfg(self) -> str:
        return str(self.tmp / "ssh_config")

    @property
    def home(self) -> str:
        return str(self.tmp / "home")

    def nsx(self, *argv, check=True):
        return run(["ip", "netns", "exec", self.ns, *argv], check=check)

    def up(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=f"ckb-{self.pid}-"))
        t = self.tmp
        # network
        run(["ip", "netns", "add", self.ns])
        self.ns_created = True
        run(["ip", "link", "add", self.vh, "type", "veth", "peer", "name", self.vn, "netns", self.ns])
        run(["ip", "addr", "add", f"{HOST_IP}/{PREFIX}", "dev", self.vh])
        run(["ip", "link", "set", self.vh, "up"])
        self.nsx("ip", "addr", "add", f"{NS_IP}/{PREFIX}", "dev", self.vn)
        self.nsx("ip", "link", "set", self.vn, "up")
        self.nsx("ip", "link", "set", "lo", "up")
        # keys
        hostkey = t / "ssh_host_ed25519_key"
        userkey = t / "id_ed25519"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ckptsync-bench-host", "-f", str(hostkey)])
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ckptsync-bench-user", "-f", str(userkey)])
        shutil.copyfile(f"{userkey}.pub", t / "authorized_keys")
        ktype, kb64 = Path(f"{hostkey}.pub").read_text().split()[:2]
        # the same server under the relay's port, which ssh looks up as [host]:port
        names = [ALIAS, NS_IP, f"[{ALIAS}]:{RELAY_PORT}", f"[{NS_IP}]:{RELAY_PORT}"]
        known = f"{','.join(names)} {ktype} {kb64}\n"
        (t / "known_hosts").write_text(known)
        sftp = "/usr/lib/openssh/sftp-server"
        sftp = sftp if os.path.exists(sftp) else "internal-sftp"
        # every session runs through this: python3 is the kind of server set_server() chose
        self.bin = t / "server-python"
        login = servers.install(self.bin, sftp if sftp != "internal-sftp" else "false")
        (t / "sshd_config").write_text(
            f"ListenAddress {NS_IP}\n"
            "Port 22\n"
            f"HostKey {hostkey}\n"
            f"PidFile {t / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {t / 'authorized_keys'}\n"
            "PermitRootLogin yes\n"
            "StrictModes no\n"
            "UsePAM no\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PubkeyAuthentication yes\n"
            "X11Forwarding no\n"
            "PrintMotd no\n"
            "UseDNS no\n"
            "MaxStartups 100:30:200\n"
            "MaxSessions 50\n"
            f"Subsystem sftp {sftp}\n"
            "LogLevel ERROR\n"
            f"ForceCommand {login}\n"
        )
        # a home directory for tools that read ~/.ssh/config (ckptsync)
        dot = t / "home" / ".ssh"
        dot.mkdir(parents=True)
        os.chmod(dot.parent, 0o700)
        os.chmod(dot, 0o700)
        shutil.copyfile(userkey, dot / "id_ed25519")
        shutil.copyfile(f"{userkey}.pub", dot / "id_ed25519.pub")
        os.chmod(dot / "id_ed25519", 0o600)
        (dot / "known_hosts").write_text(known)
        self.write_client_configs(22)
        # sshd
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        run(["/usr/sbin/sshd", "-t", "-f", str(t / "sshd_config")])
        self.sshd_log = open(t / "sshd.log", "w")
        self.sshd = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "/usr/sbin/sshd", "-D", "-e", "-f", str(t / "sshd_config")],
            stdin=subprocess.DEVNULL, stdout=self.sshd_log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            if self.sshd.poll() is not None:
                raise RuntimeError(f"sshd exited ({self.sshd.returncode}): {(t / 'sshd.log').read_text()}")
            r = run(["ssh", "-F", self.cfg, "-o", "ConnectTimeout=2", ALIAS, "true"], check=False)
            if r.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"cannot reach sshd in {self.ns}: {r.stderr.strip()}")
            time.sleep(0.2)

    def set_server(self, kind: str) -> None:
        """The python3 that the next ssh sessions run the agent with (bench/servers.py)."""
        if kind != self.server:
            servers.select(self.bin, kind)
            self.server = kind

    def write_client_configs(self, port: int) -> None:
        """`Host benchsrv` for ssh -F (rsync, scp, tar) and in the home's ~/.ssh/config (ckptsync)."""
        t = self.tmp
        dot = t / "home" / ".ssh"

        def text(key, known) -> str:
            return (f"Host {ALIAS}\n"
                    f"    HostName {NS_IP}\n"
                    "    User root\n"
                    f"    Port {port}\n"
                    f"    IdentityFile {key}\n"
                    "    IdentitiesOnly yes\n"
                    f"    UserKnownHostsFile {known}\n"
                    "    GlobalKnownHostsFile /dev/null\n"
                    "    StrictHostKeyChecking yes\n"
                    "    BatchMode yes\n"
                    "    LogLevel ERROR\n")

        (t / "ssh_config").write_text(text(t / "id_ed25519", t / "known_hosts"))
        (dot / "config").write_text(text(dot / "id_ed25519", dot / "known_hosts"))
        self.port = port

    def start_relay(self, delay: float) -> dict:
        """bench/relay.py inside the namespace, between the veth and sshd; clients are pointed at it."""
        self.stop_relay()
        logpath = self.tmp / "relay.log"
        self.relay_log = open(logpath, "w")
        argv = ["ip", "netns", "exec", self.ns, sys.executable, str(BENCH_DIR / "relay.py"),
                "--listen", f"{NS_IP}:{RELAY_PORT}", "--target", f"{NS_IP}:22", "--delay", str(delay),
                "--max-held", str(RELAY_MAX_HELD), "--probe-listen", f"{NS_IP}:{PROBE_PORT}"]
        self.relay = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.relay_log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 20
        while "listening" not in logpath.read_text():
            if self.relay.poll() is not None:
                raise RuntimeError(f"relay exited ({self.relay.returncode}): {logpath.read_text().strip()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"relay did not start: {logpath.read_text().strip()}")
            time.sleep(0.05)
        self.write_client_configs(RELAY_PORT)
        return {"program": "bench/relay.py", "argv": argv[4:], "delay_s_each_way": delay,
                "max_held_bytes_per_direction": RELAY_MAX_HELD, "listen": f"{NS_IP}:{RELAY_PORT}",
                "target": f"{NS_IP}:22", "pid": self.relay.pid}

    def stop_relay(self) -> None:
        if self.relay is not None:
            stop_process(self.relay, 5)
            self.relay = None
        if self.relay_log is not None:
            self.relay_log.close()
            self.relay_log = None
        if self.tmp and self.port != 22:
            self.write_client_configs(22)

    def relay_cpu_s(self) -> float | None:
        """user+system CPU seconds of the relay so far (None without a relay)."""
        if self.relay is None:
            return None
        try:
            with open(f"/proc/{self.relay.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return None

    def veth_bytes(self) -> tuple[int, int]:
        """(received, sent) bytes on the host end of the veth: every byte of every ssh session crosses it."""
        base = f"/sys/class/net/{self.vh}/statistics/"
        with open(base + "rx_bytes") as rx, open(base + "tx_bytes") as tx:
            return int(rx.read()), int(tx.read())

    def shape(self, rate_bps: int | None) -> dict:
        """tbf on the egress of both veth ends, or no qdisc at all."""
        if rate_bps is None:
            run(["tc", "qdisc", "del", "dev", self.vh, "root"], check=False)
            self.nsx("tc", "qdisc", "del", "dev", self.vn, "root", check=False)
            self.shaping = {"qdisc": None}
            return self.shaping
        rate_Bps = rate_bps // 8
        burst = max(rate_Bps // 250, 64 * 1024)
        args = ["root", "tbf", "rate", f"{rate_bps}bit", "burst", str(burst), "latency", TBF_LATENCY]
        run(["tc", "qdisc", "replace", "dev", self.vh, *args])
        self.nsx("tc", "qdisc", "replace", "dev", self.vn, *args)
        self.shaping = {"qdisc": "tbf", "rate_bit": rate_bps, "burst_bytes": burst, "latency": TBF_LATENCY,
                        "devices": [self.vh, f"{self.ns}:{self.vn}"],
                        "host": run(["tc", "qdisc", "show", "dev", self.vh]).stdout.strip(),
                        "ns": self.nsx("tc", "qdisc", "show", "dev", self.vn).stdout.strip()}
        return self.shaping

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            if self.keep:
                log(f"--keep: left running: netns {self.ns}, sshd pid "
                    f"{self.sshd.pid if self.sshd else '-'}, relay pid {self.relay.pid if self.relay else '-'}, "
                    f"files in {self.tmp}")
                log(f"  try: ssh -F {self.cfg} {ALIAS}")
                log(f"  clean up: python3 {Path(__file__).resolve()} --cleanup")
                return
            try:
                self.stop_relay()
            except Exception as e:  # the namespace sweep below still kills it
                log(f"warning: stopping the relay: {e}")
            if self.sshd is not None:
                stop_process(self.sshd, 5)
            if self.ns_created:
                kill_ns_pids(self.ns)
                run(["ip", "netns", "del", self.ns], check=False)
            if os.path.exists(f"/sys/class/net/{self.vh}"):
                run(["ip", "link", "del", self.vh], check=False)
            if getattr(self, "sshd_log", None):
                self.sshd_log.close()
            if self.tmp:
                shutil.rmtree(self.tmp, ignore_errors=True)
            for d in self.extra_dirs:
                shutil.rmtree(d, ignore_errors=True)
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def stop_process(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM, then SIGKILL if it is still there after `grace` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def kill_ns_pids(ns: str) -> None:
    r = run(["ip", "netns", "pids", ns], check=False)
    pids = [int(x) for x in (r.stdout or "").split() if x.isdigit()]
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + 3
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if os.path.exists(f"/proc/{p}")]
        time.sleep(0.1)
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def cleanup_stale(data: Path) -> int:
    """Remove namespaces and work dirs left by earlier runs whose process is gone."""
    r = run(["ip", "netns", "list"], check=False)
    n = 0
    for line in (r.stdout or "").splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith("ckb-srv-"):
            continue
        pid = name[len("ckb-srv-"):]
        if pid.isdigit() and os.path.exists(f"/proc/{pid}") and int(pid) != os.getpid():
            log(f"{name}: owner process {pid} still running, left alone")
            continue
        kill_ns_pids(name)
        run(["ip", "netns", "del", name], check=False)
        if pid.isdigit() and os.path.exists(f"/sys/class/net/ckbh{pid}"):
            run(["ip", "link", "del", f"ckbh{pid}"], check=False)
        for d in Path(tempfile.gettempdir()).glob(f"ckb-{pid}-*"):
            shutil.rmtree(d, ignore_errors=True)
        log(f"removed {name}")
        n += 1
    log(f"{n} stale namespace(s) removed")
    for d in sorted(data.glob("work-*")):
        pid = d.name[len("work-"):]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(d, ignore_errors=True)
            log(f"removed {d}")
    return 0


# ----------------------------------------------------------------- prereqs

def ensure_prereqs() -> bool:
    need = {"ip": "iproute2", "tc": "iproute2", "ssh": "openssh-client", "scp": "openssh-client",
            "ssh-keygen": "openssh-client", "rsync": "rsync", "zstd": "zstd", "tar": "tar", "bash": "bash"}
    missing = sorted({pkg for exe, pkg in need.items() if shutil.which(exe) is None})
    if not os.path.exists("/usr/sbin/sshd"):
        missing.append("openssh-server")
    if missing:
        log(f"missing tools; install with: apt-get install -y {' '.join(sorted(set(missing)))}")
        sys.exit(1)
    if not os.access(TIME_BIN, os.X_OK):
        log(f"{TIME_BIN} missing, trying: apt-get install -y time")
        subprocess.run(["apt-get", "install", "-y", "-q", "time"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    if not os.access(TIME_BIN, os.X_OK):
        log(f"warning: {TIME_BIN} unavailable; per-process peak RSS will be missing (tree sampling only)")
        return False
    return True


def ensure_venv(venv: Path) -> Path:
    """A virtualenv with VENV_PACKAGES (the CPU build of torch: never install torch unpinned,
    which pulls the CUDA wheels); made once, checked by importing them. Returns its python."""
    py = venv / "bin" / "python"
    if not py.exists():
        log(f"  creating virtualenv {venv}")
        venv.parent.mkdir(parents=True, exist_ok=True)
        run([sys.executable, "-m", "venv", str(venv)])
    if run([str(py), "-c", "import torch, transformers, peft, accelerate"], check=False).returncode != 0:
        log(f"  pip install {' '.join(VENV_PACKAGES)}")
        run([str(py), "-m", "pip", "install", "-q", *VENV_PACKAGES], capture=False)
    return py


def parse_rate(text: str) -> int | None:
    """A link speed as tc writes it (200mbit, 1gbit, 500kbit) in bit/s; None for unshaped."""
    if text == "unshaped":
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg])bit", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"{text}: expected e.g. 200mbit, 1gbit or unshaped")
    return int(float(m.group(1)) * {"k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)])


def ensure_data(data: Path, fixture: Path) -> Path:
    src = data / "output"
    if all((src / c).is_dir() for c in CHECKPOINTS):
        return src
    data.mkdir(parents=True, exist_ok=True)
    if not fixture.exists():
        raise SystemExit(f"fixture script not found: {fixture} (use --fixture PATH)")
    log(f"generating benchmark checkpoints in {src} (one time, a few minutes)")
    py = ensure_venv(data / "venv")
    partial = data / "output.partial"
    shutil.rmtree(partial, ignore_errors=True)
    cmd = [str(py), str(fixture), str(partial), *FIXTURE_ARGS]
    log(f"  {shlex.join(cmd)}")
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=str(data), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        raise SystemExit(f"fixture generation failed:\n{r.stdout[-3000:]}")
    for c in CHECKPOINTS:
        if not (partial / c).is_dir():
            raise SystemExit(f"fixture generation did not produce {c} in {partial}")
    if src.exists():
        shutil.rmtree(src)
    partial.rename(src)
    m = tree_map(src)
    info = {"command": [str(py), str(fixture), "OUT", *FIXTURE_ARGS], "seconds": round(time.monotonic() - t0, 1),
            "files": len(m), "bytes": sum(m.values()),
            "per_checkpoint_bytes": {c: sum(subtree(m, c).values()) for c in CHECKPOINTS},
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat()}
    (data / "fixture.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"  done: {info['files']} files, {info['bytes'] / 1e6:.1f} MB")
    return src


def ensure_many(data: Path, source: Path = MANY_SOURCE, count: int = MANY_COUNT) -> Path:
    """`count` LoRA checkpoints made from one real one: trainer_state.json gets its step, and
    8 bytes in every 4 KiB of each binary file are drawn at random (seeded), so that no two
    checkpoints share those files' bytes while they pack as the real ones do. The small files
    (README.md, adapter_config.json, training_args.bin, scheduler.pt) are shared, as in a real run.
    mtimes are an hour old, so that every checkpoint counts as complete."""
    out = data / "many" / "output"
    if (out / f"checkpoint-{4 * count}").is_dir():
        return out
    if not source.is_dir():
        raise SystemExit(f"many-checkpoints source not found: {source}")
    partial = data / "many" / "output.partial"
    shutil.rmtree(partial, ignore_errors=True)
    rng = random.Random(0)
    old = time.time() - 3600
    for i in range(1, count + 1):
        step = 4 * i
        d = partial / f"checkpoint-{step}"
        d.mkdir(parents=True)
        for f in sorted(source.iterdir()):
            data_ = bytearray(f.read_bytes())
            if f.name == "trainer_state.json":
                state = json.loads(data_)
                state["global_step"] = step
                data_ = bytearray(json.dumps(state, indent=2).encode())
            elif f.suffix in (".safetensors", ".pt", ".pth") and f.name != "scheduler.pt":
                for off in range(512, len(data_) - 8, 4096):
                    data_[off:off + 8] = rng.randbytes(8)
            (d / f.name).write_bytes(bytes(data_))
            os.chmod(d / f.name, 0o644)
            os.utime(d / f.name, (old, old))
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def first_line(argv) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        out = (r.stdout or r.stderr).strip().splitlines()
        return out[0] if out else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine_facts(ck_version: str | None) -> dict:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    git = first_line(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    return {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "cpu": cpu,
        "mem_total": mem,
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "ssh": first_line(["ssh", "-V"]),
        "sshd": "/usr/sbin/sshd (same OpenSSH as ssh)",
        "rsync": first_line(["rsync", "--version"]),
        "zstd": first_line(["zstd", "--version"]),
        "tar": first_line(["tar", "--version"]),
        "time": first_line([TIME_BIN, "--version"]),
        "ckptsync": ck_version,
        "repo_commit": git or None,
    }


# ------------------------------------------------------------------ bench

class Bench:
    def __init__(self, args, lab: Lab, src: Path, timer: Timer, tools: list[str], ck_ok: bool):
        self.a = args
        self.lab = lab
        self.src = src
        self.timer = timer
        self.tools = tools
        self.ck_ok = ck_ok
        self.records: list[dict] = []
        self.failures = 0
        self.links: dict[str, dict] = {}
        self.last_wire_samples: list[tuple[float, int]] = []
        self.ops = set(args.op_list)
        self.many: Path | None = None   # the many-checkpoints run (ensure_many), when "many" is asked for
        self.parallel = getattr(args, "ck_parallel_list", [])   # extra ckptsync rows with --parallel N
        self.servers = getattr(args, "server_list", [servers.DEFAULT])   # each ckptsync row runs against each
        self.sides: dict[str, dict] = {}   # server kind -> the digest and codec each side uses (servers.sides)
        self.drop = args.drop_caches
        self.work = Path(args.data).resolve() / f"work-{os.getpid()}"
        self.py = sys.executable
        env = dict(os.environ)
        env["HOME"] = lab.home
        env["PYTHONPATH"] = ck_pythonpath(args)
        self.ck_env = env

    # command builders -------------------------------------------------
    def rsh(self) -> str:
        return f"ssh -F {q(self.lab.cfg)}"

    def full_rows(self, dst: Path):
        s, cfg = self.src, self.lab.cfg
        rows = [
            ("rsync", "rsync -a", [["rsync", "-a", "-e", self.rsh(), f"{ALIAS}:{s}/", f"{dst}/"]], None, None),
            ("rsync", "rsync -az", [["rsync", "-az", "-e", self.rsh(), f"{ALIAS}:{s}/", f"{dst}/"]], None, None),
            ("scp", "scp -r", [["scp", "-r", "-q", "-F", cfg, f"{ALIAS}:{s}", str(dst)]], None, None),
            ("tar", "ssh tar | tar -x",
             [["ssh", "-F", cfg, ALIAS, f"tar -C {q(s)} -cf - ."], ["tar", "-C", str(dst), "-xf", "-"]], None, None),
            ("tarzstd", "ssh tar|zstd -1 -T0 | zstd -d | tar -x",
             [["ssh", "-F", cfg, ALIAS, f"tar -C {q(s)} -cf - . | zstd -q -1 -T0"],
              ["zstd", "-q", "-d"], ["tar", "-C", str(dst), "-xf", "-"]], None, None),
        ]
        for server in self.servers:
            rows.append(("ckptsync", "ckptsync backup", [self.ck("backup", "--host", ALIAS, "--remote-dir", str(s),
                                                                 "--all", "--local-dir", str(dst), "--quiet")],
                         self.ck_env, server))
            rows += [("ckptsync", f"ckptsync backup --parallel {n}",
                      [self.ck("backup", "--host", ALIAS, "--remote-dir", str(s), "--all", "--local-dir", str(dst),
                               "--quiet", "--parallel", str(n))], self.ck_env, server) for n in self.parallel]
        return rows

    def ck(self, *args) -> list[str]:
        return [self.py, "-m", "ckptsync", *args]

    def selected(self, tool: str) -> bool:
        if tool == "ckptsync":
            return "ckptsync" in self.tools and self.ck_ok
        return tool in self.tools

    # helpers -----------------------------------------------------------
    def drop_caches(self) -> None:
        if not self.drop:
            return
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError as e:
            log(f"warning: cannot drop caches ({e}); continuing without --drop-caches")
            self.drop = False

    def measure(self, speed, rep, op, tool, label, stages, env, nbytes, check, dest, network=True,
                server=None) -> dict:
        """`server`: the kind of server a ckptsync row runs against (None for the anchors)."""
        if server:
            self.lab.set_server(server)
        os.sync()  # untimed: no dirty pages from the previous copy leak into this one
        if network:
            self.drop_caches()
        rx0, tx0 = self.lab.veth_bytes()
        cpu0 = self.lab.relay_cpu_s()
        prof = cpu.Profile(str(self.work.parent / "perf.data")) if self.a.profile else None
        if prof:
            prof.start()
        res = self.timer.run(stages, env=env, cwd=self.lab.home)
        if prof:
            prof.stop()
        rx1, tx1 = self.lab.veth_bytes()
        cpu1 = self.lab.relay_cpu_s()
        self.last_wire_samples = res.pop("wire_samples")
        # counted at the host end of the veth, frame headers included; rx is server -> laptop
        wire = {"down": rx1 - rx0, "up": tx1 - tx0, "total": (rx1 - rx0) + (tx1 - tx0)}
        ok = res["rc"] == 0
        if ok:
            ok, msg = check()
        else:
            msg = f"exit status {res['rc']}: {res['stderr'].strip()[-800:]}"
        rec = {"speed": speed, "rep": rep, "op": op, "tool": tool, "label": label, "server": server,
               "sides": self.sides.get(server) if server else None, "ok": ok,
               "loadavg_after": [round(x, 2) for x in os.getloadavg()],
               "check": msg, "bytes": nbytes, "wire_bytes": wire, "dest": str(dest),
               "relay_cpu_s": round(cpu1 - cpu0, 2) if cpu0 is not None and cpu1 is not None else None,
               **{k: v for k, v in res.items() if k != "stderr"},
               "stderr_tail": res["stderr"].strip()[-2000:]}
        rec["argv"] = [str(x) for x in rec["argv"]]
        if prof:
            rec["cpu_s"] = prof.seconds()
        self.records.append(rec)
        rss = f"{rec['rss_kb'] / 1024:.0f}" if rec["rss_kb"] is not None else "?"
        line = (f"  [{speed} {rep + 1}/{self.a.reps}] {op:<12} {shown(label, server):<40} {res['wall_s']:8.2f}s "
                f"{nbytes / 1e6 / res['wall_s']:8.1f} MB/s  rss {rss:>4} MB  tree {rec['tree_peak_kb'] / 1024:.0f} MB"
                f"  wire {mb(wire['total'])} MB")
        if rec["relay_cpu_s"] is not None:
            line += f"  relay cpu {rec['relay_cpu_s']:.1f} s"
        if prof:
            line += "  cpu " + " ".join(f"{k} {sum(v.values()):.1f}" for k, v in sorted(rec["cpu_s"].items()))
        if ok:
            log(line + "  ok")
        else:
            self.failures += 1
            log(line + "  FAILED")
            log("  " + "!" * 70)
            log(f"  !!! ROW FAILED: {op} / {shown(label, server)} at {speed}, rep {rep + 1}")
            log(f"  !!! {msg}")
            log(f"  !!! command: {shlex.join(rec['argv'])}")
            log("  " + "!" * 70)
        return rec

    def fresh(self, path: Path, create=True) -> Path:
        shutil.rmtree(path, ignore_errors=True)
        if create:
            path.mkdir(parents=True)
        return path

    # one repetition ------------------------------------------------------
    def rep(self, speed: str, rep: int, src_map: dict[str, int]) -> None:
        total = sum(src_map.values())
        ck_map = subtree(src_map, RESTORE_CKPT)
        ck_bytes = sum(ck_map.values())
        rd = self.work / f"{speed}-rep{rep}"
        self.fresh(rd)
        complete: dict[tuple[str, str | None], Path] = {}   # (label, server) -> a complete copy
        # which server goes first turns from one repetition to the next, as the full copies do
        turn = rep % len(self.servers)
        order_servers = self.servers[turn:] + self.servers[:turn]
        try:
            if "many" in self.ops:
                self.many_rows(speed, rep, rd)
            if not self.ops - {"many"}:
                return
            full = [r for r in self.full_rows(Path("/nonexistent")) if self.selected(r[0])]
            order = full[rep % len(full):] + full[:rep % len(full)] if full else []
            for tool, label, _stages, _env, server in order:
                slug = (label + (f" {server}" if server else "")).replace(" ", "_").replace("|", "").replace("/", "")
                dst = rd / f"dst-{slug}"
                self.fresh(dst, create=(tool != "scp"))
                stages, env = next((r[2], r[3]) for r in self.full_rows(dst) if r[1] == label and r[4] == server)
                rec = self.measure(speed, rep, "backup", tool, label, stages, env, total,
                                   lambda d=dst, t=tool: compare(src_map, d, allow_extra=(t == "ckptsync")), dst,
                                   server=server)
                if rec["ok"]:
                    complete[(label, server)] = dst
                elif tool != "ckptsync":
                    shutil.rmtree(dst, ignore_errors=True)
            ck_dsts = {s: complete[("ckptsync backup", s)] for s in order_servers
                       if ("ckptsync backup", s) in complete and self.selected("ckptsync")}

            # no-op backups into complete destinations
            if "noop" in self.ops and self.selected("rsync") and ("rsync -a", None) in complete:
                dst = complete[("rsync -a", None)]
                self.measure(speed, rep, "noop", "rsync", "rsync -a (no-op)",
                             [["rsync", "-a", "-e", self.rsh(), f"{ALIAS}:{self.src}/", f"{dst}/"]], None, total,
                             lambda d=dst: compare(src_map, d, allow_extra=False), dst)
            for server, ck_dst in ck_dsts.items():
                if "noop" in self.ops:
                    self.measure(speed, rep, "noop", "ckptsync", "ckptsync backup (no-op)",
                                 [self.ck("backup", "--host", ALIAS, "--remote-dir", str(self.src), "--all",
                                          "--local-dir", str(ck_dst), "--quiet")], self.ck_env, total,
                                 lambda d=ck_dst: compare(src_map, d, allow_extra=True), ck_dst, server=server)

            # restore direction (push back to the server)
            anchor_dst = complete.get(("rsync -a", None)) or next((v for (k, s), v in complete.items()
                                                                   if not k.startswith("ckptsync")), None)
            if "restore-all" in self.ops and self.selected("rsync") and anchor_dst:
                nd = self.fresh(rd / "srv-restore-all")
                self.measure(speed, rep, "restore-all", "rsync", "rsync -a push (all)",
                             [["rsync", "-a", "-e", self.rsh(), f"{anchor_dst}/", f"{ALIAS}:{nd}/"]], None, total,
                             lambda d=nd: compare(src_map, d, allow_extra=False), nd)
                shutil.rmtree(nd, ignore_errors=True)
            for server, ck_dst in ck_dsts.items():
                for extra in ([[]] + [["--parallel", str(n)] for n in self.parallel]):
                    if "restore-all" not in self.ops:
                        break
                    nd = self.fresh(rd / "srv-restore-all-ckptsync")
                    self.measure(speed, rep, "restore-all", "ckptsync", " ".join(["ckptsync restore --all", *extra]),
                                 [self.ck("restore", "--host", ALIAS, "--remote-dir", str(nd), "--local-dir",
                                          str(ck_dst), "--all", *extra)], self.ck_env, total,
                                 lambda d=nd: compare(src_map, d, allow_extra=True), nd, server=server)
                    shutil.rmtree(nd, ignore_errors=True)
            if "restore-ckpt" in self.ops and self.selected("rsync") and anchor_dst:
                nd = self.fresh(rd / "srv-restore-rsync")
                self.measure(speed, rep, "restore-ckpt", "rsync", f"rsync -a push {RESTORE_CKPT}",
                             [["rsync", "-a", "-e", self.rsh(), f"{anchor_dst}/{RESTORE_CKPT}/",
                               f"{ALIAS}:{nd}/{RESTORE_CKPT}/"]], None, ck_bytes,
                             lambda d=nd: compare(ck_map, d / RESTORE_CKPT, allow_extra=False), nd)
                shutil.rmtree(nd, ignore_errors=True)
            for server, ck_dst in ck_dsts.items():
                for extra in ([[]] + [["--parallel", str(n)] for n in self.parallel]):
                    if "restore-ckpt" not in self.ops:
                        break
                    nd = self.fresh(rd / "srv-restore-ckptsync")
                    self.measure(speed, rep, "restore-ckpt", "ckptsync",
                                 " ".join([f"ckptsync restore {RESTORE_CKPT}", *extra]),
                                 [self.ck("restore", "--host", ALIAS, "--remote-dir", str(nd), "--local-dir",
                                          str(ck_dst), "--checkpoint", RESTORE_CKPT, *extra)], self.ck_env, ck_bytes,
                                 lambda d=nd: compare(ck_map, d / RESTORE_CKPT, allow_extra=True), nd, server=server)
                    shutil.rmtree(nd, ignore_errors=True)
            for server, ck_dst in ck_dsts.items():
                if "verify" not in self.ops:
                    break
                # local verification from a warm page cache: one untimed pass reads the files in
                subprocess.run(self.ck("verify", "--local-dir", str(ck_dst)), env=self.ck_env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
                self.measure(speed, rep, "verify", "ckptsync", "ckptsync verify",
                             [self.ck("verify", "--local-dir", str(ck_dst))], self.ck_env, total,
                             lambda: (True, "exit status 0"), ck_dst, network=False, server=server)
            for server in ck_dsts:
                if "bwlimit" in self.ops:
                    self.bwlimit_rows(speed, rep, rd, ck_map, ck_bytes, server)
        finally:
            if not self.a.keep:
                shutil.rmtree(rd, ignore_errors=True)

    def many_rows(self, speed: str, rep: int, rd: Path) -> None:
        """A first backup of MANY_COUNT small checkpoints: `rsync -a --fsync` (ckptsync makes every
        file durable before it counts too) against ckptsync backup --all; the order alternates."""
        src = self.many
        src_map = tree_map(src)
        total = sum(src_map.values())
        rows = []
        if self.selected("rsync"):
            rows.append(("rsync", "rsync -a --fsync", lambda d: [["rsync", "-a", "--fsync", "-e", self.rsh(),
                                                                  f"{ALIAS}:{src}/", f"{d}/"]], None, None))
        for server in (self.servers if self.selected("ckptsync") else []):
            rows.append(("ckptsync", "ckptsync backup (many)",
                         lambda d: [self.ck("backup", "--host", ALIAS, "--remote-dir", str(src), "--all",
                                            "--local-dir", str(d), "--quiet")], self.ck_env, server))
        turn = rep % len(rows) if rows else 0
        for tool, label, stages, env, server in rows[turn:] + rows[:turn]:
            dst = self.fresh(rd / f"many-{tool}")
            self.measure(speed, rep, "many", tool, label, stages(dst), env, total,
                         lambda d=dst, t=tool: compare(src_map, d, allow_extra=(t == "ckptsync")), dst, server=server)
            shutil.rmtree(dst, ignore_errors=True)

    def bwlimit_rows(self, speed: str, rep: int, rd: Path, ck_map: dict[str, int], ck_bytes: int,
                     server: str) -> None:
        """--bwlimit at a quarter of the link (or 20 MB/s unshaped), both directions: the rate while data flows
        (veth samples, 5%-95% of the bytes) must be within 5% of the limit, and the wire bytes over the run's
        own seconds (from --json) must not pass it by more than 5%. The run's seconds also hold its fixed
        costs (login, the local check of the backup, the commit), which no limiter should make up for by
        going faster. Without veth samples the run's rate is held to 5% either way. Behind the relay, one ssh
        stream may not reach the shaped rate, so the quarter is of the slower measured ssh stream if lower."""
        rate = SPEEDS[speed]
        limit = rate // 8 // BWLIMIT_SHARE if rate else BWLIMIT_UNSHAPED
        chk = self.links.get(speed, {}).get("check")
        if speed in RELAY_DELAY and chk:
            stream = min(chk["pull_mbit"], chk["push_mbit"]) * 1e6 / 8
            limit = min(limit, int(stream) // BWLIMIT_SHARE // 1000 * 1000)

        def shell(argv: list[str], out: Path) -> list[list[str]]:
            return [["bash", "-c", f"{shlex.join(argv)} > {q(out)}"]]

        def check(out: Path, tree_ok) -> tuple[bool, str]:
            ok, msg = tree_ok()
            try:
                res = json.loads(out.read_text())
                achieved = res["wire_bytes"] / res["seconds"]
            except (OSError, ValueError, KeyError, ZeroDivisionError) as e:
                return False, f"no usable --json result: {e}"
            off = achieved / limit - 1
            within = abs(off) <= BWLIMIT_TOLERANCE
            text = (f"{msg}; limit {limit / 1e6:.2f} MB/s, achieved {achieved / 1e6:.2f} MB/s "
                    f"({off:+.1%}, {res['wire_bytes'] / 1e6:.1f} MB on the wire)")
            steady = steady_rate(self.last_wire_samples)
            if steady:
                s_off = steady / limit - 1
                text += f"; while sending (veth, 5%-95% of the bytes) {steady / 1e6:.2f} MB/s ({s_off:+.1%})"
                within = abs(s_off) <= BWLIMIT_TOLERANCE and off <= BWLIMIT_TOLERANCE
            return ok and within, text

        dst = self.fresh(rd / "dst-bwlimit")
        out = rd / "bwlimit-backup.json"
        self.measure(speed, rep, "bwlimit", "ckptsync", f"ckptsync backup --bwlimit {limit // 1000}K",
                     shell(self.ck("backup", "--host", ALIAS, "--remote-dir", str(self.src), "--checkpoint",
                                   RESTORE_CKPT, "--no-extra-files", "--local-dir", str(dst), "--json",
                                   "--quiet", "--bwlimit", str(limit)), out), self.ck_env, ck_bytes,
                     lambda: check(out, lambda: compare(ck_map, dst / RESTORE_CKPT, allow_extra=True)), dst,
                     server=server)
        nd = self.fresh(rd / "srv-restore-bwlimit")
        out = rd / "bwlimit-restore.json"
        self.measure(speed, rep, "bwlimit", "ckptsync", f"ckptsync restore --bwlimit {limit // 1000}K",
                     shell(self.ck("restore", "--host", ALIAS, "--remote-dir", str(nd), "--local-dir", str(dst),
                                   "--checkpoint", RESTORE_CKPT, "--no-extra-files", "--json", "--quiet",
                                   "--bwlimit", str(limit)), out), self.ck_env, ck_bytes,
                     lambda: check(out, lambda: compare(ck_map, nd / RESTORE_CKPT, allow_extra=True)), nd,
                     server=server)
        shutil.rmtree(nd, ignore_errors=True)

    # summary -----------------------------------------------------------
    def summary(self, speed: str) -> list[dict]:
        rows: dict[tuple, list[dict]] = {}
        for r in self.records:
            if r["speed"] == speed:
                rows.setdefault((r["op"], r["label"], r.get("server")), []).append(r)
        out = []
        for (op, label, server), recs in rows.items():
            good = [r for r in recs if r["ok"]]
            med = statistics.median(r["wall_s"] for r in good) if good else None
            rss = [r["rss_kb"] for r in good if r["rss_kb"] is not None]
            out.append({
                "speed": speed, "op": op, "label": label, "tool": recs[0]["tool"], "server": server,
                "sides": recs[0].get("sides"),
                "reps_ok": len(good), "reps": len(recs), "median_s": med,
                "min_s": min((r["wall_s"] for r in good), default=None),
                "max_s": max((r["wall_s"] for r in good), default=None),
                "mb_per_s": (recs[0]["bytes"] / 1e6 / med) if med else None,
                "peak_rss_mb": (max(rss) / 1024) if rss else None,
                "peak_tree_mb": max(r["tree_peak_kb"] for r in good) / 1024 if good else None,
                "bytes": recs[0]["bytes"],
                "wire_mb": (statistics.median(r["wire_bytes"]["total"] for r in good) / 1e6) if good else None,
                "wire_mb_down": (statistics.median(r["wire_bytes"]["down"] for r in good) / 1e6) if good else None,
                "wire_mb_up": (statistics.median(r["wire_bytes"]["up"] for r in good) / 1e6) if good else None,
                # wire bytes over the bytes the row is meant to move (below 1: compressed or not sent)
                "wire_ratio": (statistics.median(r["wire_bytes"]["total"] for r in good) / recs[0]["bytes"])
                if good and recs[0]["bytes"] else None,
            })
        for s in out:
            s["ratio"] = None
            s["ratio_vs"] = None
            if s["tool"] != "ckptsync" or s["median_s"] is None:
                continue
            anchors = [o for o in out if o["op"] == s["op"] and o["tool"] != "ckptsync" and o["median_s"]]
            if s["op"] in ("noop", "restore-all", "restore-ckpt", "many"):
                anchors = [o for o in anchors if o["label"] == RATIO_ANCHOR[s["op"]]]
            elif s["op"] != "backup":
                anchors = []
            if anchors:
                best = min(anchors, key=lambda o: o["median_s"])
                s["ratio"] = s["median_s"] / best["median_s"]
                s["ratio_vs"] = best["label"]
        order = {op: i for i, (op, _d) in enumerate(OPS)}
        kinds = {k: i for i, k in enumerate(servers.SERVERS)}
        out.sort(key=lambda s: (order.get(s["op"], 99), s["tool"] == "ckptsync", s["label"] if s["server"] else "",
                                kinds.get(s["server"], -1), s["median_s"] if s["median_s"] is not None else 1e18))
        return out

    def print_table(self, speed: str, summ: list[dict], link: dict) -> None:
        log("")
        log(f"=== link: {speed}  {describe_link(link)}")
        hdr = (f"{'operation':<13}{'tool':<42}{'ok':>5}{'median s':>10}{'MB/s':>9}"
               f"{'RSS MB':>8}{'tree MB':>9}{'wire MB':>9}  ckptsync/anchor")
        log(hdr)
        log("-" * len(hdr))
        for s in summ:
            med = f"{s['median_s']:.2f}" if s["median_s"] is not None else "FAILED"
            mbs = f"{s['mb_per_s']:.1f}" if s["mb_per_s"] else "-"
            rss = f"{s['peak_rss_mb']:.0f}" if s["peak_rss_mb"] is not None else "-"
            tree = f"{s['peak_tree_mb']:.0f}" if s["peak_tree_mb"] is not None else "-"
            wire = mb(s["wire_mb"] * 1e6) if s["wire_mb"] is not None else "-"
            ratio = f"{s['ratio']:.2f}x vs {s['ratio_vs']}" if s["ratio"] is not None else ""
            log(f"{s['op']:<13}{shown(s['label'], s['server']):<42}{s['reps_ok']:>2}/{s['reps']:<2}{med:>10}{mbs:>9}"
                f"{rss:>8}{tree:>9}{wire:>9}  {ratio}")


def steady_rate(samples: list[tuple[float, int]]) -> float | None:
    """Bytes/s on the link between the samples where 5% and 95% of the command's bytes had crossed it."""
    if len(samples) < 10:
        return None
    base = samples[0][1]
    total = samples[-1][1] - base
    if total <= 0:
        return None
    a = next((t, b) for t, b in samples if b - base >= 0.05 * total)
    z = next((t, b) for t, b in samples if b - base >= 0.95 * total)
    return (z[1] - a[1]) / (z[0] - a[0]) if z[0] > a[0] else None


def shown(label: str, server: str | None) -> str:
    """A row's label with the server it ran against (ckptsync rows only)."""
    return f"{label} [{server}]" if server else label


def mb(nbytes: float) -> str:
    # a no-op moves kilobytes; keep them visible next to the gigabyte rows
    return f"{nbytes / 1e6:.1f}" if nbytes >= 10e6 else f"{nbytes / 1e6:.3f}"


def describe_link(link: dict) -> str:
    sh = link.get("shaping", {})
    if sh.get("qdisc") == "tbf":
        s = f"(tbf {sh['rate_bit'] / 1e6:.0f} Mbit/s burst {sh['burst_bytes']} B latency {sh['latency']}, both ends"
    else:
        s = "(no qdisc"
    rl = link.get("relay")
    if rl:
        s += f"; relay holding each byte {rl['delay_s_each_way'] * 1000:.0f} ms each way"
    s += ")"
    chk = link.get("check")
    if chk:
        s += (f"  measured payload: pull {chk['pull_mbit']:.0f} Mbit/s, push {chk['push_mbit']:.0f} Mbit/s"
              f" (ssh connect+login {chk['connect_s'] * 1000:.0f} ms)")
        if chk.get("ssh_rtt_ms"):
            s += f"; 1-byte round trip over ssh {chk['ssh_rtt_ms']['median']:.1f} ms"
        pr = chk.get("probe")
        if pr:
            s += (f"; without ssh: round trip {pr['rtt_ms']['median']:.1f} ms, pull {pr['pull_mbit']:.0f} Mbit/s, "
                  f"push {pr['push_mbit']:.0f} Mbit/s")
    return s


def _ms(samples: list[float]) -> dict:
    return {"median": statistics.median(samples) * 1000, "min": min(samples) * 1000,
            "max": max(samples) * 1000, "count": len(samples)}


def ssh_rtt(cfg: str, count: int = 20) -> list[float]:
    """One byte to `cat` on the server and back, `count` times over one ssh session."""
    proc = subprocess.Popen(["ssh", "-F", cfg, ALIAS, "cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            bufsize=0)
    try:
        out = []
        for i in range(count + 1):
            t0 = time.monotonic()
            proc.stdin.write(b"x")
            if proc.stdout.read(1) != b"x":
                raise RuntimeError("ssh echo: no reply from cat on the server")
            if i:  # the first one also waits for the login
                out.append(time.monotonic() - t0)
        return out
    finally:
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def probe_check(rate_bps: int | None) -> dict:
    """The relay's built-in echo/sink/source, straight over TCP: the link as the relay makes it, without ssh."""
    sys.path.insert(0, str(BENCH_DIR))
    import relay
    where = (NS_IP, PROBE_PORT)
    rtt = relay.probe_rtt(where, 20)
    base = statistics.median(rtt)
    nbytes = min(200 * 1024 * 1024, rate_bps // 8 * 4) if rate_bps else 200 * 1024 * 1024
    # each timing includes one round trip (request or confirmation); take it out
    pull = relay.probe_rate(where, nbytes, push=False)
    push = relay.probe_rate(where, nbytes, push=True)
    res = {"rtt_ms": _ms(rtt), "bytes": nbytes, "pull_s": pull, "push_s": push,
           "pull_mbit": nbytes * 8 / 1e6 / max(pull - base, 1e-3),
           "push_mbit": nbytes * 8 / 1e6 / max(push - base, 1e-3)}
    log(f"  relay probe (raw TCP through the relay, no ssh): 1-byte round trip median {res['rtt_ms']['median']:.1f} ms "
        f"(min {res['rtt_ms']['min']:.1f}, max {res['rtt_ms']['max']:.1f}, n={len(rtt)}); "
        f"{nbytes / 1e6:.0f} MB pull {res['pull_mbit']:.0f} Mbit/s, push {res['push_mbit']:.0f} Mbit/s")
    return res


def link_check(lab: Lab, rate_bps: int | None, relayed: bool = False) -> dict:
    """Time a plain ssh stream each way over the current link, and a one-byte echo."""
    nbytes = 200 * 1024 * 1024
    if rate_bps:
        nbytes = min(nbytes, rate_bps // 8 * 4)  # about 4 seconds on shaped links
    cfg = lab.cfg
    t0 = time.monotonic()
    run(["ssh", "-F", cfg, ALIAS, "true"])
    connect = time.monotonic() - t0
    rtt = ssh_rtt(cfg)
    t0 = time.monotonic()
    subprocess.run(["ssh", "-F", cfg, ALIAS, f"head -c {nbytes} /dev/zero"], stdout=subprocess.DEVNULL, check=True)
    pull = time.monotonic() - t0
    t0 = time.monotonic()
    subprocess.run(["bash", "-c", f"head -c {nbytes} /dev/zero | ssh -F {q(cfg)} {ALIAS} 'cat > /dev/null'"],
                   check=True)
    push = time.monotonic() - t0
    res = {"bytes": nbytes, "connect_s": connect, "pull_s": pull, "push_s": push,
           "pull_mbit": nbytes * 8 / 1e6 / max(pull - connect, 1e-3),
           "push_mbit": nbytes * 8 / 1e6 / max(push - connect, 1e-3),
           "ssh_rtt_ms": _ms(rtt), "port": lab.port,
           "commands": {"rtt": f"ssh -F CFG {ALIAS} cat (1 byte written, 1 read back, {len(rtt)} times)",
                        "pull": f"ssh -F CFG {ALIAS} 'head -c {nbytes} /dev/zero' > /dev/null",
                        "push": f"head -c {nbytes} /dev/zero | ssh -F CFG {ALIAS} 'cat > /dev/null'"}}
    log(f"  link check: {nbytes / 1e6:.0f} MB through ssh: pull {pull:.2f}s, push {push:.2f}s; "
        f"ssh connect+login {connect * 1000:.0f} ms; payload rate excluding connect: "
        f"pull {res['pull_mbit']:.0f} Mbit/s, push {res['push_mbit']:.0f} Mbit/s")
    log(f"  1-byte round trip over ssh (cat on the server): median {res['ssh_rtt_ms']['median']:.1f} ms "
        f"(min {res['ssh_rtt_ms']['min']:.1f}, max {res['ssh_rtt_ms']['max']:.1f}, n={len(rtt)})")
    if relayed:
        res["probe"] = probe_check(rate_bps)
    if rate_bps:
        for d in ("pull", "push"):
            ratio = res[f"{d}_mbit"] * 1e6 / rate_bps
            if ratio > 1.05 or ratio < 0.6:
                log(f"  warning: {d} rate is {ratio:.2f}x the configured {rate_bps / 1e6:.0f} Mbit/s")
    if relayed:
        window = res["ssh_rtt_ms"]["median"] / 1000 * min(res["pull_mbit"], res["push_mbit"]) * 1e6 / 8
        log(f"  note: one ssh stream keeps about {window / 2**20:.1f} MiB in flight per round trip "
            f"(rate x RTT); OpenSSH's channel window is 2 MiB, so a single channel cannot fill this link")
    return res


def end_on_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP end the run through SystemExit, so `finally` and atexit tear
    everything down; a second signal during the teardown is ignored, so it cannot cut it short."""
    def on_signal(signum, _frame):
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        log(f"\nsignal {signum}: stopping and tearing down")
        raise SystemExit(128 + signum)

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)


def ck_pythonpath(a) -> str:
    root = str(Path(a.ckptsync_root).resolve())
    old = os.environ.get("PYTHONPATH")
    return root + (os.pathsep + old if old else "")


def ckptsync_probe(lab: Lab, env: dict) -> tuple[bool, str | None, str]:
    r = subprocess.run([sys.executable, "-m", "ckptsync", "--help"], env=env, capture_output=True, text=True,
                       cwd=lab.home, timeout=120)
    if r.returncode != 0:
        lines = (r.stderr or r.stdout or "").strip().splitlines()
        return False, None, lines[-1] if lines else f"exit status {r.returncode}"
    v = subprocess.run([sys.executable, "-c", "import ckptsync; print(getattr(ckptsync, '__version__', '?'))"],
                       env=env, capture_output=True, text=True, cwd=lab.home)
    return True, v.stdout.strip() or None, ""


# ------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmark ckptsync against rsync/scp/tar over a shaped SSH link "
                                            "to an sshd in a private network namespace (needs root).")
    p.add_argument("--speeds", default=",".join(SPEEDS),
                   help="comma list of: " + ",".join(SPEEDS) + " (default: all)")
    p.add_argument("--reps", type=int, default=3, help="repetitions per row (default 3)")
    p.add_argument("--tools", default=",".join(TOOLS), help="comma list of: " + ",".join(TOOLS) + " (default: all)")
    p.add_argument("--ops", default=",".join(op for op, _d in OPS),
                   help="comma list of: " + ",".join(op for op, _d in OPS) + " (default: all); the full backups "
                        "always run, since the other operations start from their copies")
    p.add_argument("--ck-parallel", default="", metavar="N[,N...]",
                   help="also time ckptsync backup and restore with --parallel N, beside the default rows")
    p.add_argument("--server", default=servers.DEFAULT, metavar="stock|equipped|both|...",
                   help="the server's python3 that ckptsync's rows run against, a comma list of: "
                        + "; ".join(f"{k}: {v}" for k, v in servers.SERVERS.items())
                        + f"; both = equipped,stock; all = every one (default {servers.DEFAULT})")
    p.add_argument("--data", default=str(DEFAULT_DATA),
                   help=f"cache for the generated checkpoints and their venv (default {DEFAULT_DATA})")
    p.add_argument("--fixture", default=str(DEFAULT_FIXTURE), help="path to make_hf_fixture.py")
    p.add_argument("--ckptsync-root", default=str(REPO),
                   help="directory put first on PYTHONPATH for `python -m ckptsync` (default: this repository)")
    p.add_argument("--keep", action="store_true", help="keep namespace, sshd and work dirs for debugging")
    p.add_argument("--quick", action="store_true", help="1 repetition, unshaped link only")
    p.add_argument("--drop-caches", action="store_true", help="sync and drop page cache before each transfer")
    p.add_argument("--link-check-only", action="store_true", help="set up, shape and measure the link, then exit")
    p.add_argument("--cleanup", action="store_true", help="remove namespaces left by killed or --keep runs")
    p.add_argument("--no-json", action="store_true", help="do not write bench/results/*.json")
    p.add_argument("--profile", action="store_true",
                   help="record each row's CPU with `perf record -a` and count it by side and by library "
                        "(bench/cpu.py; `python3 bench/cpu.py RESULTS.json` prints the per-GB table)")
    a = p.parse_args(argv)
    if a.quick:
        a.reps = 1
        a.speeds = "unshaped"
    a.speed_list = [s.strip() for s in a.speeds.split(",") if s.strip()]
    bad = [s for s in a.speed_list if s not in SPEEDS]
    a.tool_list = [t.strip() for t in a.tools.split(",") if t.strip()]
    badt = [t for t in a.tool_list if t not in TOOLS]
    a.op_list = [o.strip() for o in a.ops.split(",") if o.strip()]
    try:
        a.ck_parallel_list = [int(n) for n in a.ck_parallel.split(",") if n.strip()]
    except ValueError:
        p.error(f"--ck-parallel {a.ck_parallel!r}: expected numbers, e.g. 2,4")
    try:
        a.server_list = servers.parse(a.server)
    except ValueError as e:
        p.error(f"--server: {e}")
    bado = [o for o in a.op_list if o not in dict(OPS)]
    if bad or badt or bado or a.reps < 1:
        p.error(f"unknown speeds {bad} / tools {badt} / ops {bado}, or --reps < 1")
    return a


def main(argv=None) -> int:
    if os.geteuid() != 0:
        print("bench/run.py needs root (it creates a network namespace, a veth pair and tc qdiscs); "
              "run it with sudo.")
        return 2
    a = parse_args(argv)
    if a.cleanup:
        return cleanup_stale(Path(a.data).expanduser().resolve())
    have_time = ensure_prereqs()
    data = Path(a.data).expanduser().resolve()
    src = ensure_data(data, Path(a.fixture))
    src_map = tree_map(src)
    total = sum(src_map.values())
    log(f"source: {src}  {len(src_map)} files, {total / 1e6:.1f} MB "
        f"({', '.join(f'{c} {sum(subtree(src_map, c).values()) / 1e6:.0f} MB' for c in CHECKPOINTS)})")

    busy = run(["ip", "-o", "-4", "addr", "show"], check=False).stdout
    if f" {HOST_IP}/" in busy:
        log(f"{HOST_IP} is already configured on this machine (another run, or a stale --keep run): "
            f"run `python3 {Path(__file__).resolve()} --cleanup` or wait for the other run")
        return 1

    lab = Lab(keep=a.keep)
    atexit.register(lab.close)

    end_on_signals()

    started = _dt.datetime.now(_dt.timezone.utc)
    out: dict = {"started": started.isoformat(), "argv": sys.argv, "complete": False}
    bench = None
    rc = 0
    try:
        lab.up()
        log(f"server: sshd in netns {lab.ns} at {NS_IP} (host side {HOST_IP}, veth {lab.vh}/{lab.vn})")
        ck_ok, ck_version, why = False, None, ""
        if "ckptsync" in a.tool_list:
            env = dict(os.environ, HOME=lab.home, PYTHONPATH=ck_pythonpath(a))
            ck_ok, ck_version, why = ckptsync_probe(lab, env)
            if not ck_ok:
                log(f"ckptsync is not available (`python3 -m ckptsync --help` failed: {why}); skipping its rows")
        out["machine"] = machine_facts(ck_version)
        out["config"] = {"speeds": a.speed_list, "reps": a.reps, "tools": a.tool_list, "ops": a.op_list, "ck_parallel": a.ck_parallel_list,
                         "servers": {k: {"what": servers.SERVERS[k], "python3": servers.wrapper_text(lab.bin, k)}
                                     for k in a.server_list},
                         "ckptsync_available": ck_ok,
                         "wire_bytes": "bytes counted on the host end of the veth (/sys/class/net/DEV/statistics "
                                       "rx_bytes + tx_bytes) across each command, both directions, frame "
                                       "headers included",
                         "drop_caches": a.drop_caches, "source": str(src), "source_files": len(src_map),
                         "source_bytes": total, "restore_checkpoint": RESTORE_CKPT,
                         "restore_checkpoint_bytes": sum(subtree(src_map, RESTORE_CKPT).values()),
                         "server": {"netns": lab.ns, "address": NS_IP, "host_address": HOST_IP},
                         "mb": "1 MB = 1e6 bytes"}
        fx = data / "fixture.json"
        if fx.exists():
            out["config"]["fixture"] = json.loads(fx.read_text())
        out["links"] = {}
        timer = Timer(have_time)
        timer.counter = lambda: sum(lab.veth_bytes())
        bench = Bench(a, lab, src, timer, a.tool_list, ck_ok)
        if ck_ok:
            for kind in a.server_list:
                lab.set_server(kind)
                doc = servers.doctor(bench.ck(), bench.ck_env, lab.home, ALIAS, str(src))
                bench.sides[kind] = servers.sides(doc)
                out["config"]["servers"][kind]["doctor"] = doc
                log(servers.describe(kind, bench.sides[kind]))
                wrong = servers.check(kind, bench.sides[kind])
                if wrong:
                    log(f"warning: {wrong}")
        if "many" in a.op_list:
            bench.many = ensure_many(data)
            many_map = tree_map(bench.many)
            log(f"many: {bench.many}  {len(many_map)} files, {sum(many_map.values()) / 1e6:.1f} MB")
            out["config"]["many"] = {"source": str(bench.many), "files": len(many_map),
                                     "bytes": sum(many_map.values()), "made_from": str(MANY_SOURCE)}
        lab.extra_dirs.append(bench.work)
        bench.work.mkdir(parents=True, exist_ok=True)
        for speed in a.speed_list:
            log("")
            log(f"--- {speed}")
            shaping = lab.shape(SPEEDS[speed])
            link = {"shaping": shaping}
            if speed in RELAY_DELAY:
                link["relay"] = lab.start_relay(RELAY_DELAY[speed])
                log(f"  relay: {NS_IP}:{RELAY_PORT} -> sshd {NS_IP}:22, each byte held "
                    f"{RELAY_DELAY[speed] * 1000:.0f} ms each way, at most {RELAY_MAX_HELD / 2**20:.0f} MiB "
                    f"per direction; Host {ALIAS} now uses port {RELAY_PORT}")
            else:
                lab.stop_relay()
            link["check"] = link_check(lab, SPEEDS[speed], relayed=speed in RELAY_DELAY)
            out["links"][speed] = link
            bench.links[speed] = link
            if a.link_check_only:
                continue
            for rep in range(a.reps):
                cur = tree_map(src)
                if cur != src_map:
                    log(f"  warning: source tree changed since start ({len(src_map)} -> {len(cur)} files)")
                bench.rep(speed, rep, cur)
            summ = bench.summary(speed)
            out.setdefault("summary", {})[speed] = summ
            bench.print_table(speed, summ, link)
            comp = servers.compare(summ, speed)
            if comp:
                out.setdefault("server_comparison", {})[speed] = comp
                servers.print_comparison(comp, speed, log)
        out["complete"] = True
        if bench.failures:
            log(f"\n{bench.failures} timed command(s) FAILED (see the !!! lines above)")
            rc = 1
    except RuntimeError as e:
        log(f"error: {e}")
        rc = 1
    finally:
        out["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat()
        if bench is not None:
            out["results"] = bench.records
        if bench is not None and bench.records and not a.no_json:
            RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            path = RESULTS_DIR / (started.strftime("%Y%m%dT%H%M%SZ") + ".json")
            path.write_text(json.dumps(out, indent=1) + "\n")
            log(f"raw results: {path}")
        lab.close()
    return rc


if __name__ == "__main__":
    sys.exit(main())
