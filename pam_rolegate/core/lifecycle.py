"""Lifecycle: refresh before expiry in a bounded, rate-limited pool; linger expiry; the reaper.

Driven by what the registry reports (it is one of the registry's listeners) and acting only
through the registry's API. Nothing here holds the registry's lock for more than one change.

- Refresh: every grant's next refresh (or linger end) sits in a heap; one scheduler thread pops
  what is due, nearest first, and hands refreshes to `refresh.workers` threads at no more than
  `refresh.rate` STS calls per second (STS throttles per account). Logins never wait for it.
- Reaper: each session's process is watched through a pidfd, which the kernel makes readable
  when the process exits, so reaping costs follow what changed, not how many sessions live.
  Processes beyond the pidfd allowance (a descriptor each) are checked in a batch every
  `reap_interval`, outside the registry's lock.
"""

import heapq
import os
import resource
import select
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ..hookside import procs
from .grants import Listener

# Leave this many descriptors for files, STS connections, the journal and the pool, besides what
# the doors may hold (the broker adds theirs); the rest may watch processes.
FD_RESERVE = 2048
SCHEDULER_MAX_SLEEP = 5.0
# A refresh the pool refused (a reload had just shut it down) goes back in the heap this far
# ahead: long enough not to spin should the pool keep refusing, short next to any refresh window.
RESUBMIT_DELAY = 1.0


class RateLimit:
    """A token bucket: at most `rate` per second on average, bursts of `burst`."""

    def __init__(self, rate, burst, clock=time.monotonic):
        self.rate = rate
        self.burst = max(1.0, burst)
        self.clock = clock
        self._tokens = self.burst
        self._at = clock()

    def wait_time(self):
        """Seconds until a token is available (0 when one is: it is then taken)."""
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.rate


class Watcher:
    """Processes that hold sessions, watched through pidfds (or, past the allowance, by polling)."""

    def __init__(self, registry, log, limit=None, reserve=FD_RESERVE):
        self.registry = registry
        self.log = log
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.limit = limit if limit is not None else max(soft - reserve, 0)
        self._lock = threading.Lock()
        self._todo = []  # ("add", pid, started) / ("remove", pid, None), from the registry's listener
        # A process is (pid, start time): a pid reused before its old pidfd fired is another process.
        self._watches = {}  # (pid, started) -> pidfd, or None when polled
        self._pids = {}  # pid -> set of started, for removal by pid
        self._fds = {}  # pidfd -> (pid, started)
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._stopping = False

    def add(self, pid, started):
        self._queue(("add", pid, started))

    def remove(self, pid):
        self._queue(("remove", pid, None))

    def _queue(self, item):
        with self._lock:
            self._todo.append(item)
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # already woken

    def counts(self):
        return {"pidfds": len(self._fds), "polled": len(self._watches) - len(self._fds)}

    def _apply(self):
        with self._lock:
            todo, self._todo = self._todo, []
        for op, pid, started in todo:
            if op == "remove":
                for st in self._pids.pop(pid, ()):
                    self._forget((pid, st))
            elif op == "add" and (pid, started) not in self._watches:
                self._watch(pid, started)

    def _forget(self, key):
        fd = self._watches.pop(key, None)
        if fd is not None:
            self._epoll.unregister(fd)
            os.close(fd)
            del self._fds[fd]
        starts = self._pids.get(key[0])
        if starts is not None:
            starts.discard(key[1])
            if not starts:
                del self._pids[key[0]]

    def _ended(self, key):
        self._forget(key)
        self.registry.process_ended(*key)

    def _watch(self, pid, started):
        key = (pid, started)
        self._pids.setdefault(pid, set()).add(started)
        if len(self._fds) >= self.limit or not hasattr(os, "pidfd_open"):
            self._watches[key] = None
            return
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._ended(key)
            return
        except OSError:  # out of descriptors after all, or pidfds unsupported: poll instead
            self._watches[key] = None
            return
        # The pidfd names whichever process has this pid now: if that is not the session's
        # process (it exited and the pid was reused), the session's process is gone.
        if started is None or procs.start_time(pid) != started:
            os.close(fd)
            self._ended(key)
            return
        self._watches[key] = fd
        self._fds[fd] = key
        self._epoll.register(fd, select.EPOLLIN)

    def sweep(self):
        """Check the polled processes (outside the registry's lock); end the sessions of dead ones."""
        polled = [key for key, fd in self._watches.items() if fd is None]
        dead = [key for key in polled if not procs.alive(*key)]
        for key in dead:
            self._ended(key)
        return len(dead)

    def run(self):
        next_sweep = time.monotonic() + self.registry.cfg.reap_interval
        while not self._stopping:
            timeout = max(0.0, next_sweep - time.monotonic())
            try:
                events = self._epoll.poll(timeout)
                for fd, _mask in events:
                    if fd == self._wake_r:
                        try:
                            while os.read(self._wake_r, 4096):
                                pass
                        except BlockingIOError:
                            pass
                        continue
                    if fd in self._fds:
                        self._ended(self._fds[fd])
                self._apply()
                if time.monotonic() >= next_sweep:
                    self.sweep()
                    next_sweep = time.monotonic() + self.registry.cfg.reap_interval
            except Exception as err:  # one bad pass must not end reaping
                self.log.error(f"reaper: {type(err).__name__}: {err}")
                time.sleep(1.0)

    def stop(self):
        self._stopping = True
        self._queue(("noop", 0, None))


