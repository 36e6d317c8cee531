"""TCPStore servers that torchckpt starts, listening only where they are asked to.

A plain ``torch.distributed.TCPStore`` server listens on every interface,
whatever its host argument. :func:`start_store` binds the listening socket to
the given address itself and hands it to the store, so a store torchckpt
starts is reachable at that address only.

Callers: :class:`torchckpt.barriers.TCPStoreBarrier` on rank 0 (the store its
barrier runs through) and :mod:`torchckpt.builder` (a store the writer
subprocesses join when the job has no TCPStore of its own). This module
imports nothing of torchckpt, so both can use it without an import circle.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch.distributed as dist

__all__ = ["sock_port", "start_store"]


def start_store(
    host: str, world_size: int, *, port: int = 0, timeout_s: float = 600, use_libuv: bool = True
) -> dist.TCPStore:
    """Start a TCPStore server that listens on ``host`` only (not on every interface).

    Args:
        host: The address to listen on (IPv4, or IPv6 when it contains ``:``).
        world_size: Number of ranks that will join the store.
        port: Port to listen on (0: any free port; read it from the store's ``port``).
        timeout_s: The store's timeout for its operations, in seconds.
        use_libuv: Serve through the libuv backend (True) or torch's older one (False).

    Returns:
        The store, as its server; it serves for as long as the object lives.

    Raises:
        OSError: The address cannot be bound (in use, not local).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    fd = sock.detach()
    return dist.TCPStore(
        host, sock_port(fd), world_size=world_size, is_master=True, timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False, master_listen_fd=fd, use_libuv=use_libuv,
    )  # fmt: skip


def sock_port(fd: int) -> int:
    """The port a listening socket, given by its file descriptor, is bound to."""
    s = socket.socket(fileno=os.dup(fd))
    try:
        return int(s.getsockname()[1])
    finally:
        s.close()
