"""The SSH transport through the system's OpenSSH client: all of ~/.ssh/config, one shared login.

Every ssh we start reads a config file of our own (`-F`): ckptsync's settings first (the first
value OpenSSH obtains for an option wins), then the user's config, then the system's, then our
defaults. ssh hands `-F` on to the ssh it starts for each ProxyJump hop, so the jump hosts get
the same host-key policy, BatchMode and forwarding rules as the target.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass, field

from ckptsync import osdeps
from ckptsync.errors import ConfigError, ConnectError, HostKeyError, LoginRefused
from ckptsync.transport.base import (
    SHELL_LAUNCH, Process, SshTarget, Transport, cipher_order, connect_timeout, unknown_alias_hint,
    unknown_host_key, unresolved,
)
from ckptsync.transport.local import Subprocess

CONTROL_PERSIST = 60
SYSTEM_CONFIG = "/etc/ssh/ssh_config"
# ssh binds a temporary name 17 bytes longer than ControlPath first (90 on Linux).
MAX_CONTROL_PATH = osdeps.SOCKET_PATH_MAX - 18
# What ssh -G reports that messages need.
FIELDS = ("hostname", "port", "user", "proxyjump", "connecttimeout", "identityfile", "userknownhostsfile")


def ssh_binary() -> str | None:
    return shutil.which("ssh")


def control_dir() -> str:
    """A private directory for the shared-connection sockets and our ssh config."""
    base = osdeps.runtime_dir("ckptsync")
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConnectError(f"cannot create {base}: {exc.strerror}") from None
    st = os.lstat(base)
    # Another user could have made it first (it holds sockets that log in as us).
    if not osdeps.is_private_dir(st):
        raise ConnectError(f"{base} is not a private directory of this user (mode 0700)",
                           hint=f"remove it (rm -r {base}) and run again")
    return base


def _home_is_fake() -> bool:
    # OpenSSH takes ~ from the passwd entry; $HOME may name another (tests, sudo -E, containers).
    real = osdeps.passwd_home()
    if real is None:
        return False
    home = os.environ.get("HOME", "")
    return bool(home) and os.path.realpath(home) != os.path.realpath(real)


def _quote(path: str) -> str:
    return '"' + path + '"'


@functools.lru_cache(maxsize=None)
def supported_ciphers(ssh: str) -> tuple[str, ...]:
    """The ciphers this ssh knows (ssh -Q cipher); () when it cannot say. Remembered in the control
    directory for this build of ssh: every run would otherwise wait for it before its login."""
    kept = _ciphers_file(ssh)
    if kept is not None:
        try:
            with open(kept, encoding="ascii") as f:
                remembered = tuple(f.read().split())
            if remembered:
                return remembered
        except (OSError, ValueError):
            pass
    try:
        res = subprocess.run([ssh, "-Q", "cipher"], capture_output=True, stdin=subprocess.DEVNULL, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    if res.returncode != 0:
        return ()
    ciphers = tuple(res.stdout.decode("ascii", "replace").split())
    if kept is not None and ciphers:
        with contextlib.suppress(OSError):
            _write_once(kept, " ".join(ciphers) + "\n")
    return ciphers


def _ciphers_file(ssh: str) -> str | None:
    """Where the cipher list of this build of ssh (its path, inode, size and time) is kept; None
    when the binary or the control directory cannot be found."""
    path = shutil.which(ssh) or ssh
    try:
        st = os.stat(path)
        where = control_dir()
    except (OSError, ConnectError):
        return None
    build = f"{os.path.abspath(path)}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}"
    return os.path.join(where, "ciphers-" + hashlib.sha1(build.encode()).hexdigest()[:8])


def servers_file() -> str:
    """What ckptsync learned of each server's CPU, by the host (and port) it was given."""
    return os.path.join(osdeps.state_home(), "ckptsync", "servers.json")


def _servers() -> dict:
    try:
        with open(servers_file(), encoding="utf-8") as f:
            found = json.load(f)
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def server_key(target: SshTarget) -> str:
    return f"{target.host}:{target.port}" if target.port else target.host


def remembered_aes(target: SshTarget) -> bool | None:
    entry = _servers().get(server_key(target))
    aes = entry.get("aes") if isinstance(entry, dict) else None
    return aes if isinstance(aes, bool) else None


def remember_aes(target: SshTarget, aes: bool) -> None:
    """Kept for the next connection; a file that cannot be written only costs that choice."""
    servers = _servers()
    key = server_key(target)
    if servers.get(key) == {"aes": aes}:
        return
    servers[key] = {"aes": aes}
    try:
        os.makedirs(os.path.dirname(servers_file()), exist_ok=True)
        _write_once(servers_file(), json.dumps(servers, indent=1, sort_keys=True) + "\n")
    except OSError:
        pass


