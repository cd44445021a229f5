"""A TCP relay in front of the test sshd that acts at a known byte count of a transfer."""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path

from helpers import HANG


class Relay:
    """Passes every connection on to sshd and counts the bytes going one way (from the server, or
    to it with `upload=True`). Once `limit` have passed it drops the connection (`cut`), or with
    `hold=True` passes nothing more that way until `release()`: a fault at a known point of a
    transfer, whatever the machine's speed. It acts once; later bytes and connections pass."""

    def __init__(self, port: int, limit: int, *, upload: bool = False, hold: bool = False) -> None:
        self.port, self.limit, self.upload, self.hold = port, limit, upload, hold
        self.passed, self.acted, self.cut = 0, False, False
        self.reached, self.released = threading.Event(), threading.Event()
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.relay_port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _addr = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.port))
            threading.Thread(target=self._pipe, args=(client, server, self.upload), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, not self.upload), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if counted:
                    data = self._count(data, dst)
                    if data is None:
                        break
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _count(self, data: bytes, dst: socket.socket) -> bytes | None:
        """What of `data` is still to go on after the limit's action; None: the link is cut."""
        with self.lock:
            if self.acted:
                return data
            room = self.limit - self.passed
            self.passed += min(room, len(data))
            if len(data) < room:
                return data
            self.acted = True
        dst.sendall(data[:room])
        self.cut = not self.hold
        self.reached.set()
        if self.cut:
            return None
        self.released.wait()
        return data[room:]

    def wait(self, proc=None, timeout: float = HANG) -> None:
        """Until the limit is reached: the transfer is at that point (and held there, with hold=True).
        Fails if the process `proc` (a subprocess.Popen) ends first."""
        if proc is not None:
            threading.Thread(target=lambda: (proc.wait(), self.reached.set()), daemon=True).start()
        self.reached.wait(timeout)
        ended = "" if proc is None or proc.poll() is None else f"; the run ended with exit {proc.returncode}"
        assert self.acted, f"the transfer never passed {self.limit} bytes{ended}"

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.release()
        self.listener.close()


def relay_alias(home: Path, sshd, relay: Relay, name: str = "relayed") -> str:
    """A Host alias in home's ssh config that reaches sshd through `relay`."""
    text = sshd.client_config_text(home / ".ssh" / "id_ed25519", home / ".ssh" / "known_hosts")
    block = text.split("\n\n")[0].splitlines()
    block[0] = f"Host {name}"
    block = [f"    Port {relay.relay_port}" if line.strip().startswith("Port ") else line for line in block]
    with open(home / ".ssh" / "config", "a") as f:
        f.write("\n" + "\n".join(block) + "\n")
    key = sshd.host_key_line.split(" ", 1)[1]
    with open(home / ".ssh" / "known_hosts", "a") as f:
        f.write(f"[127.0.0.1]:{relay.relay_port} {key}\n")
    return name
