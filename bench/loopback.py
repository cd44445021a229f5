#!/usr/bin/env python3
"""Time backup, no-op backup, verify and restore of one run directory through a local sshd.

No root, no namespace, no shaping: a throwaway sshd on 127.0.0.1 (the same one
the tests use), the real CLI, and a byte-for-byte check of what comes back.
Client and server share this machine's cores, so figures are a floor for a
real link, not a ceiling.

    python3 bench/loopback.py tests/fixtures/socrates-training/models/socrates-qwen-full-dataset
    python3 bench/loopback.py ~/.cache/ckptsync-bench/output
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from sshd import SshdServer, missing_tools  # noqa: E402


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def same_tree(a: Path, b: Path) -> list[str]:
    """Relative paths whose bytes or mtime differ between a and b."""
    bad = []
    for p in a.rglob("*"):
        if not p.is_file():
            continue
        rel = p.relative_to(a)
        q = b / rel
        if not q.is_file() or not filecmp.cmp(p, q, shallow=False) \
                or int(p.stat().st_mtime) != int(q.stat().st_mtime):
            bad.append(str(rel))
    return bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path, help="a training output directory holding checkpoint-N/")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if missing_tools():
        print(f"missing: {', '.join(missing_tools())} (apt-get install openssh-server openssh-client)")
        return 2
    src = args.source.expanduser().resolve()
    work = Path(tempfile.mkdtemp(prefix="ckb-loop-"))
    server = SshdServer(work / "sshd")
    try:
        home = work / "home"
        home.mkdir()
        server.write_home(home)
        env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(REPO)}
        env.pop("CKPTSYNC_CONFIG", None)
        run_dir = work / "server" / src.name
        shutil.copytree(src, run_dir, symlinks=True)
        old = time.time() - 3600          # settled: older than settle_seconds
        for p in run_dir.rglob("*"):
            os.utime(p, (old, old), follow_symlinks=False)
        names = sorted(p.name for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint-"))
        size = tree_bytes(run_dir)
        print(f"source {src}: {len(names)} checkpoints, {size / 1e6:.1f} MB; sshd on 127.0.0.1:{server.port}")

        def ck(*argv: str) -> float:
            t = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "ckptsync", *argv, "--quiet"], env=env,
                               capture_output=True, text=True)
            took = time.perf_counter() - t
            if r.returncode != 0:
                raise SystemExit(f"ckptsync {' '.join(argv)} exited {r.returncode}: {r.stderr.strip()}")
            return took

        rows: dict[str, list[float]] = {}
        for rep in range(args.reps):
            local = work / f"backup-{rep}"
            rows.setdefault("backup (all)", []).append(
                ck("backup", "--host", "testhost", "--remote-dir", str(run_dir), "--local-dir", str(local), "--all"))
            rows.setdefault("backup again (no-op)", []).append(
                ck("backup", "--host", "testhost", "--remote-dir", str(run_dir), "--local-dir", str(local), "--all"))
            rows.setdefault("verify (local)", []).append(ck("verify", "--local-dir", str(local)))
            target = work / f"restored-{rep}"
            total = 0.0
            for name in names:
                took = ck("restore", "--host", "testhost", "--remote-dir", str(target),
                          "--local-dir", str(local), "--checkpoint", name, "--no-extra-files")
                rows.setdefault(f"restore {name}", []).append(took)
                total += took
            rows.setdefault("restore every checkpoint", []).append(total)
            for name in names:
                bad = same_tree(run_dir / name, target / name)
                if bad:
                    raise SystemExit(f"restored {name} differs from the server copy: {bad[:5]}")
            shutil.rmtree(local)
            shutil.rmtree(target)
        print(f"{'operation':28} {'median':>9} {'runs':>24}  (restored trees byte- and mtime-identical)")
        for op, times in rows.items():
            med = sorted(times)[len(times) // 2]
            print(f"{op:28} {med:8.2f}s {' '.join(f'{t:.2f}' for t in times):>24}")
        return 0
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
