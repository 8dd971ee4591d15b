"""The listening socket `facefind serve` and `facefind bench serve` hand to uvicorn, and what
counts as this machine only. The standard library only (and ``facefind.db.errors``): `facefind
query` imports the CLI's serve module, which imports this one at its top."""

from __future__ import annotations

import ipaddress
import socket

from facefind.db.errors import FacefindError

LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address to bind or a Host header's host) is this machine only."""
    host = host.strip().lower()
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free one); FacefindError when taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP, and
    # without it a small answer written after its headers waited ~40-60 ms for a delayed ACK
    # (measured: /api/attributes p50 64 ms, 0.4 ms with it).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # A 60-hit page is ~90 KB: a send buffer that takes it in one write spares the event loop a
    # round of "wait until writable" per answer, which a busy machine makes costly.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as err:
        sock.close()
        raise FacefindError(f"cannot listen on {host}:{port} ({err.strerror}): pick another --port, "
                            "or stop the program using it") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock
