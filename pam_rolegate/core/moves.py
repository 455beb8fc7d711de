"""Moves and lifecycle's decisions: refresh, a move to the role new rules give, recheck after a reload.

When the rules move a live login to another role, its grant follows at the same location: its
files go at once (no door hands out the old role's keys), and the refresh that lifecycle then runs
at once brings the new role's keys there. A refresh whose STS call was out when a reload landed is
judged again by the rules then in force, once. Lifecycle drives these through the registry; NSS
lookups and STS calls happen outside the index's lock.
"""

import dataclasses

from ..rules import mapping
from .grants import BACKOFF_MAX, SDK_MIN_LEFT, RulesChanged, iso, login_facts, profile_sections


class Moves:
    def __init__(self, index, files, flight, release, log, clock):
        self.index = index
        self.files = files
        self.flight = flight
        self.release = release
        self.log = log
        self.clock = clock

    def credentials(self, key):
        """The live grant `key`, refreshed first when an SDK would find it too close to expiry."""
        grant = self.index.live_grant(key)
        if grant is None:
            return None
        if grant.credentials.seconds_left(self.flight.now_dt()) <= SDK_MIN_LEFT + 60 \
                and grant.request.duration > SDK_MIN_LEFT + 120 and grant.next_refresh <= self.clock():
            # A refresh that failed leaves the old credentials to serve; one that found the grant
            # revoked leaves nothing.
            grant = self.refresh(key) or self.index.live_grant(key)
        return grant

    def refresh(self, key):
        """Re-assume grant `key` if it is live and due. On failure the old file stays; retry with backoff."""
        with self.index.lock:
            grant = self.index.grants.get(key)
            if grant is None or key in self.index.lingering:
                return None
            if not self.index.by_grant.get(key):
                self.release.release_if_unused(key, "released")
                return None
            self.index.hold(key)
        moved, was = False, grant.role
        try:
            for _attempt in (1, 2):
                with self.index.lock:  # as it is now: a login under new rules may have moved it meanwhile
                    grant = self.index.grants.get(key) or grant
                rule, ident, decided, profiles = self.current_rule(grant)
                if rule is None:
                    self.release.revoke(key, "the rules no longer map this login")
                    return None
                if rule.role != grant.role:
                    self.moving_out(grant, rule)
                moved = moved or rule.role != was
                try:
                    new = self.flight.obtain(key, ident, rule, grant.rhost, decided, profiles, force=True)
                except RulesChanged:
                    new = None
                if new is not None:
                    break
                # A reload moved or unmapped this login while STS answered, and what came back
                # was dropped: judge the grant again by the rules now in force, once.
            else:
                # Twice in one refresh: leave it due at once; lifecycle looks again after this.
                with self.index.lock:
                    current = self.index.grants.get(key)
                    if current is not None and key not in self.index.revoked:
                        self.index.put_grant(dataclasses.replace(current, next_refresh=self.clock()))
                return None
            self.log.decision("moved" if moved else "refreshed", grant=key, principal=grant.principal,
                              role=new.role, was=was if moved else None,
                              key=new.credentials.masked_key, expires=iso(new.credentials.expiration))
            return new
        except Exception as err:  # STS, IMDS, NSS, a full tmpfs: one grant's trouble stays its own
            with self.index.lock:
                current = self.index.grants.get(key)
                if current is None:
                    return None
                failures = current.failures + 1
                backoff = min(5 * 2 ** (failures - 1), BACKOFF_MAX)
                self.index.put_grant(dataclasses.replace(current, failures=failures,
                                                         next_refresh=self.clock() + backoff))
                # A move that failed stays a move: no files and nothing handed out until its new
                # role's keys arrive, never the old role's again.
                moving_to = self.index.moving.get(key)
            self.log.decision("failed", grant=key, principal=grant.principal, role=moving_to or grant.role,
                              action="move" if moving_to else "refresh", code=getattr(err, "code", None),
                              attempt=failures, retry_in=f"{backoff}s", reason=str(err))
            return None
        finally:
            with self.index.lock:
                self.index.unhold(key)
                self.release.release_if_unused(key, "released")

    def moving_out(self, grant, rule):
        """The rules moved `grant`'s login from its role to `rule`'s: from now until the new role's
        credentials are written, its files are gone and no door hands out the old role's keys."""
        with self.index.lock:
            if self.index.moving.get(grant.id) == rule.role:
                return  # the reload's recheck did already
            self.index.moving[grant.id] = rule.role
            self.files.remove(grant.id)
        self.log.decision("released", grant=grant.id, principal=grant.principal, role=grant.role,
                          reason=f"the rules now give this login {rule.role}", files="removed")

    def current_rule(self, grant):
        """(rule, identity, generation, profiles) the current rules give this grant's login, for its
        profile (rule None: none). A user NSS cannot resolve now (LDAP/SSSD down) raises: that is a
        failed refresh, not a revocation."""
        cfg, decided = self.index.rules()
        ident = mapping.resolve(login_facts(grant))
        if grant.profile is not None:
            return mapping.profile_rule(cfg, ident, grant.profile), ident, decided, ()
        decision = mapping.decide(cfg, ident)
        return decision.rule, ident, decided, profile_sections(decision.profiles)

    def recheck(self):
        """After a reload: revoke every grant (lingering ones too) the new rules no longer give.
        NSS lookups happen outside the lock, one grant at a time."""
        with self.index.lock:
            grants = list(self.index.grants.values())
        revoked = 0
        for grant in grants:
            try:
                rule, _ident, _decided, profiles = self.current_rule(grant)
            except mapping.UnknownUser:
                continue  # NSS trouble is no revocation; the next refresh asks again
            if rule is None:
                revoked += self.release.revoke(grant.id, "the rules no longer map this login")
                continue
            with self.index.lock:
                current = self.index.grants.get(grant.id)
                if current is None or grant.id in self.index.revoked:
                    continue
                live = bool(self.index.by_grant.get(grant.id)) and grant.id not in self.index.lingering
                if rule.role == current.role:
                    sections = self.files.sections(grant.id, profiles)
                    if live and current.profiles != sections:  # memory-only grants name no profiles
                        self.files.renamed(current, sections)
                    continue
                if not live:  # memory only (lingering, IMDS, a named profile): nobody to move
                    revoked += self.release.revoke(grant.id, f"the rules now give this login {rule.role}")
                    continue
                # Sessions live on it: due now, so lifecycle's refresh moves it to the new role
                # at the same location (refresh() calls STS; this must not, under the lock).
                self.moving_out(current, rule)
                self.index.put_grant(dataclasses.replace(current, next_refresh=self.clock()))
        return revoked
