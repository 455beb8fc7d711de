"""What the broker's loopback HTTP doors (IMDS, container credentials) share: a thread with its own
asyncio loop serving an aiohttp application on 127.0.0.1 and ::1, a bounded worker pool for the
blocking work behind a request, and the caller's uid from the kernel (peers.py), found once as
each connection is accepted and held for every request on it.

Fairness is per uid, decided at accept: before a connection counts against anything others
need (the door's connection cap, the broker's descriptors, a request slot), its caller is known
by one exact kernel lookup, and a uid past its share of open connections is closed at once and
logged (at most once per interval per uid). We chose this over a per-uid connection meter in
nftables (`meta skuid ... ct count over N`): it holds for both doors whatever the firewall mode
and for direct connects to the loopback ports as for DNAT'd ones, it needs no conntrack, it
logs like the socket doors through the same RefusalLog, and its one lookup is the same one that
names the caller for its requests. What it does not do is keep a flood out of the kernel's
accept queue; connections past a share cost a lookup and a close each (tens of microseconds),
and the test in tests/test_imds.py measures another user's answer time during such a flood.

aiohttp, a well-kept HTTP server, parses HTTP; the doors only decide.
"""

import asyncio
import errno
import socket
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from . import peers
from .loops import loop_thread
from ..backends.firewall import DOOR_CONNECTIONS_PER_UID
from ..errors import RolegateError


def text(body, status=200):
    return web.Response(text=body, status=status, content_type="text/plain")


# While the broker is down any user may bind a door's unprivileged port (the firewall makes such a
# listener answer nobody). A door whose port is taken must not keep the broker, and so every login,
# from starting: it is logged and tried again this often, while the other doors serve.
BIND_RETRY = 5.0
# When accept itself fails (the broker is out of descriptors), the door stops accepting for this
# long, as asyncio's servers do, rather than spin on a listener that stays readable.
ACCEPT_RETRY = 1.0


