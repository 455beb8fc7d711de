"""The grant registry: the core's one API, composed of a part per responsibility.

No sockets, no HTTP, no boto3: the doors call this API, lifecycle drives refresh, expiry and
reaping through it, and every change is reported to the listeners it was handed (records
journals them, lifecycle schedules and watches); it imports neither. Nothing on a login's path
here costs more with the number of live sessions: each lookup goes through an index.

A *grant* is (target user, principal, service): one credentials location shared by its
sessions, removed when its last session ends. It holds the role the rules in force give that
login (the default profile), and when the rules move the login to another role the grant follows
at the same location, so live sessions see the new role without a new login. Its files also name
the login's *named profiles* (rules with `profile:`), each fetched through credential_process on
first use: a named grant (target, principal, service, profile) held in memory only, single flight,
lingering between uses like a released grant. A grant's credentials may *linger* in memory for
`session.linger` after its last session (never past its refresh time), so the next login of that
grant needs no STS call. A *session* is one PAM session (the process that opened it, named by pid
and start time) or one PAM-less shell (the shell that asked, by the same two numbers).

The parts, each with the index and the one lock it holds (docs/internals.md has the table):
index.py (grants, sessions, their indexes, the lock), flight.py (single flight and the check of
what an STS call brings back), files.py (what a grant's files say), release.py (how sessions and
grants end), held.py (named profiles and IMDS grants in memory), elevated.py (elevations held),
moves.py (refresh, moves, recheck), restore.py (restart and reload). This module opens sessions
and hands each other call to the part that holds it.
"""

import os
import secrets
import sys
import time

from ..rules import mapping
from .elevated import HeldElevations
from .files import GrantFiles
from .flight import SingleFlight
from .grants import (MAX_SHELL_SESSIONS_PER_UID, Opened, RulesChanged, Session, ShellLimit, failed, grant_id, iso,
                     profile_sections, unmapped_midway)
from .held import HeldProfiles
from .index import Index
from .moves import Moves
from .release import Release
from .restore import Recovery
from ..hookside import procs


