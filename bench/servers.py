"""The server's python3 in bench/run.py's lab: a stock server's, or one with xxhash and zstandard.

Every session of the lab's sshd runs through a ForceCommand, the test suite's login script
(tests/sshd.py), which puts a directory holding a `python3` wrapper first on PATH and then runs
the client's command with /bin/sh -c. That directory is a symlink, pointed at one kind of server
before each ckptsync command, so one run times the same operation against each kind over the
same link, interleaved. Sessions already open keep the python3 they started with; every ckptsync
command starts its own.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _test_sshd():
    """tests/sshd.py, loaded by its path (tests/ holds modules named like bench's): its stock
    python3 and its login script are the ones the test suite runs the agent with."""
    spec = importlib.util.spec_from_file_location("ckptsync_tests_sshd", REPO / "tests" / "sshd.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_SSHD = _test_sshd()
STOCK_PYTHON: tuple[str, ...] = _SSHD.STOCK_PYTHON
LOGIN_SCRIPT: str = _SSHD.LOGIN_SCRIPT

SERVERS = {
    "equipped": "the Python running this script, with ckptsync's dependencies (xxhash, zstandard)",
    "stock": f"{shlex.join(STOCK_PYTHON)}: the standard library only; the zstd binary on PATH if this "
             "machine has one",
    "stock-nozstd": f"{shlex.join(STOCK_PYTHON)} with no zstd binary on its PATH either",
}
SERVER_SETS = {"both": ["equipped", "stock"], "all": list(SERVERS)}
DEFAULT = "equipped"

# What a stock server should reach next to an equipped one (the time target only on the slow link,
# where the wire, not the CPU, sets the pace).
TIME_TARGET = 1.10
TIME_TARGET_SPEED = "200mbit"
WIRE_TARGET = 0.03

# How the laptop packs what it sends (restore) for a server whose own codec is this one.
TO_SERVER = {
    "zstd-zstandard": "zstd frames (the server unpacks them in process)",
    "zstd-stdlib": "zstd frames (the server unpacks them in process)",
    "zlib-lanes": "zlib byte lanes",
}


def parse(text: str) -> list[str]:
    """`--server` value: a comma list of SERVERS, or `both`/`all`; equipped first, no repeats."""
    kinds: list[str] = []
    for word in (w.strip() for w in text.split(",")):
        if not word:
            continue
        if word not in SERVERS and word not in SERVER_SETS:
            raise ValueError(f"unknown server {word!r} (choose from {', '.join([*SERVERS, *SERVER_SETS])})")
        kinds += SERVER_SETS.get(word, [word])
    if not kinds:
        raise ValueError("no server given")
    return [k for k in SERVERS if k in kinds]


def install(bin_dir: Path, sftp: str) -> Path:
    """One directory per kind with its python3 wrapper, `current` pointing at the default kind,
    and the login script for ForceCommand (returned)."""
    bin_dir.mkdir(parents=True)
    empty = bin_dir / "empty"   # stock-nozstd's PATH: the agent finds no zstd (nor anything else) there
    empty.mkdir()
    stock = f'exec {shlex.join(STOCK_PYTHON)} "$@"'
    bodies = {"equipped": f'exec {shlex.quote(sys.executable)} "$@"',
              "stock": stock,
              "stock-nozstd": f"PATH={shlex.quote(str(empty))}\nexport PATH\n{stock}"}
    for kind, body in bodies.items():
        (bin_dir / kind).mkdir()
        script = bin_dir / kind / "python3"
        script.write_text(f"#!/bin/sh\n{body}\n")
        os.chmod(script, 0o755)
    select(bin_dir, DEFAULT)
    login = bin_dir / "login"
    login.write_text(LOGIN_SCRIPT.format(bindir=shlex.quote(str(bin_dir / "current")), sftp=sftp))
    os.chmod(login, 0o755)
    return login


def select(bin_dir: Path, kind: str) -> None:
    """Point `current` at `kind`, in one rename: a session starting meanwhile gets one or the other."""
    new = bin_dir / "current.new"
    if new.is_symlink():
        new.unlink()
    new.symlink_to(kind)
    os.replace(new, bin_dir / "current")


def wrapper_text(bin_dir: Path, kind: str) -> str:
    return (bin_dir / kind / "python3").read_text()


def doctor(ck_argv: list[str], env: dict, cwd: str, alias: str, remote_dir: str) -> dict:
    """`ckptsync doctor --json` against the server the lab points at now: what each side uses."""
    r = subprocess.run([*ck_argv, "doctor", "--json", "--host", alias, "--remote-dir", remote_dir],
                       env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    try:
        doc = json.loads(r.stdout)
    except ValueError:
        doc = None
    if r.returncode != 0 or not isinstance(doc, dict) or "hash" not in doc:
        why = (r.stderr or r.stdout or "").strip().splitlines()
        raise RuntimeError(f"ckptsync doctor failed (exit {r.returncode}): {why[-1] if why else 'no output'}")
    return doc


def sides(doc: dict) -> dict:
    """Which digest and codec each side uses, from the server's doctor: the laptop keeps xxh3-128 in
    its manifests and also computes the server's algorithm when the server cannot give xxh3-128."""
    laptop_hashes = ["xxh3_128"] + ([doc["hash"]] if doc["hash"] != "xxh3_128" else [])
    return {"server": {"python": doc.get("python"), "executable": doc.get("executable"), "hash": doc["hash"],
                       "hash_rate": doc.get("hash_rate"), "codec": doc["codec"], "codec_rate": doc.get("codec_rate"),
                       "missing": [m.get("piece") for m in doc.get("missing") or []]},
            "laptop": {"python": sys.version.split()[0], "hashes": laptop_hashes,
                       "codec_to_server": TO_SERVER.get(doc["codec"], doc["codec"])}}


def describe(kind: str, side: dict) -> str:
    s = side["server"]
    gbs = lambda v: f"{v / 1e9:.2f} GB/s" if v else "not measured"  # noqa: E731
    text = (f"server {kind}: python3 {s['python']} ({s['executable']}), hash {s['hash']} "
            f"({gbs(s['hash_rate'])} there), codec {s['codec']} ({gbs(s['codec_rate'])} there)")
    if side["laptop"]["hashes"][1:]:
        text += f"; the laptop also hashes {side['laptop']['hashes'][1]}"
    return text


def check(kind: str, side: dict) -> str:
    """"" when the server is what its kind says, else why not (the run goes on; the JSON tells)."""
    s = side["server"]
    if kind == "equipped" and (s["hash"] != "xxh3_128" or s["codec"] != "zstd-zstandard"):
        return (f"the equipped server uses {s['hash']} and {s['codec']}: {sys.executable} lacks xxhash or "
                "zstandard; run this script with the Python that has ckptsync's dependencies")
    if kind != "equipped" and s["hash"] == "xxh3_128":
        return f"the {kind} server has xxhash: {shlex.join(STOCK_PYTHON)} is not isolated from site-packages"
    if kind == "stock-nozstd" and s["codec"] != "zlib-lanes":
        return f"the stock-nozstd server still uses {s['codec']}"
    return ""


def compare(summ: list[dict], speed: str) -> list[dict]:
    """Each ckptsync row measured on a server other than the equipped one, next to the same row on
    the equipped server: time ratio and wire ratios (wire bytes over the row's bytes)."""
    equipped = {(s["op"], s["label"]): s for s in summ if s.get("server") == "equipped"}
    out = []
    for s in summ:
        base = equipped.get((s["op"], s["label"]))
        if not s.get("server") or s["server"] == "equipped" or base is None:
            continue
        row = {"speed": speed, "op": s["op"], "label": s["label"], "server": s["server"],
               "median_s": s["median_s"], "equipped_median_s": base["median_s"],
               "wire_ratio": s["wire_ratio"], "equipped_wire_ratio": base["wire_ratio"],
               "time_ratio": None, "wire_ratio_diff": None, "time_target": None, "wire_target": None}
        if s["median_s"] and base["median_s"]:
            row["time_ratio"] = s["median_s"] / base["median_s"]
            if speed == TIME_TARGET_SPEED:
                row["time_target"] = row["time_ratio"] <= TIME_TARGET
        if s["wire_ratio"] is not None and base["wire_ratio"] is not None:
            row["wire_ratio_diff"] = s["wire_ratio"] - base["wire_ratio"]
            row["wire_target"] = abs(row["wire_ratio_diff"]) <= WIRE_TARGET
        out.append(row)
    return out


def print_comparison(rows: list[dict], speed: str, log) -> None:
    if not rows:
        return
    log("")
    log(f"--- stock against equipped server at {speed}: time (stock/equipped; target <= {TIME_TARGET:.2f} at "
        f"{TIME_TARGET_SPEED}) and wire ratio (wire bytes / bytes; target within {WIRE_TARGET} of equipped)")
    hdr = (f"{'operation':<13}{'row':<34}{'server':<14}{'median s':>9}{'equipped':>9}{'time x':>8}"
           f"{'wire':>8}{'equipped':>9}{'diff':>8}  targets")
    log(hdr)
    log("-" * len(hdr))
    num = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
    for r in rows:
        verdict = []
        if r["time_target"] is not None:
            verdict.append("time " + ("met" if r["time_target"] else "MISSED"))
        if r["wire_target"] is not None:
            verdict.append("wire " + ("met" if r["wire_target"] else "MISSED"))
        log(f"{r['op']:<13}{r['label']:<34}{r['server']:<14}{num(r['median_s'], '9.2f')}"
            f"{num(r['equipped_median_s'], '9.2f')}{num(r['time_ratio'], '8.2f')}{num(r['wire_ratio'], '8.3f')}"
            f"{num(r['equipped_wire_ratio'], '9.3f')}{num(r['wire_ratio_diff'], '+8.3f')}  {', '.join(verdict)}")