class HttpDoor:
    name = "http"
    workers = 8  # NSS lookups and STS calls behind requests, in parallel
    per_uid = 4  # one uid's requests in the workers at once: a flood costs its sender
    # Each open connection holds one of the broker's descriptors, which the PAM door needs too:
    # at most this many at once (more are closed at once), and none open longer than the lifetime
    # below, idle or not (aiohttp by itself would wait forever for a first request).
    max_connections = 1024
    backlog = 1024  # connections the kernel queues for us; also the most one readiness event accepts
    # One uid's open connections to this door, the share the firewall also enforces in the kernel
    # (firewall.DOOR_CONNECTIONS_PER_UID says why that number); here for a door reached without
    # the firewall's rules. Past it: closed at once, logged. Not the user door's bound: there a
    # uid's extra connections wait in its own line, here each holds one of the door's places.
    per_uid_connections = DOOR_CONNECTIONS_PER_UID
    connection_lifetime = 60.0

    def __init__(self, log, refusals, port):
        self.log = log
        self.refusals = refusals
        self.port = port
        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=f"{self.name}-door")
        self.counts = {}  # outcome -> requests
        self._callers = {}  # aiohttp's handler of each admitted connection -> its caller's uid (None: unknown)
        self._held = {}  # uid -> admitted connections open now
        self._gates = {}  # uid -> asyncio.Semaphore
        self._loop = None
        self._runner = None
        self._thread = None
        self._retries = []  # tasks waiting for a taken port
        self._listeners = []  # our listening sockets (we accept ourselves, see _accept)

    def routes(self, app):
        raise NotImplementedError

    def count(self, outcome):
        self.counts[outcome] = self.counts.get(outcome, 0) + 1

    @web.middleware
    async def _identify(self, request, handler):
        """Every request: its connection's caller, as the kernel named it at accept, or 403."""
        uid = self._callers.get(request.protocol)
        if uid is None:
            self.count("unidentified")
            return text("Forbidden", 403)
        request["uid"] = uid
        return await handler(request)

    async def work(self, uid, fn, *args):
        """fn(*args) on the pool, at most `per_uid` of one uid's at once."""
        gate = self._gates.get(uid)
        if gate is None:
            gate = self._gates[uid] = asyncio.Semaphore(self.per_uid)
        async with gate:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def _check_privileged(self):
        """The port must be one no user can bind, or a user could answer for the broker while it is down."""
        try:
            with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as fh:
                start = int(fh.read())
        except (OSError, ValueError):
            return
        if self.port >= start:
            self.log.error(f"{self.name} door: net.ipv4.ip_unprivileged_port_start is {start}, so any user may "
                           f"listen on port {self.port} while rolegated is down; set it above {self.port}")

    def start(self):
        self._check_privileged()

        async def setup():
            app = web.Application(middlewares=[self._identify], client_max_size=4096)
            self.routes(app)
            self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await self._runner.setup()
            self._bound_connections(self._runner.server)
            for host in ("127.0.0.1", "::1"):
                await self._listen(host)

        try:
            self._loop, self._thread = loop_thread(f"{self.name}-door", setup)
        except Exception as err:
            raise RolegateError(f"the {self.name} door cannot listen on port {self.port}: {err}") from None

    def _admit(self, sock):
        """The accepted socket's caller uid (None: the kernel names nobody), counted against its
        share; or False when it must be closed now: its uid is past its share, or the door is full."""
        # One exact kernel lookup (peers.py), microseconds: before the connection counts against
        # anything, and while the client is certainly connected (its socket is ESTABLISHED before
        # ours is accepted).
        uid = peers.caller_uid(sock)
        held = self._held.get(uid, 0)
        if held >= self.per_uid_connections:
            self.count("over_share")
            self.refusals.refused(-1 if uid is None else uid, None, door=self.name, reason="too many connections",
                                  share=self.per_uid_connections)
            return False
        if sum(self._held.values()) >= self.max_connections:
            self.count("over_capacity")
            self.refusals.refused(-1 if uid is None else uid, None, door=self.name, reason="door full",
                                  cap=self.max_connections)
            return False
        if uid is None:
            # Refused at its first request (403), so an HTTP client is told; logged here, once.
            self.refusals.refused(-1, None, door=self.name, reason="no socket owns this connection's tuple")
        self._held[uid] = held + 1
        return uid

    def _release(self, uid):
        self._held[uid] -= 1
        if not self._held[uid]:
            del self._held[uid]

    def _accept(self, listener):
        """Readable listener: accept what waits, refuse what is past a share at once, hand the rest
        to aiohttp. Our own accept rather than aiohttp's site, so that a refused connection costs a
        lookup and a close (tens of microseconds), never an HTTP handler and a transport: a user
        re-opening thousands of connections cannot slow the door for others."""
        loop = asyncio.get_running_loop()
        server = self._runner.server
        for _ in range(self.backlog):
            try:
                conn, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client left before we took it: nothing to serve
            except OSError as err:
                # EMFILE and the like: what waits stays in the kernel's queue. Stop listening for a
                # while, as asyncio's own servers do, or the still-readable listener spins the loop.
                self.count("accept_failed")
                self.log.error(f"{self.name} door: accept: {err}; accepting again in {ACCEPT_RETRY:g}s")
                loop.remove_reader(listener.fileno())
                loop.call_later(ACCEPT_RETRY, self._resume, listener)
                return
            uid = self._admit(conn)
            if uid is False:
                conn.close()
                continue
            conn.setblocking(False)
            made = []  # the handler aiohttp makes for this connection, once it has

            def handler(uid=uid, made=made):
                made.append(server())  # aiohttp's RequestHandler for this connection
                self._callers[made[0]] = uid
                return made[0]

            task = loop.create_task(loop.connect_accepted_socket(handler, conn))
            task.add_done_callback(lambda t, uid=uid, conn=conn, made=made: self._not_connected(t, uid, conn, made))

    def _resume(self, listener):
        if listener.fileno() != -1:  # not closed by stop() meanwhile
            asyncio.get_running_loop().add_reader(listener.fileno(), self._accept, listener)

    def _not_connected(self, task, uid, conn, made):
        """If connect_accepted_socket failed, give the connection's place back (once: connection_lost
        may have given it back already, and then its handler is no longer in _callers)."""
        if not task.cancelled() and task.exception() is None:
            return
        conn.close()
        if not made:
            self._release(uid)
        elif self._callers.pop(made[0], self) is not self:
            self._release(uid)

    def _bound_connections(self, server):
        """Time-limit connections and give a closed one's place back, through aiohttp's own
        per-connection hooks on its server (connection_made / connection_lost, in aiohttp 3.8 as in 3.14)."""
        made, lost = server.connection_made, server.connection_lost
        loop = asyncio.get_running_loop()

        def connection_made(handler, transport):
            made(handler, transport)
            loop.call_later(self.connection_lifetime, transport.close)

        def connection_lost(handler, exc=None):
            lost(handler, exc)
            if handler in self._callers:
                self._release(self._callers.pop(handler))

        server.connection_made = connection_made
        server.connection_lost = connection_lost

    async def _listen(self, host, retrying=False):
        """Listen on host:port; when another process holds the port, log it and try again every
        BIND_RETRY s in a task of the loop's own (the door serves whatever address it has meanwhile)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        while True:
            if retrying:
                await asyncio.sleep(BIND_RETRY)
            listener = socket.socket(family, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                listener.bind((host, self.port))
                listener.listen(self.backlog)
                listener.setblocking(False)
            except OSError as err:
                listener.close()
                if err.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    self.log.error(f"{self.name} door: no listener on {host}:{self.port}: {err}")
                    return  # no such address here (a kernel without IPv6): nothing to wait for
                if not retrying:
                    self.log.decision("failed", door=self.name, address=f"{host}:{self.port}", reason=str(err),
                                      note=f"another process holds the port; trying again every {BIND_RETRY:g}s")
                    self._retries.append(asyncio.get_running_loop().create_task(self._listen(host, retrying=True)))
                    return
                continue
            self._listeners.append(listener)
            asyncio.get_running_loop().add_reader(listener.fileno(), self._accept, listener)
            if retrying:
                self.log.decision("started", door=self.name, address=f"{host}:{self.port}", note="port free again")
            return

    def stop(self):
        if self._loop is None or self._runner is None:
            return
        for task in self._retries:
            self._loop.call_soon_threadsafe(task.cancel)

        def unlisten():
            for listener in self._listeners:
                self._loop.remove_reader(listener.fileno())
                listener.close()

        self._loop.call_soon_threadsafe(unlisten)
        try:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(5)
        except Exception:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self.pool.shutdown(wait=False)
