"""Named profiles and IMDS grants held in memory: obtained on first use, never written to files.

A named profile (a rule with `profile:`) of a live login grant is fetched through the section its
files carry (credential_process asks the broker) and held as its own grant (target, principal,
service, profile); a process outside any login asks through the IMDS door for a background grant of
its own account. Both linger in memory between uses like a released grant.
"""

from ..rules import mapping
from .grants import BACKGROUND_MIN_HOLD, RulesChanged, failed, grant_id, iso, login_facts, unmapped_midway


class HeldProfiles:
    def __init__(self, index, flight, release, log, clock):
        self.index = index
        self.flight = flight
        self.release = release
        self.log = log
        self.clock = clock

    def background(self, facts, min_left):
        """The grant for a process outside any login (the IMDS door): the caller's own account, no
        session, no files; between requests it lingers like a released grant. None when no rule
        maps the caller. What it returns has at least `min_left` seconds of validity."""
        ident = mapping.resolve(facts)
        cfg, decided = self.index.rules()
        rule = mapping.decide(cfg, ident).rule
        if rule is None:
            return None
        key = grant_id(ident.target_uid, ident.principal, ident.service)
        return self.in_memory(key, ident, rule, facts.rhost, decided, min_left)

    def named(self, view_key, profile, uid, min_left):
        """Named profile `profile` of the live grant `view_key` (the login whose files name it),
        for `uid` (its target account, or root): obtained on first use, then held in memory only,
        lingering between uses like a background grant. None when that grant is not live, not
        `uid`'s, or the rules in force give its login no such profile; the caller cannot tell
        which (no probing of other people's grants)."""
        view = self.view(view_key, uid)
        if view is None:
            return None
        with self.index.lock:
            elevation = self.index.elevated.get(view_key, {}).get(profile)
            if elevation is not None:  # held until `until`, never refreshed: hand out what there is
                grant = self.index.grants.get(elevation.grant_id)
                return grant if grant is not None and elevation.until > self.clock() else None
        ident = mapping.resolve(login_facts(view))
        cfg, decided = self.index.rules()
        rule = dict(mapping.named_profiles(cfg, ident)).get(profile)  # never an on-demand one: elevate gives those
        if rule is None:
            return None
        key = grant_id(ident.target_uid, ident.principal, ident.service, profile)
        return self.in_memory(key, ident, rule, view.rhost, decided, min_left)

    def view(self, view_key, uid):
        """The live login grant `view_key` with sessions on it, when `uid` may use it (its target
        account, or root); else None."""
        with self.index.lock:
            view = self.index.live_grant(view_key) if self.index.by_grant.get(view_key) else None
        if view is None or view.profile is not None or uid not in (0, view.target_uid):
            return None
        return view

    def in_memory(self, key, ident, rule, rhost, decided, min_left):
        """Grant `key` for a caller outside any session's files (IMDS, a named profile): obtained
        or reused, with at least `min_left` seconds left, then kept in memory for
        max(linger, BACKGROUND_MIN_HOLD) past this use (never past its refresh time)."""
        service = ident.service
        with self.index.lock:
            before = self.index.grants.get(key)
            self.index.hold(key)
        linger = True
        try:
            grant = self.flight.obtain(key, ident, rule, rhost, decided, write=False)
            # Never more than half a session's life: a role whose sessions last 15 minutes must
            # not be assumed anew at every call for an SDK's 15-minute margin.
            if grant.credentials.seconds_left(self.flight.now_dt()) < min(min_left, grant.request.duration / 2):
                grant = self.flight.obtain(key, ident, rule, rhost, decided, force=True, write=False)
            with self.index.lock:
                self.flight.check_still_given(key, ident, rule, decided)
                if not self.index.by_grant.get(key):  # nobody logged in holds it: keep it in memory only
                    hold = max(self.index.cfg.session.linger, BACKGROUND_MIN_HOLD)
                    until = max(self.clock() + hold, self.index.lingering.get(key, 0))
                    self.index.lingering[key] = min(until, grant.next_refresh)
                    self.index.tell("grant_lingering", grant, self.index.lingering[key])
        except RulesChanged:
            linger = False
            unmapped_midway(self.log, ident, service)
            return None
        except Exception as err:
            failed(self.log, ident, rule, service, err)
            raise
        finally:
            with self.index.lock:
                self.index.unhold(key)
                self.release.release_if_unused(key, "released", linger=linger)
        if before is None or before.credentials != grant.credentials:
            self.log.decision("granted", principal=ident.principal, target=ident.target, role=rule.role,
                              service=service, profile=rule.profile, action="profile" if rule.profile else None,
                              grant=key, rule=rule.index,
                              key=grant.credentials.masked_key, expires=iso(grant.credentials.expiration))
        return grant
