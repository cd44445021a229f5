"""Configuration: a YAML file, command-line overrides, and the target they name."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from ckptsync.errors import ConfigError, UsageError
from ckptsync.policy import HOLD_MAX, MAX_PARALLEL, MAX_STALL, stall_limit, valid_limit
from ckptsync.target import DEFAULT_GENERATIONS, DEFAULT_SETTLE, Link, PrintBack, RunPolicy, Target
from ckptsync.transport import SSH_CHOICES, CommandTransport, LocalTransport, SshTarget, Transport, ssh_transport

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
    "ssh": (str, "openssh, paramiko or auto"),
    "keep_generations": (int, "a number of earlier versions to keep per name"),
    "follow_runs": (bool, "true or false"),
    "runs": (list, "a list of glob patterns for run directories, relative to remote_dir's parent"),
    "bwlimit": ((str, int), "a rate in bytes per second, e.g. 20M or 500K"),
    "parallel": (int, f"a number of channels, 1-{MAX_PARALLEL}"),
    "hold_max": (int, "the most checkpoints `watch` holds on the server against rotation"),
    "stall_timeout": ((int, float), "a number of seconds"),
}
INSTANCE_KEYS: dict[str, tuple[type | tuple[type, ...], str]] = {
    **COMMON_KEYS,
    "host": (str, "a host name, address or ~/.ssh/config alias"),
    "user": (str, "a user name"),
    "port": (int, "a port number"),
    "identity_file": (str, "a private key path"),
    "command": (list, "an argv list, e.g. [kubectl, exec, -i, pod, --]"),
}
# Keys whose value names something (a path, a host, a pattern): an empty one would quietly mean
# the current directory, "root@:22" or every process.
NAMES = ("local_dir", "remote_dir", "host", "user", "identity_file", "train_process")
TOP_KEYS = {**COMMON_KEYS, "instances": (dict, "a mapping of instance number to settings"),
            "s3": (dict, "bucket settings: endpoint_url, profile, region, ... (see the README, Team storage)")}


@dataclass
class Config:
    path: Path | None = None
    values: dict[str, Any] = field(default_factory=dict)
    instances: dict[str, dict[str, Any]] = field(default_factory=dict)
    explicit: bool = False          # named with --config: a printed command must name it too


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
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
            raise ConfigError(f"{where}.{key}: expected {expected}, got {type(value).__name__} {value!r}")
    if "host_key_policy" in data and data["host_key_policy"] not in ("strict", "accept-new"):
        raise ConfigError(f"{where}.host_key_policy: expected strict or accept-new, got {data['host_key_policy']!r}")
    if "ssh" in data and data["ssh"] not in SSH_CHOICES:
        raise ConfigError(f"{where}.ssh: expected openssh, paramiko or auto, got {data['ssh']!r}")
    if "dedup" in data and data["dedup"] not in ("reflink", "link"):
        raise ConfigError(f"{where}.dedup: expected reflink or link, got {data['dedup']!r}")
    if "hold_max" in data and data["hold_max"] < 0:
        raise ConfigError(f"{where}.hold_max: expected 0 or more, got {data['hold_max']}")
    if "keep_generations" in data and data["keep_generations"] < 0:
        raise ConfigError(f"{where}.keep_generations: expected 0 or more, got {data['keep_generations']}")
    if "settle_seconds" in data and not (math.isfinite(data["settle_seconds"]) and data["settle_seconds"] >= 0):
        raise ConfigError(f"{where}.settle_seconds: expected a number of seconds, 0 or more, "
                          f"got {data['settle_seconds']!r}")
    for key in NAMES:
        if key in data and not data[key].strip():
            raise ConfigError(f"{where}.{key}: expected {allowed[key][1]}, got an empty string")
    for key in ("extra_files", "command", "runs"):
        if key in data and not all(isinstance(x, str) for x in data[key]):
            raise ConfigError(f"{where}.{key}: expected a list of strings")
        if key in data and key != "command" and not all(x.strip() for x in data[key]):
            raise ConfigError(f"{where}.{key}: an empty string in the list")
    if data.get("command") and not data["command"][0].strip():
        raise ConfigError(f"{where}.command: the program (the first word) is empty")
    if "parallel" in data and not 1 <= data["parallel"] <= MAX_PARALLEL:
        raise ConfigError(f"{where}.parallel: expected 1-{MAX_PARALLEL}, got {data['parallel']}")
    if "stall_timeout" in data and not valid_limit(data["stall_timeout"]):
        raise ConfigError(f"{where}.stall_timeout: expected a number of seconds (more than 0, at most "
                          f"{MAX_STALL:g}), got {data['stall_timeout']}")
    if "port" in data and not 0 < data["port"] < 65536:
        raise ConfigError(f"{where}.port: expected a port number (1-65535), got {data['port']}")


def load_config(explicit: str | None = None) -> Config:
    path = find_config(explicit)
    if path is None:
        return Config()
    import yaml   # only where there is a config file to read: a run without one never loads it

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a ckptsync config") from None
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


def _config_rate(value: Any, path: Path | None) -> int | None:
    if value is None:
        return None
    from ckptsync.ratelimit import parse_rate

    try:
        return parse_rate(value)
    except ValueError as exc:
        raise ConfigError(f"bwlimit in {path or 'the config'}: {exc}") from None


def is_store_url(text: str | None) -> bool:
    return bool(text) and str(text).startswith("s3://")


def store_url_of(where: str, label: str) -> str | None:
    """The config's local_dir in a bucket: each target below <prefix>/<label>, as on disk."""
    return f"{where.rstrip('/')}/{label}" if is_store_url(where) else None


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
    ssh: str | None = None,
) -> Target:
    """Turn the options of one command into a Target. Per-instance keys override the top level."""
    if instance is not None and host is not None:
        raise UsageError("give --instance or --host, not both")
    for flag, value in (("--instance", instance), ("--host", host), ("--remote-dir", remote_dir),
                        ("--local-dir", local_dir)):
        if value is not None and not value.strip():
            raise UsageError(f"{flag}: an empty value (give a name or a path)")
    assumed = instance is None and host is None and remote_dir is None
    args: list[str] = []
    if host is not None:
        args += ["--host", host]
    elif instance is not None or remote_dir is None:
        args += ["--instance", "0" if instance is None else instance]
    if remote_dir is not None:
        args += ["--remote-dir", remote_dir]
    if local_dir is not None:
        args += ["--local-dir", local_dir if is_store_url(local_dir) else str(Path(local_dir).expanduser().absolute())]
    if config.explicit and config.path is not None:
        args += ["--config", str(Path(config.path).absolute())]
    top = config.values
    inst: dict[str, Any] = {}
    if host is not None:
        user, hostname, port = parse_host(host)
        label = _safe_label(hostname if port is None else f"{hostname}-{port}")
    elif instance is not None or remote_dir is None:
        instance = "0" if instance is None else instance
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", instance) or (
                not instance.isdigit() and instance not in config.instances):
            named = ", ".join(sorted(k for k in config.instances if not k.isdigit()))
            raise UsageError(f"--instance {instance!r}: expected a number (the SSH alias tnr-N)"
                             + (f" or an instance named in the config ({named})" if named else ""))
        label = f"instance-{instance}"
        inst = config.instances.get(instance, {"host": f"tnr-{instance}"})
    else:
        label = "local"

    def pick(key: str, default: Any = None) -> Any:
        return inst.get(key, top.get(key, default))

    policy = "accept-new" if accept_new_host_key else pick("host_key_policy", "strict")
    store_url = local_dir.rstrip("/") if is_store_url(local_dir) else store_url_of(pick("local_dir", DEFAULT_LOCAL_DIR), label)
    backups = Path(local_dir).expanduser() if local_dir else Path(pick("local_dir", DEFAULT_LOCAL_DIR)).expanduser() / label
    rdir = remote_dir or pick("remote_dir")
    if label == "local" and rdir is not None:
        # A directory on this machine is relative to the current directory; on a server, the
        # agent takes a relative path as relative to the home directory (as scp and rsync do).
        rdir = os.path.abspath(os.path.expanduser(rdir))
    transport: Transport | None = None
    if need_remote:
        if rdir is None:
            where = f" in {config.path}" if config.path else " (no config file found)"
            raise ConfigError(f"no remote_dir for {label}{where}: give --remote-dir or set remote_dir")
        if host is not None:
            transport = ssh_transport(SshTarget(host=hostname, user=user, port=port, host_key_policy=policy),
                                      ssh, pick("ssh"))
        elif label == "local":
            transport = LocalTransport()
        elif "command" in inst:
            transport = CommandTransport(list(inst["command"]))
        else:
            transport = ssh_transport(SshTarget(
                host=inst["host"], user=inst.get("user"), port=inst.get("port"),
                identity_file=inst.get("identity_file"), host_key_policy=policy,
            ), ssh, pick("ssh"))
    return Target(
        label=label,
        transport=transport,
        remote_dir=rdir,
        local_dir=backups,
        store_url=store_url,
        s3=dict(top.get("s3") or {}),
        policy=RunPolicy(
            extra_files=list(pick("extra_files", []) or []),
            settle_seconds=float(pick("settle_seconds", DEFAULT_SETTLE)),
            train_process=pick("train_process"),
            dedup=pick("dedup", "reflink"),
            keep_generations=int(pick("keep_generations", DEFAULT_GENERATIONS)),
            follow_runs=bool(pick("follow_runs", False)),
            runs=tuple(pick("runs", []) or ()),
            hold_max=int(pick("hold_max", HOLD_MAX)),
        ),
        link=Link(
            host_key_policy=policy,
            bwlimit=_config_rate(pick("bwlimit"), config.path),
            parallel=None if pick("parallel", None) is None else int(pick("parallel", None)),
            stall_timeout=stall_limit(pick("stall_timeout")),
        ),
        printed=PrintBack(args=tuple(args), assumed_instance=assumed, config_path=config.path),
    )