def config_text(target: SshTarget, ciphers: list[str] | tuple[str, ...] = ()) -> str:
    """The ssh config every ssh of this target reads. `ciphers`, best first, come after the user's
    and the system's config: a Ciphers line there wins (OpenSSH takes the first value it reads)."""
    strict = "accept-new" if target.host_key_policy == "accept-new" else "yes"
    lines = [
        "Host *",
        "    BatchMode yes",
        # Wins over a `StrictHostKeyChecking no` in the user's config (what `tnr connect` writes);
        # a changed key is refused under both values.
        f"    StrictHostKeyChecking {strict}",
        # A LocalForward of the user's config would fight their own session for the port.
        "    ClearAllForwardings yes",
        "    RemoteCommand none",
        "    RequestTTY no",
        "    PermitLocalCommand no",
        # The level whose messages are parsed below (a jump host's failure is INFO).
        "    LogLevel INFO",
    ]
    user_config = os.path.expanduser(target.ssh_config)
    if os.path.exists(user_config):
        lines += ["Match all", f"Include {_quote(os.path.abspath(user_config))}"]
    if os.path.exists(SYSTEM_CONFIG):
        lines += ["Match all", f"Include {SYSTEM_CONFIG}"]
    lines += ["Match all", f"    ConnectTimeout {max(1, math.ceil(connect_timeout()))}", "    ServerAliveInterval 30"]
    if ciphers:
        lines.append(f"    Ciphers {','.join(ciphers)}")
    if _home_is_fake():
        home = os.path.expanduser("~/.ssh")
        lines.append(f"    UserKnownHostsFile {_quote(home + '/known_hosts')} {_quote(home + '/known_hosts2')}")
    return "\n".join(lines) + "\n"


def _write_once(path: str, text: str) -> None:
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return
    except OSError:
        pass
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}"  # several instances connect from threads at once
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


@dataclass
class Settings:
    """What ssh -G says it will use for the target."""

    alias: str
    hostname: str
    port: int
    user: str
    proxy_jump: str | None
    timeout: str
    identity_files: list[str]
    known_hosts: list[str] = field(default_factory=list)   # where accept-new writes: the first

    @property
    def label(self) -> str:
        return f"{self.user}@{self.hostname}:{self.port}"

    @property
    def hops(self) -> list[str]:
        if not self.proxy_jump or self.proxy_jump.lower() == "none":
            return []
        return [h.strip() for h in self.proxy_jump.split(",") if h.strip()]


