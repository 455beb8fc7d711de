"""Who is on the other end of a loopback TCP connection: the caller's uid from the kernel, by
one exact lookup of the caller's own socket (sock_diag), matched by the full 4-tuple.

The IMDS door listens on 127.0.0.1:PORT / [::1]:PORT and nftables DNATs users' connections to
169.254.169.254:80 / [fd00:ec2::254]:80 there. TCP has no SO_PEERCRED, so the uid comes from
the client's own socket: its local address is our peer address, and its remote address is the
destination it connected to *before* DNAT (conntrack's SO_ORIGINAL_DST), because NAT rewrites
packets, never the sockets that sent them. Nothing in the request and never the source port
alone decides who the caller is: a lookup that does not find the socket gives None, and the
door must refuse.

Why sock_diag's exact lookup (SOCK_DIAG_BY_FAMILY without NLM_F_DUMP, the id filled in), and
not /proc/net/tcp{,6} as before:
  - It is one hash probe in the kernel under RCU: the socket is there at that instant or it
    is not. /proc/net/tcp is formatted a page per read(), and each read re-finds its place in
    the hash by bucket and offset; sockets opened and closed meanwhile move that place, so a
    read is not a snapshot (and it walks every socket of every namespace, since they share
    one hash: ~10 ms on an idle test machine, 40-160 ms under churn, measured). Measured with
    tests/test_imds.py's churn test: while another process opened and closed 2,000 loopback
    connections at a time, the /proc read found no socket for 373 of 400 live IMDS callers,
    who were told 403 within ~0.2 s (so well inside botocore's 1 s timeout: their sockets were
    alive and missed, not gone); the exact lookup found all 400.
  - It costs microseconds, so the doors run it on their loop at accept time, with no thread
    pool between a caller and its answer.
Why our own codec (below, ~40 lines of struct) rather than pyroute2, the field's library:
pyroute2's DiagSocket offers only dumps (get_sock_stats sends NLM_F_DUMP and fills no id), so
an exact lookup means driving its internal message classes and nlm_request; those behave
differently in the versions we meet: Debian 12's 0.7.2 returns a tuple and drops the error
code of a miss (its MarshalDiag sets error_type = -1), PyPI's 0.9 returns a generator and its
synchronous socket refuses to run inside a running asyncio loop ("This event loop is already
running"), which is where the doors call it. One fixed request and one fixed reply layout
(linux/inet_diag.h, a stable UAPI) are less to own than that.

What the uid means: the kernel records the uid that *created* the socket (fchown on it needs
CAP_CHOWN to name another uid). A socket handed from one process to another keeps its
creator's uid; that is the kernel's word and we take it as is. It never changes for the
socket's life, so the uid found when a connection is accepted holds for every request on it.

The netlink socket is in the reading process's network namespace: the broker sees the sockets
of its own namespace, which is the only one whose connections DNAT to loopback can bring to it.
"""

import errno
import ipaddress
import socket
import struct

# From linux/netfilter_ipv4.h and linux/netfilter_ipv6/ip6_tables.h; Python's socket module
# does not export them.
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
_SOCKADDR_IN = struct.Struct("!2xH4s8x")  # family (host order, unused), port, address, zero
_SOCKADDR_IN6 = struct.Struct("!2xH4x16s4x")  # family, port, flowinfo, address, scope id

# From linux/netlink.h, linux/sock_diag.h and linux/inet_diag.h (UAPI; Python has no names for them).
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR = 2
NLM_F_REQUEST = 1  # and not NLM_F_DUMP: the kernel then looks the one socket up by the id we give
INET_DIAG_NOCOOKIE = 0xFFFFFFFF  # "we do not know the socket's cookie": match by the tuple alone
_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
# inet_diag_req_v2: family, protocol, extensions, pad, states; then inet_diag_sockid: source
# and destination ports and addresses in network order, interface, cookie (two u32).
_REQ = struct.Struct("=BBBxI2s2s16s16sIII")
# inet_diag_msg: family, state, timer, retransmits; inet_diag_sockid; expires, rqueue, wqueue, uid, inode.
_MSG = struct.Struct("=BBBB2s2s16s16sIIIIIIII")
_ERR = struct.Struct("=i")
# A reply is one inet_diag_msg and its attributes (we ask for none): a page holds it with room.
REPLY_MAX = 4096
# The kernel answers within the send itself (the reply is queued before sendto returns); this
# only bounds a kernel that never does, so the loop that asks is never held longer.
LOOKUP_TIMEOUT = 0.2

# States (include/net/tcp_states.h) in which the client's socket can be while we hold the
# accepted end: ESTABLISHED, or a half-closed connection (the client shut down writing after
# its request, or we did). SYN_SENT is left out on purpose: a connection we accepted has
# finished its handshake, so a SYN_SENT socket with the same tuple is someone else's (for
# instance a half-open connect to the real address) and must not be counted. LISTEN is left
# out too: the kernel's exact lookup falls back to a listener on the local address when no
# connection has the tuple, and a listener is not the caller.
_OWNED_STATES = frozenset({1, 4, 5, 8, 9, 11})
# ESTABLISHED FIN_WAIT1 FIN_WAIT2 CLOSE_WAIT LAST_ACK CLOSING
_STATES_MASK = sum(1 << s for s in _OWNED_STATES)
#
# The state is not enough: once the client closes, the kernel may turn its end into a timewait
# mini-socket, which sock_diag reports in its substate (FIN_WAIT2) with uid 0 and inode 0 (seen
# in tests/test_peers.py: a departed user's connection read as root's). So the socket must also
# have an inode, i.e. be one some process still holds. A client that has closed its socket is
# gone and is answered by nobody.


