"""The transport interface: start the agent launcher somewhere, get a byte pipe to it."""

from __future__ import annotations

import os
import socket
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Iterable

from ckptsync.errors import CkptsyncError, ConfigError, HostKeyError

# The first stage runs under the server's python3 -c. It prints a marker line
# (so login banners and shell noise before it can be skipped), reads a length
# line and that many bytes of zlib-compressed agent source from stdin (a
# quarter of the plain size, on every connection), and runs it. No single
# quotes: it is placed inside single quotes in a shell command line.
STAGE1 = (
    "import sys,zlib;"
    "sys.version_info<(3,8) and sys.exit(\"ckptsync: the server needs Python 3.8 or newer\");"
    "o=sys.stdout.buffer;o.write(b\"\\nCKPTSYNC-AGENT-READY\\n\");o.flush();"
    "i=sys.stdin.buffer;n=int(i.readline());"
    "exec(compile(zlib.decompress(i.read(n)),\"ckptsync-agent\",\"exec\"))"
)
MARKER = b"CKPTSYNC-AGENT-READY"
NO_PYTHON = "ckptsync: no python3 on the server"

# The shell line used where a remote shell interprets the command (ssh, tnr).
SHELL_LAUNCH = (
    "for p in python3 python; do "
    "if command -v $p >/dev/null 2>&1; then exec $p -c '" + STAGE1 + "'; fi; "
    "done; echo '" + NO_PYTHON + "' >&2; exit 127"
)


def stage1_input() -> bytes:
    """What STAGE1 reads from its stdin: the length line and the compressed agent source."""
    from ckptsync.agent.bundle import payload_compressed

    src = payload_compressed()
    return b"%d\n" % len(src) + src


@dataclass
class SshTarget:
    """An SSH server as the config and the options name it; both SSH transports take one."""

    host: str                      # an address or a ~/.ssh/config alias
    user: str | None = None
    port: int | None = None
    identity_file: str | None = None
    host_key_policy: str = "strict"   # strict | accept-new
    ssh_config: str = "~/.ssh/config"
    extra_known_hosts: list[str] = field(default_factory=list)


# Where both CPUs have AES instructions, one ssh stream (CPU-bound) moves 1.3 to 1.7 times the
# bytes with AES-GCM as with OpenSSH's default, chacha20-poly1305. chacha20 stays in the list:
# a server without AES still agrees on it.
FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
                "aes128-ctr", "aes192-ctr", "aes256-ctr")


def cipher_order(supported: Iterable[str], client_aes: bool, server_aes: bool | None) -> list[str]:
    """The ciphers to offer, best first, of those the SSH client `supported`; [] to leave its own
    order (this CPU or the server's, when known, lacks AES, or the client has no AES-GCM). Pure."""
    if not client_aes or server_aes is False:
        return []
    known = set(supported)
    order = [c for c in FAST_CIPHERS if c in known]
    return order if order and order[0].endswith("-gcm@openssh.com") else []


# Bytes one SSH channel may have in flight before the receiving end grants more: OpenSSH's
# session window (CHAN_SES_WINDOW_DEFAULT, 64 packets of 32 KiB), sshd's as well as ssh's.
OPENSSH_WINDOW = 2 << 20

CONNECT_TIMEOUT = 15.0
# Seconds for each step of an SSH connection: TCP connect, the server's banner, authentication.
TIMEOUT_ENV = "CKPTSYNC_CONNECT_TIMEOUT"


def connect_timeout() -> float:
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return CONNECT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 3600:
        raise ConfigError(f"{TIMEOUT_ENV}={text}: expected a number of seconds (0-3600)")
    return value


def unknown_alias_hint(alias: str, hostname: str) -> str:
    """For a `tnr-N` name that nothing resolved: what makes it known."""
    if alias == hostname and alias.startswith("tnr-"):
        n = alias[4:]
        return (f"{alias} is not in ~/.ssh/config: run 'tnr connect {n}' first, "
                f"or add instance {n} to the ckptsync config")
    return ""


# The key types a stock sshd has host keys of, by a word in the name SSH or ssh's messages give
# them (ssh-ed25519, ED25519, ecdsa-sha2-nistp256, rsa-sha2-512, ssh-dss); ecdsa before dsa.
_KEY_WORDS = (("ed25519", "ed25519"), ("rsa", "rsa"), ("ecdsa", "ecdsa"), ("dsa", "dsa"), ("dss", "dsa"))


def _key_word(key_type: str) -> str | None:
    name = key_type.lower()
    return next((kind for word, kind in _KEY_WORDS if word in name), None)


def host_key_file(key_type: str) -> str:
    """Where a stock sshd keeps its public host key of this type."""
    return f"/etc/ssh/ssh_host_{_key_word(key_type) or '*'}_key.pub"


