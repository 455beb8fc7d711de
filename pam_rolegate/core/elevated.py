"""Elevations held: an on-demand profile assumed for a reason and a time, named in its login's files.

`elevate` is called once the person was asked (core/elevation.py runs the asking: PAM, approvals);
the elevation's grant is held in memory, never refreshed, until its time runs out (release's
expire), `drop` ends it, its login's last session ends, or the rules no longer give the profile.
"""

from ..rules import mapping, names
from .grants import Elevated, RulesChanged, grant_id, login_facts


class HeldElevations:
    def __init__(self, index, flight, files, release, held, log, clock):
        self.index = index
        self.flight = flight
        self.files = files
        self.release = release
        self.held = held  # for the login grant an elevation is of (its view)
        self.log = log
        self.clock = clock

    def on_demand_rule(self, view, profile):
        """(rule, identity, generation) for on-demand profile `profile` of login grant `view` by the
        rules in force (rule None: they give its login no such profile). Asks NSS."""
        ident = mapping.resolve(login_facts(view))
        cfg, decided = self.index.rules()
        return dict(mapping.named_profiles(cfg, ident, on_demand=True)).get(profile), ident, decided

    def elevate(self, view_key, uid, profile, reason, seconds, elevation_id, approved_by=None, expected=None):
        """AssumeRole for on-demand profile `profile` of login grant `view_key`, with the reason and
        the elevation in its session tags, for `seconds`; then held in memory, named in the login's
        files, until it expires, is dropped, or the login's last session ends. Returns Elevated, or
        None when the grant is gone or the rules no longer give the profile. Raises StsError."""
        view = self.held.view(view_key, uid)
        if view is None:
            return None
        rule, ident, decided = self.on_demand_rule(view, profile)
        if rule is None or (expected is not None and (rule.role, rule.elevate) != (expected.role, expected.elevate)):
            return None  # the rules changed since the person was asked (another role, approvers, max)
        key = grant_id(ident.target_uid, ident.principal, ident.service, profile)
        tags = ((names.ELEVATED_TAG, "true"), (names.REASON_TAG, reason))
        with self.index.lock:
            self.index.hold(key)
        try:
            grant = self.flight.obtain(key, ident, rule, view.rhost, decided, force=True, write=False, tags=tags,
                                       duration=seconds)
            with self.index.lock:
                if self.held.view(view_key, uid) is None:  # the last session ended meanwhile: nothing to keep
                    self.release.pop_grant(key)
                    return None
                until = grant.credentials.expiration.timestamp() if grant.credentials.expiration else \
                    self.clock() + seconds
                old = self.index.elevated.get(view_key, {}).get(profile)
                if old is not None and old.grant_id != key:
                    self.release.pop_grant(old.grant_id)
                elevation = Elevated(id=elevation_id, view=view_key, profile=profile, grant_id=key, role=rule.role,
                                     principal=ident.principal, target_uid=ident.target_uid, reason=reason,
                                     until=until, approved_by=approved_by)
                self.index.add_elevation(elevation)
                self.index.lingering[key] = until  # lifecycle's expire() ends it then
                self.index.tell("grant_lingering", grant, until)
                current = self.index.grants.get(view_key)
                if current is not None and profile not in dict(current.profiles):
                    self.files.renamed(current, current.profiles + ((profile, rule.role),))
            return elevation
        except RulesChanged:
            return None
        finally:
            with self.index.lock:
                self.index.unhold(key)
                self.release.release_if_unused(key, "released", linger=False)

    def drop(self, view_key, uid, profile, event="dropped", reason="rolegate drop"):
        """End elevation `profile` of login grant `view_key` now (uid: its account or root). Returns
        the Elevated it ended, or None."""
        with self.index.lock:
            elevation = self.index.elevated.get(view_key, {}).get(profile)
            if elevation is None or uid not in (0, elevation.target_uid):
                return None
            self.release.pop_grant(elevation.grant_id)
        self.release.ended(elevation, event, reason)
        return elevation

    def elevations(self, uid=None):
        """Elevations in force that `uid` may see (None: all)."""
        with self.index.lock:
            return [e for of_view in self.index.elevated.values() for e in of_view.values()
                    if uid is None or uid == e.target_uid]
