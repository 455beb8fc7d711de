"""The grant and session index: what the core holds in memory, and the one lock over all of it.

Every part of the core (single flight, files, held profiles, elevations, moves, release) reads
and changes this state only with `lock` held, and holds it for one change at a time, never
across an STS call. The lock is re-entrant: a part that holds it may call another that takes it.
Every change to a grant or a session is told to the listeners (records journals it, lifecycle
schedules and watches), with the lock held. Each lookup goes through an index, so nothing on a
login's path costs more with the number of live sessions.
"""

import threading


class Index:
    def __init__(self, cfg, engine, listeners=()):
        self.lock = threading.RLock()
        # The rules in force and the STS engine they came with (reconfigure replaces both).
        self.cfg = cfg
        self.engine = engine
        # Bumped by every reconfigure. A decision carries the generation it was made under, so
        # what it obtains outside the lock (an STS call) is checked against the rules in force
        # when it comes back: recheck cannot see a grant whose first AssumeRole is still out.
        self.generation = 0
        self.listeners = list(listeners)
        self.grants = {}  # id -> Grant (live and lingering)
        self.sessions = {}  # id -> Session
        self.by_grant = {}  # grant id -> set of session ids
        self.by_pid = {}  # pid -> set of session ids
        self.by_uid = {}  # uid (target or principal) -> set of grant ids: what `status` shows a user
        self.shells = {}  # uid -> set of shell session ids
        self.lingering = {}  # grant id -> until (epoch): kept in memory, files removed
        self.pending = {}  # grant id -> opens/refreshes in progress (keeps the grant from release)
        self.revoked = set()  # revoked while held: released without linger when let go
        # grant id -> the role the rules moved its login to: no files, nothing handed out, until
        # the grant holds that role
        self.moving = {}
        self.elevated = {}  # login grant id -> {profile: Elevated}
        self.elevated_by_grant = {}  # elevated grant id -> Elevated

    def tell(self, event, *args):
        for listener in self.listeners:
            getattr(listener, event)(*args)

    def rules(self):
        """(config, generation) in force, read together: what a decision is made under."""
        with self.lock:
            return self.cfg, self.generation

    # -- holds: an open or refresh under way keeps its grant from release (lock held) ------------

    def hold(self, key):
        self.pending[key] = self.pending.get(key, 0) + 1

    def unhold(self, key):
        self.pending[key] -= 1
        if not self.pending[key]:
            del self.pending[key]

    # -- grants and sessions (lock held) ---------------------------------------------------------

    def put_grant(self, grant):
        self.grants[grant.id] = grant
        for uid in (grant.target_uid, grant.principal_uid):
            self.by_uid.setdefault(uid, set()).add(grant.id)
        self.tell("grant_saved", grant)

    def pop_grant(self, key):
        """Forget grant `key` and its linger and move; returns (grant, the elevation it held).
        What an elevation's end means for the login's files is the caller's (release.py)."""
        grant = self.grants.pop(key, None)
        self.lingering.pop(key, None)
        self.moving.pop(key, None)
        if grant is not None:
            for uid in (grant.target_uid, grant.principal_uid):
                ids = self.by_uid.get(uid)
                if ids is not None:
                    ids.discard(key)
                    if not ids:
                        del self.by_uid[uid]
            self.tell("grant_dropped", key)
        elevation = self.elevated_by_grant.pop(key, None)
        if elevation is not None:
            of_view = self.elevated.get(elevation.view, {})
            of_view.pop(elevation.profile, None)
            if not of_view:
                self.elevated.pop(elevation.view, None)
        return grant, elevation

    def put_session(self, session):
        self.sessions[session.id] = session
        self.by_grant.setdefault(session.grant_id, set()).add(session.id)
        self.by_pid.setdefault(session.pid, set()).add(session.id)
        if session.kind == "shell":
            self.shells.setdefault(session.uid, set()).add(session.id)
        self.tell("session_opened", session)

    def pop_session(self, sid):
        session = self.sessions.pop(sid)
        for index, key in ((self.by_grant, session.grant_id), (self.by_pid, session.pid),
                           (self.shells if session.kind == "shell" else None, session.uid)):
            if index is None:
                continue
            ids = index.get(key)
            if ids is not None:
                ids.discard(sid)
                if not ids:
                    del index[key]
        self.tell("session_closed", session, session.pid not in self.by_pid)
        return session

    def add_elevation(self, elevation):
        self.elevated.setdefault(elevation.view, {})[elevation.profile] = elevation
        self.elevated_by_grant[elevation.grant_id] = elevation

    # -- reads -----------------------------------------------------------------------------------

    def live_grant(self, key):
        """The grant with files in place (not lingering, not revoked), or None."""
        with self.lock:
            if key in self.lingering or key in self.revoked or key in self.moving:
                return None
            return self.grants.get(key)

    def next_due(self, key):
        """When lifecycle should next look at grant `key` (refresh or linger end), or None."""
        with self.lock:
            grant = self.grants.get(key)
            if grant is None:
                return None
            return self.lingering.get(key, grant.next_refresh)

    def snapshot(self, uid=None):
        """(grants, sessions, lingering ids) that `uid` may see (None: all), copied under the lock."""
        with self.lock:
            keys = list(self.grants) if uid is None else list(self.by_uid.get(uid, ()))
            grants = [self.grants[k] for k in keys]
            sessions = [self.sessions[s] for k in keys for s in self.by_grant.get(k, ())]
            lingering = {k for k in keys if k in self.lingering}
        return grants, sessions, lingering

    def counts(self):
        with self.lock:
            return {"grants": len(self.grants) - len(self.lingering), "lingering": len(self.lingering),
                    "sessions": len(self.sessions)}

    def consistent(self, fn):
        """fn(grants, sessions) called under the lock (records' snapshot for compaction)."""
        with self.lock:
            return fn(dict(self.grants), dict(self.sessions))
