"""Transports that run the agent launcher as a local subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from ckptsync import osdeps
from ckptsync.errors import ConnectError
from ckptsync.transport.base import SHELL_LAUNCH, STAGE1, Process, StderrTail, Transport

# Prefixes whose remote side runs our command through a shell, so the
# launcher must travel as one shell line rather than an argv.
SHELL_PREFIXES = {"ssh", "tnr", "gcloud", "az", "mosh"}


class Subprocess(Process):
    def __init__(self, argv: list[str], env: dict | None = None) -> None:
        try:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                bufsize=0, env=env, **osdeps.DETACHED,
            )
        except OSError as exc:
            raise ConnectError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
        self._stderr = StderrTail(self.proc.stderr.read)
        for pipe in (self.proc.stdin, self.proc.stdout):
            osdeps.widen_pipe(pipe.fileno())

    def write(self, data: bytes) -> None:
        # The pipe is unbuffered (bufsize=0): a write that a signal cuts short (a stop and continue,
        # a suspend) returns what it wrote, and the rest is written from there.
        view = memoryview(data).cast("B")
        try:
            while view:
                view = view[self.proc.stdin.write(view):]
        except (BrokenPipeError, ValueError, OSError) as exc:
            raise ConnectError(f"connection lost: {exc}") from None

    def read(self, n: int) -> bytes:
        try:
            return self.proc.stdout.read(n)
        except (OSError, ValueError):
            return b""

    def readinto(self, buf: memoryview) -> int:
        try:
            return self.proc.stdout.readinto(buf) or 0
        except (OSError, ValueError):
            return 0

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass

    def close(self) -> None:
        for stream in (self.proc.stdin,):
            try:
                stream.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class LocalTransport(Transport):
    """The agent on this machine: for a local directory standing in for the server."""

    starts_ahead = True

    def start(self) -> Process:
        return Subprocess([sys.executable, "-c", STAGE1], env=dict(os.environ))

    def describe(self) -> str:
        return "this machine"


class CommandTransport(Transport):
    """Any argv prefix that runs a command remotely on our stdin/stdout (ssh host, kubectl exec -i pod --)."""

    starts_ahead = True

    def __init__(self, prefix: list[str]) -> None:
        if not prefix:
            raise ConnectError("empty command for the command transport")
        self.prefix = list(prefix)

    def start(self) -> Process:
        head = os.path.basename(self.prefix[0])
        if head in SHELL_PREFIXES:
            argv = self.prefix + [SHELL_LAUNCH]
        else:
            argv = self.prefix + ["sh", "-c", SHELL_LAUNCH]
        return Subprocess(argv)

    def describe(self) -> str:
        return " ".join(self.prefix)

    def unreachable(self) -> tuple[str, str] | None:
        if shutil.which(self.prefix[0]) is None:
            return f"cannot run {self.prefix[0]}: not found", "install it, or change command: in the ckptsync config"
        return None
