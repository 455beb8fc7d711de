"""A daemon thread with an asyncio loop of its own: each door (socket or HTTP) runs on one, so no
door's callers can slow another door's loop."""

import asyncio
import threading


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