def key_label(key_type: str) -> str:
    """ED25519, RSA, ECDSA: the type as ssh-keygen -l prints it."""
    word = _key_word(key_type)
    return word.upper() if word else key_type


def unknown_host_key(host: str, key_type: str, fingerprint: str) -> HostKeyError:
    """The one error for a key not in known_hosts: its fingerprint and how to compare it on the server."""
    offered = f"{key_label(key_type)} {fingerprint}" if fingerprint else key_label(key_type)
    shown = f"'ssh-keygen -lf {host_key_file(key_type)}'"
    compare = (f"compare it with what {shown} prints on the server; if they match, rerun"
               if fingerprint else f"check it on the server ({shown}), then rerun")
    return HostKeyError(f"unknown host key for {host}: {offered}",
                        hint=f"{compare} with --accept-new-host-key (or set host_key_policy: accept-new in the config)")


def unresolved(alias: str, hostname: str, port: int) -> tuple[str, str] | None:
    """(problem, hint) when `hostname` does not resolve on this machine; None when it does."""
    try:
        socket.getaddrinfo(hostname, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"cannot resolve host {hostname}: {exc.strerror}", unknown_alias_hint(alias, hostname)
    except (OSError, UnicodeError):
        return None
    return None


class Process(ABC):
    """A running agent launcher: its stdin, stdout and the tail of its stderr."""

    _stderr: StderrTail | None = None   # set by a process whose stderr is collected

    @abstractmethod
    def write(self, data: bytes) -> None: ...

    @abstractmethod
    def read(self, n: int) -> bytes:
        """At least one byte, at most n; b"" at end of stream."""

    def readinto(self, buf: memoryview) -> int:
        """read() into a buffer: at least one byte, at most len(buf); 0 at end of stream."""
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)

    @abstractmethod
    def close(self) -> None: ...

    def flush(self) -> None:
        pass

    def kill(self) -> None:
        """End the peer now, so a write blocked on it fails; our end stays open until close."""

    def stderr_text(self, wait: float = 0.2) -> str:
        """The last of stderr, once it has ended or after `wait` seconds."""
        return self._stderr.text(wait) if self._stderr is not None else ""


class Transport(ABC):
    """Where the agent runs. `describe` names it for messages."""

    # The CLI's way to hear what the user must know about (a host key trusted on first use).
    on_notice: Callable[[str], None] | None = None
    # What one channel may have in flight (policy.auto_channels): the other end is sshd.
    window: int = OPENSSH_WINDOW

    _early: Process | None = None   # started ahead by prestart(), for the next connection
    # start() only starts a process, whose failures show when it is read: it may start ahead.
    starts_ahead: bool = False

    @abstractmethod
    def start(self) -> Process: ...

    def prestart(self) -> None:
        """Start the launcher now, before the connection is asked for: the login and the server's
        Python then start while this side is still loading. The next connection takes it
        (`connect`); one never taken ends with this process (the agent reads the end of its input).
        A start that fails here is left to that connection, which meets the failure where the run
        reports it (status.json records it)."""
        if self._early is not None or not self.starts_ahead:
            return
        try:
            self._early = self.launch()
        except (CkptsyncError, OSError):
            pass

    def connect(self) -> Process:
        """The launcher prestart() started, else a new one; the agent's source is on its input."""
        early, self._early = self._early, None
        return early if early is not None else self.launch()

    def launch(self) -> Process:
        """start(), and the agent written to the new process's input at once: the server's Python
        finds it there when it starts, not a round trip after its marker came back. A write that
        fails is left to the wait for the marker, which says why the process is gone."""
        proc = self.start()
        try:
            proc.write(stage1_input())
        except CkptsyncError:
            pass
        return proc

    def lane(self, i: int) -> "Transport":
        """This transport for the channels of its i-th TCP connection (0: the first). Here, where
        every start() is a process or a connection of its own, itself."""
        return self

    @abstractmethod
    def describe(self) -> str: ...

    def unreachable(self) -> tuple[str, str] | None:
        """(problem, hint) when this can be known not to work without connecting (a host name that
        does not resolve, a command that is not installed); None when it may work."""
        return None

    def close(self) -> None:
        pass

    def server_cpu(self, aes: bool | None) -> None:
        """What the agent said of the server's CPU (None: it did not say), for the next connection."""


class StderrTail:
    """Collects the last few KiB of a stream on its own thread (an unread stderr can block the peer)."""

    def __init__(self, read, limit: int = 16384) -> None:
        self._read = read
        self._limit = limit
        self._buf = bytearray()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                block = self._read(65536)
            except (OSError, ValueError, EOFError):
                return
            if not block:
                return
            self._buf += block
            if len(self._buf) > self._limit:
                del self._buf[: len(self._buf) - self._limit]

    def text(self, wait: float = 0.2) -> str:
        self._thread.join(wait)
        return self._buf.decode("utf-8", "replace").strip()

