"""The grant registry: grants and sessions with their indexes, single-flight STS calls, linger.

No sockets, no HTTP, no boto3: the doors call this API, lifecycle drives refresh, expiry and
reaping through it, and every change is reported to the listeners it was handed (records
journals them, lifecycle schedules and watches). Nothing on a login's path here costs more
with the number of live sessions: each lookup goes through an index.

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
"""

import dataclasses
import hashlib
import os
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional, Tuple

from ..rules import mapping, names
from ..rules.config import MIN_REFRESH_INTERVAL
from ..hookside import procs
from ..backends import store
from ..errors import StoreError, StsError
from ..hookside.protocol import CONTAINER_TOKEN_VAR, CONTAINER_URI_VAR
from ..backends.sts import AssumeRequest, Credentials, build_request

# credential_process callers need more than this left, or SDKs call again on every request.
SDK_MIN_LEFT = 15 * 60
# Worth handing out while STS fails: at least this much validity left.
USABLE_LEFT = 60
MAX_SHELL_SESSIONS_PER_UID = 32
# delivery container: where the endpoint serves each grant.
CONTAINER_PATH = "/rolegate/credentials/"
# A background (IMDS) grant stays in memory at least this long, linger 0 or not: an SDK asks for
# the role name, then its credentials, and both answers should come from one AssumeRole.
BACKGROUND_MIN_HOLD = 60
# Refresh retries after a failure wait 5 s, 10 s, ... up to this.
BACKOFF_MAX = 300


@dataclass(frozen=True)
class Session:
    id: str
    grant_id: str
    kind: str  # "pam" or "shell"
    pid: int  # the PAM process, or the shell's session leader
    started: Optional[int]  # that process's start time, so a reused pid is not mistaken for it
    service: str
    opened_at: float
    rhost: Optional[str] = None
    tty: Optional[str] = None
    uid: Optional[int] = None  # the account the session runs as (the grant's target)


@dataclass(frozen=True)
class Grant:
    id: str
    principal: str
    principal_uid: int
    target: str
    target_uid: int
    target_gid: int
    service: str  # the service that created it: the one re-checked against the rules at refresh
    rhost: Optional[str]
    role: str
    request: AssumeRequest
    credentials: Credentials
    next_refresh: float
    failures: int = 0
    token: Optional[str] = None  # delivery container: what the endpoint asks of this grant's callers
    profile: Optional[str] = None  # a named profile's grant (memory only); None: a login's default
    # A default grant's named profiles, ((name, role), ...): the sections its files carry.
    profiles: Tuple[Tuple[str, str], ...] = ()
    # When its credentials came from STS (epoch; None in 0.3.0's records and older): a reschedule's
    # least refresh interval counts from here, not from the reschedule.
    issued: Optional[float] = None
    # 0.3.0's process delivery: sessions begun before the upgrade point AWS_CONFIG_FILE at
    # grants/ID/config, written with the grant's files until its last session ends (restore()
    # finds these grants by that file).
    legacy_config: bool = False


@dataclass(frozen=True)
class Elevated:
    """One elevation in force: profile `profile` of the login grant `view`, held as grant `grant_id`
    (memory only, never refreshed) until `until`."""

    id: str
    view: str
    profile: str
    grant_id: str
    role: str
    principal: str
    target_uid: int
    reason: str
    until: float
    approved_by: Optional[str] = None


@dataclass(frozen=True)
class Opened:
    """What an open gave: no rule (granted False, reason), or a session on a grant."""

    granted: bool
    reason: str
    session: Optional[Session] = None
    grant: Optional[Grant] = None
    new: bool = False  # False when an existing session (a shell asking again) was found


class Listener:
    """What the registry tells about each change; called with the registry's lock held, so fast."""

    def grant_saved(self, grant):
        pass

    def grant_dropped(self, grant_id):
        pass

    def grant_lingering(self, grant, until):
        pass

    def session_opened(self, session):
        pass

    def session_closed(self, session, last_of_pid):
        pass


class ShellLimit(Exception):
    pass


class _RulesChanged(Exception):
    """Credentials came back from STS after a reload took the rule they were asked under (or
    revoked their grant): they were dropped unwritten. The caller's login gets nothing."""


class _Flight:
    """One STS call in progress for a grant; followers wait for the leader's result."""

    __slots__ = ("done", "grant", "error")

    def __init__(self):
        self.done = threading.Event()
        self.grant = None
        self.error = None


def grant_id(target_uid, principal, service, profile=None):
    """Where a login's credentials live: the same for every role the rules give it over time."""
    digest = hashlib.sha256(f"{target_uid}\0{principal}\0{service}\0{profile or ''}".encode()).hexdigest()[:12]
    return f"{target_uid}-{names.sts_name(principal)}-{digest}"


def profile_sections(rules):
    """((name, role), ...) of a decision's named profiles: what a grant's files carry."""
    return tuple((name, rule.role) for name, rule in rules)


def iso(dt):
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ") if dt else None


def epoch_to_dt(ts):
    return datetime.fromtimestamp(ts, timezone.utc)