class Lifecycle(Listener):
    def __init__(self, registry, journal, log, clock=time.time, reserve=FD_RESERVE):
        self.registry = registry
        self.journal = journal
        self.log = log
        self.clock = clock
        self._cond = threading.Condition()
        self._heap = []  # (when, grant id); stale entries are skipped when popped
        self._busy = set()  # grants being refreshed now
        self._stopping = False
        self._slots = None
        self._pool = None
        self._limit = None
        self._sizing = None  # (refresh.workers, refresh.rate) the pool and rate limit were built for
        self.watcher = Watcher(registry, log, reserve=reserve)
        self.configure(registry.cfg)

    def configure(self, cfg):
        """(Re)build the pool and the rate limit, only when refresh.workers or refresh.rate changed.
        This runs on every rules change (each fleet update): a rebuild then would race the
        scheduler's submit for nothing, and hand the rate limit a fresh burst each time."""
        workers, rate = cfg.refresh.workers, cfg.refresh.rate
        if (workers, rate) == self._sizing:
            return
        old = None
        if self._sizing is None or workers != self._sizing[0]:
            old = self._pool
            self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="refresh")
            self._slots = threading.BoundedSemaphore(workers)
        self._limit = RateLimit(rate, burst=min(workers, rate))
        self._sizing = (workers, rate)
        if old is not None:
            old.shutdown(wait=False)

    # -- the registry's listener ---------------------------------------------------------------

    def _push(self, when, key):
        with self._cond:
            heapq.heappush(self._heap, (when, key))
            if self._heap[0][1] == key:
                self._cond.notify()

    def grant_saved(self, grant):
        self._push(grant.next_refresh, grant.id)

    def grant_lingering(self, grant, until):
        self._push(until, grant.id)

    def session_opened(self, session):
        self.watcher.add(session.pid, session.started)

    def session_closed(self, session, last_of_pid):
        if last_of_pid:
            self.watcher.remove(session.pid)

    # -- the scheduler -----------------------------------------------------------------------

    def _due(self):
        """Pop the grant ids whose time has come (waiting until one has, or a little while)."""
        with self._cond:
            while not self._stopping:
                now = self.clock()
                if self._heap and self._heap[0][0] <= now:
                    due = []
                    while self._heap and self._heap[0][0] <= now:
                        due.append(heapq.heappop(self._heap)[1])
                    return due
                wait = self._heap[0][0] - now if self._heap else SCHEDULER_MAX_SLEEP
                self._cond.wait(min(max(wait, 0.01), SCHEDULER_MAX_SLEEP))
                if not self._heap or self._heap[0][0] > self.clock():
                    return []
            return []

    def tick(self):
        for key in dict.fromkeys(self._due()):
            try:
                when = self.registry.next_due(key)
                if when is None or when > self.clock() or key in self._busy:
                    continue  # dropped, rescheduled (a newer entry is in the heap), or under way
                if self.registry.expire(key):
                    continue
                self._refresh_later(key)
            except Exception as err:  # one grant's trouble must not cost the others of this batch
                self.log.error(f"lifecycle: grant {key}: {type(err).__name__}: {err}")
        if self.journal is not None and self.journal.needs_compaction():
            self.journal.compact(self.registry)

    def _refresh_later(self, key):
        # The slot goes back to the semaphore it came from: a reload (configure) may replace
        # both while this waits or the refresh runs, and a release into the new one would be
        # refused while the scheduler waited on the old one forever.
        slots, limit = self._slots, self._limit
        slots.acquire()  # no more refreshes queued than workers: the heap keeps the order
        while not self._stopping:
            wait = limit.wait_time()
            if wait <= 0:
                break
            time.sleep(min(wait, 1.0))
        self._busy.add(key)

        def work():
            try:
                self.registry.refresh(key)
            except Exception as err:
                self.log.error(f"refresh of {key}: {type(err).__name__}: {err}")
            finally:
                self._busy.discard(key)
                slots.release()
                # An entry pushed while this ran (a reload made the grant due at once) was
                # skipped as busy: put its time back, or nothing would look at it again.
                when = self.registry.next_due(key)
                if when is not None:
                    self._push(when, key)

        try:
            self._pool.submit(work)
        except Exception as err:
            # The pool was shut down between reading it and submitting (a reload resized it, or
            # the broker is stopping). Nothing ran: give back the key and the slot, or the grant
            # would count as busy, and so be skipped, for ever; try again through the heap.
            self._busy.discard(key)
            slots.release()
            if not self._stopping:
                self.log.error(f"refresh of {key} could not be queued ({type(err).__name__}: {err}); "
                               f"trying again in {RESUBMIT_DELAY:g}s")
                self._push(self.clock() + RESUBMIT_DELAY, key)

    def run(self):
        while not self._stopping:
            try:
                self.tick()
            except Exception as err:
                self.log.error(f"lifecycle: {type(err).__name__}: {err}")
                time.sleep(1.0)

    def start(self):
        threads = [threading.Thread(target=self.run, name="lifecycle", daemon=True),
                   threading.Thread(target=self.watcher.run, name="reaper", daemon=True)]
        for t in threads:
            t.start()
        return threads

    def wake(self):
        with self._cond:
            self._cond.notify_all()

    def stop(self):
        self._stopping = True
        self.watcher.stop()
        self.wake()
        self._pool.shutdown(wait=False)
