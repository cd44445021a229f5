"""Shared pytest fixtures: a real sshd, an isolated HOME, and server-side trees."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from helpers import FIXTURES, set_mtime, set_tree_mtime  # noqa: E402
from sshd import SshdServer, missing_tools, stop_masters  # noqa: E402

PRIVATE_FILES = {"adapter_model.safetensors", "model.safetensors"}
CHECKPOINT_AGES = {"checkpoint-4": 3600, "checkpoint-8": 2400, "checkpoint-12": 1200}
OTHER_FILES_AGE = 4000
LAST_WRITTEN = "trainer_state.json"
LAST_WRITTEN_DELAY = 2


def pytest_configure(config: pytest.Config) -> None:
    # A suite started in the background by a non-interactive shell (`cmd &`, nohup) inherits
    # SIGINT ignored, and so would every ckptsync it starts: the Ctrl+C tests would then test
    # nothing. A Python-level handler here is reset to the default in each child at exec.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    config.addinivalue_line("markers", "ssh: needs a real sshd")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "sshd" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ssh)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory):
    """A running :class:`SshdServer` shared by the whole test session."""
    missing = missing_tools()
    if missing:
        message = (
            f"a real sshd is needed but {', '.join(missing)} is missing: "
            "openssh-server and openssh-client are required "
            "(apt-get install openssh-server openssh-client)"
        )
        if _in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    server = SshdServer(tmp_path_factory.mktemp("sshd"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def ssh_home(tmp_path: Path, sshd: SshdServer, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh HOME whose ~/.ssh knows the test server; cwd is an empty directory.

    Note: the OpenSSH client reads ~/.ssh from the passwd entry, not $HOME; code
    that runs ``ssh``/``rsync`` must pass ``-F <HOME>/.ssh/config`` explicitly.
    """
    home = tmp_path / "home"
    home.mkdir()
    sshd.write_home(home)
    monkeypatch.setenv("HOME", str(home))
    for var in ("CKPTSYNC_CONFIG", "XDG_CONFIG_HOME", "XDG_CACHE_HOME",
                "XDG_DATA_HOME", "XDG_STATE_HOME", "SSH_AUTH_SOCK"):
        monkeypatch.delenv(var, raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return home


@pytest.fixture(autouse=True)
def ssh_runtime_dir(monkeypatch: pytest.MonkeyPatch):
    """XDG_RUNTIME_DIR is a short private directory of each test, so the shared SSH connections
    (and the ssh config) ckptsync leaves there serve only this test and end with it."""
    # Socket paths must stay short: /tmp, where there is one (not on Windows).
    runtime = Path(tempfile.mkdtemp(prefix="ck-", dir="/tmp" if os.path.isdir("/tmp") else None))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    try:
        yield runtime
    finally:
        stop_masters(runtime)
        shutil.rmtree(runtime, ignore_errors=True)


@dataclass(frozen=True)
class OtherUser:
    """The unprivileged account the test sshd logs in on ``alias`` (instance ``instance``)."""

    name: str
    uid: int
    gid: int
    home: Path
    alias: str

    @property
    def instance(self) -> str:
        return self.alias.rsplit("-", 1)[-1]

    def chown_tree(self, path: Path) -> None:
        """Give ``path`` and everything under it to this user."""
        for dirpath, dirnames, filenames in os.walk(path):
            os.chown(dirpath, self.uid, self.gid)
            for name in dirnames + filenames:
                os.chown(os.path.join(dirpath, name), self.uid, self.gid, follow_symlinks=False)


@pytest.fixture
def other_user(sshd: SshdServer, ssh_home: Path) -> OtherUser:
    """An unprivileged user on the test server; ``ssh_home``'s config has its alias."""
    problem = sshd.other_user_problem
    if problem is None and not sshd.other_user_ready:
        problem = "the server did not set up its key"
    if problem is not None:
        message = f"these tests log in to the test sshd as an unprivileged user, but {problem}"
        if _in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    import pwd  # POSIX only: conftest itself loads on every laptop

    entry = pwd.getpwnam(sshd.other_user)
    return OtherUser(name=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid,
                     home=Path(entry.pw_dir), alias=sshd.other_alias)


@pytest.fixture
def reachable_tmp() -> Path:
    """An empty directory (mode 0755) any user can reach: pytest's own tmp_path sits
    under a 0700 directory of the user running the tests."""
    path = Path(tempfile.mkdtemp(prefix="ckptsync-test-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def other_user_tree(server_tree: Path, other_user: OtherUser, reachable_tmp: Path) -> Path:
    """``server_tree`` copied (mtimes kept) under ``reachable_tmp`` and owned by ``other_user``.

    Returns ``<reachable_tmp>/socrates-training/models/socrates-qwen-full-dataset``.
    """
    root = reachable_tmp / "socrates-training"
    shutil.copytree(server_tree.parents[1], root, symlinks=True)
    other_user.chown_tree(root)
    return root / server_tree.relative_to(server_tree.parents[1])


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The read-only checkpoint fixtures in ``tests/fixtures`` (``CKPTSYNC_FIXTURES`` overrides)."""
    path = Path(os.environ.get("CKPTSYNC_FIXTURES") or FIXTURES)
    if not (path / "socrates-training").is_dir():
        pytest.fail(f"checkpoint fixtures not found at {path}", pytrace=False)
    return path


@pytest.fixture
def server_tree(tmp_path: Path, fixtures_dir: Path) -> Path:
    """A private copy of ``socrates-training`` with realistic modes and mtimes.

    Returns ``<tmp>/server/socrates-training/models/socrates-qwen-full-dataset``.
    Mtimes are whole seconds: checkpoint-4/8/12 at now-3600/-2400/-1200
    (``trainer_state.json`` 2 s later), everything else at now-4000.
    """
    root = tmp_path / "server" / "socrates-training"
    shutil.copytree(fixtures_dir / "socrates-training", root)
    prepare_server_tree(root, now=int(time.time()))
    return root / "models" / "socrates-qwen-full-dataset"


def prepare_server_tree(root: Path, now: int) -> None:
    """Set modes and mtimes on a copy of ``socrates-training`` (see server_tree)."""
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name),
                     0o600 if name in PRIVATE_FILES else 0o644)

    set_tree_mtime(root, now - OTHER_FILES_AGE)
    run_dir = root / "models" / "socrates-qwen-full-dataset"
    newest = now - OTHER_FILES_AGE
    for ckpt, age in CHECKPOINT_AGES.items():
        ckpt_dir = run_dir / ckpt
        if not ckpt_dir.is_dir():
            continue
        written = now - age
        set_tree_mtime(ckpt_dir, written)
        last = ckpt_dir / LAST_WRITTEN
        if last.exists():
            set_mtime(last, written + LAST_WRITTEN_DELAY)
        set_mtime(ckpt_dir, written + LAST_WRITTEN_DELAY)
        newest = max(newest, written)
    set_mtime(run_dir, newest)
