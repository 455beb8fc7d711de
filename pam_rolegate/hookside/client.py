"""Talking to the broker: connect within a deadline, insist the peer is root, one request, one reply.

Standard library only, and cheap to import: the PAM hook uses this inside sshd at every login.
It speaks to `_socket` directly because `socket` imports `enum` and `selectors` (~8 ms).

Connecting waits for the broker rather than failing at once: a full listen queue (a login storm)
is waited out with a blocking connect bounded by SO_SNDTIMEO, and a broker that is restarting
(no socket, or nothing listening yet) or answers `busy` is asked again until the deadline.
"""

import os
import sys
import time

import _socket

from . import protocol
from ..errors import BrokerUnavailable, ProtocolError

DEFAULT_RUNTIME_DIR = "/run/rolegate"
DEFAULT_SOCKET = DEFAULT_RUNTIME_DIR + "/" + protocol.USER_SOCKET
DEFAULT_PAM_SOCKET = DEFAULT_RUNTIME_DIR + "/" + protocol.PAM_SOCKET
SOCKET_ENV = "ROLEGATE_SOCKET"
_INT = 4  # sizeof(int) in struct ucred (pid, uid, gid) and in struct timeval's fields below
_RETRY_FIRST = 0.005  # first pause before asking a restarting or busy broker again; doubles
_RETRY_MAX = 0.1
# How long a broker that is not there (no socket, nobody listening) is waited for: long enough
# for a restart to bind again, short enough that a stopped broker costs a login little.
RESTART_WAIT = 1.0


def peer_credentials(sock):
    """(pid, uid, gid) of the process at the other end of a Unix socket, as the kernel saw it."""
    raw = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 3 * _INT)
    return tuple(int.from_bytes(raw[i:i + _INT], sys.byteorder, signed=True) for i in range(0, 3 * _INT, _INT))


def socket_path(runtime_dir=None, environ=os.environ):
    if environ.get(SOCKET_ENV):
        return environ[SOCKET_ENV]
    return os.path.join(runtime_dir, protocol.USER_SOCKET) if runtime_dir else DEFAULT_SOCKET


def _timeval(seconds):
    """struct timeval for SO_SNDTIMEO: two longs, native byte order."""
    whole = int(seconds)
    size = 8 if sys.maxsize > 2 ** 32 else 4
    return whole.to_bytes(size, sys.byteorder) + int((seconds - whole) * 1e6).to_bytes(size, sys.byteorder)


def _connect(path, deadline):
    """A connected socket, waiting out a full queue until `deadline`, a restart for RESTART_WAIT."""
    pause = _RETRY_FIRST
    absent_until = min(deadline, time.monotonic() + RESTART_WAIT)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BrokerUnavailable(f"could not connect to the broker at {path} in time: is rolegated running? "
                                    f"(systemctl status rolegated)")
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            # A blocking connect waits in the kernel for room in the listen queue, up to SO_SNDTIMEO
            # (a Python timeout would make it non-blocking, and a full queue fail at once).
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDTIMEO, _timeval(max(remaining, 0.001)))
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError, BlockingIOError, InterruptedError) as err:
            sock.close()
            last = err  # restarting (no socket yet, or nobody listening) or a queue full past the wait
        except OSError as err:
            sock.close()
            raise BrokerUnavailable(f"cannot connect to the broker at {path}: {err}") from None
        absent = isinstance(last, (FileNotFoundError, ConnectionRefusedError))
        if (absent_until if absent else deadline) - time.monotonic() <= pause:
            if absent:
                raise BrokerUnavailable(f"no broker at {path}: is rolegated running? (systemctl start rolegated)")
            raise BrokerUnavailable(f"the broker at {path} was too busy to accept a connection in time")
        _pause(pause)
        pause = min(pause * 2, _RETRY_MAX)


def _pause(seconds):
    """Sleep 50-150% of `seconds`: spread apart clients that were turned away together."""
    time.sleep(seconds * (0.5 + (time.monotonic_ns() // 1000 % 1000) / 1000))


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


def _exchange(sock, request, deadline):
    """Send the request, read the reply (joining a streamed one's frames)."""
    try:
        # MSG_NOSIGNAL: a door that closed on us must be an error here, never a SIGPIPE that kills
        # the sshd or sudo process this hook runs in (embedded Python may not ignore SIGPIPE).
        sock.sendall(protocol.encode_request(request), _socket.MSG_NOSIGNAL)
    except (BrokenPipeError, ConnectionResetError):
        pass  # a door turning us away (`busy`) replies and closes unread: its reply still waits below
    parts = []
    while True:
        header = _recv_exact(sock, 4, deadline)
        if not header:
            raise BrokerUnavailable("the broker closed the connection without answering")
        reply, more = protocol.decode_reply(_recv_exact(sock, protocol.body_length(header), deadline))
        parts.append(reply)
        if not more:
            return parts[0] if len(parts) == 1 else protocol.join_replies(parts[0], parts[1:])


def send(request, path=None, timeout=3.0, require_root=True):
    """Send one request and wait for no reply: the request's frame is in the broker's socket when this
    returns, and the broker reads and acts on it after we have gone (it takes our pid and uid from
    the connection, which the kernel keeps). For a logout only, whose loss the broker's reaper makes
    good: nothing here can tell whether the broker acted on it, or turned it away as `busy`.
    Raises BrokerUnavailable when there is no broker to hand it to."""
    path = path or socket_path()
    sock = _connect(path, time.monotonic() + timeout)
    try:
        _pid, uid, _gid = peer_credentials(sock)
        if require_root and uid != 0:
            raise BrokerUnavailable(f"refusing the broker socket {path}: its owner is uid {uid}, not root")
        try:
            # A frame of a few dozen bytes fits a fresh socket's buffer at once; MSG_NOSIGNAL as in _exchange.
            sock.sendall(protocol.encode_request(request), _socket.MSG_NOSIGNAL)
        except OSError as err:
            raise BrokerUnavailable(f"lost the connection to the broker: {err}") from None
    finally:
        sock.close()


def call(request, path=None, timeout=3.0, require_root=True):
    """Send one request and return its Reply or ErrorReply. Raises BrokerUnavailable."""
    path = path or socket_path()
    deadline = time.monotonic() + timeout
    pause = _RETRY_FIRST
    while True:
        sock = _connect(path, deadline)
        try:
            _pid, uid, _gid = peer_credentials(sock)
            if require_root and uid != 0:
                raise BrokerUnavailable(f"refusing the broker socket {path}: its owner is uid {uid}, not root")
            try:
                reply = _exchange(sock, request, deadline)
            except _socket.timeout:
                raise BrokerUnavailable(f"the broker did not answer within {timeout:g}s") from None
            except ProtocolError as err:
                raise BrokerUnavailable(f"the broker's reply was malformed: {err}") from None
            except OSError as err:
                raise BrokerUnavailable(f"lost the connection to the broker: {err}") from None
        finally:
            sock.close()
        if not (isinstance(reply, protocol.ErrorReply) and reply.code == protocol.E_BUSY):
            return reply
        if deadline - time.monotonic() <= pause:
            return reply  # still busy at the deadline: the caller reports it
        _pause(pause)
        pause = min(pause * 2, _RETRY_MAX)
