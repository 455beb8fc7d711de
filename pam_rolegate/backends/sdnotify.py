"""Telling systemd how the broker is doing (Type=notify): READY=1, RELOADING=1, STOPPING=1, STATUS=.

The protocol, not a library: one datagram of `KEY=VALUE` lines to the AF_UNIX socket named by
$NOTIFY_SOCKET (a path, or `@name` in the abstract namespace). systemd documents it as a stable
interface meant to be reimplemented (sd_notify(3), "Notes"). The library way, python3-systemd,
is a Debian package only: a venv install (`rolegate install`) would need a C compiler and
libsystemd's headers to build it from PyPI, for what fits in these few lines.
"""

import os
import socket
import time


def _address(environ):
    path = environ.get("NOTIFY_SOCKET", "")
    if path.startswith("@"):
        return "\0" + path[1:]
    if path.startswith("/"):
        return path
    return None  # unset (not under systemd), or a vsock address, which a host service never gets


def notify(*fields, environ=None):
    """Send `fields` ("READY=1", "STATUS=...") as one message. False when there is no one to tell
    or the message could not be sent (the caller logs; the broker serves either way)."""
    address = _address(os.environ if environ is None else environ)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode("utf-8"))
        return True
    except OSError:
        return False


def ready(status):
    return notify("READY=1", f"STATUS={status}")


def reloading():
    # MONOTONIC_USEC lets systemd 253's Type=notify-reload match this message to its reload; 252
    # ignores it.
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def stopping():
    return notify("STOPPING=1")


def status(text):
    return notify(f"STATUS={text}")
