"""What each socket door action does: translate a request into the registry's API and its answer
into a reply. The doors (door.py) frame, admit and schedule; nothing here knows a socket."""

import os
import pwd
import time

from ..rules import awsconfig, mapping
from ..backends import homefiles
from ..hookside import procs, protocol
from ..errors import StoreError, StsError
from ..core.grants import SDK_MIN_LEFT, ShellLimit, epoch_to_dt, iso
from .refusals import REFUSAL_REASON_MAX

HOOK_MARGIN = 0.3  # seconds kept back from the hook's budget for our reply and its PAM bookkeeping
# How long the PAM door's loop reuses a login's NSS answer (its principal's groups, the target's
# uid) to answer the same login warm, with no thread hop. The rules are decided afresh every time;
# only NSS is not asked again. nscd keeps group answers 3600 s and sssd 5400 s by default: a group
# change reaches a login here no later than it would through them.
RESOLVED_TTL = 30.0
RESOLVED_MAX = 65536  # logins remembered; past this the memory starts over (bounded whoever logs in)


class Handlers:
    """What each action does: translate a request into the registry's API and its answer into a reply."""

    def __init__(self, registry, refusals, homes=None, log=None, elevations=None):
        self.registry = registry
        self.refusals = refusals
        self.homes = homes  # a homefiles.HomeReader: PAM logins look for the user's own region
        self.log = log
        self.elevations = elevations  # core.elevation.Elevations: rolegate elevate, approve, drop
        # (user, service, ruser) -> (mapping.Identity, time.monotonic() NSS gave it): written by the
        # workers' opens, read by the loop's; single dict operations, atomic under the GIL.
        self._resolved = {}

    def pam(self):
        return {protocol.Ping.ACTION: self.ping, protocol.OpenSession.ACTION: self.open_session,
                protocol.CloseSession.ACTION: self.close_session}

    def pam_on_loop(self):
        """What the PAM door may answer on its loop, each handler returning None for "not here"."""
        return {protocol.OpenSession.ACTION: self.open_session_warm}

    def user(self):
        handlers = {protocol.Ping.ACTION: self.ping, protocol.Env.ACTION: self.env,
                    protocol.GetCredentials.ACTION: self.credentials, protocol.Status.ACTION: self.status}
        if self.elevations is not None:
            handlers.update({protocol.Elevate.ACTION: self.elevate, protocol.ElevationPoll.ACTION: self.elevation,
                             protocol.ElevationCancel.ACTION: self.elevation_cancel,
                             protocol.Approve.ACTION: self.approve, protocol.Deny.ACTION: self.deny,
                             protocol.Approvals.ACTION: self.approvals, protocol.Drop.ACTION: self.drop})
        return handlers

    def _forbidden(self, peer, action, why):
        self.refusals.refused(peer.uid, peer.pid, action=action, reason=why)
        return protocol.ErrorReply(protocol.E_FORBIDDEN, why)

    def ping(self, peer, req):
        return protocol.Reply({"version": protocol.VERSION, "pid": os.getpid()})

    def own_region_env(self, grant, env, deadline):
        """`env` without rolegate's region when the target account's own ~/.aws/config names one for
        `default`, the profile a PAM session starts with (PAM sets no AWS_PROFILE): docs/sessions.md "Whose
        region wins". Any trouble reading it keeps rolegate's region; nothing here fails a login."""
        if self.homes is None:
            return env
        try:
            timeout = homefiles.READ_BUDGET
            if deadline is not None:  # the hook's own budget, what is left of it after the grant
                timeout = min(timeout, deadline - time.monotonic())
            data = self.homes.read(grant.target_uid, timeout=timeout)
            named = awsconfig.names_region(data.decode("utf-8"))
        except homefiles.Unreadable as err:
            if not err.quiet and self.log is not None:
                self.log.decision("skipped", action="own-region", target=grant.target, reason=str(err),
                                  kept="rolegate's region")
            return env
        except UnicodeDecodeError:
            return env  # botocore refuses such a file too
        except Exception as err:  # a bug here must cost the user's region, never the login's credentials
            if self.log is not None:
                self.log.error(f"internal error in the own-region check: {type(err).__name__}")
            return env
        if not named:
            return env
        return {k: v for k, v in env.items() if k not in awsconfig.REGION_VARS}

    def _own_region_now(self, uid):
        """Whether `uid`'s own config names a region, as far as the calling thread can tell at once
        (HomeReader.peek): True, False, or None when only a read through the pool can say."""
        if self.homes is None:
            return False
        try:
            data = self.homes.peek(uid)
        except homefiles.Unreadable as err:
            return False if err.quiet else None  # no file: no region; a refusal: the pool logs it
        if data is None:
            return None
        try:
            return awsconfig.names_region(data.decode("utf-8"))
        except UnicodeDecodeError:
            return False

    def open_session_warm(self, peer, req):
        """open_session answered on the door's loop, or None: a login of a grant that is fresh (live
        or lingering), whose NSS answer is at most RESOLVED_TTL old and whose own config a stat shows
        unchanged. Anything that may wait (NSS, STS, a read of a file) goes to a worker as before."""
        if peer.uid != 0 or req.pid <= 0:
            return None  # refusals and odd requests: the worker's handler answers them
        found = self._resolved.get((req.user, req.service, req.ruser))
        if found is None or time.monotonic() - found[1] > RESOLVED_TTL:
            return None
        ident = found[0]
        own = False
        # Unmapped: no session, so no region to look for. (A reload that maps this login between
        # here and the open's own decision costs that one login the user's region, nothing more.)
        if mapping.decide(self.registry.cfg, ident).rule is not None:
            own = self._own_region_now(ident.target_uid)
            if own is None:
                return None
        facts = mapping.LoginFacts(user=req.user, service=req.service, ruser=req.ruser, rhost=req.rhost,
                                   tty=req.tty)
        return self._open(facts, "pam", req.pid, procs.start_time(req.pid), ident=ident, own=own)

    def _open(self, facts, kind, pid, started, budget=None, sid=None, ident=None, own=None):
        """One login's open. With `ident` (and `own`, the answer about its own region) it is the
        loop's warm open: None when the grant is not warm."""
        reg = self.registry
        deadline = None if budget is None else time.monotonic() + budget
        try:
            if ident is not None:
                opened = reg.open(facts, kind, pid, started, ident=ident, warm_only=True)
                if opened is None:
                    return None
            else:
                ident = reg.resolve(facts)
                if kind == "pam":
                    if len(self._resolved) >= RESOLVED_MAX:
                        self._resolved = {}
                    self._resolved[(facts.user, facts.service, facts.ruser)] = (ident, time.monotonic())
                opened = reg.open(facts, kind, pid, started, budget=budget, sid=sid, ident=ident)
        except mapping.UnknownUser as err:
            return protocol.ErrorReply(protocol.E_UNKNOWN_USER, str(err))
        except StsError as err:
            return protocol.ErrorReply(protocol.E_STS_FAILED, f"{err.code}: {err}")
        except StoreError as err:
            return protocol.ErrorReply(protocol.E_STORE_FAILED, str(err))
        if not opened.granted:
            return protocol.Reply({"granted": False, "env": {}, "reason": opened.reason,
                                   "runtime_dir": reg.cfg.runtime_dir})
        grant = opened.grant
        env = reg.env_for(grant)
        if own:
            env = {k: v for k, v in env.items() if k not in awsconfig.REGION_VARS}
        elif kind == "pam" and own is None:  # a shell's `rolegate env` decides for itself, with the shell's profile
            env = self.own_region_env(grant, env, deadline)
        return protocol.Reply({"granted": True, "session": opened.session.id, "grant": grant.id, "role": grant.role,
                               "env": env, "reason": opened.reason,
                               "expires": iso(grant.credentials.expiration), "runtime_dir": reg.cfg.runtime_dir})

    def open_session(self, peer, req):
        if peer.uid != 0:  # the door is root-only; this holds even if someone loosened its directory
            return self._forbidden(peer, req.ACTION, f"uid {peer.uid} may not open sessions (root/PAM only)")
        if req.pid <= 0:
            return protocol.ErrorReply(protocol.E_BAD_REQUEST, "open_session: pid must name a process (> 0)")
        facts = mapping.LoginFacts(user=req.user, service=req.service, ruser=req.ruser, rhost=req.rhost,
                                   tty=req.tty)
        budget = None
        if req.budget_ms is not None:
            budget = req.budget_ms / 1000.0 - HOOK_MARGIN - (time.monotonic() - peer.arrived)
            if budget <= 0.05:
                return protocol.ErrorReply(protocol.E_BUSY, "no time left in the hook's budget")
        return self._open(facts, "pam", req.pid, procs.start_time(req.pid), budget=budget)

    def close_session(self, peer, req):
        if peer.uid != 0:
            return self._forbidden(peer, req.ACTION, f"uid {peer.uid} may not close sessions (root/PAM only)")
        if req.pid is not None and req.pid <= 0:
            return protocol.ErrorReply(protocol.E_BAD_REQUEST, "close_session: pid must name a process (> 0)")
        pid = None if req.session is not None else (req.pid or peer.pid)
        released = self.registry.close(session_id=req.session, pid=pid)
        return protocol.Reply({"released": released})

    def env(self, peer, req):
        try:
            name = pwd.getpwuid(peer.uid).pw_name
        except KeyError:
            return protocol.ErrorReply(protocol.E_UNKNOWN_USER, f"uid {peer.uid} has no user name")
        # The session lives as long as the shell that asked (the parent of `rolegate env`, which
        # the profile.d snippet runs); a shell that never goes away keeps it, like a PAM session.
        shell = procs.parent(peer.pid) or peer.pid
        started = procs.start_time(shell)
        facts = mapping.LoginFacts(user=name, service=mapping.SHELL_SERVICE)
        try:
            return self._open(facts, "shell", shell, started, sid=f"shell-{peer.uid}-{shell}-{started}")
        except ShellLimit as err:
            return self._forbidden(peer, req.ACTION, str(err))

    def credentials(self, peer, req):
        key, error = self._view_key(peer, req.grant)
        if error is not None:
            return error
        if req.profile is not None:
            return self._named_credentials(peer, req, key)
        grant = self.registry.live_grant(key)
        if grant is None or (peer.uid != 0 and peer.uid != grant.target_uid):
            # The same answer whether the grant exists or is someone else's: no probing.
            if grant is not None:
                self.refusals.refused(peer.uid, peer.pid, action=req.ACTION, grant=key)
            return protocol.ErrorReply(protocol.E_NO_GRANT, f"no live grant {key} for uid {peer.uid}; log in again")
        grant = self.registry.credentials(key)
        if grant is None:  # revoked or moved to another role meanwhile: not what was looked up above
            return protocol.ErrorReply(protocol.E_NO_GRANT, f"no live grant {key} for uid {peer.uid}; log in again")
        return self._credentials_reply(grant)

    # -- elevation on demand: every handler returns at once; the CLI polls ------------------------

    def _view_key(self, peer, key):
        """The login grant a request names, or this shell's own (opened as `env` opens it)."""
        if key is not None:
            return key, None
        reply = self.env(peer, protocol.Env())
        if isinstance(reply, protocol.ErrorReply):
            return None, reply
        if not reply.get("granted"):
            return None, protocol.ErrorReply(protocol.E_NO_GRANT, reply.get("reason"))
        return reply.get("grant"), None

    def _elevation_call(self, peer, action, fn, *args):
        from ..core.elevation import Refusal

        try:
            return protocol.Reply(fn(*args))
        except Refusal as err:
            if err.code in (protocol.E_FORBIDDEN, protocol.E_NO_GRANT):
                self.refusals.refused(peer.uid, peer.pid, action=action, reason=str(err)[:REFUSAL_REASON_MAX])
            return protocol.ErrorReply(err.code, str(err))
        except mapping.UnknownUser as err:
            return protocol.ErrorReply(protocol.E_UNKNOWN_USER, str(err))

    def elevate(self, peer, req):
        """Start an elevation. Every request refused here, before PAM runs (no login, not the
        person's login, no such profile, no reason or a bad one, --for out of range, the back-off,
        the limits), leaves one `denied: action=elevate` line, rate-limited per uid like `refused:`
        lines; what PAM and approvers decide, the core logs when the request ends (never hidden:
        each is an authentication attempt)."""
        from ..core.elevation import Refusal

        key, error = self._view_key(peer, req.grant)
        fields, event = {}, "denied"
        if error is None:
            try:
                return protocol.Reply(self.elevations.start(peer.uid, key, req.profile, req.reason, req.seconds))
            except Refusal as err:
                error, fields = protocol.ErrorReply(err.code, str(err)), err.fields
            except mapping.UnknownUser as err:  # NSS could not say who: not a refusal, a failure
                error, event = protocol.ErrorReply(protocol.E_UNKNOWN_USER, str(err)), "failed"
        principal = fields.pop("principal", None)
        if principal is None:
            try:
                principal = pwd.getpwuid(peer.uid).pw_name
            except KeyError:
                principal = f"uid {peer.uid}"
        # A profile name is at most 64 characters (config.PROFILE_RE); a longer one is cut for the line.
        profile = req.profile if len(req.profile) <= 64 else req.profile[:61] + "..."
        self.refusals.limited(event, peer.uid, action="elevate", principal=principal, uid=peer.uid, pid=peer.pid,
                              profile=profile, reason=str(error.message)[:REFUSAL_REASON_MAX], **fields)
        return error

    def elevation(self, peer, req):
        return self._elevation_call(peer, req.ACTION, self.elevations.poll, peer.uid, req.id, req.answer, False,
                                    req.prompt)

    def elevation_cancel(self, peer, req):
        return self._elevation_call(peer, req.ACTION, self.elevations.poll, peer.uid, req.id, None, True)

    def approve(self, peer, req):
        return self._elevation_call(peer, req.ACTION, self.elevations.approve, peer.uid, req.id)

    def deny(self, peer, req):
        return self._elevation_call(peer, req.ACTION, self.elevations.approve, peer.uid, req.id, True)

    def approvals(self, peer, req):
        return protocol.Reply({"pending": self.elevations.pending_for(peer.uid)})

    def drop(self, peer, req):
        key, error = self._view_key(peer, req.grant)
        if error is not None:
            return error
        ended = self.registry.drop(key, peer.uid, req.profile)
        if ended is None:
            return protocol.ErrorReply(protocol.E_NO_GRANT, f"no elevation {req.profile!r} in force in grant {key} "
                                                            f"for uid {peer.uid}")
        return protocol.Reply({"dropped": ended.profile, "role": ended.role})

    def _named_credentials(self, peer, req, key):
        """A named profile's credential_process: obtained on first use (docs/profiles-and-elevation.md "Several roles per
        person"). One answer for a grant that is not the caller's, not live, or names no such
        profile: nobody learns about another user's grants by asking."""
        try:
            grant = self.registry.named(key, req.profile, peer.uid, SDK_MIN_LEFT)
        except mapping.UnknownUser as err:
            return protocol.ErrorReply(protocol.E_UNKNOWN_USER, str(err))
        except StsError as err:
            return protocol.ErrorReply(protocol.E_STS_FAILED, f"{err.code}: {err}")
        if grant is None:
            view = self.registry.live_grant(key)
            if view is not None and peer.uid not in (0, view.target_uid):
                self.refusals.refused(peer.uid, peer.pid, action=req.ACTION, grant=key)
            return protocol.ErrorReply(protocol.E_NO_GRANT, f"no profile {req.profile!r} in a live grant {key} for "
                                                            f"uid {peer.uid}; `rolegate profiles` lists yours")
        return self._credentials_reply(grant)

    def _credentials_reply(self, grant):
        c = grant.credentials
        return protocol.Reply({"Version": 1, "AccessKeyId": c.access_key_id, "SecretAccessKey": c.secret_access_key,
                               "SessionToken": c.session_token, "Expiration": iso(c.expiration)})

    def status(self, peer, req):
        reg = self.registry
        grants, sessions, lingering = reg.snapshot(None if peer.uid == 0 else peer.uid)
        now = reg.now_dt()
        counts = {}
        for s in sessions:
            counts[s.grant_id] = counts.get(s.grant_id, 0) + 1
        entries = [{"grant": g.id, "principal": g.principal, "target": g.target, "role": g.role,
                    "expires": iso(g.credentials.expiration), "seconds_left": int(g.credentials.seconds_left(now)),
                    "next_refresh": iso(epoch_to_dt(g.next_refresh)), "failures": g.failures,
                    "sessions": counts.get(g.id, 0), "service": g.service,
                    "profile": g.profile, "profiles": [list(p) for p in g.profiles],
                    # lingering: no session and no files; held in memory for the next login or IMDS call
                    "state": "lingering" if g.id in lingering else "live",
                    "path": None if g.id in lingering else reg.pointer(g)[1]}
                   for g in sorted(grants, key=lambda g: g.id)]
        elevations = {e.grant_id: e for e in reg.elevations(None if peer.uid == 0 else peer.uid)}
        for entry in entries:
            e = elevations.get(entry["grant"])
            if e is not None:
                entry["elevation"] = {"id": e.id, "reason": e.reason, "until": iso(epoch_to_dt(e.until)),
                                      "seconds_left": max(int(e.until - reg.clock()), 0),
                                      "approved_by": e.approved_by}
        listed = []
        if peer.uid == 0:  # sessions name processes and hosts: root's to see
            listed = [{"id": s.id, "grant": s.grant_id, "kind": s.kind, "pid": s.pid, "service": s.service,
                       "rhost": s.rhost, "tty": s.tty} for s in sessions]
        return protocol.Stream({"delivery": reg.cfg.delivery, "runtime_dir": reg.cfg.runtime_dir},
                               {"grants": entries, "sessions": listed})
