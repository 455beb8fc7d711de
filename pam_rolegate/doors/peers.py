"""Who is on the other end of a loopback TCP connection: the caller's uid from the kernel's socket table, matched by the exact 4-tuple.

The IMDS door listens on 127.0.0.1:PORT / [::1]:PORT and nftables DNATs users' connections to
169.254.169.254:80 / [fd00:ec2::254]:80 there. TCP has no SO_PEERCRED, so the uid comes from
the client's own socket: its local address is our peer address, and its remote address is the
destination it connected to *before* DNAT (conntrack's SO_ORIGINAL_DST), because NAT rewrites
packets, never the sockets that sent them. Nothing in the request and never the source port
alone decides who the caller is: a lookup that does not find exactly one socket gives None,
and the door must refuse.

Why /proc/net/tcp{,6} and not NETLINK_SOCK_DIAG:
  - sock_diag can look one socket up by its exact tuple, but from Python that means either
    hand-written netlink (struct packing, message framing, error replies: protocol code we
    would own) or pyroute2, a large dependency for one query in a root daemon.
  - /proc/net/tcp is a stable, documented text interface that holds the same answer (the uid
    column is the socket's sk_uid, the same field sock_diag reports). Matching the full tuple
    is as exact as sock_diag's lookup.
  - The price is cost linear in the namespace's TCP sockets: the kernel formats the whole
    table on every read (about 1.6 us per socket on the 2-core test machine; reading tcp6
    walks the shared hash too, even when it lists few lines). Our own search is one C
    substring find and is a small part of it. Measured: ~25 ms per IPv4 lookup with 12,000
    sockets in the table (tests/test_peers.py prints its own figure). That is fine for IMDS
    traffic, which SDKs send at credential refresh, but the door must bound lookups per caller
    so nobody can make the broker format the table in a loop. If hosts ever show that read in
    profiles, sock_diag's exact lookup (a hash probe in the kernel) is the upgrade, behind
    this same function.

What the uid means: the kernel records the uid that *created* the socket (fchown on it needs
CAP_CHOWN to name another uid). A socket handed from one process to another keeps its
creator's uid; that is the kernel's word and we take it as is.

/proc/net is the reading process's network namespace: the broker sees the sockets of its own
namespace, which is the only one whose connections DNAT to loopback can bring to it.
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

TCP_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")

# States (include/net/tcp_states.h) in which the client's socket can be while we hold the
# accepted end: ESTABLISHED, or a half-closed connection (the client shut down writing after
# its request, or we did). SYN_SENT is left out on purpose: a connection we accepted has
# finished its handshake, so a SYN_SENT socket with the same tuple is someone else's (for
# instance a half-open connect to the real address) and must not be counted. TIME_WAIT and
# CLOSE entries carry uid 0 and no owner, so counting them would make every caller root.
_OWNED_STATES = frozenset({b"01", b"04", b"05", b"08", b"09", b"0B"})
# ESTABLISHED FIN_WAIT1 FIN_WAIT2 CLOSE_WAIT LAST_ACK CLOSING
#
# The state is not enough: once the client closes, the kernel may turn its end into a timewait
# mini-socket that /proc lists in state FIN_WAIT2 (05) with uid 0 and inode 0 (seen in
# tests/test_peers.py: a departed user's connection read as root's). So the line must also
# have an inode, i.e. a socket some process still holds. A client that has closed its socket
# is gone and is answered by nobody.
_NO_INODE = b"0"


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


def _proc_hex(addr, port):
    """addr:port as /proc/net/tcp{,6} prints it: each 32-bit word of the address in host byte
    order as %08X, then the port as %04X. Our own byte order is the kernel's, so native
    unpacking of each word reproduces it on any machine."""
    packed = addr.packed
    words = struct.unpack("=%dI" % (len(packed) // 4), packed)
    return ("".join("%08X" % w for w in words) + ":%04X" % port).encode("ascii")


def _needles(client, server):
    """(table path, b" LOCAL REMOTE ") pairs that the client's socket's line may contain.

    An IPv4 connection is in /proc/net/tcp if the client's socket is AF_INET, or in tcp6 with
    mapped addresses if the client used a dual-stack AF_INET6 socket; look in both.
    """
    (c_ip, c_port), (s_ip, s_port) = client, server
    if c_ip.version != s_ip.version:
        return []
    if c_ip.version == 4:
        mapped = [ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + a.packed) for a in (c_ip, s_ip)]
        return [(TCP_TABLES[0], b" %s %s " % (_proc_hex(c_ip, c_port), _proc_hex(s_ip, s_port))),
                (TCP_TABLES[1], b" %s %s " % (_proc_hex(mapped[0], c_port), _proc_hex(mapped[1], s_port)))]
    return [(TCP_TABLES[1], b" %s %s " % (_proc_hex(c_ip, c_port), _proc_hex(s_ip, s_port)))]


def _read(path):
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:  # a kernel without IPv6 has no tcp6
        return b""


def tcp_owner(client_addr, server_addr):
    """The uid owning the TCP socket whose local address is `client_addr` and whose remote address
    is `server_addr` (as the client saw it: the original destination, before DNAT); or None.

    Addresses are (ip, port, ...) tuples as the socket module gives them; IPv4-mapped IPv6
    addresses match plain IPv4 ones. Exactly one socket that a process holds, in an owned
    state, must match: none, or
    more than one, gives None. The 4-tuple is unique among live connections by construction,
    so a second match means something we do not understand, and we refuse rather than guess.

    Each table is read once and searched for the tuple as its exact text, so we parse only the
    matching lines, never every line.
    """
    try:
        client = (_plain(client_addr[0]), int(client_addr[1]))
        server = (_plain(server_addr[0]), int(server_addr[1]))
    except (ValueError, TypeError, IndexError):
        return None
    found = []
    for path, needle in _needles(client, server):
        data = _read(path)
        at = data.find(needle)
        while at != -1 and len(found) < 2:
            start = data.rfind(b"\n", 0, at) + 1
            end = data.find(b"\n", at)
            fields = data[start:end if end != -1 else len(data)].split()
            # sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...; the needle can only
            # fall on local+rem, but check the fields themselves rather than trust that.
            if (len(fields) > 9 and b" %s %s " % (fields[1], fields[2]) == needle
                    and fields[3] in _OWNED_STATES and fields[9] != _NO_INODE):
                found.append(int(fields[7]))
            at = data.find(needle, at + 1)
    return found[0] if len(found) == 1 else None


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
