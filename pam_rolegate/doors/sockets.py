"""The broker's socket doors: the root-only PAM door and the world-reachable user door.

This module is their front door only; each responsibility has its own module:

    door.py       a Unix socket door: admission by uid, waiting lines, framing, dispatch; its limits
    handlers.py   what each action on the PAM and user doors does (the registry's API -> a reply)
    refusals.py   the one rate limit on refused:/denied: lines, shared with the HTTP doors
    loops.py      a thread with an asyncio loop of its own, one per door

The names below are re-exported so the broker and the tests import them from one place.
"""

from .door import (ACCEPT_BATCH, ACCEPT_RETRY, ALWAYS_ADMITTED_PER_UID, ALWAYS_ADMITTED_POOL, BACKLOG,  # noqa: F401
                   FRAME_DEADLINE, INLINE_ACTIONS, INLINE_FRAME, LINE_DEADLINE, LINE_SWEEP, MAX_CONNECTIONS,
                   MAX_CONNECTIONS_PER_UID, MAX_SERVING_PER_UID, MAX_USER_CONNECTIONS, MAX_WORKING_PER_UID,
                   PAM_WORKERS, USER_WORKERS, Door, Peer)
from .handlers import HOOK_MARGIN, Handlers  # noqa: F401
from .loops import loop_thread  # noqa: F401
from .refusals import REFUSAL_REASON_MAX, REFUSED_LOG_INTERVAL, RefusalLog  # noqa: F401
