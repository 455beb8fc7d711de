"""peers.caller_uid with real sockets and real users: plain loopback, through DNAT in a network
namespace of the test's own, and among thousands of other connections. Loopback only."""

import json
import os
import resource
import secrets
import select
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, require_sandbox
from harness import CHURN, make_host, run
from pam_rolegate.backends import firewall
from pam_rolegate.doors import peers

USERS = ("rgpeera", "rgpeerb")
LINE_TIMEOUT = 20  # seconds to wait for a child's line; generous for a shared 2-core machine
MANY = 2000  # other established connections in the load test (4,000 sockets with their peers)

# A client that connects, says which local address it got, and holds the connection until its
# stdin closes, so the server looks it up while it is certainly alive.
CONNECT = """
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
s.settimeout(10)
if len(sys.argv) > 3:  # a device to bind to first (SO_BINDTODEVICE)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, sys.argv[3].encode())
s.connect((host, port))
local = s.getsockname()
print(local[0], local[1], flush=True)
sys.stdin.read()
"""

# An HTTP client, as an SDK would be: it only knows the IMDS URL.
FETCH = """
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=10) as resp:
    print(resp.read().decode(), flush=True)
"""

# The door in miniature, run inside the namespace: per accepted connection it looks the caller
# up before reading anything, prints what it found and answers it as JSON.
SERVER = """
import json, select, socket, sys
from pam_rolegate.doors import peers
listeners = []
for family, host, port in ((socket.AF_INET, "127.0.0.1", int(sys.argv[1])),
                           (socket.AF_INET6, "::1", int(sys.argv[1])),
                           (socket.AF_INET6, "::", int(sys.argv[2]))):
    s = socket.socket(family)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if host == "::":  # dual stack: IPv4 callers arrive as ::ffff:a.b.c.d
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind((host, port))
    s.listen(16)
    listeners.append(s)
print("LISTENING", flush=True)
while True:
    ready, _, _ = select.select(listeners + [sys.stdin], [], [], 60)
    if not ready or sys.stdin in ready:
        break
    for lst in ready:
        conn, peer = lst.accept()
        with conn:
            conn.settimeout(5)
            orig = peers.original_destination(conn)
            found = {"peer": list(peer[:2]), "orig": list(orig), "uid": peers.caller_uid(conn),
                     # the NAT'd address is where the packets went, not what the client's
                     # socket is connected to: nobody is found there
                     "uid_at_translated": peers.tcp_owner(peer, conn.getsockname()),
                     "uid_other_port": peers.tcp_owner((peer[0], peer[1] ^ 1), orig)}
            print(json.dumps(found), flush=True)
            request = b""
            while b"\\r\\n\\r\\n" not in request and len(request) < 65536:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                request += chunk
            body = json.dumps(found).encode()
            conn.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Type: application/json\\r\\nContent-Length: %d\\r\\n\\r\\n"
                         % len(body) + body)
"""


@pytest.fixture(scope="module")
def host():
    require_sandbox()
    h = make_host()
    for name in USERS:
        h.add_user(name)
    yield h
    h.stop()


def uid_of(user):
    return 0 if user == "root" else int(run(["id", "-u", user]).stdout)


def as_user(user, argv, prefix=()):
    """argv run as `user` (real uid, gid and groups), after `prefix` (such as ip netns exec)."""
    drop = [] if user == "root" else ["setpriv", "--reuid", user, "--regid", user, "--init-groups"]
    return [*prefix, *drop, *argv]


def read_line(proc, what, timeout=LINE_TIMEOUT):
    poller = select.poll()  # not select(): the crowd test holds fds past FD_SETSIZE
    poller.register(proc.stdout, select.POLLIN)
    ready = poller.poll(timeout * 1000)
    assert ready, f"{what} printed nothing within {timeout}s (exit code {proc.poll()})"
    line = proc.stdout.readline()
    assert line, f"{what} exited ({proc.wait(5)}) without printing: {proc.stderr.read()}"
    return line.strip()


