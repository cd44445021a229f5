"""The agent runs under the server's python3, which may be as old as 3.8 (Ubuntu 20.04); the client
needs 3.10. vermin reads the agent's modules and fails on anything newer than 3.8 allows."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO_ROOT

AGENT = REPO_ROOT / "ckptsync" / "agent"
VERMIN = [sys.executable, "-c", "import sys; from vermin import main; sys.exit(main())"]


@pytest.fixture(scope="module", autouse=True)
def vermin_installed() -> None:
    if importlib.util.find_spec("vermin") is None:
        message = "vermin is not installed (it comes with the test extra: pip install -e '.[test]')"
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


def vermin(path: Path) -> subprocess.CompletedProcess[str]:
    # --eval-annotations: the agent's modules have no `from __future__ import annotations`, so a
    # 3.8 server evaluates every annotation when it defines the function.
    return subprocess.run([*VERMIN, "--target=3.8-", "--no-tips", "--violations", "--eval-annotations", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_the_agent_is_valid_python_3_8() -> None:
    res = vermin(AGENT)
    assert res.returncode == 0, res.stdout + res.stderr


NEWER = {
    "str.removeprefix": 'def short_name():\n    return "xxh3_128".removeprefix("xxh3_")\n',
    "list[..]": "def first(names: list[str]):\n    return names[0]\n",
    "`with` statement with parentheses": 'def both(a, b):\n    with (open(a) as x, open(b) as y):\n        return x, y\n',
}


@pytest.mark.parametrize("construct", sorted(NEWER))
def test_a_python_3_9_construct_in_the_agent_fails_the_check(tmp_path: Path, construct: str) -> None:
    copy = tmp_path / "agent"
    shutil.copytree(AGENT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "hashing.py", "a", encoding="utf-8") as f:
        f.write("\n\n" + NEWER[construct])
    res = vermin(copy)
    assert res.returncode != 0 and construct in res.stdout, res.stdout + res.stderr
