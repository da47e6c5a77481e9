"""systemd's readiness protocol (sd_notify), in the few lines of stdlib it takes: a datagram to the socket
named by $NOTIFY_SOCKET. Under `Type=notify` the service is "started" only once READY=1 arrives (after the
daemon listens), and STOPPING=1 tells systemd the drain has begun. Without $NOTIFY_SOCKET (not under systemd)
every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("mgr.daemon")


def notify(state: str) -> bool:
    """Send `state` ("READY=1", "STOPPING=1", "STATUS=..."); True when it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket: a leading NUL byte on Linux
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as e:
        log.warning("could not notify systemd at %s: %s", address, e)
        return False
    return True
