"""Configuration: a YAML file, command-line overrides, and the target they name."""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import yaml

from ckptsync.errors import ConfigError, UsageError
from ckptsync.transport import CommandTransport, LocalTransport, Transport, ssh_transport

if TYPE_CHECKING:
    from ckptsync.server import Server

DEFAULT_LOCAL_DIR = "~/ckpt-backups"
SEARCH = ("./ckptsync.yaml", "~/.config/ckptsync/config.yaml")

# key -> (type check, what is expected); shared by the top level and instances.
COMMON_KEYS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "local_dir": (str, "a directory path"),
    "remote_dir": (str, "a directory path on the server"),
    "extra_files": (list, "a list of paths"),
    "settle_seconds": ((int, float), "a number of seconds"),
    "host_key_policy": (str, "strict or accept-new"),
    "train_process": (str, "a process name pattern"),
    "dedup": (str, "reflink or link"),
}
INSTANCE_KEYS: dict[str, tuple[type | tuple[type, ...], str]] = {
    **COMMON_KEYS,
    "host": (str, "a host name, address or ~/.ssh/config alias"),
    "user": (str, "a user name"),
    "port": (int, "a port number"),
    "identity_file": (str, "a private key path"),
    "command": (list, "an argv list, e.g. [kubectl, exec, -i, pod, --]"),
}
TOP_KEYS = {**COMMON_KEYS, "instances": (dict, "a mapping of instance number to settings")}


@dataclass
class Config:
    path: Path | None = None
    values: dict[str, Any] = field(default_factory=dict)
    instances: dict[str, dict[str, Any]] = field(default_factory=dict)
    explicit: bool = False          # named with --config: a printed command must name it too


@dataclass
class Target:
    """Everything one command needs to know about where checkpoints are and go."""

    label: str                      # instance-1, host name, or "local"
    transport: Transport | None     # None when only the backup directory is used
    remote_dir: str | None
    local_dir: Path                 # the backup directory of this target
    extra_files: list[str]
    settle_seconds: float
    train_process: str | None
    host_key_policy: str
    # The target options this run was given, so that a printed command reaches the same server.
    args: tuple[str, ...] = ()
    assumed_instance: bool = False  # no --instance/--host/--remote-dir: instance 0 was taken
    # Tests hand in a server of their own (the in-process twin); None: the agent over `transport`.
    server_factory: Callable[[], Server] | None = None
    # How identical files are stored: "reflink" (a clone, else a hard link when mode and
    # mtime match, else a copy: every file shows its own mtime) or "link" (always hard-link).
    dedup: str = "reflink"

    def command(self, *words: str) -> str:
        """`ckptsync WORDS` aimed at this target, ready to paste into a shell."""
        return " ".join(shlex.quote(w) for w in ("ckptsync", *words, *self.args))

    def describe(self) -> str:
        if self.server_factory is not None:
            return "the in-process server"
        return self.transport.describe() if self.transport else "no server"


def find_config(explicit: str | None) -> Path | None:
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        return path
    env = os.environ.get("CKPTSYNC_CONFIG")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise ConfigError(f"{path}: config file named by CKPTSYNC_CONFIG not found")
        return path
    for candidate in SEARCH:
        path = Path(candidate).expanduser()
        if path.is_file():
            return path
    return None


