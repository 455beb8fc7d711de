"""The one rate limit on refusal and denial lines, shared by every door (sockets, IMDS, container)."""

import threading
import time

REFUSED_LOG_INTERVAL = 10.0  # a uid's refusals are logged at most once per this, with a count
REFUSAL_REASON_MAX = 256  # characters of a refusal's message a line keeps (a reason is at most 256 too)


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

