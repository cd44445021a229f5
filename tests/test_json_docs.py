"""docs/json.md cannot drift: every JSON example in it is run as the command it names, and the
command's real output must have the same keys and the same JSON types, all the way down."""

from __future__ import annotations

import itertools
import json
import re
import shlex
from pathlib import Path

import pytest

from ckptsync.demo import make_server_tree
from helpers import FAKE_CRONTAB, REPO_ROOT, run_cli

DOC = REPO_ROOT / "docs" / "json.md"
# ```json ckptsync list --json ...   (the words after "json" are the command that prints it)
# ```json-bucket ckptsync ...: a bucket store's output, run by tests/test_s3.py against SeaweedFS
FENCE = re.compile(r"^```json(?P<kind>-bucket)? (?P<command>[^\n]*)\n(?P<body>.*?)^```$", re.M | re.S)
# ```jsonl ckptsync watch --json ...: one object a line (watch's events), run like the others;
# ```jsonl-events: watch's other events, whose keys tests/test_watch.py checks against what it prints.
LINES = re.compile(r"^```jsonl (?P<command>[^\n]*)\n(?P<body>.*?)^```$", re.M | re.S)
EVENTS = re.compile(r"^```jsonl-events\n(?P<body>.*?)^```$", re.M | re.S)


def examples(kind: str = "") -> list[tuple[str, str]]:
    return [(m["command"].strip(), m["body"]) for m in FENCE.finditer(DOC.read_text(encoding="utf-8"))
            if (m["kind"] or "").lstrip("-") == kind]


def documented_events() -> dict[str, dict]:
    """Every event docs/json.md shows (watch), by kind: the first example of each."""
    text = DOC.read_text(encoding="utf-8")
    bodies = [m["body"] for m in LINES.finditer(text)] + [m["body"] for m in EVENTS.finditer(text)]
    out: dict[str, dict] = {}
    for body in bodies:
        for line in body.splitlines():
            if line.strip():
                event = json.loads(line)
                out.setdefault(event["event"], event)
    return out


def shape(value):
    """What the doc promises of a value: its keys and JSON types, not its contents."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value]
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return "null" if value is None else "string"


def differences(doc, real, where: str = "$") -> list[str]:
    """Where the real output's shape leaves the doc's. Lists are compared item by item as far as
    both go: the doc may show fewer items (the first ones), or more (a warning this run had not)."""
    if isinstance(doc, dict) and isinstance(real, dict):
        out = [f"{where}.{k}: in the doc, not printed" for k in doc if k not in real]
        out += [f"{where}.{k}: printed, not in the doc" for k in real if k not in doc]
        for k in doc:
            if k in real:
                out += differences(doc[k], real[k], f"{where}.{k}")
        return out
    if isinstance(doc, list) and isinstance(real, list):
        if real and not doc:
            return [f"{where}: the doc shows no item of this list"]
        return list(itertools.chain.from_iterable(
            differences(d, r, f"{where}[{i}]") for i, (d, r) in enumerate(zip(doc, real))))
    return [] if doc == real else [f"{where}: {doc} in the doc, {real} printed"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The demo's training run on "this machine", backed up once and archived once."""
    base = tmp_path_factory.mktemp("json-docs")
    home = base / "home"
    (home / ".ssh").mkdir(parents=True)
    server = make_server_tree(base / "server" / "socrates-training")
    config = base / "ckptsync.yaml"
    config.write_text("extra_files: [../../config_full_dataset.json]\nsettle_seconds: 60\n")
    table = base / "crontab.txt"
    crontab = base / "crontab"
    crontab.write_text(FAKE_CRONTAB.format(table=shlex.quote(str(table))))
    crontab.chmod(0o755)
    env = {"HOME": str(home), "CKPTSYNC_CONFIG": str(config), "XDG_CONFIG_HOME": None, "CKPTSYNC_DEBUG": None,
           "SSH_AUTH_SOCK": None, "CKPTSYNC_CRONTAB": str(crontab), "COLUMNS": None}
    paths = {"server": str(server), "backups": str(base / "backups" / "instance-0"),
             "archive": str(base / "run.tar.zst"), "empty": str(base / "nothing-here")}
    for args in (["backup", "--remote-dir", paths["server"], "--local-dir", paths["backups"]],
                 ["archive", "--local-dir", paths["backups"], "--output", paths["archive"]]):
        res = run_cli(*args, env=env, cwd=base)
        assert res.returncode == 0, res.stderr
    return {"base": base, "env": env, "paths": paths, "scratch": itertools.count()}


def run_example(world: dict, command: str):
    """The doc's command with its placeholders filled in: {scratch} is a new empty directory."""
    scratch = world["base"] / f"scratch-{next(world['scratch'])}"
    words = [w.format(**world["paths"], scratch=scratch) for w in shlex.split(command)]
    assert words[0] == "ckptsync" and "--json" in words, command
    return run_cli(*words[1:], env=world["env"], cwd=world["base"], timeout=300)


def test_every_json_block_names_its_command() -> None:
    found = examples()
    assert len(found) >= 15
    assert all(command.startswith("ckptsync ") for command, _ in found), \
        [c for c, _ in found if not c.startswith("ckptsync ")]
    commands = {shlex.split(c)[1] for c, _ in found}
    assert commands >= {"list", "backup", "restore", "verify", "prune", "show", "compare", "archive",
                        "checklist", "demo", "cron", "doctor"}


def test_examples_are_what_the_commands_print(world: dict) -> None:
    """In the doc's order, which is the order a user would run them in (cron install, then show)."""
    problems = []
    for command, body in examples():
        doc = json.loads(body)
        res = run_example(world, command)
        assert "Traceback" not in res.stderr, (command, res.stderr)
        real = json.loads(res.stdout)   # the whole of stdout is one JSON document
        if not res.returncode == real["exit_code"] == doc["exit_code"]:
            problems.append(f"{command}: exit {res.returncode}, {real['exit_code']} printed, "
                            f"{doc['exit_code']} in the doc: {res.stderr.strip()}")
        problems += [f"{command}: {d}" for d in differences(shape(doc), shape(real))]
    assert not problems, "docs/json.md differs from the commands:\n" + "\n".join(problems)


def test_watch_prints_the_events_the_doc_shows(world: dict) -> None:
    problems = []
    found = [(m["command"].strip(), m["body"]) for m in LINES.finditer(DOC.read_text(encoding="utf-8"))]
    assert found and all(shlex.split(c)[1] == "watch" for c, _ in found)
    for command, body in found:
        doc = [json.loads(line) for line in body.splitlines() if line.strip()]
        res = run_example(world, command)
        assert "Traceback" not in res.stderr, (command, res.stderr)
        real: dict[str, dict] = {}
        for line in res.stdout.splitlines():   # every line is one JSON object
            event = json.loads(line)
            real.setdefault(event["event"], event)
        assert res.returncode == 0, res.stderr
        for event in doc:
            if event["event"] not in real:
                problems.append(f"{command}: printed no {event['event']} event")
                continue
            problems += [f"{command}: {event['event']}: {d}"
                         for d in differences(shape(event), shape(real[event["event"]]))]
    assert not problems, "docs/json.md differs from watch:\n" + "\n".join(problems)
