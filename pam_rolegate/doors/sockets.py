"""The broker's socket doors: the root-only PAM door and the world-reachable user door.

Each door has its own thread, asyncio loop and worker pool, so nothing a user does on the user
door can delay logins on the PAM door, which no unprivileged process can even connect to (its
socket sits in a 0700 root directory). A door takes the caller from SO_PEERCRED, reads one frame
within a deadline, hands it to a worker, and writes the reply; it speaks to the core only through
the registry's API. On the user door each uid's connections wait in a line of their own, served a
few at a time in the order they came, so one user's burst waits behind itself, not others. Why asyncio plus pools: one loop holds thousands of connections (a storm of
logins, a user's flood) at no thread each, while the blocking work behind a request (NSS, an STS
call, file writes) runs on a fixed number of threads — never one thread per connection.
"""

import asyncio
import collections
import os
import pwd
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ..rules import awsconfig, mapping
from ..backends import homefiles
from ..hookside import procs, protocol
from ..hookside.client import peer_credentials
from ..errors import ProtocolError, StoreError, StsError
from ..core.registry import SDK_MIN_LEFT, ShellLimit, epoch_to_dt, iso

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
HOOK_MARGIN = 0.3  # seconds kept back from the hook's budget for our reply and its PAM bookkeeping
REFUSED_LOG_INTERVAL = 10.0  # a uid's refusals are logged at most once per this, with a count
REFUSAL_REASON_MAX = 256  # characters of a refusal's message a line keeps (a reason is at most 256 too)
# Actions a door answers on its loop rather than in a worker: no NSS, STS or file work behind them.
# A worker round trip takes two loop turns, and a uid gets MAX_WORKING_PER_UID of them at once: a
# turn slowed by a storm of `busy` refusals let one uid's 1000 simultaneous pings through at ~20/s.
INLINE_ACTIONS = frozenset({protocol.Ping.ACTION})
INLINE_FRAME = 256  # frames up to this size are checked for an inline action; a ping's is ~30 bytes


def loop_thread(name, setup):
    """A daemon thread running a new asyncio loop, once `setup()` (a coroutine function) has run on
    it; returns (loop, thread), or raises what setup raised. Each door has one of its own."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    failure = []

    def run():
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(setup())
        except Exception as err:
            failure.append(err)
            ready.set()
            return
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    ready.wait(10)
    if failure:
        raise failure[0]
    return loop, thread


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


class RefusalLog:
    """The one rate limit on refusal lines: at most one line per uid and event per interval (a flood
    cannot fill the log), the next one saying how many were left out (also_refused=N,
    also_denied=N). Every refusal still reaches the log's observer, so the metrics count all of them."""

    def __init__(self, log, interval=REFUSED_LOG_INTERVAL, clock=time.monotonic):
        self.log = log
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        self._seen = {}  # (event, uid) -> (window start, refusals hidden since)

    def refused(self, uid, pid, **fields):
        """A `refused:` line: a door turned a caller away."""
        self.limited("refused", uid, uid=uid, pid=pid, **fields)

    def limited(self, event, uid, /, **fields):  # positional: the line's own fields may name a uid
        """Decision line `event` about a request of `uid`, rate-limited per (event, uid): a person's
        `denied: action=elevate` lines have their own window, so a `refused:` line never hides one."""
        now = self.clock()
        with self._lock:
            start, hidden = self._seen.get((event, uid), (None, 0))
            shown = start is None or now - start >= self.interval
            if shown:
                if len(self._seen) > 4096:  # bounded however many uids misbehave
                    self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.interval}
                self._seen[(event, uid)] = (now, 0)
            else:
                self._seen[(event, uid)] = (start, hidden + 1)
        if shown:
            self.log.decision(event, **fields, **{f"also_{event}": hidden or None})
            return
        observer = getattr(self.log, "observer", None)
        if observer is not None:  # counted, not written: as Log.decision would have told it
            try:
                observer(event, fields)
            except Exception:
                pass


class Door:
    """One Unix socket: admission by uid, a waiting line per uid, framing with a deadline, dispatch
    to a worker pool.

    The door accepts on its loop itself rather than through asyncio's server: a connection is
    named by SO_PEERCRED and admitted or turned away before anything else is made for it, so a
    uid's burst of a thousand connections costs the loop a syscall or two each until its turn.
    """

    def __init__(self, name, path, handlers, workers, log, refusals, per_uid_connections=None,
                 per_uid_serving=None, per_uid_working=None, mode=0o666, inline=INLINE_ACTIONS,
                 max_connections=MAX_CONNECTIONS):
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
            if self._inline(body):
                reply = self.dispatch(peer, body)
            elif self.per_uid_working:
                gate = self._working.get(uid)
                if gate is None:
                    gate = self._working[uid] = asyncio.Semaphore(self.per_uid_working)
                async with gate:
                    reply = await loop.run_in_executor(self.pool, self.dispatch, peer, body)
            else:
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


