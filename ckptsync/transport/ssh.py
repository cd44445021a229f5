"""The SSH transport through paramiko: ~/.ssh/config, known_hosts, keys and the agent."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import socket
from dataclasses import dataclass

import paramiko

from ckptsync.errors import ConfigError, ConnectError, HostKeyError, LoginRefused
from ckptsync.transport.base import (
    OPENSSH_WINDOW, SHELL_LAUNCH, Process, SshTarget, StderrTail, Transport, connect_timeout, unknown_alias_hint, unknown_host_key,
    unresolved,
)

# paramiko logs failures that we report ourselves in one line; without a handler of its own,
# Python would print its warnings to stderr as well.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

# paramiko's own order starts with AES-CTR and a separate HMAC; it has no chacha20. AES-GCM
# costs the client less CPU per byte (AES instructions, no second pass for the MAC).
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")


def paramiko_ciphers(chosen: str | None) -> tuple[str, ...]:
    """The order paramiko offers: AES-GCM first, or the user's Ciphers of ~/.ssh/config where they
    set them (paramiko's default where none of them is one paramiko has)."""
    known = paramiko.Transport._cipher_info
    default = tuple(paramiko.Transport._preferred_ciphers)
    if chosen:
        # A list starting with +, - or ^ edits OpenSSH's defaults, which are not paramiko's.
        names = tuple(c for c in chosen.split(",") if c in known)
        return names if names and chosen[0] not in "+-^" else default
    first = tuple(c for c in PREFERRED_CIPHERS if c in known)
    return first + tuple(c for c in default if c not in first)


@dataclass
class Resolved:
    alias: str
    hostname: str
    port: int
    user: str
    identity_files: list[str]
    identities_only: bool
    known_hosts: list[str]
    proxy_jump: str | None
    ciphers: str | None = None        # the user's Ciphers for this host


def _factory(ciphers: tuple[str, ...]) -> dict:
    import inspect

    def make(*args, **kwargs) -> paramiko.Transport:
        transport = paramiko.Transport(*args, **kwargs)
        transport.get_security_options().ciphers = ciphers
        return transport

    if "transport_factory" in inspect.signature(paramiko.SSHClient.connect).parameters:
        return {"transport_factory": make}
    return {}


def resolve(target: SshTarget) -> Resolved:
    """Merge explicit settings over ~/.ssh/config, the way OpenSSH does."""
    cfg = paramiko.SSHConfig()
    path = os.path.expanduser(target.ssh_config)
    if os.path.exists(path):
        try:
            cfg = paramiko.SSHConfig.from_path(path)
        except (OSError, ValueError, paramiko.ssh_exception.ConfigParseError) as exc:
            raise ConnectError(f"cannot read {path}: {exc}") from None
    found = cfg.lookup(target.host)
    identity = [target.identity_file] if target.identity_file else found.get("identityfile", [])
    known = found.get("userknownhostsfile", "").split() or ["~/.ssh/known_hosts"]
    port = target.port or int(found.get("port", 22))
    return Resolved(
        alias=target.host,
        hostname=found.get("hostname", target.host),
        port=port,
        user=target.user or found.get("user") or _local_user(target.host),
        identity_files=[os.path.expanduser(p) for p in identity],
        identities_only=found.get("identitiesonly", "no").lower() == "yes",
        known_hosts=[os.path.expanduser(p) for p in known + target.extra_known_hosts],
        proxy_jump=found.get("proxyjump"),
        ciphers=found.get("ciphers"),
    )


def _local_user(host: str) -> str:
    from ckptsync import osdeps

    name = osdeps.user_name()
    if not name:
        raise ConfigError(f"{host}: no user to log in as, and this machine does not say who you are",
                          hint="give --host USER@HOST, or User in ~/.ssh/config")
    return name


def _host_label(hostname: str, port: int) -> str:
    return hostname if port == 22 else f"[{hostname}]:{port}"


def _fingerprint(key: paramiko.PKey) -> str:
    """SHA256:... as ssh-keygen -l prints it: the key blob's sha256, base64 without padding."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


class _Policy(paramiko.MissingHostKeyPolicy):
    def __init__(self, accept_new: bool, save_to: str, on_notice=None) -> None:
        self.accept_new = accept_new
        self.save_to = save_to
        self.on_notice = on_notice

    def missing_host_key(self, client, hostname, key) -> None:
        fingerprint = _fingerprint(key)
        if not self.accept_new:
            raise unknown_host_key(hostname, key.get_name(), fingerprint)
        client.get_host_keys().add(hostname, key.get_name(), key)
        os.makedirs(os.path.dirname(self.save_to) or ".", exist_ok=True)
        with open(self.save_to, "a", encoding="ascii") as f:
            f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        if self.on_notice is not None:
            self.on_notice(f"trusted the new host key of {hostname}: {key.get_name()} {fingerprint} "
                           f"(added to {self.save_to})")


class SshProcess(Process):
    def __init__(self, client: paramiko.SSHClient, chan: paramiko.Channel, jump) -> None:
        self.client = client
        self.chan = chan
        self.jump = jump
        self._stderr = StderrTail(chan.recv_stderr)

    def write(self, data: bytes) -> None:
        try:
            self.chan.sendall(data)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise ConnectError(f"connection lost: {exc or type(exc).__name__}") from None

    def read(self, n: int) -> bytes:
        try:
            return self.chan.recv(n)
        except (OSError, EOFError, paramiko.SSHException):
            return b""

    def kill(self) -> None:
        try:
            self.chan.close()
        except (OSError, EOFError, paramiko.SSHException):
            pass

    def close(self) -> None:
        # On a connection that just died, paramiko's close() writes to the dead socket and raises
        # EOFError; that must not replace the "connection lost" error being reported.
        for step in (self.chan.shutdown_write, self.chan.close, self.client.close,
                     self.jump.close if self.jump is not None else None):
            if step is None:
                continue
            try:
                step()
            except (OSError, EOFError, paramiko.SSHException):
                pass


class SshTransport(Transport):
    # Every start() is a TCP connection of its own. A backup waits on the window paramiko grants
    # (open_session's default), a restore on sshd's: the smaller of the two.
    window = min(paramiko.common.DEFAULT_WINDOW_SIZE, OPENSSH_WINDOW)

    def __init__(self, target: SshTarget) -> None:
        self.target = target
        self.resolved = resolve(target)

    def describe(self) -> str:
        r = self.resolved
        return f"{r.user}@{r.hostname}:{r.port}" if r.alias == r.hostname else f"{r.alias} ({r.user}@{r.hostname}:{r.port})"

    def unreachable(self) -> tuple[str, str] | None:
        r = self.resolved
        if r.proxy_jump and r.proxy_jump.lower() != "none":
            return None  # the jump host resolves the name
        return unresolved(r.alias, r.hostname, r.port)

    def _client(self, r: Resolved) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        primary = r.known_hosts[0]
        for path in reversed(r.known_hosts):
            if os.path.exists(path):
                try:
                    client.load_host_keys(path) if path == primary else client.get_host_keys().load(path)
                except (OSError, paramiko.SSHException) as exc:
                    raise ConnectError(f"cannot read known hosts file {path}: {exc}") from None
        client.set_missing_host_key_policy(_Policy(self.target.host_key_policy == "accept-new", primary,
                                                   self.on_notice))
        return client

    def _connect(self, r: Resolved, sock=None) -> paramiko.SSHClient:
        client = self._client(r)
        label = f"{r.user}@{r.hostname}:{r.port}"
        keys = [p for p in r.identity_files if os.path.exists(p)]
        timeout = connect_timeout()
        try:
            client.connect(
                r.hostname, port=r.port, username=r.user, key_filename=keys or None,
                allow_agent=not r.identities_only, look_for_keys=not (r.identities_only or keys),
                timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
                sock=sock, **_factory(paramiko_ciphers(r.ciphers)),
            )
        except HostKeyError:
            client.close()
            raise
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise HostKeyError(
                f"host key for {_host_label(r.hostname, r.port)} has CHANGED ({exc.key.get_name()}); "
                "refusing to connect",
                hint="if the server was really rebuilt, remove its old line from known_hosts "
                f"(ssh-keygen -R '{_host_label(r.hostname, r.port)}') and accept the new key",
            ) from None
        except paramiko.AuthenticationException:
            client.close()
            tried = ", ".join(keys) if keys else "default keys and the SSH agent"
            raise LoginRefused(f"authentication failed for {label} (tried {tried})") from None
        except socket.gaierror as exc:
            client.close()
            raise ConnectError(f"cannot resolve host {r.hostname}: {exc.strerror}", hint=unknown_alias_hint(r.alias, r.hostname)) from None
        except paramiko.ssh_exception.NoValidConnectionsError as exc:
            client.close()
            why = "connection refused" if all(e.errno == 111 for e in exc.errors.values()) else str(exc)
            raise ConnectError(f"cannot connect to {label}: {why}") from None
        except (socket.timeout, TimeoutError):
            client.close()
            raise ConnectError(f"cannot connect to {label}: timed out after {timeout:g}s") from None
        except OSError as exc:
            client.close()
            raise ConnectError(f"cannot connect to {label}: {exc.strerror or exc}") from None
        except (paramiko.SSHException, EOFError) as exc:
            started = client.get_transport()
            silent = started is not None and not started.remote_version
            client.close()
            if silent:  # TCP was accepted, but nothing on that port speaks SSH
                raise ConnectError(
                    f"no SSH server answered on {r.hostname}:{r.port} "
                    f"(connected, but no SSH banner within {timeout:g} s)",
                    hint="check the port: something else listens there, or sshd is hung") from None
            raise ConnectError(f"SSH failed with {label}: {exc or type(exc).__name__}") from None
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(30)
            # A request is a few small SSH packets; with Nagle each reply would wait for a delayed ACK (40 ms).
            with contextlib.suppress(OSError, AttributeError):
                transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client

    def start(self) -> Process:
        r = self.resolved
        jump = None
        sock = None
        if r.proxy_jump and r.proxy_jump.lower() != "none":
            hops = [h.strip() for h in r.proxy_jump.split(",") if h.strip()]
            if len(hops) > 1:
                raise ConnectError(
                    f"ProxyJump {r.proxy_jump} for {r.alias} has {len(hops)} hops; only one is supported",
                    hint="the OpenSSH client follows any chain: use --ssh openssh (or ssh: openssh in the config)")
            hop = hops[0]
            user, _, rest = hop.rpartition("@")
            host, _, port = rest.partition(":")
            jr = resolve(SshTarget(host=host, user=user or None, port=int(port) if port else None,
                                   ssh_config=self.target.ssh_config,
                                   host_key_policy=self.target.host_key_policy))
            jump = self._connect(jr)
            try:
                sock = jump.get_transport().open_channel("direct-tcpip", (r.hostname, r.port), ("127.0.0.1", 0))
            except (paramiko.SSHException, OSError) as exc:
                jump.close()
                raise ConnectError(f"jump host {hop} cannot reach {r.hostname}:{r.port}: {exc}") from None
        client = self._connect(r, sock)
        try:
            chan = client.get_transport().open_session()
            chan.exec_command(SHELL_LAUNCH)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            client.close()
            raise ConnectError(f"cannot start a command on {self.describe()}: {exc}") from None
        return SshProcess(client, chan, jump)
