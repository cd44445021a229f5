"""Transports: where the agent runs. One interface (`Transport.start`), three kinds."""

from __future__ import annotations

import os

from ckptsync.errors import ConfigError
from ckptsync.transport.base import Process, SshTarget, Transport
from ckptsync.transport.local import CommandTransport, LocalTransport

__all__ = ["Process", "Transport", "LocalTransport", "CommandTransport", "SshTarget", "ssh_transport",
           "SSH_CHOICES", "SSH_ENV"]

SSH_CHOICES = ("auto", "openssh", "paramiko")
SSH_ENV = "CKPTSYNC_SSH"


def ssh_transport(target: SshTarget, option: str | None = None, configured: str | None = None) -> Transport:
    """The OpenSSH client when `ssh` is on PATH (or asked for), else paramiko.

    The choice: `option` (--ssh), else CKPTSYNC_SSH, else `configured` (the config's ssh:), else auto.
    """
    from ckptsync.transport.openssh import OpenSshTransport, ssh_binary

    env = os.environ.get(SSH_ENV) or None
    choice = option or env or configured or "auto"
    if choice not in SSH_CHOICES:
        source = "--ssh" if option else SSH_ENV if env else "ssh"
        raise ConfigError(f"{source} {choice!r}: expected openssh, paramiko or auto")
    binary = ssh_binary()
    if choice == "openssh" and binary is None:
        raise ConfigError("ssh: openssh was asked for, but there is no ssh on PATH",
                          hint="install openssh-client, or use --ssh paramiko")
    if choice != "paramiko" and binary is not None:
        return OpenSshTransport(target, binary)
    # paramiko is imported only when it is used.
    from ckptsync.transport.ssh import SshTransport

    return SshTransport(target)