def _check(where: str, data: dict, allowed: dict) -> None:
    for key, value in data.items():
        if key not in allowed:
            known = ", ".join(sorted(allowed))
            raise ConfigError(f"{where}: unknown key '{key}' (known keys: {known})")
        kind, expected = allowed[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ConfigError(f"{where}.{key}: expected {expected}, got {type(value).__name__} {value!r}")
    if "host_key_policy" in data and data["host_key_policy"] not in ("strict", "accept-new"):
        raise ConfigError(f"{where}.host_key_policy: expected strict or accept-new, got {data['host_key_policy']!r}")
    if "dedup" in data and data["dedup"] not in ("reflink", "link"):
        raise ConfigError(f"{where}.dedup: expected reflink or link, got {data['dedup']!r}")
    for key in ("extra_files", "command"):
        if key in data and not all(isinstance(x, str) for x in data[key]):
            raise ConfigError(f"{where}.{key}: expected a list of strings")
    if "port" in data and not 0 < data["port"] < 65536:
        raise ConfigError(f"{where}.port: expected a port number (1-65535), got {data['port']}")


def load_config(explicit: str | None = None) -> Config:
    path = find_config(explicit)
    if path is None:
        return Config()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    _check(str(path), data, TOP_KEYS)
    instances: dict[str, dict[str, Any]] = {}
    for key, inst in (data.get("instances") or {}).items():
        where = f"{path}: instances.{key}"
        if not isinstance(inst, dict):
            raise ConfigError(f"{where}: expected a mapping with host or command")
        _check(where, inst, INSTANCE_KEYS)
        if "host" not in inst and "command" not in inst:
            raise ConfigError(f"{where}: missing host (or command)")
        if "host" in inst and "command" in inst:
            raise ConfigError(f"{where}: give host or command, not both")
        if "command" in inst and not inst["command"]:
            raise ConfigError(f"{where}.command: expected a non-empty argv list")
        instances[str(key)] = inst
    values = {k: v for k, v in data.items() if k != "instances"}
    return Config(path=path, values=values, instances=instances, explicit=bool(explicit))


HOST_RE = re.compile(r"^(?:(?P<user>[^@\s]+)@)?(?P<host>\[[^\]]+\]|[^:\s@]+)(?::(?P<port>\d+))?$")


def parse_host(text: str) -> tuple[str | None, str, int | None]:
    m = HOST_RE.match(text.strip())
    if not m:
        raise UsageError(f"--host {text!r}: expected [user@]host[:port]")
    port = int(m.group("port")) if m.group("port") else None
    if port is not None and not 0 < port < 65536:
        raise UsageError(f"--host {text!r}: port out of range")
    return m.group("user"), m.group("host").strip("[]"), port


def _safe_label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "host"


def resolve_target(
    config: Config,
    *,
    instance: str | None = None,
    host: str | None = None,
    remote_dir: str | None = None,
    local_dir: str | None = None,
    accept_new_host_key: bool = False,
    need_remote: bool = True,
) -> Target:
    """Turn the options of one command into a Target. Per-instance keys override the top level."""
    if instance is not None and host is not None:
        raise UsageError("give --instance or --host, not both")
    assumed = instance is None and host is None and remote_dir is None
    args: list[str] = []
    if host is not None:
        args += ["--host", host]
    elif instance is not None or remote_dir is None:
        args += ["--instance", "0" if instance is None else instance]
    if remote_dir is not None:
        args += ["--remote-dir", remote_dir]
    if local_dir is not None:
        args += ["--local-dir", str(Path(local_dir).expanduser().absolute())]
    if config.explicit and config.path is not None:
        args += ["--config", str(Path(config.path).absolute())]
    top = config.values
    inst: dict[str, Any] = {}
    if host is not None:
        user, hostname, port = parse_host(host)
        label = _safe_label(hostname if port is None else f"{hostname}-{port}")
    elif instance is not None or remote_dir is None:
        instance = "0" if instance is None else instance
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", instance):
            raise UsageError(f"--instance {instance!r}: expected a number or a name")
        label = f"instance-{instance}"
        inst = config.instances.get(instance, {"host": f"tnr-{instance}"})
    else:
        label = "local"

    def pick(key: str, default: Any = None) -> Any:
        return inst.get(key, top.get(key, default))

    policy = "accept-new" if accept_new_host_key else pick("host_key_policy", "strict")
    backups = Path(local_dir).expanduser() if local_dir else Path(pick("local_dir", DEFAULT_LOCAL_DIR)).expanduser() / label
    rdir = remote_dir or pick("remote_dir")
    transport: Transport | None = None
    if need_remote:
        if rdir is None:
            where = f" in {config.path}" if config.path else " (no config file found)"
            raise ConfigError(f"no remote_dir for {label}{where}: give --remote-dir or set remote_dir")
        if host is not None:
            from ckptsync.transport.ssh import SshTarget

            transport = ssh_transport(SshTarget(host=hostname, user=user, port=port, host_key_policy=policy))
        elif label == "local":
            transport = LocalTransport()
        elif "command" in inst:
            transport = CommandTransport(list(inst["command"]))
        else:
            from ckptsync.transport.ssh import SshTarget

            transport = ssh_transport(SshTarget(
                host=inst["host"], user=inst.get("user"), port=inst.get("port"),
                identity_file=inst.get("identity_file"), host_key_policy=policy,
            ))
    return Target(
        label=label,
        transport=transport,
        remote_dir=rdir,
        local_dir=backups,
        extra_files=list(pick("extra_files", []) or []),
        settle_seconds=float(pick("settle_seconds", 60)),
        train_process=pick("train_process"),
        host_key_policy=policy,
        args=tuple(args),
        assumed_instance=assumed,
        dedup=pick("dedup", "reflink"),
    )