class OpenSshTransport(Transport):
    starts_ahead = True

    def __init__(self, target: SshTarget, ssh: str = "ssh") -> None:
        self.target = target
        self.ssh = ssh
        self._argv: list[str] | None = None
        self._settings: Settings | None = None
        self._lane = 0

    def lane(self, i: int) -> "OpenSshTransport":
        """The same login over a master connection of its own (ControlPath ...-i-...): channels
        beyond the first connection's get another congestion window and another ssh process."""
        if i == 0:
            return self
        other = copy.copy(self)
        other._lane = i
        other._early = None   # a launcher started ahead belongs to the first connection
        return other

    # ------------------------------------------------------------ the command line

    def argv(self, share: bool = True) -> list[str]:
        """ssh's argv up to the destination (no command); `share`: through the shared connection."""
        if self._argv is None:
            t = self.target
            where = control_dir()
            ciphers = cipher_order(supported_ciphers(self.ssh), osdeps.cpu_has_aes(), remembered_aes(t))
            text = config_text(t, ciphers)
            key = hashlib.sha1(text.encode()).hexdigest()[:8]
            config = os.path.join(where, f"config-{key}")
            _write_once(config, text)
            argv = [self.ssh, "-F", config, "-T"]
            if t.user:
                argv += ["-l", t.user]
            if t.port:
                argv += ["-p", str(t.port)]
            ident = ["-i", os.path.expanduser(t.identity_file)] if t.identity_file else []
            # A master is shared only by runs with the same settings: the hash covers the config
            # and the identity; %C covers host, port, user and jump hosts.
            mux = hashlib.sha1("\0".join([text, *ident]).encode()).hexdigest()[:8]
            self._control = os.path.join(where, mux)
            self._argv = argv + ident
        control = f"{self._control}-{self._lane}-%C" if self._lane else f"{self._control}-%C"
        if share and osdeps.SHARED_SSH and len(control) - 2 + 40 <= MAX_CONTROL_PATH:
            return [*self._argv, "-o", "ControlMaster=auto", "-o", f"ControlPath={control}",
                    "-o", f"ControlPersist={CONTROL_PERSIST}"]
        return [*self._argv, "-o", "ControlPath=none"]

    def settings(self) -> Settings:
        if self._settings is None:
            t = self.target
            try:
                res = subprocess.run([*self.argv(), "-G", "--", t.host], capture_output=True,
                                     stdin=subprocess.DEVNULL, timeout=30)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise ConnectError(f"cannot run {self.ssh}: {getattr(exc, 'strerror', None) or exc}") from None
            err = res.stderr.decode("utf-8", "replace")
            if res.returncode != 0:
                raise explain(err, Settings(t.host, t.host, t.port or 22, t.user or "", None, "", []))
            found: dict[str, list[str]] = {}
            for line in res.stdout.decode("utf-8", "replace").splitlines():
                name, _, value = line.partition(" ")
                if name in FIELDS:
                    found.setdefault(name, []).append(value)
            one = {k: v[0] for k, v in found.items()}
            home = osdeps.ssh_home()
            self._settings = Settings(
                alias=t.host, hostname=one.get("hostname", t.host), port=int(one.get("port", 22)),
                user=one.get("user", ""), proxy_jump=one.get("proxyjump"),
                timeout=one.get("connecttimeout", f"{connect_timeout():g}"),
                identity_files=[p.replace("~", home, 1) if p.startswith("~/") else p
                                for p in found.get("identityfile", [])],
                # ssh -G prints the files space-separated, unquoted: split before each absolute path
                known_hosts=re.split(r" (?=/)", one["userknownhostsfile"]) if one.get("userknownhostsfile") else [],
            )
        return self._settings

    # ------------------------------------------------------------ Transport

    def describe(self) -> str:
        s = self.settings()
        return s.label if s.alias == s.hostname else f"{s.alias} ({s.label})"

    def start(self) -> Process:
        argv = [*self.argv(), "--", self.target.host, SHELL_LAUNCH]
        return OpenSshProcess(argv, self)

    def unreachable(self) -> tuple[str, str] | None:
        s = self.settings()
        if s.hops:
            return None  # the jump host resolves the name
        return unresolved(s.alias, s.hostname, s.port)

    def failure(self, stderr: str) -> ConnectError | ConfigError:
        s = self.settings()
        # With a shared connection ssh sends a jump host's own messages to /dev/null, and ssh names
        # the key it refused only at the debug level: ask again, only to learn why. The second
        # attempt stops at the same host key check, before any login.
        unknown = bool(_first(UNKNOWN_KEY, stderr))
        if s.hops or unknown:
            verbose = ["-o", "LogLevel=DEBUG1"] if unknown else []
            try:
                res = subprocess.run([*self.argv(share=False), *verbose, "--", self.target.host, "true"],
                                     capture_output=True, stdin=subprocess.DEVNULL, timeout=120)
                again = res.stderr.decode("utf-8", "replace")
                if not unknown or _first(UNKNOWN_KEY, again):
                    stderr = again
            except (OSError, subprocess.TimeoutExpired):
                pass
        return explain(stderr, s)

    def server_cpu(self, aes: bool | None) -> None:
        if aes is not None:
            remember_aes(self.target, aes)

    def stop_master(self) -> None:
        """End the shared connection now instead of after ControlPersist."""
        subprocess.run([*self.argv(), "-O", "exit", "--", self.target.host], capture_output=True,
                       stdin=subprocess.DEVNULL, timeout=30, check=False)


class OpenSshProcess(Subprocess):
    """ssh with the agent launcher; a failure of ssh itself becomes one classified error."""

    def __init__(self, argv: list[str], transport: OpenSshTransport) -> None:
        super().__init__(argv)
        self.transport = transport
        self._got_output = False

    def read(self, n: int) -> bytes:
        data = super().read(n)
        if data:
            self._got_output = True
        elif not self._got_output:
            self._raise_if_ssh_failed()
        return data

    def readinto(self, buf: memoryview) -> int:
        got = super().readinto(buf)
        if got:
            self._got_output = True
        elif not self._got_output:
            self._raise_if_ssh_failed()
        return got

    def _raise_if_ssh_failed(self) -> None:
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            return
        # 255 is ssh's own failure; anything else is the remote command's exit status.
        if code == 255:
            raise self.transport.failure(self._stderr.text(wait=5))

    def close(self) -> None:
        super().close()
        notice = self.transport.on_notice
        if notice is not None:
            # Printed before the session started, so complete once ssh has exited.
            m = _first(r"^Warning: Permanently added '?([^' ]+)'? \((\S+)\)", self._stderr.text(wait=5))
            if m:
                where = self.transport.settings().known_hosts[:1]
                fingerprint = _fingerprint(m.group(1), where[0]) if where else ""
                notice(f"trusted the new host key of {m.group(1)}: {m.group(2)}"
                       f"{' ' + fingerprint if fingerprint else ''} (added to {where[0] if where else 'known_hosts'})")