def _plain(ip):
    """An address as an ip_address, with an IPv4-mapped IPv6 address (::ffff:a.b.c.d) as its IPv4.

    A dual-stack socket shows IPv4 peers as mapped addresses; the other end of the same
    connection may be a plain AF_INET socket. Comparing in one form finds it either way.
    """
    addr = ipaddress.ip_address(ip.split("%", 1)[0] if isinstance(ip, str) else ip)
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def original_destination(sock):
    """(ip, port) the client connected to before DNAT; the socket's own address if it was not NAT'd.

    IPv4 connections (including IPv4 peers of a dual-stack socket) ask conntrack through
    SO_ORIGINAL_DST at SOL_IP, IPv6 ones through IP6T_SO_ORIGINAL_DST at SOL_IPV6 (which Python
    names only as IPPROTO_IPV6). ENOENT (no conntrack entry: the connection was never tracked)
    and ENOPROTOOPT (conntrack not loaded, so nothing can have been NAT'd) both mean the client
    connected straight to us. An IPv4 address is returned in plain form, never mapped.
    """
    local = sock.getsockname()
    fallback = (str(_plain(local[0])), local[1])
    ipv4 = sock.family == socket.AF_INET or _plain(local[0]).version == 4
    try:
        if ipv4:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN.size)
            port, packed = _SOCKADDR_IN.unpack(raw)
        else:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6.size)
            port, packed = _SOCKADDR_IN6.unpack(raw)
    except OSError as err:
        if err.errno in (errno.ENOENT, errno.ENOPROTOOPT):
            return fallback
        raise
    return str(_plain(packed)), port


def _loopback_index():
    try:
        return socket.if_nametoindex("lo")
    except OSError:
        return 0  # no name for it here: any interface, as before


def _exact_lookup(family, client, server):
    """sock_diag's exact lookup of the TCP socket whose local end is `client` and remote end
    `server` ((ip_address, port) each); the reply's (state, uid, inode, local, remote), or None
    when the kernel has no such socket (ENOENT) or answers anything we do not expect."""
    (c_ip, c_port), (s_ip, s_port) = client, server
    # The interface: loopback's, which every caller's socket uses (both ends are local). The kernel
    # matches a socket bound to no device whatever we name, and one bound to lo only if we name lo.
    req = _REQ.pack(family, socket.IPPROTO_TCP, 0, _STATES_MASK, c_port.to_bytes(2, "big"),
                    s_port.to_bytes(2, "big"), c_ip.packed.ljust(16, b"\0"), s_ip.packed.ljust(16, b"\0"),
                    _loopback_index(), INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    # A socket of its own per lookup: no reply to an earlier, abandoned lookup can be read as
    # this one's, and threads need not share anything.
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(LOOKUP_TIMEOUT)
        nl.sendto(_NLMSGHDR.pack(_NLMSGHDR.size + _REQ.size, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0) + req,
                  (0, 0))
        data = nl.recv(REPLY_MAX)
    if len(data) < _NLMSGHDR.size:
        return None
    length, kind, _flags, seq, _port = _NLMSGHDR.unpack_from(data)
    if kind == NLMSG_ERROR:
        return None  # ENOENT: no socket has this tuple now
    if kind != SOCK_DIAG_BY_FAMILY or seq != 1 or length > len(data) or length < _NLMSGHDR.size + _MSG.size:
        return None  # a reply we do not understand
    fam, state, _t, _r, sport, dport, src, dst, _if, _c0, _c1, _e, _rq, _wq, uid, inode = \
        _MSG.unpack_from(data, _NLMSGHDR.size)
    size = 4 if fam == socket.AF_INET else 16
    local = (_plain(ipaddress.ip_address(src[:size])), int.from_bytes(sport, "big"))
    remote = (_plain(ipaddress.ip_address(dst[:size])), int.from_bytes(dport, "big"))
    return state, uid, inode, local, remote


def tcp_owner(client_addr, server_addr):
    """The uid owning the TCP socket whose local address is `client_addr` and whose remote address
    is `server_addr` (as the client saw it: the original destination, before DNAT); or None.

    Addresses are (ip, port, ...) tuples as the socket module gives them; IPv4-mapped IPv6
    addresses match plain IPv4 ones, and an IPv4 lookup finds a dual-stack client socket too
    (the kernel's IPv4 hash holds it). The kernel's answer must be the very tuple we asked for,
    in an owned state, held by a process (an inode); anything else, or any error, gives None:
    we refuse rather than guess.
    """
    try:
        client = (_plain(client_addr[0]), int(client_addr[1]))
        server = (_plain(server_addr[0]), int(server_addr[1]))
    except (ValueError, TypeError, IndexError):
        return None
    if client[0].version != server[0].version or not (0 < client[1] < 65536 and 0 < server[1] < 65536):
        return None
    family = socket.AF_INET if client[0].version == 4 else socket.AF_INET6
    try:
        found = _exact_lookup(family, client, server)
    except (OSError, ValueError, struct.error):
        return None  # no sock_diag here, a timeout, or a reply we cannot read: nobody
    if found is None:
        return None
    state, uid, inode, local, remote = found
    if state not in _OWNED_STATES or inode == 0 or local != client or remote != server:
        return None
    return uid


def caller_uid(sock):
    """The uid of the process at the other end of an accepted loopback TCP socket, or None.

    Works for stdlib sockets and for asyncio's transport.get_extra_info("socket") alike: it
    only calls getpeername, getsockname and getsockopt.
    """
    try:
        peer = sock.getpeername()
        destination = original_destination(sock)
    except OSError:  # the client is already gone (ENOTCONN): nobody to answer
        return None
    return tcp_owner(peer, destination)
