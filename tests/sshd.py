"""A throwaway OpenSSH server on 127.0.0.1 for tests.

``SshdServer`` starts the system ``sshd`` in the foreground on a free local
port, with every file it needs (host key, user key, authorized_keys, config,
pid file, log) inside one directory.  Clients get a ``known_hosts`` file and an
``ssh_config`` that define the host aliases ``tnr-0``, ``tnr-1``, ``tnr-2`` and
``testhost``, all pointing at this server as the current user.

When sshd runs as root and the unprivileged account ``ckptsync-test`` exists
(``.ci/test`` creates it), the alias ``tnr-7`` logs in as that account with the
same client key, so tests can meet "permission denied" on the server.

The server's ``python3`` is chosen here, not by whatever the login shell's rc files put
first on PATH: every session runs through a ForceCommand that puts a directory holding a
``python3`` wrapper first on PATH, then runs the client's command with ``/bin/sh -c``.
On the default port (every alias but ``tnr-8``) that wrapper is a stock server's Python:
the system interpreter (``STOCK_PYTHON``) isolated from every site-packages (``-I -S``), so
it has the standard library only, as on a rented GPU server where the training venv is
not on a non-interactive login's PATH. The alias ``tnr-8`` reaches a second port whose
``python3`` is the interpreter running the tests, with xxhash and zstandard (``FULL_PYTHON``).

It works as root (CI) and as an ordinary user.  Nothing here imports pytest.
"""

from __future__ import annotations

import atexit
import getpass
import os
import select
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

HOST_ALIASES: tuple[str, ...] = ("tnr-0", "tnr-1", "tnr-2", "testhost")
TEST_USER = "ckptsync-test"
TEST_USER_ALIAS = "tnr-7"
# A server whose python3 has xxhash and zstandard (the other aliases' has the standard library only).
FULL_ALIAS = "tnr-8"