class Registry:
    def __init__(self, cfg, engine, credential_store, log, clock=time.time, rolegate_cmd=None, listeners=()):
        self.cfg = cfg
        self.engine = engine
        self.store = credential_store
        self.log = log
        self.clock = clock
        self.rolegate_cmd = rolegate_cmd or os.path.join(os.path.dirname(sys.executable), "rolegate")
        self.listeners = list(listeners)
        self._lock = threading.RLock()
        self._grants = {}  # id -> Grant (live and lingering)
        self._sessions = {}  # id -> Session
        self._by_grant = {}  # grant id -> set of session ids
        self._by_pid = {}  # pid -> set of session ids
        self._by_uid = {}  # uid (target or principal) -> set of grant ids: what `status` shows a user
        self._shells = {}  # uid -> set of shell session ids
        self._lingering = {}  # grant id -> until (epoch): kept in memory, files removed
        self._inflight = {}  # grant id -> _Flight
        self._pending = {}  # grant id -> opens/refreshes in progress (keeps the grant from release)
        self._revoked = set()  # revoked while held: released without linger when let go
        # grant id -> the role the rules moved its login to: no files, nothing handed out, until
        # the grant holds that role
        self._moving = {}
        self._elevated = {}  # login grant id -> {profile: Elevated}
        self._elevated_by_grant = {}  # elevated grant id -> Elevated
        # Bumped by every reconfigure. A decision carries the generation it was made under, so
        # what it obtains outside the lock (an STS call) is checked against the rules in force
        # when it comes back: recheck cannot see a grant whose first AssumeRole is still out.
        self._generation = 0
        self._host = None

    # -- small helpers -----------------------------------------------------------------------

    def _tell(self, event, *args):
        for listener in self.listeners:
            getattr(listener, event)(*args)

    @property
    def host(self):
        if self._host is None:
            facts = self.engine.host_facts()
            if facts.instance_id or self.cfg.source.kind != "instance-profile":
                self._host = facts  # a failed instance-id lookup is asked again next time
            return facts
        return self._host

    def now_dt(self):
        return epoch_to_dt(self.clock())

    def schedule(self, creds, issued=None):
        """When to refresh: refresh_before ahead of expiry, less a little jitter, never in the past.
        `issued`: when STS gave `creds` (None: just now)."""
        now = self.clock()
        rb = self.cfg.session.refresh_before
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

    def pointer(self, grant):
        """(variable, path) through which a session finds this grant, by delivery. Never
        AWS_CONFIG_FILE: the user's own config (profiles, region, output, chains) stays in use."""
        if self.cfg.delivery == "container":
            return CONTAINER_TOKEN_VAR, self.store.path(grant.id, store.TOKEN)
        return "AWS_SHARED_CREDENTIALS_FILE", self.store.path(grant.id, store.CREDENTIALS)

    def container_uri(self, grant):
        return f"http://127.0.0.1:{self.cfg.container_port}{CONTAINER_PATH}{grant.id}"

    def env_for(self, grant):
        var, path = self.pointer(grant)
        env = {"AWS_REGION": self.cfg.region, "AWS_DEFAULT_REGION": self.cfg.region, var: path}
        if self.cfg.delivery == "container":
            env[CONTAINER_URI_VAR] = self.container_uri(grant)
            # The named profiles' sections: a credentials file with no [default], so the default
            # still comes from the endpoint. Set whether or not the rules name profiles now, so
            # ones a reload adds reach this session too.
            env["AWS_SHARED_CREDENTIALS_FILE"] = self.store.path(grant.id, store.CREDENTIALS)
        return env

    def _named_commands(self, grant):
        return [(name, f"{self._command(grant)} --profile {name}") for name, _role in grant.profiles]

    def _write_files(self, grant):
        named = self._named_commands(grant)
        if self.cfg.delivery == "container":
            self.store.write(grant.id, store.TOKEN, grant.token.encode(), grant.target_uid, grant.target_gid)
            self.store.write(grant.id, store.CREDENTIALS, store.credentials_ini(None, named),
                             grant.target_uid, grant.target_gid)
        elif self.cfg.delivery == "process":
            self.store.write(grant.id, store.CREDENTIALS, store.credentials_ini(None, named, self._command(grant)),
                             grant.target_uid, grant.target_gid)
        else:
            self.store.write(grant.id, store.CREDENTIALS, store.credentials_ini(grant.credentials, named),
                             grant.target_uid, grant.target_gid)
        if grant.legacy_config:
            self.store.write(grant.id, store.AWS_CONFIG,
                             store.process_config_ini(self.cfg.region, self._command(grant), named),
                             grant.target_uid, grant.target_gid)

    def _command(self, grant):
        """The credential_process that fetches this grant's default profile."""
        return f"{self.rolegate_cmd} credentials --grant {grant.id}"

    def _fresh(self, grant):
        return grant.credentials.seconds_left(self.now_dt()) > self.cfg.session.refresh_before

    def _still_usable(self, grant):
        return grant is not None and grant.credentials.seconds_left(self.now_dt()) > USABLE_LEFT

    def _rules(self):
        """(config, generation) in force, read together: what a decision is made under."""
        with self._lock:
            return self.cfg, self._generation

    def _check_still_given(self, key, ident, rule, decided):
        """Raise _RulesChanged unless grant `key` stands and the rules in force still give `ident`
        the role `rule` (chosen under generation `decided`) gave it, for the same profile. Pure:
        the identity was resolved before; lock held."""
        if key in self._revoked or self._moving.get(key, rule.role) != rule.role:
            raise _RulesChanged(key)
        if decided != self._generation:
            now = mapping.profile_rule(self.cfg, ident, rule.profile)
            if now is None or now.role != rule.role:
                raise _RulesChanged(key)

    def _unmapped_midway(self, ident, service):
        """The one `denied` line for a login (or IMDS request) the rules stopped mapping while it
        was under way; the Opened a login gets."""
        self.log.decision("denied", principal=ident.principal, target=ident.target, service=service,
                          reason="the rules changed during the login")
        return Opened(False, "the rules no longer map this login (a reload changed them during it)")

    def _hold(self, key):
        self._pending[key] = self._pending.get(key, 0) + 1

    def _unhold(self, key):
        self._pending[key] -= 1
        if not self._pending[key]:
            del self._pending[key]

    # -- indexes (lock held) -------------------------------------------------------------------

    def _put_grant(self, grant):
        self._grants[grant.id] = grant
        for uid in (grant.target_uid, grant.principal_uid):
            self._by_uid.setdefault(uid, set()).add(grant.id)
        self._tell("grant_saved", grant)

    def _pop_grant(self, key):
        grant = self._grants.pop(key, None)
        self._lingering.pop(key, None)
        self._moving.pop(key, None)
        if grant is not None:
            for uid in (grant.target_uid, grant.principal_uid):
                ids = self._by_uid.get(uid)
                if ids is not None:
                    ids.discard(key)
                    if not ids:
                        del self._by_uid[uid]
            self._tell("grant_dropped", key)
        elevation = self._elevated_by_grant.pop(key, None)
        if elevation is not None:  # its section leaves the login's files with it
            of_view = self._elevated.get(elevation.view, {})
            of_view.pop(elevation.profile, None)
            if not of_view:
                self._elevated.pop(elevation.view, None)
            self._unname(elevation.view, {elevation.profile})
        self._drop_elevations_of(key, "its login ended")
        return grant

    def _drop_elevations_of(self, key, reason):
        """End every elevation of login grant `key` (lock held): its last session ended, or it went."""
        for elevation in list(self._elevated.get(key, {}).values()):
            self._pop_grant(elevation.grant_id)
            self._ended(elevation, "dropped", reason)

    def _put_session(self, session):
        self._sessions[session.id] = session
        self._by_grant.setdefault(session.grant_id, set()).add(session.id)
        self._by_pid.setdefault(session.pid, set()).add(session.id)
        if session.kind == "shell":
            self._shells.setdefault(session.uid, set()).add(session.id)
        self._tell("session_opened", session)

    def _pop_session(self, sid):
        session = self._sessions.pop(sid)
        for index, key in ((self._by_grant, session.grant_id), (self._by_pid, session.pid),
                           (self._shells if session.kind == "shell" else None, session.uid)):
            if index is None:
                continue
            ids = index.get(key)
            if ids is not None:
                ids.discard(sid)
                if not ids:
                    del index[key]
        self._tell("session_closed", session, session.pid not in self._by_pid)
        return session

    # -- obtaining credentials (single flight) ------------------------------------------------

    def _obtain(self, key, ident, rule, rhost, decided, profiles=(), budget=None, force=False, write=True,
                again=False, tags=(), duration=None):
        """Grant `key` holding `rule`'s role: reused while fresh and still that role, else one
        AssumeRole however many ask. New credentials go to the grant's files when it has sessions,
        or `write` asks (a login). `decided` is the generation `rule` was chosen under: credentials
        that come back after a reload took that rule, or revoked the grant, are dropped unwritten
        (raises _RulesChanged). `profiles`: the named profiles its files name (profile_sections)."""
        with self._lock:
            current = held = self._grants.get(key)
            if current is not None and current.role != rule.role:
                current = None  # the rules moved this login: what it held is never handed out again
            if current is not None and not force and self._fresh(current):
                full = self._sections(key, profiles)
                if current.profiles == full:
                    return current
                return self._renamed(current, full)
            flight = self._inflight.get(key)
            leader = flight is None
            if leader:
                flight = self._inflight[key] = _Flight()
        if not leader:
            waited = time.monotonic()
            if not flight.done.wait(budget if budget is not None else self.cfg.sts_timeout + 1):
                raise StsError("waited too long for another login's STS call for the same grant")
            other_role = flight.grant is not None and flight.grant.role != rule.role
            if (isinstance(flight.error, _RulesChanged) or other_role) and not again:
                # The reload took the leader's rule, not necessarily this caller's (decided under
                # the new rules), or the leader asked for the role the rules gave before: this
                # caller asks STS itself, once, within what is left of its budget.
                left = None if budget is None else budget - (time.monotonic() - waited)
                return self._obtain(key, ident, rule, rhost, decided, profiles, left, force, write, again=True,
                                    tags=tags, duration=duration)
            if flight.error is not None:
                raise flight.error
            if other_role:
                raise _RulesChanged(key)
            return flight.grant
        try:
            if not force and current is not None and current.failures and self._still_usable(current):
                # STS is failing (the refresher is backing off): hand out what is still valid
                # rather than spend this login's budget on another failing call.
                flight.grant = current
                return current
            request = build_request(self.cfg, rule, ident, rhost=rhost, host=self.host)
            if tags or duration:  # an elevation's: its reason and length
                request = dataclasses.replace(request, tags=request.tags + tuple(tags),
                                              duration=duration or request.duration)
            try:
                creds = self.engine.assume(request, budget=budget)
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
                profile=rule.profile, profiles=self._sections(key, profiles),
                legacy_config=held is not None and held.legacy_config)
            with self._lock:
                self._check_still_given(key, ident, rule, decided)
                # A lingering grant has no files until a session revives it; a background
                # grant (IMDS) has none unless logins share it.
                files = key not in self._lingering and (write or bool(self._by_grant.get(key)))
            if files:
                self._write_files(grant)
            with self._lock:
                try:
                    # Again: a reload may have moved or unmapped this login while the files were
                    # written (outside the lock). Then what was just written is taken back.
                    self._check_still_given(key, ident, rule, decided)
                except _RulesChanged:
                    if files:
                        self._remove_files(key)
                    raise
                if self._moving.get(key) == rule.role:
                    del self._moving[key]  # the move is done: the doors may hand this grant out
                sections = self._sections(key, profiles)
                if sections != grant.profiles:  # an elevation began or ended while STS answered
                    grant = dataclasses.replace(grant, profiles=sections)
                    if files:
                        self._write_files(grant)
                self._put_grant(grant)
            flight.grant = grant
            return grant
        except BaseException as err:
            flight.error = err
            raise
        finally:
            with self._lock:
                self._inflight.pop(key, None)
            flight.done.set()

    def _remove_files(self, key):
        try:
            self.store.remove(key)
        except OSError as err:
            self.log.error(f"could not remove grant {key}: {err}")

    def _sections(self, key, named):
        """The sections grant `key`'s files carry: the rules' named profiles, then its elevations."""
        with self._lock:
            elevated = tuple((p, e.role) for p, e in self._elevated.get(key, {}).items() if p not in dict(named))
        return tuple(named) + elevated

    def _unname(self, view_key, ended):
        """Take the sections of profiles `ended` out of login grant `view_key`'s files (lock held).
        Best effort: on a full tmpfs the stale section's command is refused by the broker anyway."""
        view = self._grants.get(view_key)
        if view is None or not ended & set(dict(view.profiles)):
            return
        try:
            self._renamed(view, tuple(p for p in view.profiles if p[0] not in ended))
        except (OSError, StoreError) as err:
            self.log.error(f"could not rewrite grant {view_key}'s files: {err}")

    def _renamed(self, grant, profiles):
        """`grant` naming `profiles` in its files from now on (the rules changed its named profiles;
        its role stands). Lock held; the files are rewritten now when it has any."""
        grant = dataclasses.replace(grant, profiles=profiles)
        self._put_grant(grant)
        if self._by_grant.get(grant.id) and grant.id not in self._lingering:
            self._write_files(grant)
        return grant

    # -- the doors' API ------------------------------------------------------------------------

    def open(self, facts, kind, pid, started, budget=None, sid=None):
        """Resolve, decide, obtain and record one session. Raises mapping.UnknownUser, StsError,
        StoreError or ShellLimit; returns Opened."""
        try:
            ident = mapping.resolve(facts)
        except mapping.UnknownUser as err:
            self.log.decision("denied", user=facts.user, service=facts.service, reason=str(err))
            raise
        cfg, decided = self._rules()
        decision = mapping.decide(cfg, ident)
        if decision.rule is None:
            self.log.decision("denied", principal=ident.principal, target=ident.target, service=facts.service,
                              reason="no rule matches")
            return Opened(False, decision.reason)
        rule = decision.rule
        key = grant_id(ident.target_uid, ident.principal, ident.service)
        with self._lock:
            existing = self._sessions.get(sid) if sid else None
            if kind == "shell" and existing is None:
                self._make_room_for_shell(ident.target_uid)
            self._hold(key)
        linger = True
        try:
            grant = self._obtain(key, ident, rule, facts.rhost, decided, profile_sections(decision.profiles),
                                 budget=budget)
            with self._lock:
                # A reload may have unmapped this login while it was under way (the grant may
                # have been fresh, so no STS call checked): then no session, and the release
                # below (when this login was the last holder) removes the grant, without linger.
                self._check_still_given(key, ident, rule, decided)
                if self._lingering.pop(key, None) is not None:
                    self._write_files(self._grants[key])  # revived: the files were removed at release
                if existing is not None and existing.grant_id == key:
                    return Opened(True, decision.reason, existing, grant, new=False)
                session = Session(id=sid or secrets.token_hex(8), grant_id=key, kind=kind, pid=pid,
                                  started=started, service=facts.service, opened_at=self.clock(),
                                  rhost=facts.rhost, tty=facts.tty, uid=ident.target_uid)
                if existing is not None:  # the shell's mapping changed: move it to the new grant
                    self._pop_session(existing.id)
                    self._release_if_unused(existing.grant_id, "released")
                self._put_session(session)
        except _RulesChanged:
            linger = False
            return self._unmapped_midway(ident, facts.service)
        except Exception as err:
            self._failed(ident, rule, facts.service, err)
            raise
        finally:
            with self._lock:
                self._unhold(key)
                self._release_if_unused(key, "released", linger=linger)
        self.log.decision("granted", principal=ident.principal, target=ident.target, role=rule.role,
                          service=facts.service, session=session.id, grant=key, rule=rule.index,
                          key=grant.credentials.masked_key, expires=iso(grant.credentials.expiration),
                          rhost=facts.rhost, tty=facts.tty, pid=pid)
        return Opened(True, decision.reason, session, grant, new=True)

    def _failed(self, ident, rule, service, err):
        """The one `failed` line for a login or IMDS request that got no credentials (STS errors
        carry their code)."""
        self.log.decision("failed", principal=ident.principal, target=ident.target, role=rule.role,
                          service=service, code=getattr(err, "code", None), reason=str(err))

    def rule_for(self, facts):
        """The rule the config gives these login facts (None: no rule). No STS call."""
        return mapping.decide(self.cfg, mapping.resolve(facts)).rule

    def background(self, facts, min_left):
        """The grant for a process outside any login (the IMDS door): the caller's own account, no
        session, no files; between requests it lingers like a released grant. None when no rule
        maps the caller. What it returns has at least `min_left` seconds of validity."""
        ident = mapping.resolve(facts)
        cfg, decided = self._rules()
        rule = mapping.decide(cfg, ident).rule
        if rule is None:
            return None
        key = grant_id(ident.target_uid, ident.principal, ident.service)
        return self._in_memory(key, ident, rule, facts.rhost, decided, min_left)

    def named(self, view_key, profile, uid, min_left):
        """Named profile `profile` of the live grant `view_key` (the login whose files name it),
        for `uid` (its target account, or root): obtained on first use, then held in memory only,
        lingering between uses like a background grant. None when that grant is not live, not
        `uid`'s, or the rules in force give its login no such profile; the caller cannot tell
        which (no probing of other people's grants)."""
        view = self.view(view_key, uid)
        if view is None:
            return None
        with self._lock:
            elevation = self._elevated.get(view_key, {}).get(profile)
            if elevation is not None:  # held until `until`, never refreshed: hand out what there is
                grant = self._grants.get(elevation.grant_id)
                return grant if grant is not None and elevation.until > self.clock() else None
        ident = mapping.resolve(self._facts_of(view))
        cfg, decided = self._rules()
        rule = dict(mapping.named_profiles(cfg, ident)).get(profile)  # never an on-demand one: elevate gives those
        if rule is None:
            return None
        key = grant_id(ident.target_uid, ident.principal, ident.service, profile)
        return self._in_memory(key, ident, rule, view.rhost, decided, min_left)

    def view(self, view_key, uid):
        """The live login grant `view_key` with sessions on it, when `uid` may use it (its target
        account, or root); else None."""
        with self._lock:
            view = self.live_grant(view_key) if self._by_grant.get(view_key) else None
        if view is None or view.profile is not None or uid not in (0, view.target_uid):
            return None
        return view

    @staticmethod
    def _facts_of(grant):
        return mapping.LoginFacts(user=grant.target, service=grant.service, rhost=grant.rhost,
                                  ruser=grant.principal if grant.principal != grant.target else None)

    def on_demand_rule(self, view, profile):
        """(rule, identity, generation) for on-demand profile `profile` of login grant `view` by the
        rules in force (rule None: they give its login no such profile). Asks NSS."""
        ident = mapping.resolve(self._facts_of(view))
        cfg, decided = self._rules()
        return dict(mapping.named_profiles(cfg, ident, on_demand=True)).get(profile), ident, decided

    def elevate(self, view_key, uid, profile, reason, seconds, elevation_id, approved_by=None, expected=None):
        """AssumeRole for on-demand profile `profile` of login grant `view_key`, with the reason and
        the elevation in its session tags, for `seconds`; then held in memory, named in the login's
        files, until it expires, is dropped, or the login's last session ends. Returns Elevated, or
        None when the grant is gone or the rules no longer give the profile. Raises StsError."""
        view = self.view(view_key, uid)
        if view is None:
            return None
        rule, ident, decided = self.on_demand_rule(view, profile)
        if rule is None or (expected is not None and (rule.role, rule.elevate) != (expected.role, expected.elevate)):
            return None  # the rules changed since the person was asked (another role, approvers, max)
        key = grant_id(ident.target_uid, ident.principal, ident.service, profile)
        tags = ((names.ELEVATED_TAG, "true"), (names.REASON_TAG, reason))
        with self._lock:
            self._hold(key)
        try:
            grant = self._obtain(key, ident, rule, view.rhost, decided, force=True, write=False, tags=tags,
                                 duration=seconds)
            with self._lock:
                if self.view(view_key, uid) is None:  # the last session ended meanwhile: nothing to keep
                    self._pop_grant(key)
                    return None
                until = grant.credentials.expiration.timestamp() if grant.credentials.expiration else \
                    self.clock() + seconds
                old = self._elevated.get(view_key, {}).get(profile)
                if old is not None and old.grant_id != key:
                    self._pop_grant(old.grant_id)
                elevation = Elevated(id=elevation_id, view=view_key, profile=profile, grant_id=key, role=rule.role,
                                     principal=ident.principal, target_uid=ident.target_uid, reason=reason,
                                     until=until, approved_by=approved_by)
                self._elevated.setdefault(view_key, {})[profile] = elevation
                self._elevated_by_grant[key] = elevation
                self._lingering[key] = until  # lifecycle's expire() ends it then
                self._tell("grant_lingering", grant, until)
                current = self._grants.get(view_key)
                if current is not None and profile not in dict(current.profiles):
                    self._renamed(current, current.profiles + ((profile, rule.role),))
            return elevation
        except _RulesChanged:
            return None
        finally:
            with self._lock:
                self._unhold(key)
                self._release_if_unused(key, "released", linger=False)

    def drop(self, view_key, uid, profile, event="dropped", reason="rolegate drop"):
        """End elevation `profile` of login grant `view_key` now (uid: its account or root). Returns
        the Elevated it ended, or None."""
        with self._lock:
            elevation = self._elevated.get(view_key, {}).get(profile)
            if elevation is None or uid not in (0, elevation.target_uid):
                return None
            self._pop_grant(elevation.grant_id)
        self._ended(elevation, event, reason)
        return elevation

    def _ended(self, elevation, event, reason):
        self.log.decision(event, principal=elevation.principal, profile=elevation.profile, role=elevation.role,
                          elevation=elevation.id, reason=reason)

    def elevations(self, uid=None):
        """Elevations in force that `uid` may see (None: all)."""
        with self._lock:
            return [e for of_view in self._elevated.values() for e in of_view.values()
                    if uid is None or uid == e.target_uid]

    def _in_memory(self, key, ident, rule, rhost, decided, min_left):
        """Grant `key` for a caller outside any session's files (IMDS, a named profile): obtained
        or reused, with at least `min_left` seconds left, then kept in memory for
        max(linger, BACKGROUND_MIN_HOLD) past this use (never past its refresh time)."""
        service = ident.service
        with self._lock:
            before = self._grants.get(key)
            self._hold(key)
        linger = True
        try:
            grant = self._obtain(key, ident, rule, rhost, decided, write=False)
            # Never more than half a session's life: a role whose sessions last 15 minutes must
            # not be assumed anew at every call for an SDK's 15-minute margin.
            if grant.credentials.seconds_left(self.now_dt()) < min(min_left, grant.request.duration / 2):
                grant = self._obtain(key, ident, rule, rhost, decided, force=True, write=False)
            with self._lock:
                self._check_still_given(key, ident, rule, decided)
                if not self._by_grant.get(key):  # nobody logged in holds it: keep it in memory only
                    hold = max(self.cfg.session.linger, BACKGROUND_MIN_HOLD)
                    until = max(self.clock() + hold, self._lingering.get(key, 0))
                    self._lingering[key] = min(until, grant.next_refresh)
                    self._tell("grant_lingering", grant, self._lingering[key])
        except _RulesChanged:
            linger = False
            self._unmapped_midway(ident, service)
            return None
        except Exception as err:
            self._failed(ident, rule, service, err)
            raise
        finally:
            with self._lock:
                self._unhold(key)
                self._release_if_unused(key, "released", linger=linger)
        if before is None or before.credentials != grant.credentials:
            self.log.decision("granted", principal=ident.principal, target=ident.target, role=rule.role,
                              service=service, profile=rule.profile, action="profile" if rule.profile else None,
                              grant=key, rule=rule.index,
                              key=grant.credentials.masked_key, expires=iso(grant.credentials.expiration))
        return grant

    def _make_room_for_shell(self, uid):
        """Refuse a uid's shell past the cap, after forgetting its shells that have died (lock held)."""
        shells = self._shells.get(uid, ())
        if len(shells) < MAX_SHELL_SESSIONS_PER_UID:
            return
        for sid in [s for s in shells if not procs.alive(self._sessions[s].pid, self._sessions[s].started)]:
            self._drop_session(sid, "reaped")
        count = len(self._shells.get(uid, ()))
        if count >= MAX_SHELL_SESSIONS_PER_UID:
            raise ShellLimit(f"uid {uid} already has {count} live shell sessions (limit {MAX_SHELL_SESSIONS_PER_UID})")

    def close(self, session_id=None, pid=None):
        """End a PAM session by id, or every PAM session of a process. Returns how many ended."""
        with self._lock:
            if session_id is not None:
                ids = [session_id] if session_id in self._sessions else []
            else:
                ids = [s for s in self._by_pid.get(pid, ()) if self._sessions[s].kind == "pam"]
            for sid in ids:
                self._drop_session(sid, "released")
        return len(ids)

    def live_grant(self, key):
        """The grant with files in place (not lingering, not revoked), or None."""
        with self._lock:
            if key in self._lingering or key in self._revoked or key in self._moving:
                return None
            return self._grants.get(key)

    def credentials(self, key):
        """The live grant `key`, refreshed first when an SDK would find it too close to expiry."""
        grant = self.live_grant(key)
        if grant is None:
            return None
        if grant.credentials.seconds_left(self.now_dt()) <= SDK_MIN_LEFT + 60 \
                and grant.request.duration > SDK_MIN_LEFT + 120 and grant.next_refresh <= self.clock():
            # A refresh that failed leaves the old credentials to serve; one that found the grant
            # revoked leaves nothing.
            grant = self.refresh(key) or self.live_grant(key)
        return grant

    def snapshot(self, uid=None):
        """(grants, sessions, lingering ids) that `uid` may see (None: all), copied under the lock."""
        with self._lock:
            keys = list(self._grants) if uid is None else list(self._by_uid.get(uid, ()))
            grants = [self._grants[k] for k in keys]
            sessions = [self._sessions[s] for k in keys for s in self._by_grant.get(k, ())]
            lingering = {k for k in keys if k in self._lingering}
        return grants, sessions, lingering

    def counts(self):
        with self._lock:
            return {"grants": len(self._grants) - len(self._lingering), "lingering": len(self._lingering),
                    "sessions": len(self._sessions)}

    def consistent(self, fn):
        """fn(grants, sessions) called under the lock (records' snapshot for compaction)."""
        with self._lock:
            return fn(dict(self._grants), dict(self._sessions))

    # -- lifecycle's API -------------------------------------------------------------------------

    def _drop_session(self, sid, event, reason=None):
        """Forget a session (lock held); release its grant when no session is left."""
        session = self._pop_session(sid)
        grant = self._grants.get(session.grant_id)
        self.log.decision(event, session=sid, kind=session.kind, pid=session.pid, service=session.service,
                          principal=grant.principal if grant else None, grant=session.grant_id, reason=reason)
        self._release_if_unused(session.grant_id, event)

    def _release_if_unused(self, key, event, linger=True):
        """Remove a grant's files once nothing holds it; keep its credentials lingering if allowed."""
        if self._by_grant.get(key) or self._pending.get(key) or key in self._lingering:
            return False
        grant = self._grants.get(key)
        self._drop_elevations_of(key, "the last session ended")
        try:
            removed = self.store.remove(key)
        except OSError as err:
            self.log.error(f"could not remove grant {key}: {err}")
            removed = False
        until = None
        if key in self._revoked:
            self._revoked.discard(key)
            linger = False
        if key in self._moving:
            linger = False  # the rules took its role: nothing of it is kept for a next login
        if grant is not None and linger and self.cfg.session.linger and not grant.failures:
            until = min(self.clock() + self.cfg.session.linger, grant.next_refresh)
            if until <= self.clock():
                until = None
        if until is not None:
            if grant.legacy_config:  # its sessions from before the upgrade have ended
                grant = dataclasses.replace(grant, legacy_config=False)
                self._put_grant(grant)
            self._lingering[key] = until
            self._tell("grant_lingering", grant, until)
        else:
            self._pop_grant(key)
        if grant is not None or removed:
            self.log.decision(event, grant=key, principal=grant.principal if grant else None,
                              role=grant.role if grant else None, files="removed",
                              linger_until=iso(epoch_to_dt(until)) if until else None)
        return True

    def next_due(self, key):
        """When lifecycle should next look at grant `key` (refresh or linger end), or None."""
        with self._lock:
            grant = self._grants.get(key)
            if grant is None:
                return None
            return self._lingering.get(key, grant.next_refresh)

    def expire(self, key):
        """End a grant's linger once it is due (its memory-only credentials are forgotten)."""
        with self._lock:
            until = self._lingering.get(key)
            if until is None or until > self.clock():
                return False
            if self._pending.get(key):
                # A login found it fresh and is about to revive it: forgetting it now would leave
                # that session on a grant with no file. Should the login fail instead, the grant's
                # refresh-time entry (never later than its linger) ends the linger then.
                return False
            elevation = self._elevated_by_grant.get(key)
            self._pop_grant(key)
            if elevation is not None:
                self._ended(elevation, "expired", f"its time ran out ({iso(epoch_to_dt(elevation.until))})")
            else:
                self.log.decision("released", grant=key, reason="linger ended")
            return True

    def refresh(self, key):
        """Re-assume grant `key` if it is live and due. On failure the old file stays; retry with backoff."""
        with self._lock:
            grant = self._grants.get(key)
            if grant is None or key in self._lingering:
                return None
            if not self._by_grant.get(key):
                self._release_if_unused(key, "released")
                return None
            self._hold(key)
        moved, was = False, grant.role
        try:
            for _attempt in (1, 2):
                with self._lock:  # as it is now: a login under new rules may have moved it meanwhile
                    grant = self._grants.get(key) or grant
                rule, ident, decided, profiles = self._current_rule(grant)
                if rule is None:
                    self.revoke(key, "the rules no longer map this login")
                    return None
                if rule.role != grant.role:
                    self._moving_out(grant, rule)
                moved = moved or rule.role != was
                try:
                    new = self._obtain(key, ident, rule, grant.rhost, decided, profiles, force=True)
                except _RulesChanged:
                    new = None
                if new is not None:
                    break
                # A reload moved or unmapped this login while STS answered, and what came back
                # was dropped: judge the grant again by the rules now in force, once.
            else:
                # Twice in one refresh: leave it due at once; lifecycle looks again after this.
                with self._lock:
                    current = self._grants.get(key)
                    if current is not None and key not in self._revoked:
                        self._put_grant(dataclasses.replace(current, next_refresh=self.clock()))
                return None
            self.log.decision("moved" if moved else "refreshed", grant=key, principal=grant.principal,
                              role=new.role, was=was if moved else None,
                              key=new.credentials.masked_key, expires=iso(new.credentials.expiration))
            return new
        except Exception as err:  # STS, IMDS, NSS, a full tmpfs: one grant's trouble stays its own
            with self._lock:
                current = self._grants.get(key)
                if current is None:
                    return None
                failures = current.failures + 1
                backoff = min(5 * 2 ** (failures - 1), BACKOFF_MAX)
                self._put_grant(dataclasses.replace(current, failures=failures, next_refresh=self.clock() + backoff))
                # A move that failed stays a move: no files and nothing handed out until its new
                # role's keys arrive, never the old role's again.
                moving_to = self._moving.get(key)
            self.log.decision("failed", grant=key, principal=grant.principal, role=moving_to or grant.role,
                              action="move" if moving_to else "refresh", code=getattr(err, "code", None),
                              attempt=failures, retry_in=f"{backoff}s", reason=str(err))
            return None
        finally:
            with self._lock:
                self._unhold(key)
                self._release_if_unused(key, "released")

    def _moving_out(self, grant, rule):
        """The rules moved `grant`'s login from its role to `rule`'s: from now until the new role's
        credentials are written, its files are gone and no door hands out the old role's keys."""
        with self._lock:
            if self._moving.get(grant.id) == rule.role:
                return  # the reload's recheck did already
            self._moving[grant.id] = rule.role
            self._remove_files(grant.id)
        self.log.decision("released", grant=grant.id, principal=grant.principal, role=grant.role,
                          reason=f"the rules now give this login {rule.role}", files="removed")

    def _current_rule(self, grant):
        """(rule, identity, generation, profiles) the current rules give this grant's login, for its
        profile (rule None: none). A user NSS cannot resolve now (LDAP/SSSD down) raises: that is a
        failed refresh, not a revocation."""
        facts = mapping.LoginFacts(user=grant.target, service=grant.service,
                                   ruser=grant.principal if grant.principal != grant.target else None,
                                   rhost=grant.rhost)
        cfg, decided = self._rules()
        ident = mapping.resolve(facts)
        if grant.profile is not None:
            return mapping.profile_rule(cfg, ident, grant.profile), ident, decided, ()
        decision = mapping.decide(cfg, ident)
        return decision.rule, ident, decided, profile_sections(decision.profiles)

    def revoke(self, key, reason):
        """The rules no longer give this grant: end its sessions and remove it now, lingering or not."""
        with self._lock:
            grant = self._grants.get(key)
            if grant is None or key in self._revoked:
                return False  # gone, or revoked already and waiting for its holder to let go
            self.log.decision("released", grant=key, principal=grant.principal, role=grant.role, reason=reason)
            for sid in list(self._by_grant.get(key, ())):
                self._pop_session(sid)
            self._lingering.pop(key, None)
            self._remove_files(key)
            if self._pending.get(key):
                # The open or refresh holding it drops it when it lets go, without linger; what it
                # obtains meanwhile is neither written nor kept (_obtain refuses a revoked grant).
                self._revoked.add(key)
                return True
            self._pop_grant(key)
            return True

    def recheck(self):
        """After a reload: revoke every grant (lingering ones too) the new rules no longer give.
        NSS lookups happen outside the lock, one grant at a time."""
        with self._lock:
            grants = list(self._grants.values())
        revoked = 0
        for grant in grants:
            try:
                rule, _ident, _decided, profiles = self._current_rule(grant)
            except mapping.UnknownUser:
                continue  # NSS trouble is no revocation; the next refresh asks again
            if rule is None:
                revoked += self.revoke(grant.id, "the rules no longer map this login")
                continue
            with self._lock:
                current = self._grants.get(grant.id)
                if current is None or grant.id in self._revoked:
                    continue
                live = bool(self._by_grant.get(grant.id)) and grant.id not in self._lingering
                if rule.role == current.role:
                    sections = self._sections(grant.id, profiles)
                    if live and current.profiles != sections:  # memory-only grants name no profiles
                        self._renamed(current, sections)
                    continue
                if not live:  # memory only (lingering, IMDS, a named profile): nobody to move
                    revoked += self.revoke(grant.id, f"the rules now give this login {rule.role}")
                    continue
                # Sessions live on it: due now, so lifecycle's refresh moves it to the new role
                # at the same location (refresh() calls STS; this must not, under the lock).
                self._moving_out(current, rule)
                self._put_grant(dataclasses.replace(current, next_refresh=self.clock()))
        return revoked

    def process_ended(self, pid, started):
        """A watched process exited: end the sessions it held. Returns how many."""
        with self._lock:
            ids = [s for s in self._by_pid.get(pid, ()) if self._sessions[s].started in (started, None)]
            for sid in ids:
                self._drop_session(sid, "reaped")
        return len(ids)

    def restore(self, grants, sessions):
        """Records from a previous broker: keep sessions whose process lives, release the rest."""
        kept = reaped = 0
        with self._lock:
            for grant in grants.values():
                if not grant.legacy_config and self.store.has(grant.id, store.AWS_CONFIG):
                    grant = dataclasses.replace(grant, legacy_config=True)  # made by 0.3.0's process delivery
                self._put_grant(grant)
            for session in sessions.values():
                if session.grant_id in grants and procs.alive(session.pid, session.started):
                    if session.uid is None:
                        session = dataclasses.replace(session, uid=grants[session.grant_id].target_uid)
                    self._put_session(session)
                    kept += 1
                else:
                    reaped += 1
                    self.log.decision("reaped", session=session.id, kind=session.kind, pid=session.pid,
                                      service=session.service, grant=session.grant_id,
                                      reason="ended while the broker was down")
            for key in list(self._grants):
                self._release_if_unused(key, "released", linger=False)
            # Grants made by 0.3.0's process delivery: their sessions keep the config file they
            # point at; logins from now on are pointed at the credentials file, written now.
            for grant in [g for g in self._grants.values() if g.legacy_config]:
                try:
                    self._write_files(grant)
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
                self._unname(view_key, names_ended)
            for key in self.store.grant_ids():
                if key not in self._grants:
                    self.store.remove(key)
                    self.log.decision("released", grant=key, reason="stray file with no grant", files="removed")
        return kept, reaped

    def reconfigure(self, cfg, engine):
        """A reloaded config: a changed refresh_before reschedules every live grant by the new rule.
        A new generation: logins and refreshes decided before it are judged again by the new rules
        when their STS call returns (recheck() sees only the grants that exist already)."""
        with self._lock:
            old, self.cfg, self.engine = self.cfg, cfg, engine
            self._generation += 1
            if cfg.session.refresh_before != old.session.refresh_before:
                for grant in list(self._grants.values()):
                    if grant.id not in self._lingering and not grant.failures:
                        self._put_grant(dataclasses.replace(
                            grant, next_refresh=self.schedule(grant.credentials, grant.issued)))


