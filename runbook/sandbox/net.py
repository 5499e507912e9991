"""Loopback port helpers: the sandbox only ever binds or dials 127.0.0.1."""

from __future__ import annotations

import socket

from runbook.engine.daemon import free_ports

LOOPBACK = "127.0.0.1"
__all__ = ["LOOPBACK", "free_ports", "port_accepts"]


def port_accepts(port: int, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on 127.0.0.1:port."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout):
            return True
    except OSError:
        return False