def _fingerprint(host: str, known_hosts: str) -> str:
    """SHA256:... of the key known_hosts holds for host ("" when it cannot be read)."""
    try:
        res = subprocess.run(["ssh-keygen", "-l", "-F", host, "-f", known_hosts], capture_output=True,
                             stdin=subprocess.DEVNULL, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    m = re.search(r"\b(SHA256:\S+)", res.stdout.decode("utf-8", "replace"))
    return m.group(1) if m else ""


# ---------------------------------------------------------------- ssh's stderr -> one error

UNKNOWN_KEY = r"^No (\S+) host key is known for (\S+) and you have requested strict checking"


def _first(pattern: str, text: str) -> re.Match | None:
    return re.search(pattern, text, re.MULTILINE)


def _unknown_alias_hint(s: Settings) -> str:
    return unknown_alias_hint(s.alias, s.hostname)


def _reason(text: str) -> str:
    return text[:1].lower() + text[1:] if text[:1].isupper() and text[1:2].islower() else text


def explain(stderr: str, s: Settings) -> ConnectError | ConfigError:
    """The one-line error for what ssh printed before giving up."""
    text = stderr.replace("\r", "")
    m = _first(r"^(.*?): line (\d+): (.+)$", text)
    if m and ("Bad configuration option" in text or "terminating" in text):
        return ConfigError(f"{m.group(1)} line {m.group(2)}: {m.group(3)}")
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text or _first(r"^Host key for \S+ has changed", text):
        host = _first(r"^Host key for (\S+) has changed", text)
        kind = _first(r"The fingerprint for the (\S+) key sent", text)
        where = _first(r"^Offending \S+ key in (\S+):\d+", text)
        label = host.group(1) if host else s.hostname
        file = f" -f {where.group(1)}" if where else ""
        return HostKeyError(
            f"host key for {label} has CHANGED ({kind.group(1) if kind else 'unknown type'}); refusing to connect",
            hint="if the server was really rebuilt, remove its old line from known_hosts "
                 f"(ssh-keygen -R '{label}'{file}) and accept the new key")
    m = _first(UNKNOWN_KEY, text)
    if m:
        # At the debug level, the key the server offered is named just before the refusal.
        offered = re.findall(r"^debug1: Server host key: (\S+) (SHA256:\S+)", text[:m.start()], re.MULTILINE)
        return unknown_host_key(m.group(2), m.group(1), offered[-1][1] if offered else "")
    if _first(r"^Host key verification failed", text):
        return HostKeyError(f"host key verification failed for {s.label}")
    m = _first(r"^ssh: Could not resolve hostname (\S+?): (.+?)\.?$", text)
    if m:
        jump = "" if m.group(1) == s.hostname.lower() or not s.hops else " (a jump host)"
        return ConnectError(f"cannot resolve host {m.group(1)}{jump}: {m.group(2)}", hint=_unknown_alias_hint(s))
    m = _first(r"^channel \d+: open failed: [^:]+: (.+)$", text)
    if m and s.hops:
        why = _reason(m.group(1))
        if len(s.hops) == 1:
            return ConnectError(f"jump host {s.hops[0]} cannot reach {s.hostname}:{s.port}: {why}")
        return ConnectError(f"a jump host on the way to {s.alias} (ProxyJump {s.proxy_jump}) "
                            f"cannot reach the next host: {why}")
    m = _first(r"^ssh: connect to host (\S+) port (\d+): (.+)$", text)
    if m:
        why = m.group(3)
        why = f"timed out after {s.timeout}s" if "timed out" in why else _reason(why)
        if s.hops:
            return ConnectError(f"cannot connect to jump host {m.group(1)}:{m.group(2)} "
                                f"(ProxyJump {s.proxy_jump}): {why}")
        return ConnectError(f"cannot connect to {s.label}: {why}")
    m = _first(r"^(\S+)@(\S+): Permission denied \((.+)\)", text)
    if m:
        if (m.group(1), m.group(2)) == (s.user, s.hostname) or not s.hops:
            keys = [p for p in s.identity_files if os.path.exists(p)]
            tried = ", ".join(keys) if keys else "default keys and the SSH agent"
            return LoginRefused(f"authentication failed for {s.label} (tried {tried})")
        return LoginRefused(f"authentication failed for jump host {m.group(1)}@{m.group(2)}")
    m = _first(r"banner exchange: .*(invalid format|timed out)|(timed out) during banner exchange", text)
    if m:
        why = "it does not speak SSH" if m.group(1) == "invalid format" else f"no SSH banner within {s.timeout} s"
        return ConnectError(f"no SSH server answered on {s.hostname}:{s.port} (connected, but {why})",
                            hint="check the port: something else listens there, or sshd is hung")
    if _first(r"^(kex_exchange_identification|Connection closed by|Connection reset by)", text):
        return ConnectError(f"SSH failed with {s.label}: the connection closed during the handshake")
    return ConnectError(f"SSH failed with {s.label} (ssh exited with status 255)",
                        hint=f"ssh -v {s.alias} true shows why")
