"""bench/servers.py: the benchmark's server python3 (stock or equipped) and its side-by-side summary."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "servers.py"


@pytest.fixture(scope="module")
def servers():
    spec = importlib.util.spec_from_file_location("bench_servers", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


PROBE = ("import importlib.util as u, shutil; "
         "print(bool(u.find_spec('xxhash')), bool(u.find_spec('zstandard')), shutil.which('zstd') is not None)")


def run_current(bin_dir: Path) -> list[str]:
    """What the python3 that `current` points at can import and find, as the login script runs it."""
    res = subprocess.run(["/bin/sh", "-c", f"PATH={bin_dir / 'current'}:$PATH; export PATH; python3 -c \"{PROBE}\""],
                         capture_output=True, text=True, check=True)
    return res.stdout.split()


def test_each_kind_of_server_gets_its_python3(servers, tmp_path):
    pytest.importorskip("xxhash")
    pytest.importorskip("zstandard")
    bin_dir = tmp_path / "server-python"
    login = servers.install(bin_dir, "false")
    assert f"PATH={bin_dir / 'current'}:$PATH" in login.read_text()
    assert run_current(bin_dir)[:2] == ["True", "True"]          # equipped, the default
    servers.select(bin_dir, "stock")
    assert run_current(bin_dir)[:2] == ["False", "False"]
    servers.select(bin_dir, "stock-nozstd")
    assert run_current(bin_dir) == ["False", "False", "False"]
    servers.select(bin_dir, "equipped")
    assert run_current(bin_dir)[:2] == ["True", "True"]


def test_server_option(servers):
    assert servers.parse("both") == ["equipped", "stock"]
    assert servers.parse("stock,equipped,stock") == ["equipped", "stock"]
    assert servers.parse("all") == ["equipped", "stock", "stock-nozstd"]
    with pytest.raises(ValueError, match="unknown server 'stok'"):
        servers.parse("stok")


def row(op, server, median, wire, nbytes=1000):
    return {"op": op, "label": f"ckptsync {op}", "tool": "ckptsync", "server": server, "median_s": median,
            "wire_ratio": wire / nbytes}


def test_stock_rows_beside_equipped_ones(servers):
    summ = [row("backup", "equipped", 10.0, 800), row("backup", "stock", 10.5, 820),
            row("restore-all", "equipped", 10.0, 800), row("restore-all", "stock", 12.0, 1000),
            {"op": "backup", "label": "rsync -a", "tool": "rsync", "server": None, "median_s": 9.0, "wire_ratio": 1.0}]
    slow = servers.compare(summ, "200mbit")
    assert [(r["op"], r["server"]) for r in slow] == [("backup", "stock"), ("restore-all", "stock")]
    backup, restore = slow
    assert backup["time_ratio"] == pytest.approx(1.05) and backup["time_target"] is True
    assert backup["wire_ratio_diff"] == pytest.approx(0.02) and backup["wire_target"] is True
    assert restore["time_target"] is False and restore["wire_target"] is False
    fast = servers.compare(summ, "1gbit")
    assert fast[0]["time_ratio"] == pytest.approx(1.05) and fast[0]["time_target"] is None


def test_sides_say_what_each_side_hashes_and_packs(servers):
    doc = {"python": "3.11.2", "executable": "/usr/bin/python3", "hash": "sha1", "hash_rate": 1e9,
           "codec": "zlib-lanes", "codec_rate": 1e8, "missing": [{"piece": "xxhash"}, {"piece": "zstandard"}]}
    sides = servers.sides(doc)
    assert sides["server"]["hash"] == "sha1" and sides["server"]["missing"] == ["xxhash", "zstandard"]
    assert sides["laptop"]["hashes"] == ["xxh3_128", "sha1"]
    assert sides["laptop"]["codec_to_server"] == "zlib byte lanes"
    assert servers.check("stock-nozstd", sides) == ""
    assert "lacks xxhash or zstandard" in servers.check("equipped", sides)
    assert sys.executable in servers.check("equipped", sides)
