"""What the broker's loopback HTTP doors (IMDS, container credentials) share: a thread with its own
asyncio loop serving an aiohttp application on 127.0.0.1 and ::1, a bounded worker pool for the
blocking work behind a request, and the caller's uid from the kernel (peers.py) on every request.

aiohttp, a well-kept HTTP server, parses HTTP; the doors only decide.
"""

import asyncio
import errno
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from . import peers
from .sockets import loop_thread
from ..errors import RolegateError


def text(body, status=200):
    return web.Response(text=body, status=status, content_type="text/plain")


# While the broker is down any user may bind a door's unprivileged port (the firewall makes such a
# listener answer nobody). A door whose port is taken must not keep the broker, and so every login,
# from starting: it is logged and tried again this often, while the other doors serve.
BIND_RETRY = 5.0


class HttpDoor:
    name = "http"
    workers = 8  # NSS lookups and STS calls behind requests, in parallel
    per_uid = 4  # one uid's requests in the workers at once: a flood costs its sender
    lookup_workers = 2  # socket-table reads (who is calling) at once: each is a pass over /proc/net/tcp
    # Each open connection holds one of the broker's descriptors, which the PAM door needs too:
    # at most this many at once (more are closed at once), and none open longer than the lifetime
    # below, idle or not (aiohttp by itself would wait forever for a first request).
    max_connections = 1024
    connection_lifetime = 60.0

    def __init__(self, log, refusals, port):
        self.log = log
        self.refusals = refusals
        self.port = port
        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=f"{self.name}-door")
        self.lookups = ThreadPoolExecutor(max_workers=self.lookup_workers, thread_name_prefix=f"{self.name}-peers")
        self.counts = {}  # outcome -> requests
        self._gates = {}  # uid -> asyncio.Semaphore
        self._loop = None
        self._runner = None
        self._thread = None
        self._retries = []  # tasks waiting for a taken port

    def routes(self, app):
        raise NotImplementedError

    def count(self, outcome):
        self.counts[outcome] = self.counts.get(outcome, 0) + 1

    @web.middleware
    async def _identify(self, request, handler):
        """Every request: the caller's uid from its socket's exact tuple, or 403."""
        sock = request.transport.get_extra_info("socket") if request.transport else None
        # Reading the kernel's socket table costs milliseconds on a busy host: off the loop.
        uid = None
        if sock is not None:
            uid = await asyncio.get_running_loop().run_in_executor(self.lookups, peers.caller_uid, sock)
        if uid is None:
            self.count("unidentified")
            self.refusals.refused(-1, None, door=self.name, reason="no socket owns this connection's tuple")
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

    def _bound_connections(self, server):
        """Cap and time-limit connections through aiohttp's own per-connection hook on its server."""
        made = server.connection_made
        loop = asyncio.get_running_loop()

        def connection_made(handler, transport):
            made(handler, transport)
            if len(server.connections) > self.max_connections:
                self.count("over_capacity")
                transport.close()
            else:
                loop.call_later(self.connection_lifetime, transport.close)

        server.connection_made = connection_made

    async def _listen(self, host, retrying=False):
        """Listen on host:port; when another process holds the port, log it and try again every
        BIND_RETRY s in a task of the loop's own (the door serves whatever address it has meanwhile)."""
        while True:
            if retrying:
                await asyncio.sleep(BIND_RETRY)
            try:
                site = web.TCPSite(self._runner, host, self.port, backlog=1024, reuse_address=True)
                await site.start()
                if retrying:
                    self.log.decision("started", door=self.name, address=f"{host}:{self.port}", note="port free again")
                return
            except OSError as err:
                if err.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    self.log.error(f"{self.name} door: no listener on {host}:{self.port}: {err}")
                    return  # no such address here (a kernel without IPv6): nothing to wait for
                if not retrying:
                    self.log.decision("failed", door=self.name, address=f"{host}:{self.port}", reason=str(err),
                                      note=f"another process holds the port; trying again every {BIND_RETRY:g}s")
                    self._retries.append(asyncio.get_running_loop().create_task(self._listen(host, retrying=True)))
                    return

    def stop(self):
        if self._loop is None or self._runner is None:
            return
        for task in self._retries:
            self._loop.call_soon_threadsafe(task.cancel)
        try:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(5)
        except Exception:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self.pool.shutdown(wait=False)
        self.lookups.shutdown(wait=False)
