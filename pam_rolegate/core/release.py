"""How sessions and grants end: close, reaping, release with linger, revocation, a linger's end.

A grant's files go when nothing holds it (no session, no open or refresh under way); its keys may
then linger in memory for the next login. A revoked grant goes at once, lingering or not; one an
open or refresh still holds goes when that lets go. A login grant's elevations end with it.
"""

import dataclasses

from .grants import epoch_to_dt, iso


class Release:
    def __init__(self, index, files, credential_store, log, clock):
        self.index = index
        self.files = files
        self.store = credential_store
        self.log = log
        self.clock = clock

    def pop_grant(self, key):
        """Forget grant `key` (lock held). An elevation it held leaves its login's files; the
        elevations of a login grant end with it."""
        grant, elevation = self.index.pop_grant(key)
        if elevation is not None:  # its section leaves the login's files with it
            self.files.unname(elevation.view, {elevation.profile})
        self.drop_elevations_of(key, "its login ended")
        return grant

    def drop_elevations_of(self, key, reason):
        """End every elevation of login grant `key` (lock held): its last session ended, or it went."""
        for elevation in list(self.index.elevated.get(key, {}).values()):
            self.pop_grant(elevation.grant_id)
            self.ended(elevation, "dropped", reason)

    def ended(self, elevation, event, reason):
        self.log.decision(event, principal=elevation.principal, profile=elevation.profile, role=elevation.role,
                          elevation=elevation.id, reason=reason)

    # -- sessions ----------------------------------------------------------------------------------

    def close(self, session_id=None, pid=None):
        """End a PAM session by id, or every PAM session of a process. Returns how many ended."""
        index = self.index
        with index.lock:
            if session_id is not None:
                ids = [session_id] if session_id in index.sessions else []
            else:
                ids = [s for s in index.by_pid.get(pid, ()) if index.sessions[s].kind == "pam"]
            for sid in ids:
                self.drop_session(sid, "released")
        return len(ids)

    def process_ended(self, pid, started):
        """A watched process exited: end the sessions it held. Returns how many."""
        index = self.index
        with index.lock:
            ids = [s for s in index.by_pid.get(pid, ()) if index.sessions[s].started in (started, None)]
            for sid in ids:
                self.drop_session(sid, "reaped")
        return len(ids)

    def drop_session(self, sid, event, reason=None):
        """Forget a session (lock held); release its grant when no session is left."""
        session = self.index.pop_session(sid)
        grant = self.index.grants.get(session.grant_id)
        self.log.decision(event, session=sid, kind=session.kind, pid=session.pid, service=session.service,
                          principal=grant.principal if grant else None, grant=session.grant_id, reason=reason)
        self.release_if_unused(session.grant_id, event)

    # -- grants ------------------------------------------------------------------------------------

    def release_if_unused(self, key, event, linger=True):
        """Remove a grant's files once nothing holds it; keep its credentials lingering if allowed
        (lock held)."""
        index = self.index
        if index.by_grant.get(key) or index.pending.get(key) or key in index.lingering:
            return False
        grant = index.grants.get(key)
        self.drop_elevations_of(key, "the last session ended")
        try:
            removed = self.store.remove(key)
        except OSError as err:
            self.log.error(f"could not remove grant {key}: {err}")
            removed = False
        until = None
        if key in index.revoked:
            index.revoked.discard(key)
            linger = False
        if key in index.moving:
            linger = False  # the rules took its role: nothing of it is kept for a next login
        if grant is not None and linger and index.cfg.session.linger and not grant.failures:
            until = min(self.clock() + index.cfg.session.linger, grant.next_refresh)
            if until <= self.clock():
                until = None
        if until is not None:
            if grant.legacy_config:  # its sessions from before the upgrade have ended
                grant = dataclasses.replace(grant, legacy_config=False)
                index.put_grant(grant)
            index.lingering[key] = until
            index.tell("grant_lingering", grant, until)
        else:
            self.pop_grant(key)
        if grant is not None or removed:
            self.log.decision(event, grant=key, principal=grant.principal if grant else None,
                              role=grant.role if grant else None, files="removed",
                              linger_until=iso(epoch_to_dt(until)) if until else None)
        return True

    def expire(self, key):
        """End a grant's linger once it is due (its memory-only credentials are forgotten)."""
        index = self.index
        with index.lock:
            until = index.lingering.get(key)
            if until is None or until > self.clock():
                return False
            if index.pending.get(key):
                # A login found it fresh and is about to revive it: forgetting it now would leave
                # that session on a grant with no file. Should the login fail instead, the grant's
                # refresh-time entry (never later than its linger) ends the linger then.
                return False
            elevation = index.elevated_by_grant.get(key)
            self.pop_grant(key)
            if elevation is not None:
                self.ended(elevation, "expired", f"its time ran out ({iso(epoch_to_dt(elevation.until))})")
            else:
                self.log.decision("released", grant=key, reason="linger ended")
            return True

    def revoke(self, key, reason):
        """The rules no longer give this grant: end its sessions and remove it now, lingering or not."""
        index = self.index
        with index.lock:
            grant = index.grants.get(key)
            if grant is None or key in index.revoked:
                return False  # gone, or revoked already and waiting for its holder to let go
            self.log.decision("released", grant=key, principal=grant.principal, role=grant.role, reason=reason)
            for sid in list(index.by_grant.get(key, ())):
                index.pop_session(sid)
            index.lingering.pop(key, None)
            self.files.remove(key)
            if index.pending.get(key):
                # The open or refresh holding it drops it when it lets go, without linger; what it
                # obtains meanwhile is neither written nor kept (single flight refuses a revoked grant).
                index.revoked.add(key)
                return True
            self.pop_grant(key)
            return True
