"""`ckptsync show` and `ckptsync compare` on a real backup directory made by `ckptsync backup`."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path

import pytest

from helpers import run_cli, set_tree_mtime

Y_LABEL = re.compile(r"^\s*(-?\d+\.\d+(?:e[-+]\d+)?) [┤+]")


def _env(tmp_path: Path) -> dict[str, str | None]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {"HOME": str(home), "CKPTSYNC_CONFIG": None, "COLUMNS": None}


def _backup(tmp_path: Path, remote_dir: Path) -> Path:
    dest = tmp_path / "backups" / "run"
    r = run_cli("backup", "--all", "--remote-dir", remote_dir, "--local-dir", dest, env=_env(tmp_path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return dest


@pytest.fixture
def store(tmp_path: Path, server_tree: Path) -> Path:
    return _backup(tmp_path, server_tree)


def show(tmp_path: Path, dest: Path, *args: str, env: dict | None = None):
    return run_cli("show", *args, "--local-dir", dest, env={**_env(tmp_path), **(env or {})}, cwd=tmp_path)


def _state(server_tree: Path, name: str) -> dict:
    return json.loads((server_tree / name / "trainer_state.json").read_text())


def _history(state: dict, key: str) -> list[float]:
    return [e[key] for e in state["log_history"] if key in e]


def test_show_reads_the_backup(tmp_path: Path, server_tree: Path, store: Path) -> None:
    state = _state(server_tree, "checkpoint-12")
    last_loss = _history(state, "loss")[-1]
    r = show(tmp_path, store, "checkpoint-12")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("checkpoint-12  * best checkpoint")
    assert re.search(r"^\s+step\s+12 of 12, epoch 0\.1875$", r.stdout, re.M)
    assert re.search(rf"^\s+train loss\s+{re.escape(f'{last_loss:.6g}')} at step 12$", r.stdout, re.M)
    assert re.search(r"^\s+best\s+checkpoint-12 \(this one\), best_metric 6\.05694$", r.stdout, re.M)
    assert re.search(r"^\s+resume\s+resumable: exact resume", r.stdout, re.M)
    assert re.search(r"^\s+backed up\s+\d{4}-\d\d-\d\d \d\d:\d\d \(\d+s ago\)$", r.stdout, re.M)
    size = (server_tree / "checkpoint-12" / "optimizer.pt").stat().st_size
    assert re.search(rf"^optimizer\.pt\s+{size / 1000:.1f}KB\s+yes$", r.stdout, re.M)   # plain rows: one word a cell
    assert re.search(r"^training_args\.bin\s+\S+KB\s+no$", r.stdout, re.M)   # not needed to resume

    # The curve: y-axis labels span exactly the logged losses, both series are drawn.
    values = _history(state, "loss") + _history(state, "eval_loss")
    labels = [float(m[1]) for line in lines if (m := Y_LABEL.match(line))]
    assert len(labels) >= 3
    assert labels[0] == pytest.approx(max(values), abs=1e-4)
    assert labels[-1] == pytest.approx(min(values), abs=1e-4)
    chart = [line for line in lines if re.match(r"^\s*(-?\d+\.\d+)? +[┤│]", line)]
    assert len(chart) == 10
    assert sum(line.count("●") for line in chart) == len(_history(state, "eval_loss"))
    assert any(re.search(r"[\u2801-\u28ff]", line) for line in chart)
    axis = lines[lines.index(chart[-1]) + 1:lines.index(chart[-1]) + 3]
    assert axis[0].lstrip().startswith("└┬")
    assert axis[1].split()[0] == "1" and axis[1].split()[-1] == "12"
    assert max(len(line) for line in lines if "┤" in line or "└" in line) <= 72   # a pipe: 72 columns
    assert "● eval loss" in r.stdout and "train loss" in r.stdout
    assert re.search(r"^learning rate  [▁▂▃▄▅▆▇█]{12}  max 0\.001, last 2\.45e-05$", r.stdout, re.M)


def test_show_ascii_when_asked_or_when_the_output_is_not_utf8(tmp_path: Path, store: Path) -> None:
    for args, env in ((["--ascii"], None), ([], {"PYTHONIOENCODING": "ascii"})):
        r = show(tmp_path, store, "checkpoint-12", *args, env=env)
        assert r.returncode == 0, r.stderr
        assert r.stdout.isascii()
        assert "o eval loss" in r.stdout and "** train loss" in r.stdout
        assert sum(line.count("o") for line in r.stdout.splitlines() if re.match(r"^\s*[\d.]* +[+|]", line)) == 3


def test_show_chart_follows_width(tmp_path: Path, store: Path) -> None:
    r = show(tmp_path, store, "--width", "120")
    assert r.returncode == 0, r.stderr
    axis = next(line for line in r.stdout.splitlines() if "└" in line)
    assert len(axis) == 120
    assert r.stdout.startswith("checkpoint-12")   # default: the newest


def test_show_json(tmp_path: Path, server_tree: Path, store: Path) -> None:
    state = _state(server_tree, "checkpoint-8")
    r = show(tmp_path, store, "checkpoint-8", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["name"] == "checkpoint-8" and data["source"] == "backup"
    assert data["step"] == 8 and data["epoch"] == state["epoch"]
    assert data["loss"] == _history(state, "loss")[-1]
    assert data["eval_loss"] == _history(state, "eval_loss")[-1]
    assert data["learning_rate"] == _history(state, "learning_rate")[-1]
    assert data["best_checkpoint"] == "checkpoint-12" and data["is_best"] is False
    assert data["resumable"] is True and data["content"] == "full" and data["missing"] == []
    files = {f["path"]: f for f in data["files"]}
    assert files["optimizer.pt"]["resume"] and not files["README.md"]["resume"]
    assert files["optimizer.pt"]["size"] == (server_tree / "checkpoint-8" / "optimizer.pt").stat().st_size
    assert [p[1] for p in data["curve"]["train"]] == _history(state, "loss")
    assert [p[0] for p in data["curve"]["eval"]] == [4, 8]
    assert time.time() - 600 < data["backed_up_at"] <= time.time()
    assert data["verified_at"] >= data["backed_up_at"]


def test_show_unknown_name_exits_10_and_lists_backups(tmp_path: Path, store: Path) -> None:
    r = show(tmp_path, store, "checkpoint-99")
    assert r.returncode == 10
    assert "checkpoint-99 is not in the backup directory" in r.stderr
    assert "checkpoint-12, checkpoint-8, checkpoint-4" in r.stderr
    assert "Traceback" not in r.stderr


def test_show_remote_reads_the_server(tmp_path: Path, server_tree: Path, store: Path) -> None:
    (server_tree / "checkpoint-8" / "optimizer.pt").write_bytes(b"changed")   # the backup is now outdated
    r = run_cli("show", "checkpoint-8", "--remote", "--remote-dir", server_tree, "--local-dir", store,
                env=_env(tmp_path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"(on this machine:{server_tree})" in r.stdout
    assert re.search(r"^\s+step\s+8 of 12", r.stdout, re.M)
    assert re.search(r"^\s+backed up\s+outdated", r.stdout, re.M)
    assert re.search(r"^optimizer\.pt\s+7B\s+yes", r.stdout, re.M)
    assert r.stdout.count("●") == 2 + 1   # two eval points and the legend


def test_show_remote_over_ssh(tmp_path: Path, ssh_home: Path, server_tree: Path) -> None:
    r = run_cli("show", "checkpoint-12", "--instance", "1", "--remote", "--remote-dir", server_tree,
                "--local-dir", tmp_path / "none", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["source"] == "server" and data["backup"] == "no" and data["complete"] is True
    assert len(data["curve"]["train"]) == 12 and data["is_best"] is True


def test_show_single_file_checkpoint_without_history(tmp_path: Path, fixtures_dir: Path) -> None:
    remote = tmp_path / "server" / "single"
    shutil.copytree(fixtures_dir / "seed-style" / "single_file", remote)
    for path in [remote, *remote.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    set_tree_mtime(remote, int(time.time()) - 3600)
    store = _backup(tmp_path, remote)
    r = show(tmp_path, store, "rolling_step_000150.pt")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^\s+layout\s+single-file \(rolling\)$", r.stdout, re.M)
    assert re.search(r"^\s+step\s+150, epoch 1$", r.stdout, re.M)
    assert re.search(r"^\s+best\s+best_model\.pt$", r.stdout, re.M)
    assert "note: no loss curve" in r.stdout
    assert "┤" not in r.stdout
    assert re.search(r"^rolling_step_000150\.pt\s+\S+KB\s+yes", r.stdout, re.M)
    data = json.loads(show(tmp_path, store, "rolling_step_000150.pt", "--json").stdout)
    assert data["step"] == 150 and data["curve"] == {"train": [], "eval": [], "learning_rate": []}


# ---------------------------------------------------------------- compare


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_compare_steps_values_and_files(tmp_path: Path, server_tree: Path, store: Path) -> None:
    r = run_cli("compare", "checkpoint-4", "checkpoint-12", "--local-dir", store, "--json",
                env=_env(tmp_path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    values = {v["key"]: v for v in data["values"]}
    assert values["step"] == {"key": "step", "a": 4, "b": 12, "delta": 8}
    a, b = _state(server_tree, "checkpoint-4"), _state(server_tree, "checkpoint-12")
    assert values["loss"]["delta"] == pytest.approx(_history(b, "loss")[-1] - _history(a, "loss")[-1])
    assert values["learning_rate"]["b"] == _history(b, "learning_rate")[-1]

    names = sorted(p.name for p in (server_tree / "checkpoint-4").iterdir())
    same = [n for n in names if _sha(server_tree / "checkpoint-4" / n) == _sha(server_tree / "checkpoint-12" / n)]
    assert "training_args.bin" in same and "optimizer.pt" not in same
    assert [f["path"] for f in data["identical"]] == same
    assert [f["path"] for f in data["differ"]] == [n for n in names if n not in same]
    assert data["only_a"] == [] and data["only_b"] == []

    human = run_cli("compare", "checkpoint-4", "checkpoint-12", "--local-dir", store, env=_env(tmp_path), cwd=tmp_path)
    assert human.returncode == 0, human.stderr
    assert re.search(r"^step\s+4\s+12\s+\+8\s*$", human.stdout, re.M)
    assert f"files: {len(names) - len(same)} differ, {len(same)} identical" in human.stdout
    assert re.search(r"^differs\s+optimizer\.pt\s", human.stdout, re.M)
    assert re.search(r"^identical\s+training_args\.bin\s", human.stdout, re.M)


def test_compare_unknown_exits_10(tmp_path: Path, store: Path) -> None:
    r = run_cli("compare", "checkpoint-4", "checkpoint-5", "--local-dir", store, env=_env(tmp_path), cwd=tmp_path)
    assert r.returncode == 10
    assert "checkpoint-5 is not in the backup directory" in r.stderr and "checkpoint-8" in r.stderr


# ---------------------------------------------------------------- the chart renderer (pure)


@pytest.mark.parametrize("ascii_only", [False, True])
@pytest.mark.parametrize("points, top, bottom", [
    (((1, 6.0), (2, 5.0), (3, 5.5)), "6.00", "5.00"),
    (((1, 2.0), (2, 2.0)), "2.100", "1.900"),                      # flat: padded, line in the middle
    (((1, float("nan")), (2, 1.0), (3, 0.5)), "1.00", "0.50"),     # NaN from a diverged run is skipped
    (((0, 3e-5), (10, 1e-5)), "3.000e-05", "1.000e-05"),
    (((7, 4.0),), "4.200", "3.800"),                               # one point
])
def test_line_chart_table(points, top, bottom, ascii_only: bool) -> None:
    from ckptsync.plot import Series, line_chart

    lines = line_chart([Series("train loss", points), Series("eval loss", points[-1:], "marker")],
                       width=50, height=6, ascii_only=ascii_only)
    assert all(len(line) <= 50 for line in lines)
    labels = [m[1] for line in lines if (m := re.match(r"^\s*(\S+) [┤+]", line))]
    assert labels[0] == top and labels[-1] == bottom
    assert lines[-1].split() == (["**", "train", "loss", "o", "eval", "loss"] if ascii_only
                                 else ["⠤⠤", "train", "loss", "●", "eval", "loss"])
    assert all(line.isascii() for line in lines) == ascii_only
    axis = len(lines[6]) - len(lines[6].lstrip())   # the column of the y axis
    assert sum(line[axis + 1:].count("o" if ascii_only else "●") for line in lines[:6]) == 1


def test_line_chart_without_data_and_sparkline() -> None:
    from ckptsync.plot import Series, line_chart, sparkline

    assert line_chart([Series("train loss", ())]) == []
    assert sparkline([0.0, 0.5, 1.0, 0.5], 10) == "▁▅█▅"
    assert sparkline([0.0, 1.0], 10, ascii_only=True) == "_#"
    assert len(sparkline(list(range(1000)), 30)) == 30
