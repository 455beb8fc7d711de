"""A socket door: one Unix socket with admission by uid, a waiting line per uid, framing with a
deadline, and dispatch to a worker pool (or, for a few quick actions, an answer on the loop).

Each door has its own thread, asyncio loop and worker pool, so nothing a user does on the user
door can delay logins on the PAM door, which no unprivileged process can even connect to (its
socket sits in a 0700 root directory). A door takes the caller from SO_PEERCRED, reads one frame
within a deadline, hands it to a worker, and writes the reply. On the user door each uid's
connections wait in a line of their own, served a few at a time in the order they came, so one
user's burst waits behind itself, not others. Why asyncio plus pools: one loop holds thousands
of connections (a storm of logins, a user's flood) at no thread each, while the blocking work
behind a request (NSS, an STS call, file writes) runs on a fixed number of threads — never one
thread per connection. What each action does lives in handlers.py.
"""

import asyncio
import collections
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

from ..hookside import protocol
from ..hookside.client import peer_credentials
from ..errors import ProtocolError
from .loops import loop_thread
from .refusals import REFUSED_LOG_INTERVAL

# Capacity, each number with its reason (see docs/internals.md "Capacity and fairness").
BACKLOG = 4096  # net.core.somaxconn's default cap: a storm of logins waits in the kernel queue
FRAME_DEADLINE = 2.0  # a request frame must arrive whole within this, however slowly it trickles
MAX_CONNECTIONS = 4096  # the PAM door, all callers together: far above any real storm, below fd limits
PAM_WORKERS = 32  # first logins of different grants ask STS in parallel; same-grant logins share a call
USER_WORKERS = 8  # env/credentials/status are quick; a few threads keep one slow NSS lookup from stalling all
# The user door's waiting line: each uid's connections wait in the order they came, as an accepted
# socket each (one descriptor, nothing read yet), and only a few of a uid's are served at once.
# Above the 1000 simultaneous requests of `xargs -P 64 aws ...` or a parallel build whose every job
# runs credential_process; one descriptor each.
MAX_CONNECTIONS_PER_UID = 1024  # user door: one uid's connections, waiting and served; past this, `busy` at once
# The user door, all callers together: 8 uids at their full line. A uid may wait with many
# connections here (a burst is normal use), so the PAM door's MAX_CONNECTIONS would let 4 users
# fill this door for everyone else; more than 8 lines' worth would not fit beside the other doors
# and the session watches in a 20,000-descriptor limit (the broker reserves every door's cap).
MAX_USER_CONNECTIONS = 8 * MAX_CONNECTIONS_PER_UID
# ...except that a uid holding fewer than this is admitted even then, from a pool of its own: 8
# users at their full line would otherwise lock every other user out (`rolegate env` from an SSM
# shell included). The pool is bounded too (the broker reserves its descriptors with the door's):
# a user with many uids (subordinate uids through newuidmap) may drain it, never past it.
ALWAYS_ADMITTED_PER_UID = 16
ALWAYS_ADMITTED_POOL = 1024
# Enough to read a uid's next frames while its two workers run; few enough that a burst puts only
# this many of its tasks ahead of another uid's on the door's loop.
MAX_SERVING_PER_UID = 4  # user door: one uid's connections being read and answered at once; the rest wait
MAX_WORKING_PER_UID = 2  # user door: one uid's requests in the workers at once, so a flood costs its sender
# A connection still waiting after this is answered `busy`: by then the CLI (5 s) and the AWS CLI's
# wait for a credential process have given up on it, so serving it would be work for nobody.
LINE_DEADLINE = 5.0
LINE_SWEEP = 0.5  # how often the lines are checked for connections past LINE_DEADLINE
ACCEPT_BATCH = 64  # connections accepted per loop turn, so a storm's accepts interleave with replies
ACCEPT_RETRY = 0.1  # out of descriptors: accepting pauses this long rather than spin on a ready socket
# Actions a door answers on its loop rather than in a worker: no NSS, STS or file work behind them.
# A worker round trip takes two loop turns, and a uid gets MAX_WORKING_PER_UID of them at once: a
# turn slowed by a storm of `busy` refusals let one uid's 1000 simultaneous pings through at ~20/s.
INLINE_ACTIONS = frozenset({protocol.Ping.ACTION})
INLINE_FRAME = 256  # frames up to this size are checked for an inline action; a ping's is ~30 bytes
# Frames up to this size are offered to the door's on-loop handlers (a warm open_session: its frame
# is ~150 bytes, at most ~5 KiB with every string at its limit); larger ones go to a worker undecoded.
ON_LOOP_FRAME = 8192


