"""Transports: where the agent runs. One interface (`Transport.start`), three kinds."""

from ckptsync.transport.base import Process, Transport
from ckptsync.transport.local import CommandTransport, LocalTransport

__all__ = ["Process", "Transport", "LocalTransport", "CommandTransport", "ssh_transport"]


def ssh_transport(target):
    # paramiko is imported only when an SSH remote is used.
    from ckptsync.transport.ssh import SshTransport

    return SshTransport(target)
