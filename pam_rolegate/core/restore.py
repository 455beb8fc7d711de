"""Restore and reconfigure: the registry after a restart, and after new rules come into force.

`restore` takes the records a previous broker left (records.py replays them; this module never
imports it): sessions whose process still lives are kept, the rest reaped, stray files removed.
`reconfigure` puts new rules in force under a new generation (single flight judges what an STS call
brings back by it) and reschedules live grants when refresh_before changed.
"""

import dataclasses

from ..backends import store
from ..errors import StoreError
from ..hookside import procs
from ..rules import names
from .grants import grant_id


class Recovery:
    def __init__(self, index, files, flight, release, credential_store, log):
        self.index = index
        self.files = files
        self.flight = flight
        self.release = release
        self.store = credential_store
        self.log = log

    def restore(self, grants, sessions):
        """Records from a previous broker: keep sessions whose process lives, release the rest."""
        kept = reaped = 0
        with self.index.lock:
            for grant in grants.values():
                if not grant.legacy_config and self.store.has(grant.id, store.AWS_CONFIG):
                    grant = dataclasses.replace(grant, legacy_config=True)  # made by 0.3.0's process delivery
                self.index.put_grant(grant)
            for session in sessions.values():
                if session.grant_id in grants and procs.alive(session.pid, session.started):
                    if session.uid is None:
                        session = dataclasses.replace(session, uid=grants[session.grant_id].target_uid)
                    self.index.put_session(session)
                    kept += 1
                else:
                    reaped += 1
                    self.log.decision("reaped", session=session.id, kind=session.kind, pid=session.pid,
                                      service=session.service, grant=session.grant_id,
                                      reason="ended while the broker was down")
            for key in list(self.index.grants):
                self.release.release_if_unused(key, "released", linger=False)
            # Grants made by 0.3.0's process delivery: their sessions keep the config file they
            # point at; logins from now on are pointed at the credentials file, written now.
            for grant in [g for g in self.index.grants.values() if g.legacy_config]:
                try:
                    self.files.write(grant)
                except (OSError, StoreError) as err:
                    self.log.error(f"could not write grant {grant.id}'s files: {err}")
            # Elevations are not kept across a restart (their grants had no sessions, so they went
            # just now): their sections leave the files of the logins that carried them.
            ended = {}
            for grant in grants.values():
                if grant.profile is not None and dict(grant.request.tags).get(names.ELEVATED_TAG):
                    view = grant_id(grant.target_uid, grant.principal, grant.service)
                    ended.setdefault(view, set()).add(grant.profile)
            for view_key, names_ended in ended.items():
                self.files.unname(view_key, names_ended)
            for key in self.store.grant_ids():
                if key not in self.index.grants:
                    self.store.remove(key)
                    self.log.decision("released", grant=key, reason="stray file with no grant", files="removed")
        return kept, reaped

    def reconfigure(self, cfg, engine):
        """A reloaded config: a changed refresh_before reschedules every live grant by the new rule.
        A new generation: logins and refreshes decided before it are judged again by the new rules
        when their STS call returns (recheck() sees only the grants that exist already)."""
        with self.index.lock:
            old, self.index.cfg, self.index.engine = self.index.cfg, cfg, engine
            self.index.generation += 1
            if cfg.session.refresh_before != old.session.refresh_before:
                for grant in list(self.index.grants.values()):
                    if grant.id not in self.index.lingering and not grant.failures:
                        self.index.put_grant(dataclasses.replace(
                            grant, next_refresh=self.flight.schedule(grant.credentials, grant.issued)))
