#!/usr/bin/env python3
"""What a real training run keeps: a transformers Trainer that saves every few seconds and rotates
(save_total_limit=3), backed up over a shaped SSH link by `ckptsync watch`, `watch --no-hold` and
`backup` in a loop. For each run: checkpoints written, backed up, lost; the exposure of each (save
finished -> committed on this side), median and worst; and whether every backup holds the bytes
the trainer wrote. See bench/README.md.
"""
from __future__ import annotations

import argparse
import atexit
import datetime as _dt
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import run as lab_mod  # noqa: E402  (bench/run.py: the lab, the venv, the link check)
from tree_hash import sha256_tree  # noqa: E402
from run import (ALIAS, DEFAULT_DATA, REPO, RESULTS_DIR, Lab, ck_pythonpath, end_on_signals,  # noqa: E402
                 ensure_prereqs, ensure_venv, link_check, log, machine_facts, parse_rate, stop_process)

# A subnet of its own, so that run.py and s3.py can run beside it (they still share the CPU).
NET = "10.231.79"
TRAIN_SCRIPT = BENCH_DIR / "tiny_train.py"
MODES = {"watch": ["watch", "--json", "--until-done"],
         "no-hold": ["watch", "--json", "--until-done", "--no-hold"],
         "backup-loop": ["backup", "--json"]}
POLL = 0.2            # how often the backup directory is looked at for new manifests
EXPOSURE_MARGIN = 3.0  # the target: worst exposure at most one checkpoint's transfer + this


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


