"""A TCP port for a test's process group (TCPStore / torchrun / deepspeed --master_port).

Picked below the kernel's ephemeral range: a port from bind(0) is free only until the probe closes, and in the
seconds before rank 0's store binds it, any outgoing connection on the machine may be given it as its local port.
Ports below the range are only ever taken by an explicit bind.
"""

from __future__ import annotations

import os
import random
import socket


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default range is 32768-60999


def free_port() -> int:
    low = min(_ephemeral_low(), 32768)
    draw = random.Random(os.getpid() ^ int.from_bytes(os.urandom(4), "little"))
    for _ in range(200):
        port = draw.randrange(low - 10000, low)
        with socket.socket() as s:
            try:
                s.bind(("", port))  # the store listens on every interface
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free TCP port in {low - 10000}-{low}")
