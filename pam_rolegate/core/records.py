"""Records that survive a broker restart: an append-only journal of the registry's changes.

The journal lives in runtime_dir/state/ (root only, on tmpfs like the credentials: secrets never
reach a disk). Each change is one JSON line, written with a single write() to an O_APPEND file
while the registry's lock is held, before the change's reply leaves the broker: a SIGKILL at any
instant loses no session a login was told about, and costs a few hundred bytes per change, not a
rewrite of the whole state. A line torn by a crash mid-write can only be the last; replay skips it.

When the journal has grown well past the live state, `compact()` rewrites it from a consistent
copy of the registry, off the login path: changes made meanwhile go to the old journal *and* a
buffer, which is appended to the new file before it is renamed into place.
"""

import dataclasses
import json
import os
import threading
from datetime import datetime, timezone

from .grants import Grant, Listener, Session, iso
from ..backends.sts import AssumeRequest, Credentials

JOURNAL = "journal"
JOURNAL_NEW = "journal.new"
LEGACY = "records.json"  # version 0.1's whole-state file, read once when found
# Compact when the journal holds this many bytes more than the last compaction left, and at
# least this many in all: small hosts never bother, large ones stay within a few times the state.
COMPACT_MIN = 1 << 20
COMPACT_FACTOR = 4


def grant_record(grant):
    d = dataclasses.asdict(grant)
    c = grant.credentials
    d["credentials"] = {"access_key_id": c.access_key_id, "secret_access_key": c.secret_access_key,
                        "session_token": c.session_token, "expiration": iso(c.expiration)}
    return d


def grant_from_record(d):
    d = dict(d)
    c = d.pop("credentials")
    expiry = datetime.strptime(c["expiration"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc) \
        if c["expiration"] else None
    d["credentials"] = Credentials(c["access_key_id"], c["secret_access_key"], c["session_token"], expiry)
    r = dict(d.pop("request"))
    r["tags"] = tuple(tuple(t) for t in r["tags"])
    r["policy_arns"] = tuple(r["policy_arns"])
    d["request"] = AssumeRequest(**r)
    d["profiles"] = tuple(tuple(p) for p in d.get("profiles", ()))  # absent in 0.2's records
    return Grant(**d)


def _line(entry):
    return (json.dumps(entry, separators=(",", ":")) + "\n").encode()


class Journal(Listener):
    def __init__(self, store, log):
        self.store = store
        self.log = log
        self._lock = threading.Lock()
        self._fd = None
        self._buffer = None  # lines written during a compaction
        self._written = 0  # bytes appended since the last compaction
        self._base = 0  # bytes the last compaction wrote
        self.appended = 0  # bytes appended in all (for benchmarks)

    # -- writing: the registry's listener ----------------------------------------------------

    def _append(self, entry):
        data = _line(entry)
        with self._lock:
            if self._fd is None:
                return
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view):]
            except OSError as err:  # a full tmpfs: say so; the registry in memory is still right
                self.log.error(f"could not journal a change: {err}")
            self._written += len(data)
            self.appended += len(data)
            if self._buffer is not None:
                self._buffer.append(data)

    def grant_saved(self, grant):
        self._append({"g": grant_record(grant)})

    def grant_dropped(self, grant_id):
        self._append({"d": grant_id})

    def session_opened(self, session):
        self._append({"s": dataclasses.asdict(session)})

    def session_closed(self, session, last_of_pid):
        self._append({"e": session.id})

    # -- reading -----------------------------------------------------------------------------

    def load(self):
        """Replay the records a previous broker left: (grants, sessions) by id."""
        grants, sessions = {}, {}
        legacy = self.store.read_state(LEGACY)
        if legacy:
            try:
                data = json.loads(legacy)
                for d in data.get("grants", []):
                    d.pop("next_refresh_", None)
                    g = grant_from_record(d)
                    grants[g.id] = g
                for d in data.get("sessions", []):
                    sessions[d["id"]] = Session(**d)
            except (ValueError, KeyError, TypeError) as err:
                self.log.error(f"ignoring unreadable records from the previous broker: {err}")
        raw = self.store.read_state(JOURNAL) or b""
        lines = raw.split(b"\n")
        for number, line in enumerate(lines, 1):
            if not line:
                continue
            try:
                entry = json.loads(line)
                if "g" in entry:
                    g = grant_from_record(entry["g"])
                    grants[g.id] = g
                elif "d" in entry:
                    grants.pop(entry["d"], None)
                elif "s" in entry:
                    s = Session(**entry["s"])
                    sessions[s.id] = s
                elif "e" in entry:
                    sessions.pop(entry["e"], None)
            except (ValueError, KeyError, TypeError) as err:
                if number < len(lines) - 1:  # not the torn tail of a crash: worth saying
                    self.log.error(f"skipping unreadable journal line {number}: {type(err).__name__}")
        return grants, sessions

    # -- compaction --------------------------------------------------------------------------

    def start(self, registry):
        """Begin journaling: write the registry's state as a fresh journal (after recovery)."""
        self.compact(registry)
        self.store.remove_state(LEGACY)

    def needs_compaction(self):
        with self._lock:
            return self._written > max(COMPACT_MIN, COMPACT_FACTOR * self._base)

    def compact(self, registry):
        def begin(grants, sessions):
            with self._lock:
                self._buffer = []
            return grants, sessions

        grants, sessions = registry.consistent(begin)
        fd = self.store.open_state(JOURNAL_NEW, append=False)
        try:
            parts = [_line({"g": grant_record(g)}) for g in grants.values()]
            parts += [_line({"s": dataclasses.asdict(s)}) for s in sessions.values()]
            data = b"".join(parts)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            with self._lock:
                for chunk in self._buffer:
                    os.write(fd, chunk)
                self.store.rename_state(JOURNAL_NEW, JOURNAL)
                old, self._fd = self._fd, fd
                self._base = len(data) + sum(len(c) for c in self._buffer)
                self._written = 0
                self._buffer = None
            fd = None
            if old is not None:
                os.close(old)
        finally:
            if fd is not None:
                os.close(fd)
                with self._lock:
                    self._buffer = None

    def close(self):
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