# The server sides' interpreters, each an argv prefix. The stock one is the machine's system
# Python when it has one (what a rented server runs), else this one; either way isolated from
# site-packages, so nothing outside the standard library imports.
STOCK_PYTHON: tuple[str, ...] = (
    "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable, "-I", "-S")
FULL_PYTHON: tuple[str, ...] = (sys.executable,)
SFTP_SERVERS = ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server", "/usr/libexec/sftp-server")

# The ForceCommand of a session: python3 from {bindir} first on PATH, then the client's command.
LOGIN_SCRIPT = """#!/bin/sh
PATH={bindir}:$PATH
export PATH
case "$SSH_ORIGINAL_COMMAND" in
  "") exec "${{SHELL:-/bin/sh}}" -l ;;
  internal-sftp) exec {sftp} ;;
esac
exec /bin/sh -c "$SSH_ORIGINAL_COMMAND"
"""
TEST_USER_HINT = f"useradd -m -s /bin/sh -p '*' {TEST_USER}"

STARTUP_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
KEYGEN_TIMEOUT = 30.0


class SshdError(RuntimeError):
    """sshd could not be set up or did not come up in time."""


def find_sshd() -> str | None:
    """Absolute path of the sshd binary, or None when it is not installed."""
    if os.access("/usr/sbin/sshd", os.X_OK):
        return "/usr/sbin/sshd"
    search = os.pathsep.join(
        [os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"]
    )
    found = shutil.which("sshd", path=search)
    return os.path.abspath(found) if found else None


def find_client_tool(name: str) -> str | None:
    """Absolute path of an OpenSSH client tool (ssh, ssh-keygen)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/bin", "/bin"])
    found = shutil.which(name, path=search)
    return os.path.abspath(found) if found else None


def missing_tools() -> list[str]:
    """Names of the OpenSSH programs the fixture needs but cannot find."""
    missing = []
    if find_sshd() is None:
        missing.append("sshd")
    for tool in ("ssh", "ssh-keygen"):
        if find_client_tool(tool) is None:
            missing.append(tool)
    return missing


def current_user() -> str:
    """Login name for the tests: ``getpass.getuser()``, unless that disagrees
    with the effective uid (sshd, when not root, can only log in its own user)."""
    import pwd  # POSIX only, like sshd: the module stays importable on any laptop

    name = getpass.getuser()
    try:
        real = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return name
    return name if name == real else real


def account_locked(user: str) -> bool:
    """True when ``user``'s shadow entry marks a locked password ("!...")."""
    try:
        with open("/etc/shadow", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                fields = line.rstrip("\n").split(":")
                if fields[0] == user and len(fields) > 1:
                    return fields[1].startswith("!")
    except OSError:
        pass
    return False


def other_user_problem(user: str, *, is_root: bool, use_pam: bool) -> str | None:
    """Why this sshd cannot log ``user`` in with a key; None when it can."""
    import pwd

    if not is_root:
        return f"logging in as {user} needs sshd to run as root"
    try:
        pwd.getpwnam(user)
    except KeyError:
        return f"user {user} does not exist (create it as root: {TEST_USER_HINT})"
    if account_locked(user) and not use_pam:
        # sshd without PAM refuses even key logins to a "!" account.
        return (f"account {user} is locked (its shadow password starts with '!'), so sshd "
                f"refuses it; unlock it without a password: usermod -p '*' {user}")
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def read_stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process from /proc/PID/stat, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read().decode("utf-8", "replace")
    except OSError:
        return None
    # The command name sits in parentheses and may itself hold spaces or ')'.
    rest = data[data.rfind(")") + 2 :].split()
    if len(rest) < 2:
        return None
    try:
        return rest[0], int(rest[1])
    except ValueError:
        return None


def process_tree(root_pid: int) -> list[int]:
    """PIDs of all live descendants of root_pid (not root_pid itself)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        pid = int(entry)
        info = read_stat(pid)
        if info is None:
            continue
        state, ppid = info
        if state in ("Z", "X"):
            continue
        children.setdefault(ppid, []).append(pid)
    found: list[int] = []
    queue = list(children.get(root_pid, []))
    while queue:
        pid = queue.pop(0)
        if pid in found or pid == root_pid:
            continue
        found.append(pid)
        queue.extend(children.get(pid, []))
    return sorted(found)


def _process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as fh:
            return fh.read().strip()
    except OSError:
        return ""


class SshdServer:
    """A real OpenSSH sshd listening on 127.0.0.1, confined to ``workdir``.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    host = "127.0.0.1"

    def __init__(self, workdir: str | os.PathLike[str], *, start: bool = True,
                 startup_timeout: float = STARTUP_TIMEOUT,
                 use_pam: bool | None = None,
                 other_user: str | None = TEST_USER) -> None:
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.startup_timeout = startup_timeout
        self.user = current_user()
        self.is_root = os.geteuid() == 0
        # Without PAM, sshd refuses a user whose shadow password starts with
        # "!" (a "locked" account) even for key logins.  It can read the shadow
        # file only as root, so only then is PAM needed to get in.
        self.use_pam = (self.is_root and account_locked(self.user)) if use_pam is None \
            else use_pam
        self.aliases = HOST_ALIASES
        # A second, unprivileged account on alias ``other_alias``; usable only when
        # ``other_user_problem`` is None.
        self.other_user = other_user
        self.other_alias = TEST_USER_ALIAS
        self.other_user_problem: str | None = (
            "no other user configured" if other_user is None
            else other_user_problem(other_user, is_root=self.is_root, use_pam=self.use_pam)
        )
        self.other_keys_dir: Path | None = None
        self.full_alias = FULL_ALIAS
        self.bin_dir: Path | None = None   # the sessions' python3 wrappers and login scripts

        self.sshd_path = find_sshd()
        self.ssh_path = find_client_tool("ssh")
        self.keygen_path = find_client_tool("ssh-keygen")

        self.host_key = self.workdir / "ssh_host_ed25519_key"
        self.identity_file = self.workdir / "id_ed25519"
        self.authorized_keys = self.workdir / "authorized_keys"
        self.sshd_config = self.workdir / "sshd_config"
        self.pid_file = self.workdir / "sshd.pid"
        self.log_path = self.workdir / "sshd.log"
        self.known_hosts = self.workdir / "known_hosts"
        self.ssh_config = self.workdir / "ssh_config"

        self.port: int = 0            # the stock server's (every alias but full_alias)
        self.full_port: int = 0       # the server whose python3 has xxhash and zstandard
        self.host_key_line: str = ""
        self.process: subprocess.Popen[bytes] | None = None
        self._log_handle = None

        if start:
            self.start()

    # ------------------------------------------------------------------ setup

    @property
    def identity_pub(self) -> Path:
        return self.identity_file.with_name(self.identity_file.name + ".pub")

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def _keygen(self, path: Path, comment: str) -> None:
        for stale in (path, path.with_name(path.name + ".pub")):
            if stale.exists():
                stale.unlink()
        try:
            subprocess.run(
                [self.keygen_path, "-q", "-t", "ed25519", "-N", "", "-C", comment,
                 "-f", str(path)],
                check=True, stdin=subprocess.DEVNULL, capture_output=True,
                timeout=KEYGEN_TIMEOUT,
            )
        except subprocess.CalledProcessError as exc:
            raise SshdError(
                f"ssh-keygen failed for {path}: {exc.stderr.decode(errors='replace')}"
            ) from exc
        os.chmod(path, 0o600)
        os.chmod(path.with_name(path.name + ".pub"), 0o644)

    def _prepare_files(self) -> None:
        if self.sshd_path is None:
            raise SshdError("sshd not found (install openssh-server)")
        if self.ssh_path is None or self.keygen_path is None:
            raise SshdError("ssh / ssh-keygen not found (install openssh-client)")
        if self.is_root:
            # Privilege separation directory, absent in fresh containers.
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self._keygen(self.host_key, "ckptsync-test-host")
        self._keygen(self.identity_file, f"{self.user}@ckptsync-test")
        shutil.copyfile(self.identity_pub, self.authorized_keys)
        os.chmod(self.authorized_keys, 0o600)
        if self.other_user_problem is None:
            self._prepare_other_user_keys()
        self._prepare_pythons()

    def _prepare_pythons(self) -> None:
        """The python3 of each port, and the ForceCommand that puts it first on PATH. In a
        world-readable directory: the unprivileged user's sessions run them too."""
        self._remove_bin_dir()
        self.bin_dir = Path(tempfile.mkdtemp(prefix="ckptsync-sshd-bin-", dir="/tmp"))
        os.chmod(self.bin_dir, 0o755)
        sftp = next((p for p in SFTP_SERVERS if os.access(p, os.X_OK)), "false")
        for kind, argv in (("stock", STOCK_PYTHON), ("full", FULL_PYTHON)):
            bindir = self.bin_dir / kind
            bindir.mkdir()
            os.chmod(bindir, 0o755)
            _write_script(bindir / "python3", f'#!/bin/sh\nexec {shlex.join(argv)} "$@"\n')
            _write_script(self.bin_dir / f"login-{kind}", LOGIN_SCRIPT.format(bindir=shlex.quote(str(bindir)),
                                                                              sftp=sftp))

    def _remove_bin_dir(self) -> None:
        if self.bin_dir is not None:
            shutil.rmtree(self.bin_dir, ignore_errors=True)
            self.bin_dir = None

    def _prepare_other_user_keys(self) -> None:
        # sshd opens AuthorizedKeysFile as the user logging in, and the workdir may sit
        # under a 0700 directory (pytest's), so that user's key lives in a world-readable
        # directory of its own.
        self._remove_other_keys()
        self.other_keys_dir = Path(tempfile.mkdtemp(prefix="ckptsync-sshd-keys-", dir="/tmp"))
        os.chmod(self.other_keys_dir, 0o755)
        keys = self.other_keys_dir / self.other_user
        shutil.copyfile(self.identity_pub, keys)
        os.chmod(keys, 0o644)

    def _remove_other_keys(self) -> None:
        if self.other_keys_dir is not None:
            shutil.rmtree(self.other_keys_dir, ignore_errors=True)
            self.other_keys_dir = None

    @property
    def other_user_ready(self) -> bool:
        """True when ``other_alias`` logs in as ``other_user``."""
        return self.other_user_problem is None and self.other_keys_dir is not None

    def _write_sshd_config(self) -> None:
        lines = [
            f"ListenAddress {self.host}",
            f"Port {self.port}",
            f"Port {self.full_port}",
            f"HostKey {self.host_key}",
            f"PidFile {self.pid_file}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "StrictModes no",
            f"UsePAM {'yes' if self.use_pam else 'no'}",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "MaxStartups 100",
            "MaxSessions 64",
            "LogLevel VERBOSE",
            "Subsystem sftp internal-sftp",
        ]
        if self.is_root:
            lines.append("PermitRootLogin yes")
        # Match blocks run to the next Match: these come after every global setting.
        lines += [f"Match LocalPort {self.port}", f"    ForceCommand {self.bin_dir / 'login-stock'}",
                  f"Match LocalPort {self.full_port}", f"    ForceCommand {self.bin_dir / 'login-full'}"]
        if self.other_user_ready:
            # Match blocks run to the end of the file: this one must stay last.
            lines += [f"Match User {self.other_user}",
                      f"    AuthorizedKeysFile {self.other_keys_dir / self.other_user}"]
        self.sshd_config.write_text("\n".join(lines) + "\n")
        os.chmod(self.sshd_config, 0o600)

    def _host_key_line(self, port: int | None = None) -> str:
        fields = self.host_key.with_name(self.host_key.name + ".pub").read_text().split()
        return f"[{self.host}]:{port or self.port} {fields[0]} {fields[1]}"

    @property
    def known_hosts_text(self) -> str:
        """known_hosts for both ports (the same host key)."""
        return f"{self.host_key_line}\n{self._host_key_line(self.full_port)}\n"

    def client_config_text(self, identity_file: Path | None = None,
                           known_hosts: Path | None = None) -> str:
        identity = identity_file or self.identity_file
        known = known_hosts or self.known_hosts
        hosts = [(alias, self.user, self.port) for alias in self.aliases]
        if self.other_user_ready:
            hosts.append((self.other_alias, self.other_user, self.port))
        hosts.append((self.full_alias, self.user, self.full_port))
        blocks = []
        for alias, user, port in hosts:
            blocks.append(
                "\n".join([
                    f"Host {alias}",
                    f"    HostName {self.host}",
                    f"    Port {port}",
                    f"    User {user}",
                    f"    IdentityFile {identity}",
                    f"    UserKnownHostsFile {known}",
                    "    StrictHostKeyChecking yes",
                    "    IdentitiesOnly yes",
                    "    BatchMode yes",
                    "    ConnectTimeout 10",
                ])
            )
        return "\n\n".join(blocks) + "\n"

    def _write_client_files(self) -> None:
        self.host_key_line = self._host_key_line()
        self.known_hosts.write_text(self.known_hosts_text)
        os.chmod(self.known_hosts, 0o644)
        self.ssh_config.write_text(self.client_config_text())
        os.chmod(self.ssh_config, 0o600)

    # -------------------------------------------------------------- lifecycle

    def start(self) -> "SshdServer":
        if self.process is not None and self.process.poll() is None:
            return self
        self._prepare_files()
        last_error: SshdError | None = None
        for _attempt in range(3):
            self.port = free_port(self.host)
            self.full_port = free_port(self.host)
            while self.full_port == self.port:
                self.full_port = free_port(self.host)
            self._write_sshd_config()
            self._write_client_files()
            try:
                self._launch()
                return self
            except SshdError as exc:
                last_error = exc
                self._terminate_listener()
                if "Address already in use" not in str(exc):
                    break
        assert last_error is not None
        raise last_error

    def _launch(self) -> None:
        self._log_handle = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [self.sshd_path, "-D", "-e", "-f", str(self.sshd_config)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            cwd=str(self.workdir),
        )
        atexit.register(self.stop)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise SshdError(
                    f"sshd exited with status {code} during startup on port "
                    f"{self.port}\n--- {self.log_path} ---\n{self.log_tail()}"
                )
            if self._banner_ok():
                break
            if time.monotonic() > deadline:
                raise SshdError(
                    f"sshd did not accept connections on {self.host}:{self.port} "
                    f"within {self.startup_timeout:.0f} s\n--- {self.log_path} ---\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.05)
        # Let the child that served the readiness probe go away.
        self.wait_idle()

    def _banner_ok(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                sock.settimeout(2.0)
                data = b""
                while b"\n" not in data and len(data) < 256:
                    chunk = sock.recv(256)
                    if not chunk:
                        break
                    data += chunk
                return data.startswith(b"SSH-")
        except OSError:
            return False

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def session_pids(self) -> list[int]:
        """PIDs of the per-connection sshd processes and everything below them."""
        if not self.is_running():
            return []
        return process_tree(self.process.pid)

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Until no session is left (each process waited on as it exits, see wait_gone); False if
        some are still there after `timeout`, which only bounds a hang."""
        deadline = time.monotonic() + timeout
        while True:
            pids = self.session_pids()
            if not pids:
                return True
            if wait_gone(pids, max(0.0, deadline - time.monotonic())):
                return False

    def kill_sessions(self, sig: int = signal.SIGKILL, *, sshd_only: bool = False,
                      wait: float = 60.0) -> list[int]:
        """Send ``sig`` to every session process (never the listener).

        With ``sshd_only`` only the sshd processes of the connections are hit and
        the remote commands are left running, as after a real network drop.
        Returns the PIDs signalled; waits up to ``wait`` seconds for them to go.
        """
        signalled: list[int] = []
        # Again until a look finds nothing new: a session forking as it is hit is hit too.
        for _ in range(10):
            pids = [p for p in self.session_pids() if p not in signalled]
            if sshd_only:
                pids = [p for p in pids if _process_name(p).startswith("sshd")]
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, sig)
                    signalled.append(pid)
                except (ProcessLookupError, PermissionError):
                    pass
            if sig not in (signal.SIGKILL, signal.SIGTERM):
                break
        if sig in (signal.SIGKILL, signal.SIGTERM) and wait > 0:
            wait_gone(signalled, wait)
        return signalled

    def _terminate_listener(self) -> None:
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def stop(self) -> None:
        """Kill all sessions and terminate the listener."""
        if self.process is None:
            self._remove_other_keys()
            self._remove_bin_dir()
            return
        atexit.unregister(self.stop)
        sessions = self.session_pids()
        self._terminate_listener()
        for pid in sessions:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._remove_other_keys()
        self._remove_bin_dir()

    close = stop

    def __enter__(self) -> "SshdServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<SshdServer {self.user}@{self.host}:{self.port} {state}>"

    # ---------------------------------------------------------------- clients

    def ssh_argv(self, host: str = "testhost") -> list[str]:
        """``ssh -F ssh_config HOST``: prefix for running the OpenSSH client."""
        return [self.ssh_path or "ssh", "-F", str(self.ssh_config), host]

    def ssh_e(self) -> str:
        """The value for ``rsync -e``."""
        return shlex.join([self.ssh_path or "ssh", "-F", str(self.ssh_config)])

    def run_ssh(self, command: str | Sequence[str], *, host: str = "testhost",
                input: str | None = None, timeout: float = 60,
                check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run ``command`` on the server with the OpenSSH client."""
        if not isinstance(command, str):
            command = shlex.join(list(command))
        return subprocess.run(
            [*self.ssh_argv(host), command],
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def write_home(self, home_dir: str | os.PathLike[str]) -> Path:
        """Lay out ``home_dir/.ssh`` like a real user's set-up for this server.

        Writes ``config`` (the same host entries, pointing at the copies in this
        ``.ssh``, with ``other_alias`` for the unprivileged user when it can log
        in), ``known_hosts`` and ``id_ed25519`` (+ ``.pub``).  Returns the
        ``.ssh`` directory.
        """
        if not self.host_key_line:
            raise SshdError("write_home() needs a started server")
        home = Path(home_dir).resolve()
        ssh_dir = home / ".ssh"
        ssh_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(home, 0o755)
        os.chmod(ssh_dir, 0o700)
        key = ssh_dir / "id_ed25519"
        pub = ssh_dir / "id_ed25519.pub"
        known = ssh_dir / "known_hosts"
        config = ssh_dir / "config"
        _write_private(key, self.identity_file.read_bytes())
        _write_private(pub, self.identity_pub.read_bytes())
        _write_private(known, self.known_hosts_text.encode())
        _write_private(config, self.client_config_text(key, known).encode())
        return ssh_dir


def stop_masters(directory: str | os.PathLike[str]) -> None:
    """End every OpenSSH connection master whose control socket lies under ``directory``."""
    for dirpath, _dirnames, filenames in os.walk(directory):
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                is_socket = stat.S_ISSOCK(os.lstat(path).st_mode)
            except OSError:
                continue
            if is_socket:
                subprocess.run([find_client_tool("ssh") or "ssh", "-F", "none", "-o", f"ControlPath={path}",
                                "-O", "exit", "master"], stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=30, check=False)


def _write_script(path: Path, text: str) -> None:
    path.write_text(text)
    os.chmod(path, 0o755)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    """Wait for each of `pids` to exit, woken by the exit itself (a pidfd), not by polling; the
    ones still alive after `timeout` seconds in all."""
    deadline = time.monotonic() + timeout
    alive = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            exited, _w, _x = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not exited:
                alive.append(pid)
        finally:
            os.close(fd)
    return alive
