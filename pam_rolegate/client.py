"""Talking to the broker: connect within a deadline, insist the peer is root, one request, one reply.

Standard library only: the PAM hook uses this inside sshd.
"""

import os
import socket
import struct
import time

from . import protocol
from .errors import BrokerUnavailable, ProtocolError

DEFAULT_SOCKET = "/run/rolegate/rolegated.sock"
SOCKET_ENV = "ROLEGATE_SOCKET"
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_credentials(sock):
    """(pid, uid, gid) of the process at the other end of a Unix socket, as the kernel saw it."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return _UCRED.unpack(raw)


def socket_path(runtime_dir=None, environ=os.environ):
    if environ.get(SOCKET_ENV):
        return environ[SOCKET_ENV]
    return os.path.join(runtime_dir, "rolegated.sock") if runtime_dir else DEFAULT_SOCKET


def _recv_exact(sock, n, deadline):
    chunks, got = [], 0
    while got < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BrokerUnavailable("the broker did not answer in time")
        sock.settimeout(remaining)
        chunk = sock.recv(n - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def call(request, path=None, timeout=3.0, require_root=True):
    """Send one request and return its Reply or ErrorReply. Raises BrokerUnavailable."""
    path = path or socket_path()
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(max(timeout, 0.01))
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise BrokerUnavailable(f"no broker socket at {path}: is rolegated running? "
                                    f"(systemctl start rolegated)") from None
        except ConnectionRefusedError:
            raise BrokerUnavailable(f"nothing listens on {path}: is rolegated running? "
                                    f"(systemctl start rolegated)") from None
        except OSError as err:
            raise BrokerUnavailable(f"cannot connect to the broker at {path}: {err}") from None
        _pid, uid, _gid = peer_credentials(sock)
        if require_root and uid != 0:
            raise BrokerUnavailable(f"refusing the broker socket {path}: its owner is uid {uid}, not root")
        try:
            sock.sendall(protocol.encode_request(request))
            header = _recv_exact(sock, 4, deadline)
            if not header:
                raise BrokerUnavailable("the broker closed the connection without answering")
            body = _recv_exact(sock, protocol.body_length(header), deadline)
            return protocol.decode_reply(body)
        except socket.timeout:
            raise BrokerUnavailable(f"the broker did not answer within {timeout:g}s") from None
        except ProtocolError as err:
            raise BrokerUnavailable(f"the broker's reply was malformed: {err}") from None
        except OSError as err:
            raise BrokerUnavailable(f"lost the connection to the broker: {err}") from None
    finally:
        sock.close()