class Handlers:
    """What each action does: translate a request into the registry's API and its answer into a reply."""

    def __init__(self, registry, refusals, homes=None, log=None, elevations=None):
        self.registry = registry
        self.refusals = refusals
        self.homes = homes  # a homefiles.HomeReader: PAM logins look for the user's own region
        self.log = log
        self.elevations = elevations  # core.elevation.Elevations: rolegate elevate, approve, drop

    def pam(self):
        return {protocol.Ping.ACTION: self.ping, protocol.OpenSession.ACTION: self.open_session,
                protocol.CloseSession.ACTION: self.close_session}

    def user(self):
        handlers = {protocol.Ping.ACTION: self.ping, protocol.Env.ACTION: self.env,
                    protocol.GetCredentials.ACTION: self.credentials, protocol.Status.ACTION: self.status}
        if self.elevations is not None:
            handlers.update({protocol.Elevate.ACTION: self.elevate, protocol.ElevationPoll.ACTION: self.elevation,
                             protocol.ElevationCancel.ACTION: self.elevation_cancel,
                             protocol.Approve.ACTION: self.approve, protocol.Deny.ACTION: self.deny,
                             protocol.Approvals.ACTION: self.approvals, protocol.Drop.ACTION: self.drop})
        return handlers

    def _forbidden(self, peer, action, why):
        self.refusals.refused(peer.uid, peer.pid, action=action, reason=why)
        return protocol.ErrorReply(protocol.E_FORBIDDEN, why)

    def ping(self, peer, req):
        return protocol.Reply({"version": protocol.VERSION, "pid": os.getpid()})

    def own_region_env(self, grant, env, deadline):
        """`env` without rolegate's region when the target account's own ~/.aws/config names one for
        `default`, the profile a PAM session starts with (PAM sets no AWS_PROFILE): docs/sessions.md "Whose
        region wins". Any trouble reading it keeps rolegate's region; nothing here fails a login."""
        if self.homes is None:
            return env
        try:
            timeout = homefiles.READ_BUDGET
            if deadline is not None:  # the hook's own budget, what is left of it after the grant
                timeout = min(timeout, deadline - time.monotonic())
            data = self.homes.read(grant.target_uid, timeout=timeout)
            named = awsconfig.names_region(data.decode("utf-8"))
        except homefiles.Unreadable as err:
            if not err.quiet and self.log is not None:
                self.log.decision("skipped", action="own-region", target=grant.target, reason=str(err),
                                  kept="rolegate's region")
            return env
        except UnicodeDecodeError:
            return env  # botocore refuses such a file too
        except Exception as err:  # a bug here must cost the user's region, never the login's credentials
            if self.log is not None:
                self.log.error(f"internal error in the own-region check: {type(err).__name__}")
            return env
        if not named:
            return env
        return {k: v for k, v in env.items() if k not in awsconfig.REGION_VARS}

    def _open(self, facts, kind, pid, started, budget=None, sid=None):
        reg = self.registry
        deadline = None if budget is None else time.monotonic() + budget
        try:
            opened = reg.open(facts, kind, pid, started, budget=budget, sid=sid)
        except mapping.UnknownUser as err:
            return protocol.ErrorReply(protocol.E_UNKNOWN_USER, str(err))
        except StsError as err:
            return protocol.ErrorReply(protocol.E_STS_FAILED, f"{err.code}: {err}")
        except StoreError as err:
            return protocol.ErrorReply(protocol.E_STORE_FAILED, str(err))
        if not opened.granted:
            return protocol.Reply({"granted": False, "env": {}, "reason": opened.reason,
                                   "runtime_dir": reg.cfg.runtime_dir})
        grant = opened.grant
        env = reg.env_for(grant)
        if kind == "pam":  # a shell's `rolegate env` decides for itself, with the shell's profile
            env = self.own_region_env(grant, env, deadline)
        return protocol.Reply({"granted": True, "session": opened.session.id, "grant": grant.id, "role": grant.role,
                               "env": env, "reason": opened.reason,
                               "expires": iso(grant.credentials.expiration), "runtime_dir": reg.cfg.runtime_dir})

    def open_session(self, peer, req):
        if peer.uid != 0:  # the door is root-only; this holds even if someone loosened its directory
            return self._forbidden(peer, req.ACTION, f"uid {peer.uid} may not open sessions (root/PAM only)")
        if req.pid <= 0:
            return protocol.ErrorReply(protocol.E_BAD_REQUEST, "open_session: pid must name a process (> 0)")
        facts = mapping.LoginFacts(user=req.user, service=req.service, ruser=req.ruser, rhost=req.rhost,
                                   tty=req.tty)
        budget = None
        if req.budget_ms is not None:
            budget = req.budget_ms / 1000.0 - HOOK_MARGIN - (time.monotonic() - peer.arrived)
            if budget <= 0.05:
                return protocol.ErrorReply(protocol.E_BUSY, "no time left in the hook's budget")
        return self._open(facts, "pam", req.pid, procs.start_time(req.pid), budget=budget)

    def close_session(self, peer, req):
        if peer.uid != 0:
            return self._forbidden(peer, req.ACTION, f"uid {peer.uid} may not close sessions (root/PAM only)")
        if req.pid is not None and req.pid <= 0:
            return protocol.ErrorReply(protocol.E_BAD_REQUEST, "close_session: pid must name a process (> 0)")
        pid = None if req.session is not None else (req.pid or peer.pid)
        released = self.registry.close(session_id=req.session, pid=pid)
        return protocol.Reply({"released": released})

    def env(self, peer, req):
        try:
            name = pwd.getpwuid(peer.uid).pw_name
        except KeyError:
            return protocol.ErrorReply(protocol.E_UNKNOWN_USER, f"uid {peer.uid} has no user name")
        # The session lives as long as the shell that asked (the parent of `rolegate env`, which
        # the profile.d snippet runs); a shell that never goes away keeps it, like a PAM session.
        shell = procs.parent(peer.pid) or peer.pid
        started = procs.start_time(shell)
        facts = mapping.LoginFacts(user=name, service=mapping.SHELL_SERVICE)
        try:
            return self._open(facts, "shell", shell, started, sid=f"shell-{peer.uid}-{shell}-{started}")
        except ShellLimit as err:
            return self._forbidden(peer, req.ACTION, str(err))

    def credentials(self, peer, req):
        key, error = self._view_key(peer, req.grant)
        if error is not None:
            return error
        if req.profile is not None:
            return self._named_credentials(peer, req, key)
        grant = self.registry.live_grant(key)
        if grant is None or (peer.uid != 0 and peer.uid != grant.target_uid):
            # The same answer whether the grant exists or is someone else's: no probing.
            if grant is not None:
                self.refusals.refused(peer.uid, peer.pid, action=req.ACTION, grant=key)
            return protocol.ErrorReply(protocol.E_NO_GRANT, f"no live grant {key} for uid {peer.uid}; log in again")
        grant = self.registry.credentials(key)
        if grant is None:  # revoked or moved to another role meanwhile: not what was looked up above
            return protocol.ErrorReply(protocol.E_NO_GRANT, f"no live grant {key} for uid {peer.uid}; log in again")
        return self._credentials_reply(grant)

    # -- elevation on demand: every handler returns at once; the CLI polls ------------------------

    def _view_key(self, peer, key):
        """The login grant a request names, or this shell's own (opened as `env` opens it)."""
        if key is not None:
            return key, None
        reply = self.env(peer, protocol.Env())
        if isinstance(reply, protocol.ErrorReply):
            return None, reply
        if not reply.get("granted"):
            return None, protocol.ErrorReply(protocol.E_NO_GRANT, reply.get("reason"))
        return reply.get("grant"), None

    def _elevation_call(self, peer, action, fn, *args):
        from ..core.elevation import Refusal

        try:
            return protocol.Reply(fn(*args))
        except Refusal as err:
            if err.code in (protocol.E_FORBIDDEN, protocol.E_NO_GRANT):
                self.refusals.refused(peer.uid, peer.pid, action=action, reason=str(err)[:REFUSAL_REASON_MAX])
            return protocol.ErrorReply(err.code, str(err))
        except mapping.UnknownUser as err:
            return protocol.ErrorReply(protocol.E_UNKNOWN_USER, str(err))

    def elevate(self, peer, req):
        """Start an elevation. Every request refused here, before PAM runs (no login, not the
        person's login, no such profile, no reason or a bad one, --for out of range, the back-off,
        the limits), leaves one `denied: action=elevate` line, rate-limited per uid like `refused:`
        lines; what PAM and approvers decide, the core logs when the request ends (never hidden:
        each is an authentication attempt)."""
        from ..core.elevation import Refusal

        key, error = self._view_key(peer, req.grant)
        fields, event = {}, "denied"
        if error is None:
            try:
                return protocol.Reply(self.elevations.start(peer.uid, key, req.profile, req.reason, req.seconds))
            except Refusal as err:
                error, fields = protocol.ErrorReply(err.code, str(err)), err.fields
            except mapping.UnknownUser as err:  # NSS could not say who: not a refusal, a failure
                error, event = protocol.ErrorReply(protocol.E_UNKNOWN_USER, str(err)), "failed"
        principal = fields.pop("principal", None)
        if principal is None:
            try:
                principal = pwd.getpwuid(peer.uid).pw_name
            except KeyError:
                principal = f"uid {peer.uid}"
        # A profile name is at most 64 characters (config.PROFILE_RE); a longer one is cut for the line.
        profile = req.profile if len(req.profile) <= 64 else req.profile[:61] + "..."
        self.refusals.limited(event, peer.uid, action="elevate", principal=principal, uid=peer.uid, pid=peer.pid,
                              profile=profile, reason=str(error.message)[:REFUSAL_REASON_MAX], **fields)
        return error

    def elevation(self, peer, req):
        return self._elevation_call(peer, req.ACTION, self.elevations.poll, peer.uid, req.id, req.answer, False,
                                    req.prompt)

    def elevation_cancel(self, peer, req):
        return self._elevation_call(peer, req.ACTION, self.elevations.poll, peer.uid, req.id, None, True)

    def approve(self, peer, req):
        return self._elevation_call(peer, req.ACTION, self.elevations.approve, peer.uid, req.id)

    def deny(self, peer, req):
        return self._elevation_call(peer, req.ACTION, self.elevations.approve, peer.uid, req.id, True)

    def approvals(self, peer, req):
        return protocol.Reply({"pending": self.elevations.pending_for(peer.uid)})

    def drop(self, peer, req):
        key, error = self._view_key(peer, req.grant)
        if error is not None:
            return error
        ended = self.registry.drop(key, peer.uid, req.profile)
        if ended is None:
            return protocol.ErrorReply(protocol.E_NO_GRANT, f"no elevation {req.profile!r} in force in grant {key} "
                                                            f"for uid {peer.uid}")
        return protocol.Reply({"dropped": ended.profile, "role": ended.role})

    def _named_credentials(self, peer, req, key):
        """A named profile's credential_process: obtained on first use (docs/profiles-and-elevation.md "Several roles per
        person"). One answer for a grant that is not the caller's, not live, or names no such
        profile: nobody learns about another user's grants by asking."""
        try:
            grant = self.registry.named(key, req.profile, peer.uid, SDK_MIN_LEFT)
        except mapping.UnknownUser as err:
            return protocol.ErrorReply(protocol.E_UNKNOWN_USER, str(err))
        except StsError as err:
            return protocol.ErrorReply(protocol.E_STS_FAILED, f"{err.code}: {err}")
        if grant is None:
            view = self.registry.live_grant(key)
            if view is not None and peer.uid not in (0, view.target_uid):
                self.refusals.refused(peer.uid, peer.pid, action=req.ACTION, grant=key)
            return protocol.ErrorReply(protocol.E_NO_GRANT, f"no profile {req.profile!r} in a live grant {key} for "
                                                            f"uid {peer.uid}; `rolegate profiles` lists yours")
        return self._credentials_reply(grant)

    def _credentials_reply(self, grant):
        c = grant.credentials
        return protocol.Reply({"Version": 1, "AccessKeyId": c.access_key_id, "SecretAccessKey": c.secret_access_key,
                               "SessionToken": c.session_token, "Expiration": iso(c.expiration)})

    def status(self, peer, req):
        reg = self.registry
        grants, sessions, lingering = reg.snapshot(None if peer.uid == 0 else peer.uid)
        now = reg.now_dt()
        counts = {}
        for s in sessions:
            counts[s.grant_id] = counts.get(s.grant_id, 0) + 1
        entries = [{"grant": g.id, "principal": g.principal, "target": g.target, "role": g.role,
                    "expires": iso(g.credentials.expiration), "seconds_left": int(g.credentials.seconds_left(now)),
                    "next_refresh": iso(epoch_to_dt(g.next_refresh)), "failures": g.failures,
                    "sessions": counts.get(g.id, 0), "service": g.service,
                    "profile": g.profile, "profiles": [list(p) for p in g.profiles],
                    # lingering: no session and no files; held in memory for the next login or IMDS call
                    "state": "lingering" if g.id in lingering else "live",
                    "path": None if g.id in lingering else reg.pointer(g)[1]}
                   for g in sorted(grants, key=lambda g: g.id)]
        elevations = {e.grant_id: e for e in reg.elevations(None if peer.uid == 0 else peer.uid)}
        for entry in entries:
            e = elevations.get(entry["grant"])
            if e is not None:
                entry["elevation"] = {"id": e.id, "reason": e.reason, "until": iso(epoch_to_dt(e.until)),
                                      "seconds_left": max(int(e.until - reg.clock()), 0),
                                      "approved_by": e.approved_by}
        listed = []
        if peer.uid == 0:  # sessions name processes and hosts: root's to see
            listed = [{"id": s.id, "grant": s.grant_id, "kind": s.kind, "pid": s.pid, "service": s.service,
                       "rhost": s.rhost, "tty": s.tty} for s in sessions]
        return protocol.Stream({"delivery": reg.cfg.delivery, "runtime_dir": reg.cfg.runtime_dir},
                               {"grants": entries, "sessions": listed})