class Peer:
    __slots__ = ("pid", "uid", "gid", "arrived")

    def __init__(self, pid, uid, gid, arrived):
        self.pid, self.uid, self.gid, self.arrived = pid, uid, gid, arrived


def _turn_away(conn):
    """Answer `busy` on a socket nothing was read from, and close it; never waits."""
    try:
        conn.setblocking(False)
        conn.send(_BUSY, socket.MSG_NOSIGNAL)  # a fresh socket's buffer has room for these few bytes
    except OSError:
        pass  # the caller has gone: nothing to tell
    conn.close()


_BUSY = protocol.encode_reply(protocol.ErrorReply(protocol.E_BUSY, "the broker is busy with your other requests; "
                                                                   "try again"))



class Door:
    """One Unix socket: admission by uid, a waiting line per uid, framing with a deadline, dispatch
    to a worker pool.

    The door accepts on its loop itself rather than through asyncio's server: a connection is
    named by SO_PEERCRED and admitted or turned away before anything else is made for it, so a
    uid's burst of a thousand connections costs the loop a syscall or two each until its turn.
    """

    def __init__(self, name, path, handlers, workers, log, refusals, per_uid_connections=None,
                 per_uid_serving=None, per_uid_working=None, mode=0o666, inline=INLINE_ACTIONS,
                 max_connections=MAX_CONNECTIONS, on_loop=None):
        self.name = name
        self.max_connections = max_connections
        # The user door's pool for uids that hold few connections when it is full (see
        # ALWAYS_ADMITTED_POOL); the PAM door's callers are root's logins, which need none.
        self.admitted_pool = ALWAYS_ADMITTED_POOL if per_uid_connections else 0
        self.path = path
        self.handlers = handlers
        self.log = log
        self.refusals = refusals
        self.mode = mode
        self.per_uid_connections = per_uid_connections
        self.per_uid_serving = per_uid_serving  # None: no line, every admitted connection is served at once
        self.per_uid_working = per_uid_working
        self.inline = inline
        # action -> handler tried on the loop first; its None sends the request to a worker as usual.
        # Such a handler must not wait: no NSS, STS or read of a file that may be slow (handlers.py).
        self.on_loop = on_loop or {}
        self.served_on_loop = 0
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{name}-door")
        # All of these are touched only on the door's loop.
        self._held = {}  # uid -> connections held, waiting or served
        self._total = 0
        self._lines = {}  # uid -> deque of (socket, Peer) waiting, oldest first
        self._serving = {}  # uid -> connections being served
        self._working = {}  # uid -> asyncio.Semaphore
        self._tasks = set()  # the loop keeps only weak references to tasks
        self._sweep = None
        self._accept_error_at = None
        self._listener = None
        self._loop = None
        self._thread = None
        self.served = 0

    # -- start and stop ----------------------------------------------------------------------

    def start(self):
        try:
            os.unlink(self.path)  # a stale socket from a previous broker (the directory is root's)
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.path)
            os.chmod(self.path, self.mode)
            listener.listen(BACKLOG)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        self._listener = listener

        async def setup():
            self._loop = asyncio.get_running_loop()  # before the first accept, which may come at once
            self._loop.add_reader(listener.fileno(), self._accept)

        self._loop, self._thread = loop_thread(f"{self.name}-door", setup)

    def stop(self):
        if self._loop is None or self._listener is None:
            return

        async def close():
            self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            for line in self._lines.values():
                for conn, _peer in line:
                    conn.close()
            self._lines.clear()

        try:
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        except Exception:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self.pool.shutdown(wait=False)
        try:
            os.unlink(self.path)  # so clients say "is rolegated running?" rather than wait on a dead socket
        except OSError:
            pass

    # -- admission and the waiting line -----------------------------------------------------------

    def _accept(self):
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # out of descriptors or memory: the socket stays ready, so pause
                now = time.monotonic()
                if self._accept_error_at is None or now - self._accept_error_at >= REFUSED_LOG_INTERVAL:
                    self._accept_error_at = now
                    self.log.error(f"{self.name} door: cannot accept: {err}; pausing {ACCEPT_RETRY:g}s")
                self._loop.remove_reader(self._listener.fileno())
                self._loop.call_later(ACCEPT_RETRY, self._resume_accepting)
                return
            try:
                pid, uid, gid = peer_credentials(conn)
            except OSError:
                conn.close()
                continue
            self._arrive(conn, Peer(pid, uid, gid, time.monotonic()))

    def _resume_accepting(self):
        if self._listener.fileno() >= 0:  # not stopped meanwhile
            self._loop.add_reader(self._listener.fileno(), self._accept)

    def _arrive(self, conn, peer):
        uid = peer.uid
        held = self._held.get(uid, 0)
        # A door full of other users' lines still admits a uid's first few connections: filling it
        # must not lock out the users who hold none (the kernel's listen queue is theirs too).
        full = self._total >= self.max_connections and (
            held >= ALWAYS_ADMITTED_PER_UID or self._total >= self.max_connections + self.admitted_pool)
        if full or (self.per_uid_connections and held >= self.per_uid_connections):
            self.refusals.refused(uid, peer.pid, door=self.name, reason="too many connections")
            _turn_away(conn)
            return
        self._held[uid] = held + 1
        self._total += 1
        if self.per_uid_serving is None:
            self._begin(conn, peer)
            return
        self._lines.setdefault(uid, collections.deque()).append((conn, peer))
        self._next(uid)
        if uid in self._lines and self._sweep is None:
            self._sweep = self._loop.call_later(LINE_SWEEP, self._sweep_lines)

    def _next(self, uid):
        """Serve `uid`'s oldest waiting connections while it has room to be served."""
        line = self._lines.get(uid)
        while line and self._serving.get(uid, 0) < self.per_uid_serving:
            conn, peer = line.popleft()
            self._serving[uid] = self._serving.get(uid, 0) + 1
            self._begin(conn, peer)
        if line is not None and not line:
            del self._lines[uid]

    def _sweep_lines(self):
        """Turn away connections that have waited past LINE_DEADLINE (the oldest are first)."""
        self._sweep = None
        now = time.monotonic()
        for uid, line in list(self._lines.items()):
            while line and now - line[0][1].arrived > LINE_DEADLINE:
                conn, peer = line.popleft()
                self.refusals.refused(uid, peer.pid, door=self.name,
                                      reason=f"waited in line over {LINE_DEADLINE:g}s")
                _turn_away(conn)
                self._release(uid)
            if not line:
                del self._lines[uid]
        if self._lines:
            self._sweep = self._loop.call_later(LINE_SWEEP, self._sweep_lines)

    def _begin(self, conn, peer):
        task = self._loop.create_task(self._serve(conn, peer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _release(self, uid):
        self._total -= 1
        self._held[uid] -= 1
        if not self._held[uid]:
            del self._held[uid]
            self._working.pop(uid, None)

    def _done(self, uid):
        self._release(uid)
        if self.per_uid_serving is not None:
            self._serving[uid] -= 1
            if not self._serving[uid]:
                del self._serving[uid]
            self._next(uid)

    # -- one connection ----------------------------------------------------------------------

    async def _serve(self, conn, peer):
        uid, pid = peer.uid, peer.pid
        writer = None
        try:
            try:
                reader, writer = await asyncio.open_unix_connection(sock=conn, limit=protocol.MAX_FRAME + 8)
            except OSError:
                conn.close()
                return
            try:
                body = await asyncio.wait_for(self._read_frame(reader), FRAME_DEADLINE)
            except asyncio.TimeoutError:
                self.refusals.refused(uid, pid, door=self.name, reason=f"frame not received within "
                                                                      f"{FRAME_DEADLINE:g}s")
                await self._send(writer, protocol.ErrorReply(protocol.E_BAD_REQUEST, "frame not received in time"))
                return
            except ProtocolError as err:
                self.refusals.refused(uid, pid, door=self.name, reason=f"bad frame: {err}")
                await self._send(writer, protocol.ErrorReply(protocol.E_BAD_REQUEST, str(err)))
                return
            if body is None:
                writer.close()  # connected and left without a word (a liveness probe): nothing to log
                return
            loop = asyncio.get_running_loop()
            # A ping, or what an on-loop handler answers (a warm login), costs no thread hop.
            reply = self.dispatch(peer, body) if self._inline(body) else self._on_loop(peer, body)
            if reply is None and self.per_uid_working:
                gate = self._working.get(uid)
                if gate is None:
                    gate = self._working[uid] = asyncio.Semaphore(self.per_uid_working)
                async with gate:
                    reply = await loop.run_in_executor(self.pool, self.dispatch, peer, body)
            elif reply is None:
                reply = await loop.run_in_executor(self.pool, self.dispatch, peer, body)
            await self._send(writer, reply)
            self.served += 1
        except Exception as err:  # a bug costs one connection, never the door
            self.log.error(f"{self.name} door: {type(err).__name__}: {err}")
            (writer or conn).close()
        finally:
            self._done(uid)

    def _inline(self, body):
        """Whether `body` is a small frame asking for an action answered on the loop."""
        if not self.inline or len(body) > INLINE_FRAME:
            return False
        try:
            return protocol.decode_request(body).ACTION in self.inline
        except ProtocolError:
            return False  # the worker's dispatch reports what is wrong with it

    def _on_loop(self, peer, body):
        """The on-loop handler's reply for this frame, or None: a worker answers it as ever."""
        if not self.on_loop or len(body) > ON_LOOP_FRAME:
            return None
        try:
            request = protocol.decode_request(body)
        except ProtocolError:
            return None  # the worker's dispatch reports what is wrong with it
        handler = self.on_loop.get(request.ACTION)
        if handler is None:
            return None
        try:
            reply = handler(peer, request)
        except Exception as err:  # a bug costs this request, never the door (as in dispatch)
            self.log.error(f"internal error in {request.ACTION} on the loop: {type(err).__name__}: {err}")
            return protocol.ErrorReply(protocol.E_INTERNAL, f"internal error: {type(err).__name__}")
        if reply is not None:
            self.served_on_loop += 1
        return reply

    @staticmethod
    async def _read_frame(reader):
        try:
            header = await reader.readexactly(4)
        except asyncio.IncompleteReadError as err:
            if not err.partial:
                return None
            raise ProtocolError("connection closed inside a frame header") from None
        try:
            return await reader.readexactly(protocol.body_length(header))
        except asyncio.IncompleteReadError:
            raise ProtocolError("connection closed mid-frame") from None

    async def _send(self, writer, reply):
        try:
            try:
                data = protocol.encode_reply(reply)
            except ProtocolError as err:  # a reply too large for one frame (a bug: streams exist for that)
                data = protocol.encode_reply(protocol.ErrorReply(protocol.E_INTERNAL, str(err)))
            writer.write(data)
            await asyncio.wait_for(writer.drain(), FRAME_DEADLINE)
        except (OSError, asyncio.TimeoutError):
            pass  # the client gave up (its own deadline); nothing to do
        finally:
            writer.close()

    def dispatch(self, peer, body):
        """Frame body from `peer` -> reply record. Never raises."""
        try:
            request = protocol.decode_request(body)
        except ProtocolError as err:
            self.refusals.refused(peer.uid, peer.pid, door=self.name, reason=str(err))
            return protocol.ErrorReply(err.code, str(err))
        handler = self.handlers.get(request.ACTION)
        if handler is None:
            self.refusals.refused(peer.uid, peer.pid, door=self.name, action=request.ACTION,
                                  reason="not served on this door")
            other = "the PAM door (root only)" if request.ACTION in protocol.PAM_ACTIONS else "the user door"
            return protocol.ErrorReply(protocol.E_UNKNOWN_ACTION, f"{request.ACTION} is served on {other}")
        try:
            return handler(peer, request)
        except Exception as err:  # a bug must cost one request, never the broker
            self.log.error(f"internal error in {request.ACTION}: {type(err).__name__}: {err}")
            return protocol.ErrorReply(protocol.E_INTERNAL, f"internal error: {type(err).__name__}")