class Registry:
    def __init__(self, cfg, engine, credential_store, log, clock=time.time, rolegate_cmd=None, listeners=()):
        self.store = credential_store
        self.log = log
        self.clock = clock
        self.index = index = Index(cfg, engine, listeners)
        self.files = GrantFiles(index, credential_store, log,
                                rolegate_cmd or os.path.join(os.path.dirname(sys.executable), "rolegate"))
        self.flight = SingleFlight(index, self.files, clock)
        self.release = Release(index, self.files, credential_store, log, clock)
        self.held = HeldProfiles(index, self.flight, self.release, log, clock)
        self.elevated = HeldElevations(index, self.flight, self.files, self.release, self.held, log, clock)
        self.moves = Moves(index, self.files, self.flight, self.release, log, clock)
        self.recovery = Recovery(index, self.files, self.flight, self.release, credential_store, log)
        # The parts' entry points, as the doors, lifecycle and the broker call them.
        self.now_dt, self.schedule = self.flight.now_dt, self.flight.schedule
        self.pointer, self.env_for = self.files.pointer, self.files.env_for
        self.container_uri = self.files.container_uri
        self.close, self.process_ended = self.release.close, self.release.process_ended
        self.expire, self.revoke = self.release.expire, self.release.revoke
        self.background, self.named, self.view = self.held.background, self.held.named, self.held.view
        self.on_demand_rule, self.elevate = self.elevated.on_demand_rule, self.elevated.elevate
        self.drop, self.elevations = self.elevated.drop, self.elevated.elevations
        self.refresh, self.recheck, self.credentials = self.moves.refresh, self.moves.recheck, self.moves.credentials
        self.restore, self.reconfigure = self.recovery.restore, self.recovery.reconfigure
        self.live_grant, self.next_due, self.snapshot = index.live_grant, index.next_due, index.snapshot
        self.counts, self.consistent = index.counts, index.consistent

    # The rules and engine in force, and the listeners: the index's (the broker sets listeners
    # once the journal and lifecycle exist; reconfigure replaces the rules and engine).
    cfg = property(lambda self: self.index.cfg, lambda self, cfg: setattr(self.index, "cfg", cfg))
    engine = property(lambda self: self.index.engine, lambda self, engine: setattr(self.index, "engine", engine))
    listeners = property(lambda self: self.index.listeners,
                         lambda self, value: setattr(self.index, "listeners", list(value)))
    host = property(lambda self: self.flight.host)
    _pending = property(lambda self: self.index.pending)  # opens and refreshes under way, by grant

    def _obtain(self, *args, **kwargs):
        """The login's way into single flight (one name, so a test can stand between the two)."""
        return self.flight.obtain(*args, **kwargs)

    def rule_for(self, facts):
        """The rule the config gives these login facts (None: no rule). No STS call."""
        return mapping.decide(self.cfg, mapping.resolve(facts)).rule

    # -- the doors' API ------------------------------------------------------------------------

    def resolve(self, facts):
        """The login's identity through NSS (mapping.resolve); an unknown user is a `denied:` line."""
        try:
            return mapping.resolve(facts)
        except mapping.UnknownUser as err:
            self.log.decision("denied", user=facts.user, service=facts.service, reason=str(err))
            raise

    def open(self, facts, kind, pid, started, budget=None, sid=None, ident=None, warm_only=False):
        """Resolve, decide, obtain and record one session. Raises mapping.UnknownUser, StsError,
        StoreError or ShellLimit; returns Opened. `ident`: the facts resolved already (resolve()),
        decided again here under the rules in force. `warm_only`: None instead of anything that may
        wait (an STS call, another login's for the same grant): the PAM door answers a warm login
        on its loop with this, and sends the rest to a worker."""
        if not warm_only:
            return self._open(facts, kind, pid, started, budget, sid, ident, False)
        # Nor does the loop wait for the lock: held by a worker (a reload writing files, say), the
        # login goes to a worker. Held here across the open (an RLock: the blocks inside re-enter it).
        if not self.index.lock.acquire(blocking=False):
            return None
        try:
            return self._open(facts, kind, pid, started, None, sid, ident, True)
        finally:
            self.index.lock.release()

    def _open(self, facts, kind, pid, started, budget, sid, ident, warm_only):
        if ident is None:
            ident = self.resolve(facts)
        cfg, decided = self.index.rules()
        decision = mapping.decide(cfg, ident)
        if decision.rule is None:
            self.log.decision("denied", principal=ident.principal, target=ident.target, service=facts.service,
                              reason="no rule matches")
            return Opened(False, decision.reason)
        rule = decision.rule
        key = grant_id(ident.target_uid, ident.principal, ident.service)
        with self.index.lock:
            existing = self.index.sessions.get(sid) if sid else None
            if kind == "shell" and existing is None:
                self._make_room_for_shell(ident.target_uid)
            self.index.hold(key)
        linger = True
        try:
            grant = self._obtain(key, ident, rule, facts.rhost, decided, profile_sections(decision.profiles),
                                 budget=budget, **({"warm_only": True} if warm_only else {}))
            if grant is None:
                return None  # not warm: nothing was taken, the finally below lets go of the hold
            with self.index.lock:
                # A reload may have unmapped this login while it was under way (the grant may
                # have been fresh, so no STS call checked): then no session, and the release
                # below (when this login was the last holder) removes the grant, without linger.
                self.flight.check_still_given(key, ident, rule, decided)
                if self.index.lingering.pop(key, None) is not None:
                    self.files.write(self.index.grants[key])  # revived: the files were removed at release
                if existing is not None and existing.grant_id == key:
                    return Opened(True, decision.reason, existing, grant, new=False)
                session = Session(id=sid or secrets.token_hex(8), grant_id=key, kind=kind, pid=pid,
                                  started=started, service=facts.service, opened_at=self.clock(),
                                  rhost=facts.rhost, tty=facts.tty, uid=ident.target_uid)
                if existing is not None:  # the shell's mapping changed: move it to the new grant
                    self.index.pop_session(existing.id)
                    self.release.release_if_unused(existing.grant_id, "released")
                self.index.put_session(session)
        except RulesChanged:
            linger = False
            return unmapped_midway(self.log, ident, facts.service)
        except Exception as err:
            failed(self.log, ident, rule, facts.service, err)
            raise
        finally:
            with self.index.lock:
                self.index.unhold(key)
                self.release.release_if_unused(key, "released", linger=linger)
        self.log.decision("granted", principal=ident.principal, target=ident.target, role=rule.role,
                          service=facts.service, session=session.id, grant=key, rule=rule.index,
                          key=grant.credentials.masked_key, expires=iso(grant.credentials.expiration),
                          rhost=facts.rhost, tty=facts.tty, pid=pid)
        return Opened(True, decision.reason, session, grant, new=True)

    def _make_room_for_shell(self, uid):
        """Refuse a uid's shell past the cap, after forgetting its shells that have died (lock held)."""
        shells = self.index.shells.get(uid, ())
        if len(shells) < MAX_SHELL_SESSIONS_PER_UID:
            return
        for sid in [s for s in shells if not procs.alive(self.index.sessions[s].pid, self.index.sessions[s].started)]:
            self.release.drop_session(sid, "reaped")
        count = len(self.index.shells.get(uid, ()))
        if count >= MAX_SHELL_SESSIONS_PER_UID:
            raise ShellLimit(f"uid {uid} already has {count} live shell sessions (limit {MAX_SHELL_SESSIONS_PER_UID})")