def start_client(user, host, port, device=None):
    proc = subprocess.Popen(as_user(user, [sys.executable, "-c", CONNECT, host, str(port)] + ([device] if device else [])),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ip, local_port = read_line(proc, f"{user}'s client to [{host}]:{port}").split()
    return proc, int(local_port)


def stop(procs):
    for proc in procs:
        if proc.stdin:
            proc.stdin.close()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def listen(host_ip, backlog=128):
    s = socket.socket(socket.AF_INET6 if ":" in host_ip else socket.AF_INET)
    s.bind((host_ip, 0))
    s.listen(backlog)
    s.settimeout(LINE_TIMEOUT)
    return s


def accept_all(listener, clients):
    """Accept one connection per client; returns {user: accepted socket}, matched by the client's
    own report of its port (bookkeeping for the test only, not what peers uses)."""
    by_port = {port: user for user, (_proc, port) in clients.items()}
    conns = {}
    for _ in range(len(clients)):
        conn, peer = listener.accept()
        assert peer[1] in by_port, f"accepted a connection from {peer} that none of our clients made"
        conns[by_port[peer[1]]] = conn
    return conns


@pytest.mark.parametrize("host_ip", ["127.0.0.1", "::1"])
def test_peers__each_concurrent_caller_is_known_by_its_own_uid(host, host_ip):
    listener = listen(host_ip)
    port = listener.getsockname()[1]
    clients = {}
    try:
        for user in ("root",) + USERS:
            clients[user] = start_client(user, host_ip, port)
        conns = accept_all(listener, clients)
        for user, conn in conns.items():
            dest = peers.original_destination(conn)
            assert dest == (host_ip, port), f"{user}'s un-NAT'd connection reported original destination {dest}, not [{host_ip}]:{port}"
            got = peers.caller_uid(conn)
            assert got == uid_of(user), f"{user}'s connection (peer {conn.getpeername()}) was attributed to uid {got}, not {uid_of(user)}"
            # Reversed, the tuple names our own accepted socket (root's), never the client's.
            back = peers.tcp_owner(conn.getsockname(), conn.getpeername())
            assert back == 0, f"the accepted end of {user}'s connection should be root's (ours), got {back}"
        for conn in conns.values():
            conn.close()
    finally:
        stop([proc for proc, _port in clients.values()])
        listener.close()


@pytest.mark.parametrize("host_ip", ["127.0.0.1", "::1"])
def test_peers__a_caller_bound_to_the_loopback_device_is_known_by_its_uid(host, host_ip):
    """A socket bound to lo (SO_BINDTODEVICE) is found only if the lookup names lo's interface."""
    listener = listen(host_ip)
    port = listener.getsockname()[1]
    user = USERS[0]
    clients = {}
    try:
        clients[user] = start_client(user, host_ip, port, device="lo")
        for conn in accept_all(listener, clients).values():
            with conn:
                got = peers.caller_uid(conn)
                assert got == uid_of(user), f"{user}'s lo-bound connection was attributed to uid {got}, not {uid_of(user)}"
    finally:
        stop([proc for proc, _port in clients.values()])
        listener.close()


def test_peers__dual_stack_listener_sees_ipv4_callers_by_their_uid(host):
    """An IPv6 socket accepting IPv4 shows ::ffff:127.0.0.1 while the client's socket is AF_INET."""
    listener = socket.socket(socket.AF_INET6)
    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listener.bind(("::", 0))
    listener.listen(8)
    listener.settimeout(LINE_TIMEOUT)
    port = listener.getsockname()[1]
    clients = {}
    try:
        for user in USERS:
            clients[user] = start_client(user, "127.0.0.1", port)
        for user, conn in accept_all(listener, clients).items():
            with conn:
                assert conn.getpeername()[0] == "::ffff:127.0.0.1", f"expected a mapped peer address, got {conn.getpeername()}"
                got = peers.caller_uid(conn)
                assert got == uid_of(user), f"{user}'s IPv4 connection to a dual-stack listener gave uid {got}, not {uid_of(user)}"
    finally:
        stop([proc for proc, _port in clients.values()])
        listener.close()


def proc_tcp_states(local, remote):
    """States of /proc/net/tcp lines for this IPv4 tuple, parsed here independently of peers."""
    def enc(ip, port):
        return "%08X:%04X" % (int.from_bytes(socket.inet_aton(ip), sys.byteorder), port)
    want = (enc(*local), enc(*remote))
    with open("/proc/net/tcp") as fh:
        rows = [line.split() for line in fh.readlines()[1:]]
    return [row[3] for row in rows if (row[1], row[2]) == want]


def test_peers__a_client_that_has_gone_is_nobody_not_root(host):
    """The client's end lingers in TIME_WAIT with uid 0; that must not make the caller root."""
    user = USERS[0]
    listener = listen("127.0.0.1")
    port = listener.getsockname()[1]
    proc, cport = start_client(user, "127.0.0.1", port)
    try:
        conn = accept_all(listener, {user: (proc, cport)})[user]
        conn.settimeout(LINE_TIMEOUT)
        tuple_ = (("127.0.0.1", cport), ("127.0.0.1", port))
        assert peers.caller_uid(conn) == uid_of(user), "the live client was not found before it left"
        stop([proc])  # the client exits; its socket sends FIN
        deadline = time.monotonic() + 10
        while conn.recv(1) and time.monotonic() < deadline:
            pass
        leaving = peers.caller_uid(conn)
        assert leaving in (uid_of(user), None), f"a client closing its end was attributed to uid {leaving}"
        conn.close()  # now the client's end goes to TIME_WAIT
        deadline = time.monotonic() + 10
        while "06" not in proc_tcp_states(*tuple_) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "06" in proc_tcp_states(*tuple_), f"expected the client's end in TIME_WAIT, /proc shows {proc_tcp_states(*tuple_)}"
        got = peers.tcp_owner(*tuple_)
        assert got is None, f"a TIME_WAIT entry (uid 0, no owner) was taken as the caller: uid {got}"
    finally:
        stop([proc])
        listener.close()


def test_peers__a_tuple_no_socket_has_is_nobody(host):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # a port that is ours and unconnected: no connection uses it
        unused = s.getsockname()[1]
        for dest in ((firewall.IMDS_V4, 80), ("127.0.0.1", 1)):
            got = peers.tcp_owner(("127.0.0.1", unused), dest)
            assert got is None, f"a tuple nobody has (127.0.0.1:{unused} -> {dest}) was attributed to uid {got}"
    got = peers.tcp_owner(("::1", unused), (firewall.IMDS_V6, 80))
    assert got is None, f"an IPv6 tuple nobody has was attributed to uid {got}"
    assert peers.tcp_owner(("127.0.0.1", unused), ("::1", 80)) is None, "mixed families cannot be one connection"
    assert peers.tcp_owner(("not an address", 1), ("127.0.0.1", 80)) is None, "garbage should be nobody, not an error"


# -- through DNAT, in a namespace of the test's own ---------------------------------------------

@pytest.fixture(scope="module")
def natns(host):
    name = "rgp-" + secrets.token_hex(4)
    run(["ip", "netns", "add", name])
    ns = ["ip", "netns", "exec", name]
    server = None
    try:
        run(ns + ["ip", "link", "set", "lo", "up"])
        run(ns + ["ip", "addr", "add", firewall.IMDS_V4 + "/32", "dev", "lo"])
        v6 = run(ns + ["ip", "-6", "addr", "add", firewall.IMDS_V6 + "/128", "dev", "lo", "nodad"],
                 check=False).returncode == 0
        port, dual_port = 8700 + secrets.randbelow(500), 9300 + secrets.randbelow(500)  # a fresh namespace: all free
        rules = "\n".join([
            "table inet rgtest {", "  chain out {", "    type nat hook output priority -100;",  # dstnat; this nft knows the name only for prerouting
            f"    ip daddr {firewall.IMDS_V4} tcp dport 80 dnat ip to 127.0.0.1:{port}",
            f"    ip daddr {firewall.IMDS_V4} tcp dport 81 dnat ip to 127.0.0.1:{dual_port}",
            f"    ip6 daddr {firewall.IMDS_V6} tcp dport 80 dnat ip6 to [::1]:{port}" if v6 else "",
            "  }", "}", ""])
        run(ns + ["nft", "-f", "-"], input=rules)
        server = subprocess.Popen(ns + [sys.executable, "-c", SERVER, str(port), str(dual_port)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=dict(os.environ, PYTHONPATH=REPO))
        assert read_line(server, "the server in the namespace") == "LISTENING", "the server did not start"
        urls = {"v4": (f"http://{firewall.IMDS_V4}/latest/meta-data/", firewall.IMDS_V4, 80),
                "dual": (f"http://{firewall.IMDS_V4}:81/latest/meta-data/", firewall.IMDS_V4, 81)}
        if v6:
            urls["v6"] = (f"http://[{firewall.IMDS_V6}]/latest/meta-data/", firewall.IMDS_V6, 80)
        yield ns, server, urls
    finally:
        if server is not None:
            stop([server])
        run(["ip", "netns", "delete", name], check=False)


@pytest.mark.parametrize("family", ["v4", "v6", "dual"])
def test_peers__imds_callers_through_dnat_are_known_by_their_uid(natns, family):
    ns, server, urls = natns
    if family not in urls:
        pytest.skip("this kernel gave the namespace no IPv6 address")
    url, imds_ip, imds_port = urls[family]
    for user in ("root",) + USERS:
        done = run(as_user(user, [sys.executable, "-c", FETCH, url], prefix=ns), check=False, timeout=30)
        seen = json.loads(read_line(server, f"the server, for {user}'s request to {url}"))
        assert done.returncode == 0, f"{user} could not fetch {url} through DNAT: {done.stderr}"
        assert json.loads(done.stdout) == seen, f"{user} got {done.stdout!r}, the server found {seen}"
        assert tuple(seen["orig"]) == (imds_ip, imds_port), f"original destination of {user}'s connection was {seen['orig']}, not {imds_ip}:{imds_port}"
        assert seen["uid"] == uid_of(user), f"{user}'s IMDS request through DNAT was attributed to uid {seen['uid']}, not {uid_of(user)}"
        assert seen["uid_at_translated"] is None, f"looking {user}'s client up at the translated address found uid {seen['uid_at_translated']}"
        assert seen["uid_other_port"] is None, f"a neighbouring source port, which no socket has, was attributed to uid {seen['uid_other_port']}"


# -- among thousands of other connections -------------------------------------------------------

@pytest.fixture
def crowd():
    """MANY established loopback connections (root's, both ends open) to one listener."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * MANY + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(need, soft), max(need, hard)))
    listener = listen("127.0.0.1", backlog=MANY)
    port = listener.getsockname()[1]
    clients, served = [], []
    try:
        for i in range(MANY):
            c = socket.create_connection(("127.0.0.1", port), timeout=LINE_TIMEOUT)
            clients.append(c)
            served.append(listener.accept()[0])
        yield listener, port
    finally:
        for s in clients + served:
            s.close()
        listener.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_peers__lookups_stay_exact_among_thousands_of_connections(host, crowd):
    listener, port = crowd
    with open("/proc/net/tcp") as fh:
        rows = sum(1 for _ in fh) - 1
    assert rows >= 2 * MANY, f"expected at least {2 * MANY} sockets in /proc/net/tcp, found {rows}"
    clients = {}
    try:
        for user in USERS:
            clients[user] = start_client(user, "127.0.0.1", port)
        conns = accept_all(listener, clients)
        timings = []
        for user, conn in conns.items():
            for _ in range(10):
                start = time.perf_counter()
                got = peers.caller_uid(conn)
                timings.append(time.perf_counter() - start)
                assert got == uid_of(user), f"among {rows} sockets, {user}'s connection was attributed to uid {got}"
            conn.close()
        timings.sort()
        print(f"\ncaller_uid (sock_diag exact lookup) with {rows} sockets in /proc/net/tcp: median {timings[len(timings) // 2] * 1e3:.2f} ms, "
              f"max {timings[-1] * 1e3:.2f} ms over {len(timings)} lookups")
        assert timings[-1] < 5, f"one lookup took {timings[-1]:.2f}s with {rows} sockets: something hangs"
    finally:
        stop([proc for proc, _port in clients.values()])


CHURN_SECONDS = 8  # of lookups while another process opens and closes connections


def test_peers__live_callers_are_always_found_while_other_connections_churn(host):
    """The lookup is one probe of the kernel's hash, not a read of a table that changes under it:
    a caller whose socket is alive is found every time, whatever else opens and closes."""
    from concurrent.futures import ThreadPoolExecutor

    listener = listen("127.0.0.1")
    port = listener.getsockname()[1]
    clients = {user: start_client(user, "127.0.0.1", port) for user in USERS}
    churn = subprocess.Popen(as_user(USERS[0], ["prlimit", "--nofile=5000:5000", sys.executable, "-c", CHURN,
                                                "2000", "60"]),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        conns = accept_all(listener, clients)
        assert read_line(churn, "the churning process") == "CHURNING", "the churn did not start"

        def look(user):
            wrong, timings = [], []
            until = time.monotonic() + CHURN_SECONDS
            while time.monotonic() < until:
                start = time.perf_counter()
                got = peers.caller_uid(conns[user])
                timings.append(time.perf_counter() - start)
                if got != uid_of(user):
                    wrong.append(got)
            return wrong, timings

        with ThreadPoolExecutor(4) as pool:  # two lookups of each caller at once, as doors would
            results = list(pool.map(look, USERS * 2))
        churn.stdin.close()
        churned = int(read_line(churn, "the churning process's count", timeout=60))
    finally:
        churn.kill()
        churn.wait(10)
        stop([proc for proc, _port in clients.values()])
        listener.close()
    wrong = [w for ws, _t in results for w in ws]
    timings = sorted(t for _w, ts in results for t in ts)
    print(f"\n{len(timings)} lookups of live callers while {churned} other connections opened and closed: "
          f"{len(wrong)} wrong or missed; median {timings[len(timings) // 2] * 1e6:.0f} us, "
          f"p99 {timings[int(len(timings) * .99)] * 1e6:.0f} us, max {timings[-1] * 1e3:.1f} ms")
    assert churned >= 2000, f"only {churned} connections churned: the test proved nothing"
    assert not wrong, f"{len(wrong)} of {len(timings)} lookups of a live caller gave another answer: {wrong[:10]}"
