"""Single flight: one STS call per grant however many ask, and the check of what comes back.

A login, a refresh, an IMDS request, a named profile or an elevation all obtain a grant's keys
here: reused while fresh and still the role the rules give, else one AssumeRole, which every other
caller of the same grant waits for. The call runs outside the index's lock. What comes back is
judged by the rules in force *then*: a login or refresh whose STS call was out when a reload
landed (a new generation) keeps its keys only if the new rules still give its login that role,
and a grant revoked or moved meanwhile keeps nothing (RulesChanged).
"""

import dataclasses
import secrets
import threading
import time

from ..rules import mapping
from ..rules.config import MIN_REFRESH_INTERVAL
from ..errors import StsError
from ..backends.sts import build_request
from .grants import USABLE_LEFT, Grant, RulesChanged, epoch_to_dt


class _Flight:
    """One STS call in progress for a grant; followers wait for the leader's result."""

    __slots__ = ("done", "grant", "error")

    def __init__(self):
        self.done = threading.Event()
        self.grant = None
        self.error = None


class SingleFlight:
    def __init__(self, index, files, clock):
        self.index = index
        self.files = files
        self.clock = clock
        self._inflight = {}  # grant id -> _Flight (under the index's lock)
        self._host = None

    @property
    def host(self):
        if self._host is None:
            facts = self.index.engine.host_facts()
            if facts.instance_id or self.index.cfg.source.kind != "instance-profile":
                self._host = facts  # a failed instance-id lookup is asked again next time
            return facts
        return self._host

    def now_dt(self):
        return epoch_to_dt(self.clock())

    def schedule(self, creds, issued=None):
        """When to refresh: refresh_before ahead of expiry, less a little jitter, never in the past.
        `issued`: when STS gave `creds` (None: just now)."""
        now = self.clock()
        rb = self.index.cfg.session.refresh_before
        lifetime = creds.seconds_left(self.now_dt())
        jitter = secrets.randbelow(1000) / 1000 * min(30.0, 0.1 * max(lifetime - rb, 0))
        # Never sooner than config's least refresh interval after the keys were issued, whatever
        # lifetime STS gave: keys shorter-lived than refresh_before (a role's lower cap) must not
        # be re-assumed every second for ever. Keys about to expire (recovered after the broker
        # was down) go sooner. Counted from the issue, not from now: a reload that makes old keys
        # due (a longer refresh_before) refreshes them at once, at the refresh rate, instead of
        # holding every grant back by the interval first (0.3.0's 10 s wait before a pass).
        floor = min(MIN_REFRESH_INTERVAL, max(lifetime / 2, 1.0))
        since = now if issued is None else min(issued, now)
        return max(now + lifetime - rb - jitter, since + floor, now)

    def _fresh(self, grant):
        return grant.credentials.seconds_left(self.now_dt()) > self.index.cfg.session.refresh_before

    def _still_usable(self, grant):
        return grant is not None and grant.credentials.seconds_left(self.now_dt()) > USABLE_LEFT

    def check_still_given(self, key, ident, rule, decided):
        """Raise RulesChanged unless grant `key` stands and the rules in force still give `ident`
        the role `rule` (chosen under generation `decided`) gave it, for the same profile. Pure:
        the identity was resolved before; lock held."""
        if key in self.index.revoked or self.index.moving.get(key, rule.role) != rule.role:
            raise RulesChanged(key)
        if decided != self.index.generation:
            now = mapping.profile_rule(self.index.cfg, ident, rule.profile)
            if now is None or now.role != rule.role:
                raise RulesChanged(key)

    def obtain(self, key, ident, rule, rhost, decided, profiles=(), budget=None, force=False, write=True,
               again=False, tags=(), duration=None, warm_only=False):
        """Grant `key` holding `rule`'s role: reused while fresh and still that role, else one
        AssumeRole however many ask. New credentials go to the grant's files when it has sessions,
        or `write` asks (a login). `decided` is the generation `rule` was chosen under: credentials
        that come back after a reload took that rule, or revoked the grant, are dropped unwritten
        (raises RulesChanged). `profiles`: the named profiles its files name (profile_sections).
        `warm_only`: None rather than anything that may wait (an STS call, another login's)."""
        with self.index.lock:
            current = held = self.index.grants.get(key)
            if current is not None and current.role != rule.role:
                current = None  # the rules moved this login: what it held is never handed out again
            if current is not None and not force and self._fresh(current):
                full = self.files.sections(key, profiles)
                if current.profiles == full:
                    return current
                return self.files.renamed(current, full)
            if warm_only:
                return None
            flight = self._inflight.get(key)
            leader = flight is None
            if leader:
                flight = self._inflight[key] = _Flight()
        if not leader:
            waited = time.monotonic()
            if not flight.done.wait(budget if budget is not None else self.index.cfg.sts_timeout + 1):
                raise StsError("waited too long for another login's STS call for the same grant")
            other_role = flight.grant is not None and flight.grant.role != rule.role
            if (isinstance(flight.error, RulesChanged) or other_role) and not again:
                # The reload took the leader's rule, not necessarily this caller's (decided under
                # the new rules), or the leader asked for the role the rules gave before: this
                # caller asks STS itself, once, within what is left of its budget.
                left = None if budget is None else budget - (time.monotonic() - waited)
                return self.obtain(key, ident, rule, rhost, decided, profiles, left, force, write, again=True,
                                   tags=tags, duration=duration)
            if flight.error is not None:
                raise flight.error
            if other_role:
                raise RulesChanged(key)
            return flight.grant
        try:
            if not force and current is not None and current.failures and self._still_usable(current):
                # STS is failing (the refresher is backing off): hand out what is still valid
                # rather than spend this login's budget on another failing call.
                flight.grant = current
                return current
            request = build_request(self.index.cfg, rule, ident, rhost=rhost, host=self.host)
            if tags or duration:  # an elevation's: its reason and length
                request = dataclasses.replace(request, tags=request.tags + tuple(tags),
                                              duration=duration or request.duration)
            try:
                creds = self.index.engine.assume(request, budget=budget)
            except StsError:
                if force or not self._still_usable(current):
                    raise
                flight.grant = current
                return current
            grant = Grant(
                id=key, principal=ident.principal, principal_uid=ident.principal_uid, target=ident.target,
                target_uid=ident.target_uid, target_gid=ident.target_gid, service=ident.service, rhost=rhost,
                role=rule.role, request=request, credentials=creds, next_refresh=self.schedule(creds),
                issued=self.clock(),
                token=held.token if held is not None and held.token else secrets.token_urlsafe(32),
                profile=rule.profile, profiles=self.files.sections(key, profiles),
                legacy_config=held is not None and held.legacy_config)
            with self.index.lock:
                self.check_still_given(key, ident, rule, decided)
                # A lingering grant has no files until a session revives it; a background
                # grant (IMDS) has none unless logins share it.
                files = key not in self.index.lingering and (write or bool(self.index.by_grant.get(key)))
            if files:
                self.files.write(grant)
            with self.index.lock:
                try:
                    # Again: a reload may have moved or unmapped this login while the files were
                    # written (outside the lock). Then what was just written is taken back.
                    self.check_still_given(key, ident, rule, decided)
                except RulesChanged:
                    if files:
                        self.files.remove(key)
                    raise
                if self.index.moving.get(key) == rule.role:
                    del self.index.moving[key]  # the move is done: the doors may hand this grant out
                sections = self.files.sections(key, profiles)
                if sections != grant.profiles:  # an elevation began or ended while STS answered
                    grant = dataclasses.replace(grant, profiles=sections)
                    if files:
                        self.files.write(grant)
                self.index.put_grant(grant)
            flight.grant = grant
            return grant
        except BaseException as err:
            flight.error = err
            raise
        finally:
            with self.index.lock:
                self._inflight.pop(key, None)
            flight.done.set()

