#!/usr/bin/env python3
"""A TCP relay that delays every byte by a fixed time in each direction.

The benchmark's kernel has no netem, so a long link is built in user space:
each accepted connection is paired with a connection to the target, and each
direction holds what it reads for --delay seconds before writing it on. What
a direction holds is bounded (--max-held bytes); when it is full the relay
stops reading, so the sender's TCP window closes instead of memory growing.

Standard library only. Prints "listening HOST:PORT" once ready; exits on SIGTERM.
"""
from __future__ import annotations

import argparse
import collections
import signal
import socket
import sys
import threading
import time

CHUNK = 256 * 1024
BATCH = 1024 * 1024


class Direction:
    """One way of one connection: a reader thread and a writer thread around a bounded, timed queue."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay: float, max_held: int, on_done):
        self.src, self.dst = src, dst
        self.delay, self.max_held = delay, max_held
        self.on_done = on_done
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.held = 0
        self.cond = threading.Condition()
        self.dead = False

    def start(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def kill(self) -> None:
        with self.cond:
            self.dead = True
            self.cond.notify_all()

    def _read(self) -> None:
        try:
            while True:
                with self.cond:
                    while self.held >= self.max_held and not self.dead:
                        self.cond.wait()
                    if self.dead:
                        return
                data = self.src.recv(CHUNK)
                due = time.monotonic() + self.delay
                with self.cond:
                    # b"" is the peer's FIN: it travels with the same delay as the data
                    self.queue.append((due, data))
                    self.held += len(data)
                    self.cond.notify_all()
                if not data:
                    return
        except OSError:
            self.on_done()

    def _write(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.queue and not self.dead:
                        self.cond.wait()
                    if self.dead:
                        return
                    due = self.queue[0][0]
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                # everything already due goes out in one write, so a busy stream is not one sleep per recv
                batch, size, fin = [], 0, False
                with self.cond:
                    now = time.monotonic()
                    while self.queue and self.queue[0][0] <= now and size < BATCH:
                        data = self.queue.popleft()[1]
                        if not data:
                            fin = True
                            break
                        batch.append(data)
                        size += len(data)
                if batch:
                    self.dst.sendall(b"".join(batch) if len(batch) > 1 else batch[0])
                    with self.cond:
                        self.held -= size
                        self.cond.notify_all()
                if fin:
                    self.dst.shutdown(socket.SHUT_WR)
                    self.on_done(half=True)
                    return
        except OSError:
            self.on_done()


class Pair:
    def __init__(self, a: socket.socket, b: socket.socket, delay: float, max_held: int):
        self.socks = (a, b)
        self.lock = threading.Lock()
        self.halves = 0
        self.closed = False
        self.dirs = (Direction(a, b, delay, max_held, self.done), Direction(b, a, delay, max_held, self.done))

    def start(self) -> None:
        for d in self.dirs:
            d.start()

    def done(self, half: bool = False) -> None:
        with self.lock:
            if half:
                self.halves += 1
                if self.halves < 2:
                    return
            if self.closed:
                return
            self.closed = True
        for d in self.dirs:
            d.kill()
        for s in self.socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def tune(s: socket.socket) -> None:
    # the relay writes whole chunks when they are due; Nagle would only add latency to small ones
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


# ------------------------------------------------------------------ probe
# A test peer for checking the relay without ssh in the way. The client sends one command byte:
#   e          echo everything back
#   s + N(8)   swallow N bytes, then answer b"k"
#   g + N(8)   send N zero bytes

def _recv_exact(c: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        d = c.recv(n - len(buf))
        if not d:
            raise ConnectionError("peer closed")
        buf += d
    return buf


def _probe_one(c: socket.socket) -> None:
    try:
        tune(c)
        cmd = _recv_exact(c, 1)
        if cmd == b"e":
            while True:
                d = c.recv(CHUNK)
                if not d:
                    break
                c.sendall(d)
        elif cmd in (b"s", b"g"):
            n = int.from_bytes(_recv_exact(c, 8), "big")
            if cmd == b"s":
                while n > 0:
                    d = c.recv(min(n, CHUNK * 4))
                    if not d:
                        raise ConnectionError("peer closed")
                    n -= len(d)
                c.sendall(b"k")
            else:
                zero = bytes(CHUNK * 4)
                while n > 0:
                    c.sendall(zero[:n] if n < len(zero) else zero)
                    n -= len(zero)
    except OSError:
        pass
    finally:
        c.close()


def probe_server() -> tuple[str, int]:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)

    def loop():
        while True:
            c, _ = srv.accept()
            threading.Thread(target=_probe_one, args=(c,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return srv.getsockname()


def probe_rtt(where: tuple[str, int], count: int = 20) -> list[float]:
    """Seconds for each of `count` one-byte round trips to the probe's echo."""
    with socket.create_connection(where, timeout=30) as c:
        tune(c)
        c.sendall(b"e")
        out = []
        for _ in range(count):
            t0 = time.monotonic()
            c.sendall(b"x")
            _recv_exact(c, 1)
            out.append(time.monotonic() - t0)
        return out


def probe_rate(where: tuple[str, int], nbytes: int, push: bool) -> float:
    """Seconds to push `nbytes` to the probe (until it confirms) or pull them from it."""
    with socket.create_connection(where, timeout=60) as c:
        tune(c)
        t0 = time.monotonic()
        c.sendall((b"s" if push else b"g") + nbytes.to_bytes(8, "big"))
        if push:
            zero = bytes(CHUNK * 4)
            left = nbytes
            while left > 0:
                c.sendall(zero[:left] if left < len(zero) else zero)
                left -= len(zero)
            _recv_exact(c, 1)
        else:
            left = nbytes
            while left > 0:
                d = c.recv(CHUNK * 4)
                if not d:
                    raise ConnectionError("probe closed early")
                left -= len(d)
        return time.monotonic() - t0


def serve(listen: tuple[str, int], target: tuple[str, int], delay: float, max_held: int) -> socket.socket:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(listen)
    srv.listen(64)

    def loop():
        while True:
            client, _peer = srv.accept()
            try:
                upstream = socket.create_connection(target, timeout=10)
                upstream.settimeout(None)
            except OSError as e:
                print(f"cannot reach {target[0]}:{target[1]}: {e}", file=sys.stderr, flush=True)
                client.close()
                continue
            tune(client)
            tune(upstream)
            Pair(client, upstream, delay, max_held).start()

    threading.Thread(target=loop, daemon=True).start()
    return srv


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="TCP relay that holds every byte for a fixed delay each way.")
    p.add_argument("--listen", required=True, type=addr, help="HOST:PORT to accept on")
    p.add_argument("--target", required=True, type=addr, help="HOST:PORT to connect each client to")
    p.add_argument("--delay", type=float, default=0.05, help="seconds each byte is held, per direction")
    p.add_argument("--max-held", type=int, default=16 * 1024 * 1024,
                   help="bytes held per direction of a connection before reading stops (default 16 MiB)")
    p.add_argument("--probe-listen", type=addr, default=None,
                   help="HOST:PORT of a second relayed port whose far end is a built-in echo/sink/source, "
                        "for checking the delay and the rate without ssh")
    a = p.parse_args(argv)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: done.set())
    serve(a.listen, a.target, a.delay, a.max_held)
    if a.probe_listen:
        serve(a.probe_listen, probe_server(), a.delay, a.max_held)
    print(f"listening {a.listen[0]}:{a.listen[1]}", flush=True)
    while not done.wait(3600):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