class Commits:
    """When each checkpoint was committed here: the mtime of its manifest (written just before the
    entry is renamed into place), taken when the manifest is first seen, so a later rewrite cannot
    move it."""

    def __init__(self, backup: Path):
        self.dir = backup / ".ckptsync" / "manifests"
        self.at: dict[str, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def look(self) -> None:
        try:
            entries = list(os.scandir(self.dir))
        except OSError:
            return
        for e in entries:
            if e.name.endswith(".json") and e.name[:-5] not in self.at:
                try:
                    self.at[e.name[:-5]] = e.stat().st_mtime
                except OSError:
                    pass

    def loop(self) -> None:
        while not self.stop.wait(POLL):
            self.look()

    def start(self) -> None:
        self.thread.start()

    def finish(self) -> None:
        self.stop.set()
        if self.thread.ident is not None:
            self.thread.join()
        self.look()


class TrainRun:
    """One training run backed up one way over the current link."""

    def __init__(self, a, lab: Lab, train_py: Path, mode: str, link: str, rate_bps: int | None, root: Path):
        self.a, self.lab, self.train_py, self.mode, self.link, self.rate_bps = a, lab, train_py, mode, link, rate_bps
        self.dir = root / f"{mode}-{link}"
        self.out = self.dir / "out"            # the trainer's output_dir: remote_dir of the backup
        self.backup = self.dir / "backup"
        self.saves = self.dir / "saves.jsonl"
        self.go = self.dir / "go"
        self.config = self.dir / "ckptsync.yaml"
        self.env = dict(os.environ, HOME=lab.home, PYTHONPATH=ck_pythonpath(a))
        self.env.pop("CKPTSYNC_CONFIG", None)
        self.trainer: subprocess.Popen | None = None
        self.watch: subprocess.Popen | None = None
        self.events: list[dict] = []
        self.loop_runs: list[dict] = []
        self.trainer_done_at: float | None = None
        self.ended = ""
        self.commits = Commits(self.backup)
        self.stopping = threading.Event()   # ends the backup loop early (an error, a signal)

    def words(self) -> list[str]:
        hold = ["--hold-max", str(self.a.hold_max)] if self.a.hold_max is not None and self.mode == "watch" else []
        return MODES[self.mode] + hold

    def ck(self, *words: str) -> list[str]:
        return [self.a.ckptsync_python, "-m", "ckptsync", "--config", str(self.config), *words,
                "--host", ALIAS, "--remote-dir", str(self.out), "--local-dir", str(self.backup)]

    # ------------------------------------------------------------ the trainer

    def start_trainer(self) -> None:
        a = self.a
        argv = [str(self.train_py), str(TRAIN_SCRIPT), str(self.out), "--log", str(self.saves), "--go", str(self.go),
                "--checkpoints", str(a.checkpoints), "--save-seconds", str(a.save_seconds),
                "--width", str(a.width), "--rank", str(a.rank)] + (["--full"] if a.full else [])
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        self.train_log = open(self.dir / "train.log", "w")
        self.trainer = subprocess.Popen(argv, cwd=self.dir, env=env, stdin=subprocess.DEVNULL, stdout=self.train_log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 600
        while not any(e.get("event") == "ready" for e in read_jsonl(self.saves)):
            if self.trainer.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the trainer did not start (exit {self.trainer.poll()}):\n{self.train_tail()}")
            time.sleep(0.2)

    def train_tail(self) -> str:
        return "\n".join((self.dir / "train.log").read_text(errors="replace").splitlines()[-15:])

    def wait_trainer(self) -> None:
        limit = self.a.checkpoints * self.a.save_seconds * 4 + 300
        try:
            rc = self.trainer.wait(limit)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the trainer ran past {limit:.0f} s:\n{self.train_tail()}") from None
        if rc != 0:
            raise RuntimeError(f"the trainer failed (exit {rc}):\n{self.train_tail()}")
        self.trainer_done_at = time.time()

    # ------------------------------------------------------------ ckptsync

    def start_watch(self) -> None:
        self.watch_err = open(self.dir / "ckptsync.stderr", "w")
        self.watch = subprocess.Popen(self.ck(*self.words()),
                                      cwd=self.lab.home, env=self.env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=self.watch_err, text=True,
                                      start_new_session=True)
        self.reader = threading.Thread(target=self.read_events, daemon=True)
        self.reader.start()
        deadline = time.monotonic() + 120
        while not any(e.get("event") == "started" for e in self.events):
            if self.watch.poll() is not None or time.monotonic() > deadline:
                self.reader.join(5)
                raise RuntimeError(f"ckptsync watch did not start (exit {self.watch.poll()}): "
                                   f"{(self.dir / 'ckptsync.stderr').read_text()[-2000:]} {self.events[-3:]}")
            time.sleep(0.1)

    def read_events(self) -> None:
        for line in self.watch.stdout:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            e["received"] = time.time()
            self.events.append(e)

    def end_watch(self) -> None:
        """--until-done ends it once training has finished and it has caught up; past the drain time
        it is interrupted (which releases its holds)."""
        try:
            self.watch.wait(self.a.drain_seconds)
            self.ended = f"until-done (exit {self.watch.returncode})"
        except subprocess.TimeoutExpired:
            self.watch.send_signal(signal.SIGINT)
            try:
                self.watch.wait(60)
            except subprocess.TimeoutExpired:
                self.watch.kill()
                self.watch.wait()
            self.ended = f"interrupted after {self.a.drain_seconds:.0f} s of drain time (exit {self.watch.returncode})"
        self.reader.join(10)

    def backup_loop(self) -> None:
        """`backup` as a cron entry would run it, every loop_seconds (a run still going when its next
        time comes delays that one); once training is over, until one run has started after it."""
        every, t0 = self.a.loop_seconds, time.time()
        while not self.stopping.is_set():
            start = time.time()
            r = subprocess.run(self.ck(*MODES["backup-loop"]), cwd=self.lab.home, env=self.env, text=True,
                               stdin=subprocess.DEVNULL, capture_output=True)
            try:
                doc = json.loads(r.stdout)
            except ValueError:
                doc = {}
            self.loop_runs.append({"start": start, "end": time.time(), "exit_code": r.returncode,
                                   "fetched": doc.get("fetched", []), "failed": doc.get("failed", {}),
                                   "not_backed_up": doc.get("not_backed_up", []),
                                   "deleted_on_server": doc.get("deleted_on_server", []),
                                   "stderr": r.stderr[-1500:]})
            done = self.trainer_done_at
            if done is not None and start >= done + self.a.settle:
                return
            now = time.time()
            self.stopping.wait(max(0.0, t0 + every * math.ceil((now - t0) / every) - now))

    # ------------------------------------------------------------ one run

    def measure(self) -> dict:
        a = self.a
        self.dir.mkdir(parents=True)
        self.out.mkdir()
        self.config.write_text(f"settle_seconds: {a.settle:g}\n")
        wire0 = sum(self.lab.veth_bytes())
        log(f"  {self.mode}: starting the trainer")
        try:
            self.start_trainer()
            self.commits.start()
            loop = None
            if self.mode == "backup-loop":
                loop = threading.Thread(target=self.backup_loop, daemon=True)
                loop.start()
            else:
                self.start_watch()
            began = time.time()
            self.go.touch()
            log(f"  {self.mode}: training ({a.checkpoints} checkpoints, one every {a.save_seconds:g} s)")
            self.wait_trainer()
            log(f"  {self.mode}: training done after {time.time() - began:.0f} s; waiting for ckptsync")
            if loop is not None:
                loop.join(a.drain_seconds)
                self.ended = "loop ended" if not loop.is_alive() else "loop still running at the drain time"
            else:
                self.end_watch()
        finally:
            self.stop_all()
            self.commits.finish()
        return self.analyse(sum(self.lab.veth_bytes()) - wire0, time.time() - began)

    def stop_all(self) -> None:
        self.stopping.set()
        if self.watch is not None and self.watch.poll() is None:
            self.watch.send_signal(signal.SIGINT)
            try:
                self.watch.wait(30)
            except subprocess.TimeoutExpired:
                self.watch.kill()
                self.watch.wait()
        if self.trainer is not None:
            stop_process(self.trainer, 10)
        for f in ("train_log", "watch_err"):
            if getattr(self, f, None):
                getattr(self, f).close()

    # ------------------------------------------------------------ what it did

    def analyse(self, wire: int, seconds: float) -> dict:
        saves = [s for s in read_jsonl(self.saves) if s.get("event") == "saved"]
        written = [s["checkpoint"] for s in saves]
        by_name = {s["checkpoint"]: s for s in saves}
        committed = {n: t for n, t in self.commits.at.items() if n in by_name}
        events = {}
        for e in self.events:
            if e.get("event") == "committed":
                events.setdefault(e["checkpoint"], e)
        named = set()
        for e in self.events:
            if e.get("event") in ("lost", "skipped"):
                named.add(e.get("checkpoint"))
        for r in self.loop_runs:
            named |= set(r["not_backed_up"]) | set(r["failed"])
        rows, bad = [], []
        for s in saves:
            name = s["checkpoint"]
            row = {"checkpoint": name, "size": s["size"], "saved_at": s["saved_at"], "committed_at": committed.get(name)}
            if name in committed:
                row["exposure_s"] = round(committed[name] - s["saved_at"], 3)
                got = sha256_tree(self.backup / name)
                row["identical"] = got == s["files"]
                if not row["identical"]:
                    differ = sorted(k for k in set(got) | set(s["files"]) if got.get(k) != s["files"].get(k))
                    row["differs"] = differ
                    bad.append(f"{name}: {', '.join(differ[:4])}")
            e = events.get(name)
            if e is not None:
                row["event_exposure_s"] = round(e["time"] - s["saved_at"], 3)
                row["saved_seconds_ago"] = e.get("saved_seconds_ago")
                row["held"] = e.get("held")
            rows.append(row)
        backed = [r for r in rows if r["committed_at"] is not None]
        lost = [r["checkpoint"] for r in rows if r["committed_at"] is None]
        exposure = [r["exposure_s"] for r in backed]
        sizes = [s["size"] for s in saves]
        gaps = [b["saved_at"] - a_["saved_at"] for a_, b in zip(saves, saves[1:])]
        per_ckpt_wire = wire / len(backed) if backed else None
        transfer = per_ckpt_wire * 8 / self.rate_bps if per_ckpt_wire and self.rate_bps else None
        kinds: dict[str, int] = {}
        for e in self.events:
            kinds[e.get("event", "?")] = kinds.get(e.get("event", "?"), 0) + 1
        watch_rc = self.watch.returncode if self.watch is not None else None
        return {
            "mode": self.mode, "link": self.link, "rate_bit": self.rate_bps, "argv": self.ck(*self.words()),
            "seconds": round(seconds, 1), "ended": self.ended, "exit_code": watch_rc,
            "written": len(written), "backed_up": len(backed), "lost": lost,
            "lost_named": sorted(n for n in lost if n in named), "lost_silent": sorted(n for n in lost if n not in named),
            "identical": sum(1 for r in backed if r.get("identical")), "not_identical": bad,
            "exposure_median_s": round(statistics.median(exposure), 2) if exposure else None,
            "exposure_worst_s": round(max(exposure), 2) if exposure else None,
            "checkpoint_bytes_median": int(statistics.median(sizes)) if sizes else None,
            "save_interval_median_s": round(statistics.median(gaps), 2) if gaps else None,
            "wire_bytes": wire, "wire_bytes_per_backed_up": int(per_ckpt_wire) if per_ckpt_wire else None,
            "transfer_s": round(transfer, 2) if transfer else None,
            "events": kinds, "event_log": self.events, "finished": next((e for e in self.events if e.get("event") == "finished"), None),
            "checkpoints": rows,
            "loop_runs": [{k: v for k, v in r.items() if k != "stderr" or r["exit_code"]} for r in self.loop_runs],
            "stderr_tail": (self.dir / "ckptsync.stderr").read_text()[-3000:] if (self.dir / "ckptsync.stderr").exists() else "",
        }


# ------------------------------------------------------------------ verdicts and table

def targets(r: dict) -> list[str]:
    """The issue's targets, as they apply to this run."""
    out = []
    fast = r["transfer_s"] is not None and r["save_interval_median_s"] and r["transfer_s"] < r["save_interval_median_s"]
    if r["not_identical"]:
        out.append("BYTES DIFFER")
    if fast:
        out.append("0 lost: " + ("met" if not r["lost"] else "MISSED"))
        if r["mode"] != "backup-loop" and r["exposure_worst_s"] is not None:
            ok = r["exposure_worst_s"] <= r["transfer_s"] + EXPOSURE_MARGIN
            out.append(f"worst <= transfer+{EXPOSURE_MARGIN:g}s: " + ("met" if ok else "MISSED"))
    elif r["lost"]:   # slower than the saves: the hold keeps what it can, and what is lost must be named
        out.append(f"lost {len(r['lost'])}, every one named: " + ("met" if not r["lost_silent"] else "MISSED"))
    else:
        out.append("0 lost")
    return out


def print_table(runs: list[dict]) -> None:
    head = (f"{'mode':<12} {'link':<9} {'written':>7} {'backed':>6} {'lost':>4} {'named':>5} {'same':>5} "
            f"{'exp med':>7} {'worst':>6} {'xfer':>5} {'every':>5}  targets")
    log("")
    log(head)
    log("-" * len(head))
    for r in runs:
        def s(v):
            return "-" if v is None else f"{v:.1f}"
        log(f"{r['mode']:<12} {r['link']:<9} {r['written']:>7} {r['backed_up']:>6} {len(r['lost']):>4} "
            f"{len(r['lost_named']):>5} {r['identical']:>5} {s(r['exposure_median_s']):>7} {s(r['exposure_worst_s']):>6} "
            f"{s(r['transfer_s']):>5} {s(r['save_interval_median_s']):>5}  {'; '.join(targets(r))}")
    log("")
    log("backed: committed here; lost: written, never backed up (named: said so in a lost/skipped event or a")
    log("backup's not_backed_up); same: backups whose bytes equal the trainer's at save time; exp: save")
    log("finished -> committed here, s; xfer: wire bytes per backed-up checkpoint at the link rate, s;")
    log("every: median seconds between saves")
    for r in runs:
        if r["lost"]:
            log(f"  {r['mode']} {r['link']}: lost {', '.join(r['lost'])}"
                + (f" (not named: {', '.join(r['lost_silent'])})" if r["lost_silent"] else ""))
        if r["not_identical"]:
            log(f"  {r['mode']} {r['link']}: bytes differ: {'; '.join(r['not_identical'])}")
        log(f"  {r['mode']} {r['link']}: {r['ended']}; events {r['events'] or '-'}")


# ------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="A real transformers Trainer that saves and rotates every few seconds, "
                                            "backed up by ckptsync watch / watch --no-hold / backup in a loop over a "
                                            "shaped SSH link (needs root).")
    p.add_argument("--link", default="200mbit", help="the link for every mode (default 200mbit)")
    p.add_argument("--modes", default="watch,no-hold,backup-loop", help="comma list of: " + ",".join(MODES))
    p.add_argument("--slow-link", default="16mbit",
                   help="a link on which one checkpoint's transfer takes longer than the save interval "
                        "(default 16mbit; 'none' skips it)")
    p.add_argument("--slow-modes", default="watch,no-hold", help="modes run on the slow link (default watch,no-hold)")
    p.add_argument("--checkpoints", type=int, default=30, help="checkpoints each training run saves (default 30)")
    p.add_argument("--save-seconds", type=float, default=4.0, help="seconds between saves (default 4)")
    p.add_argument("--rank", type=int, default=128, help="LoRA rank (default 128: about 12.6 MB a checkpoint)")
    p.add_argument("--width", type=int, default=256, help="the model's n_embd (default 256)")
    p.add_argument("--full", action="store_true", help="full fine-tune instead of LoRA (larger checkpoints)")
    p.add_argument("--hold-max", type=int, default=None, help="watch: --hold-max N (default: ckptsync's, 3)")
    p.add_argument("--settle", type=float, default=3.0, help="settle_seconds in ckptsync's config (default 3)")
    p.add_argument("--loop-seconds", type=float, default=5.0, help="backup-loop: a backup every N s (default 5)")
    p.add_argument("--drain-seconds", type=float, default=240.0,
                   help="after training, how long ckptsync may take to finish before it is interrupted (default 240)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help=f"where the venv and the work files go (default {DEFAULT_DATA})")
    p.add_argument("--ckptsync-root", default=str(REPO), help="directory put first on PYTHONPATH (default: this repository)")
    p.add_argument("--ckptsync-python", default=sys.executable,
                   help="the Python that runs `-m ckptsync` (default: this one)")
    p.add_argument("--net", default=NET, help=f"first three octets of the lab's /30 (default {NET})")
    p.add_argument("--keep", action="store_true", help="keep the namespace, sshd and work files")
    p.add_argument("--no-json", action="store_true", help="do not write bench/results/trainer-*.json")
    a = p.parse_args(argv)
    plan = []
    for link, modes in ((a.link, a.modes), (a.slow_link, a.slow_modes)):
        if link == "none":
            continue
        try:
            rate = parse_rate(link)
        except argparse.ArgumentTypeError as e:
            p.error(str(e))
        names = [m.strip() for m in modes.split(",") if m.strip()]
        bad = [m for m in names if m not in MODES]
        if bad:
            p.error(f"unknown modes {bad}: expected {', '.join(MODES)}")
        plan.append((link, rate, names))
    if a.checkpoints < 1 or a.save_seconds <= 0 or a.loop_seconds <= 0:
        p.error("--checkpoints, --save-seconds and --loop-seconds must be positive")
    a.plan = plan
    return a


def main(argv=None) -> int:
    if os.geteuid() != 0:
        print("bench/trainer.py needs root (it creates a network namespace, a veth pair and tc qdiscs); "
              "run it with sudo.")
        return 2
    a = parse_args(argv)
    lab_mod.HOST_IP, lab_mod.NS_IP = f"{a.net}.1", f"{a.net}.2"   # Lab.up() reads run.py's globals
    busy = lab_mod.run(["ip", "-o", "-4", "addr", "show"], check=False).stdout
    if f" {lab_mod.HOST_IP}/" in busy:
        log(f"{lab_mod.HOST_IP} is already in use (another run?): wait, use --net, or clean up with "
            f"`python3 {BENCH_DIR / 'run.py'} --cleanup`")
        return 1
    ensure_prereqs()
    data = Path(a.data).expanduser().resolve()
    train_py = ensure_venv(data / "trainer-venv")
    env = dict(os.environ, PYTHONPATH=ck_pythonpath(a))
    probe = subprocess.run([a.ckptsync_python, "-c", "import ckptsync; print(ckptsync.__version__)"], env=env,
                           capture_output=True, text=True)
    if probe.returncode != 0:
        log(f"{a.ckptsync_python} cannot import ckptsync from {a.ckptsync_root}: {probe.stderr.strip()[-300:]}")
        return 1
    lab = Lab(keep=a.keep)
    atexit.register(lab.close)
    end_on_signals()
    work = data / f"trainer-work-{os.getpid()}"
    if not a.keep:
        lab.extra_dirs.append(work)
    started = _dt.datetime.now(_dt.timezone.utc)
    out: dict = {"started": started.isoformat(), "argv": sys.argv, "complete": False,
                 "machine": machine_facts(probe.stdout.strip()),
                 "config": {k: getattr(a, k) for k in ("checkpoints", "save_seconds", "rank", "width", "full", "hold_max", "settle",
                                                       "loop_seconds", "drain_seconds", "ckptsync_python")},
                 "links": {}, "runs": []}
    out["config"].update(save_total_limit=3, model="GPT-2 from a config, 2 layers, vocab 1000, CPU",
                         exposure="manifest mtime (committed here) - the time on_save ran (save finished)")
    rc = 0
    try:
        lab.up()
        log(f"server: sshd in netns {lab.ns} at {lab_mod.NS_IP}; trainer venv {train_py.parent.parent}; work {work}")
        for link, rate, modes in a.plan:
            log(f"\n--- {link}")
            out["links"][link] = {"shaping": lab.shape(rate), "check": link_check(lab, rate)}
            for mode in modes:
                r = TrainRun(a, lab, train_py, mode, link, rate, work).measure()
                out["runs"].append(r)
                log(f"  {mode}: {r['backed_up']}/{r['written']} backed up, lost {len(r['lost'])}, "
                    f"exposure median {r['exposure_median_s']} s, worst {r['exposure_worst_s']} s")
                if not a.keep:
                    shutil.rmtree(work / f"{mode}-{link}", ignore_errors=True)
        print_table(out["runs"])
        out["complete"] = True
        if any(r["not_identical"] for r in out["runs"]):
            rc = 1
    except RuntimeError as e:
        log(f"error: {e}")
        rc = 1
    finally:
        out["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat()
        if out["runs"] and not a.no_json:
            RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            path = RESULTS_DIR / f"trainer-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
            path.write_text(json.dumps(out, indent=1) + "\n")
            log(f"raw results: {path}")
        lab.close()
    return rc


if __name__ == "__main__":
    sys.exit(main())
