"""`ckptsync doctor`: what the server's python3 offers ckptsync, what it costs, how to add what it lacks.

A server's python3 is the one a non-interactive SSH login finds: on a rented GPU server the
system's, without xxhash or zstandard (the training venv is not on that PATH). ckptsync works
with the standard library alone and gives the same answers; what it costs is speed, measured
here on the server.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from ckptsync.config import Target
from ckptsync.result import Result
from ckptsync.server import Hello, Server, open_server

PIP_FIX = "python3 -m pip install --user xxhash zstandard"
APT_PACKAGES = "python3-xxhash python3-zstandard"

CODECS = {
    "zstd-zstandard": "zstd per 1 MiB chunk (the zstandard module)",
    "zstd-stdlib": "zstd per 1 MiB chunk (Python's compression.zstd)",
    "zlib-lanes": "zlib byte lanes (the standard library)",
}


@dataclass
class Missing:
    piece: str          # xxhash or zstandard
    meaning: str        # what its absence costs
    fix: str            # the command that installs it, on the server


def apt(hello: Hello, packages: str) -> str:
    return f"{'' if hello.root else 'sudo '}apt-get install {packages}"


def modules_fix(hello: Hello) -> tuple[str, str]:
    """(the command that installs xxhash and zstandard for the server's python3, another way or "").
    Pure. A distribution's python3 refuses pip (PEP 668): its own packages, where apt is there."""
    if hello.managed and hello.apt:
        return apt(hello, APT_PACKAGES), ""
    if hello.managed:
        return PIP_FIX + " --break-system-packages", ""   # into ~/.local: the system's packages stay as they are
    return PIP_FIX, apt(hello, APT_PACKAGES) if hello.apt else ""


def missing(hello: Hello) -> list[Missing]:
    """What the server's python3 lacks, from its hello. Pure."""
    out = []
    command, other = modules_fix(hello)
    modules = command + (f" (or: {other})" if other else "")
    if "xxh3_128" not in hello.hashes:
        out.append(Missing("xxhash", f"files are hashed with {hello.hashes[0] if hello.hashes else 'sha1'} instead of "
                           "xxh3-128: the same checks, several times slower to compute on the server; the "
                           "backups are compared through sha1 values kept in their manifests", modules))
    if hello.zstd != "module":
        out.append(Missing("zstandard", "data is packed as byte lanes with zlib: about as small on the wire "
                           "as zstd on checkpoints, but slower to pack, so a fast link gets more of it raw", modules))
    return out


def fallback_line(hello: Hello, server: str, doctor: str) -> str:
    """One line for a new target's first backup when the server falls back to a slower hash or
    codec; "" when it has both modules. `doctor`: the command that says more."""
    lacks = missing(hello)
    if not lacks:
        return ""
    pieces = [m.piece for m in lacks]
    names = pieces[0] if len(pieces) == 1 else f"neither {pieces[0]} nor {pieces[1]}"
    how = []
    if any(m.piece == "xxhash" for m in lacks):
        how.append(f"hashing with {hello.hashes[0] if hello.hashes else 'sha1'}")
    if any(m.piece != "xxhash" for m in lacks):
        how.append("compressing with zlib")
    return (f"{server}: its python3 {hello.python} has {'no ' if len(pieces) == 1 else ''}{names}, so ckptsync is {' and '.join(how)} "
            f"(slower, same results); to install them there: {modules_fix(hello)[0]} (details: {doctor})")


@dataclass
class DoctorResult(Result):
    target: str
    server: str
    remote_dir: str
    python: str = ""
    executable: str = ""
    hash: str = ""
    hash_rate: float = 0.0          # bytes per second, measured on the server
    codec: str = ""
    codec_rate: float = 0.0
    free_bytes: int = 0
    free_path: str = ""             # the existing directory measured (remote_dir or its nearest parent)
    writers_visible: bool = False   # other processes' open files can be read (the completion rule uses them)
    fd_readable: int = 0
    fd_total: int = 0
    missing: list[Missing] = field(default_factory=list)
    seconds: float = 0.0



def run_doctor(target: Target, connect: Callable[[], Server] | None = None) -> DoctorResult:
    """Ask the server's agent what it has and how fast it hashes and packs there. `connect`: gives
    the server (see open_server)."""
    started = time.monotonic()
    result = DoctorResult(target=target.label, server=target.describe(), remote_dir=target.remote_dir or "")
    with open_server(target, connect) as server:
        probe = server.probe()
        space = server.df(target.remote_dir or ".")
        result.missing = missing(server.hello)
    result.python, result.executable = probe.python, probe.executable
    result.hash, result.hash_rate = probe.hash, probe.hash_rate
    result.codec, result.codec_rate = probe.codec, probe.codec_rate
    result.free_bytes, result.free_path = space.free, space.path
    result.fd_readable, result.fd_total = probe.fd_readable, probe.fd_total
    result.writers_visible = probe.fd_readable > 0
    result.seconds = time.monotonic() - started
    return result
