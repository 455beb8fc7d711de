"""The broker with its PAM door requests timed: the bench's --timings knob, never the installed broker.

    python scripts/bench_timings.py OUT [rolegated arguments]

Runs rolegated (pam_rolegate.admin.cli:daemon_main) after wrapping, from the outside, the methods a
PAM door request passes through, and writes one JSON line per request to OUT every half second (the
records of requests that ended since the last write). Nothing in the product reads a knob for this:
the wrappers are here, so no timing code runs in a real broker. Each record holds time.monotonic()
points (seconds) and the durations of the core's steps:

    arrived    accepted (Peer.arrived)          framed     the frame read, on the loop
    dispatch   a worker (or the loop) began     dispatched the handler returned
    on_loop    true when the loop answered (a warm open): dispatch..dispatched is then on the loop
    send       back on the loop, writing        sent       written and closed
    open, env_for, own_region: seconds spent in Registry.open, Registry.env_for, Handlers.own_region_env
"""

import contextvars
import json
import sys
import threading
import time

OUT = sys.argv.pop(1)
_task_record = contextvars.ContextVar("record", default=None)
_by_peer = {}
_worker = threading.local()
_done = []
_lock = threading.Lock()


def _wrap_serve(door_cls):
    serve = door_cls._serve

    async def timed(self, conn, peer):
        rec = {"door": self.name, "arrived": peer.arrived}
        _task_record.set(rec)
        _by_peer[id(peer)] = rec
        try:
            await serve(self, conn, peer)
        finally:
            rec["end"] = time.monotonic()
            _by_peer.pop(id(peer), None)
            with _lock:
                _done.append(rec)

    door_cls._serve = timed

    inline = door_cls._inline

    def timed_inline(self, body):
        rec = _task_record.get()
        if rec is not None:
            rec["framed"] = time.monotonic()
        return inline(self, body)

    door_cls._inline = timed_inline

    dispatch = door_cls.dispatch

    def timed_dispatch(self, peer, body):
        rec = _by_peer.get(id(peer))
        if rec is None:
            return dispatch(self, peer, body)
        rec["dispatch"] = time.monotonic()
        _worker.rec = rec
        try:
            return dispatch(self, peer, body)
        finally:
            _worker.rec = None
            rec["dispatched"] = time.monotonic()

    door_cls.dispatch = timed_dispatch

    on_loop = getattr(door_cls, "_on_loop", None)
    if on_loop is not None:  # the loop's own answers (a warm open): no worker, so the handler is timed here
        def timed_on_loop(self, peer, body):
            rec = _by_peer.get(id(peer))
            if rec is None:
                return on_loop(self, peer, body)
            start = time.monotonic()
            _worker.rec = rec
            try:
                reply = on_loop(self, peer, body)
            finally:
                _worker.rec = None
            if reply is not None:
                rec.update(on_loop=True, dispatch=start, dispatched=time.monotonic())
            return reply

        door_cls._on_loop = timed_on_loop

    send = door_cls._send

    async def timed_send(self, writer, reply):
        rec = _task_record.get()
        if rec is not None:
            rec["send"] = time.monotonic()
        try:
            await send(self, writer, reply)
        finally:
            if rec is not None:
                rec["sent"] = time.monotonic()

    door_cls._send = timed_send


def _step(cls, name, label, note=None):
    """Wrap cls.name: its time goes into the current request's record under `label`."""
    fn = getattr(cls, name, None)
    if fn is None:
        return

    def timed(self, *args, **kw):
        rec = getattr(_worker, "rec", None)
        start = time.perf_counter_ns()
        try:
            return fn(self, *args, **kw)
        finally:
            if rec is not None:
                rec[label] = rec.get(label, 0) + (time.perf_counter_ns() - start) / 1e9
                if note is not None:
                    note(rec, args)

    setattr(cls, name, timed)


def _writer():
    while True:
        time.sleep(0.5)
        with _lock:
            batch, _done[:] = list(_done), []
        if batch:
            with open(OUT, "a") as fh:
                for rec in batch:
                    fh.write(json.dumps(rec) + "\n")


def main():
    from pam_rolegate.admin import cli
    from pam_rolegate.core import registry

    try:
        from pam_rolegate.doors import door, handlers
    except ImportError:  # a tree from before doors/sockets.py was split
        from pam_rolegate.doors import sockets as door
        handlers = door
    _wrap_serve(door.Door)

    def who(rec, args):
        rec["action"] = getattr(args[1], "ACTION", None)
        rec["user"] = getattr(args[1], "user", None)

    _step(handlers.Handlers, "open_session", "handler", who)
    _step(handlers.Handlers, "open_session_warm", "handler", who)
    _step(handlers.Handlers, "_own_region_now", "own_region")
    _step(handlers.Handlers, "close_session", "handler", who)
    _step(handlers.Handlers, "own_region_env", "own_region")
    _step(registry.Registry, "open", "open")
    _step(registry.Registry, "env_for", "env_for")
    _step(registry.Registry, "close", "close")
    try:  # since the core's split these are its parts' methods, bound into the registry
        from pam_rolegate.core import files, release

        _step(files.GrantFiles, "env_for", "env_for")
        _step(release.Release, "close", "close")
    except ImportError:
        pass
    threading.Thread(target=_writer, daemon=True).start()
    sys.argv[0] = "rolegated"
    sys.exit(cli.daemon_main())


if __name__ == "__main__":
    main()
