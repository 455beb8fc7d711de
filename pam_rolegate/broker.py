"""rolegated: the root broker. Socket server, peer credentials, dispatch table, grants and sessions,
single-flight STS calls, refresh before expiry, reaping of dead sessions, records that survive a restart.

A *grant* is (target user, principal, role): one credentials file shared by its sessions, removed
when its last session ends. A *session* is one PAM session (the process that opened it, named by
pid and start time) or one PAM-less shell (the shell that asked, by the same two numbers).
"""

import dataclasses
import hashlib
import json
import os
import pwd
import random
import secrets
import signal
import socket
import socketserver
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional

from . import config as config_mod
from . import mapping, names, procs, protocol, store
from .client import peer_credentials
from .errors import ConfigError, ProtocolError, RolegateError, StoreError, StsError
from .log import Log
from .sts import AssumeRequest, Credentials, StsEngine

STATE_FILE = "records.json"
SOCKET_NAME = "rolegated.sock"
# credential_process callers need more than this left, or SDKs call again on every request.
SDK_MIN_LEFT = 15 * 60
# A request frame must arrive whole within this time, however slowly a client trickles it in.
FRAME_DEADLINE = 2.0
# Connections of non-root callers: at most this many at once per uid and in all. Root (the PAM
# hook) has its own allowance, so no user can crowd logins out of the broker.
MAX_PER_UID = 4
MAX_UNPRIVILEGED = 48
MAX_ROOT = 64
MAX_SHELL_SESSIONS_PER_UID = 32
HOOK_MARGIN = 0.3  # seconds kept back from the hook's budget for our own reply


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


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


@dataclass
class _Flight:
    """One STS call in progress for a grant; followers wait for the leader's result."""

    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    grant: Optional[Grant] = None
    error: Optional[BaseException] = None


def grant_id(target_uid, principal, role):
    digest = hashlib.sha256(f"{target_uid}\0{principal}\0{role}".encode()).hexdigest()[:12]
    return f"{target_uid}-{names.sts_name(principal)}-{digest}"


def _iso(dt):
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ") if dt else None


def _epoch_to_dt(ts):
    return datetime.fromtimestamp(ts, timezone.utc)


class Broker:
    def __init__(self, cfg, engine=None, log=None, clock=time.time, rolegate_cmd=None, store_mount=True):
        self.cfg = cfg
        self.engine = engine or StsEngine.from_config(cfg)
        self.log = log or Log("rolegated")
        self.clock = clock
        self.store = store.CredentialStore(cfg.runtime_dir, mount=store_mount)
        self.rolegate_cmd = rolegate_cmd or os.path.join(os.path.dirname(sys.executable), "rolegate")
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._grants = {}
        self._sessions = {}
        self._inflight = {}
        self._pending = {}  # grant id -> opens/refreshes in progress (keeps the grant from release)
        self._host = None
        self._stopping = threading.Event()
        self._next_reap = 0.0
        self.handlers = {
            protocol.Ping.ACTION: self.ping,
            protocol.OpenSession.ACTION: self.open_session,
            protocol.CloseSession.ACTION: self.close_session,
            protocol.Env.ACTION: self.env,
            protocol.GetCredentials.ACTION: self.credentials,
            protocol.Status.ACTION: self.status,
        }

    # -- helpers -----------------------------------------------------------------------------

    @property
    def host(self):
        if self._host is None:
            facts = self.engine.host_facts()
            if facts.instance_id or self.cfg.source.kind != "instance-profile":
                self._host = facts  # a failed instance-id lookup is asked again next time
            return facts
        return self._host

    def _now_dt(self):
        return _epoch_to_dt(self.clock())

    def _schedule(self, creds):
        """When to refresh: refresh_before ahead of expiry, less a little jitter, never in the past."""
        rb = self.cfg.session.refresh_before
        lifetime = creds.seconds_left(self._now_dt())
        jitter = random.uniform(0, min(30.0, 0.1 * max(lifetime - rb, 0)))
        return self.clock() + max(lifetime - rb - jitter, 1.0)

    def _pointer(self, grant):
        """(variable, path) through which a session finds this grant, by delivery."""
        if self.cfg.delivery == "process":
            return "AWS_CONFIG_FILE", self.store.path(grant.id, store.AWS_CONFIG)
        return "AWS_SHARED_CREDENTIALS_FILE", self.store.path(grant.id, store.CREDENTIALS)

    def _env_for(self, grant):
        var, path = self._pointer(grant)
        return {"AWS_REGION": self.cfg.region, "AWS_DEFAULT_REGION": self.cfg.region, var: path}

    def _write_files(self, grant):
        if self.cfg.delivery == "process":
            command = f"{self.rolegate_cmd} credentials --grant {grant.id}"
            self.store.write(grant.id, store.AWS_CONFIG, store.process_config_ini(self.cfg.region, command),
                             grant.target_uid, grant.target_gid)
        else:
            self.store.write(grant.id, store.CREDENTIALS, store.credentials_ini(grant.credentials),
                             grant.target_uid, grant.target_gid)

    def _fresh(self, grant):
        return grant.credentials.seconds_left(self._now_dt()) > self.cfg.session.refresh_before

    def _still_usable(self, grant):
        """Worth handing out while STS fails: at least a minute left."""
        return grant is not None and grant.credentials.seconds_left(self._now_dt()) > 60

    # -- obtaining credentials (single flight) ------------------------------------------------

    def _obtain(self, ident, rule, rhost, budget=None, force=False):
        """The grant for (ident, rule): reused while fresh, else one AssumeRole however many ask."""
        key = grant_id(ident.target_uid, ident.principal, rule.role)
        with self._lock:
            current = self._grants.get(key)
            if current is not None and not force and self._fresh(current):
                return current
            flight = self._inflight.get(key)
            leader = flight is None
            if leader:
                flight = self._inflight[key] = _Flight()
        if not leader:
            if not flight.done.wait(budget if budget is not None else self.cfg.sts_timeout + 1):
                raise StsError("waited too long for another login's STS call for the same grant")
            if flight.error is not None:
                raise flight.error
            return flight.grant
        try:
            if not force and current is not None and current.failures and self._still_usable(current):
                # STS is failing (the refresher is backing off): hand out what is still valid
                # rather than spend this login's budget on another failing call.
                flight.grant = current
                return current
            request = self.build_request(ident, rule, rhost)
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
                role=rule.role, request=request, credentials=creds,
                next_refresh=self._schedule(creds))
            self._write_files(grant)
            with self._lock:
                self._grants[key] = grant
                self._save()
                self._wake.notify_all()
            flight.grant = grant
            return grant
        except BaseException as err:
            flight.error = err
            raise
        finally:
            with self._lock:
                self._inflight.pop(key, None)
            flight.done.set()

    def build_request(self, ident, rule, rhost):
        from .sts import build_request

        return build_request(self.cfg, rule, ident, rhost=rhost, host=self.host)

    # -- request handling -----------------------------------------------------------------------

    def dispatch(self, peer, body):
        """Frame body from `peer` -> reply record. Never raises."""
        try:
            request = protocol.decode_request(body)
        except ProtocolError as err:
            self.log.decision("refused", uid=peer.uid, pid=peer.pid, reason=str(err))
            code = protocol.E_UNKNOWN_ACTION if "unknown action" in str(err) else protocol.E_BAD_REQUEST
            return protocol.ErrorReply(code, str(err))
        try:
            return self.handlers[request.ACTION](peer, request)
        except RolegateError as err:
            return protocol.ErrorReply(protocol.E_INTERNAL, str(err))
        except Exception as err:  # a bug must cost one request, never the broker
            self.log.error(f"internal error in {request.ACTION}: {type(err).__name__}: {err}")
            return protocol.ErrorReply(protocol.E_INTERNAL, f"internal error: {type(err).__name__}")

    def ping(self, peer, req):
        return protocol.Reply({"version": protocol.VERSION, "pid": os.getpid()})

    def _forbidden(self, peer, action, why):
        self.log.decision("refused", uid=peer.uid, pid=peer.pid, action=action, reason=why)
        return protocol.ErrorReply(protocol.E_FORBIDDEN, why)

    def _grant_session(self, peer, facts, kind, pid, started, budget=None, sid=None):
        """Resolve, decide, obtain and record one session. Returns a reply."""
        try:
            ident = mapping.resolve(facts)
        except mapping.UnknownUser as err:
            self.log.decision("denied", user=facts.user, service=facts.service, reason=str(err))
            return protocol.ErrorReply(protocol.E_UNKNOWN_USER, str(err))
        decision = mapping.decide(self.cfg, ident)
        if decision.rule is None:
            self.log.decision("denied", principal=ident.principal, target=ident.target, service=facts.service,
                              reason="no rule matches")
            return protocol.Reply({"granted": False, "env": {}, "reason": decision.reason,
                                   "runtime_dir": self.cfg.runtime_dir})
        rule = decision.rule
        key = grant_id(ident.target_uid, ident.principal, rule.role)
        with self._lock:
            self._pending[key] = self._pending.get(key, 0) + 1
            existing = self._sessions.get(sid) if sid else None
        try:
            grant = self._obtain(ident, rule, facts.rhost, budget=budget)
            with self._lock:
                if existing is not None and existing.grant_id == key:
                    session = existing
                else:
                    session = Session(id=sid or secrets.token_hex(8), grant_id=key, kind=kind, pid=pid,
                                      started=started, service=facts.service, opened_at=self.clock(),
                                      rhost=facts.rhost, tty=facts.tty)
                    self._sessions[session.id] = session
                    if existing is not None:  # the shell's mapping changed: move it to the new grant
                        self._release_if_unused(existing.grant_id, "released")
                self._save()
        except StsError as err:
            self.log.decision("failed", principal=ident.principal, target=ident.target, role=rule.role,
                              service=facts.service, code=err.code, reason=str(err))
            return protocol.ErrorReply(protocol.E_STS_FAILED, str(err))
        except StoreError as err:
            self.log.decision("failed", principal=ident.principal, target=ident.target, role=rule.role,
                              service=facts.service, reason=str(err))
            return protocol.ErrorReply(protocol.E_STORE_FAILED, str(err))
        finally:
            with self._lock:
                self._pending[key] -= 1
                if not self._pending[key]:
                    del self._pending[key]
        if existing is None or existing.grant_id != key:
            self.log.decision("granted", principal=ident.principal, target=ident.target, role=rule.role,
                              service=facts.service, session=session.id, grant=key, rule=rule.index,
                              key=grant.credentials.masked_key, expires=_iso(grant.credentials.expiration),
                              rhost=facts.rhost, tty=facts.tty, pid=pid)
        return protocol.Reply({"granted": True, "session": session.id, "grant": key, "role": rule.role,
                               "env": self._env_for(grant), "reason": decision.reason,
                               "expires": _iso(grant.credentials.expiration),
                               "runtime_dir": self.cfg.runtime_dir})

    def open_session(self, peer, req):
        if peer.uid != 0:
            return self._forbidden(peer, req.ACTION, f"uid {peer.uid} may not open sessions (root/PAM only); "
                                                     f"ask with 'env' for your own credentials")
        facts = mapping.LoginFacts(user=req.user, service=req.service, ruser=req.ruser, rhost=req.rhost,
                                   tty=req.tty)
        budget = None
        if req.budget_ms is not None:
            budget = max(req.budget_ms / 1000.0 - HOOK_MARGIN, 0.1)
        return self._grant_session(peer, facts, "pam", req.pid, procs.start_time(req.pid), budget=budget)

    def close_session(self, peer, req):
        if peer.uid != 0:
            return self._forbidden(peer, req.ACTION, f"uid {peer.uid} may not close sessions (root/PAM only)")
        with self._lock:
            if req.session is not None:
                ids = [req.session] if req.session in self._sessions else []
            else:
                pid = req.pid or peer.pid
                ids = [s.id for s in self._sessions.values() if s.kind == "pam" and s.pid == pid]
            for sid in ids:
                self._drop_session(sid, "released")
            if ids:
                self._save()
        return protocol.Reply({"released": len(ids)})

    def _own_facts(self, peer):
        try:
            name = pwd.getpwuid(peer.uid).pw_name
        except KeyError:
            return None
        return mapping.LoginFacts(user=name, service=mapping.SHELL_SERVICE)

    def env(self, peer, req):
        facts = self._own_facts(peer)
        if facts is None:
            return protocol.ErrorReply(protocol.E_UNKNOWN_USER, f"uid {peer.uid} has no user name")
        # The session lives as long as the shell that asked (the parent of `rolegate env`, which
        # the profile.d snippet runs); a shell that never goes away keeps it, like a PAM session.
        shell = procs.parent(peer.pid) or peer.pid
        started = procs.start_time(shell)
        sid = f"shell-{peer.uid}-{shell}-{started}"
        def count():
            return sum(1 for s in self._sessions.values() if s.id.startswith(f"shell-{peer.uid}-"))

        with self._lock:
            if sid not in self._sessions and count() >= MAX_SHELL_SESSIONS_PER_UID:
                self.reap()  # dead shells first; then, if still full, refuse
                if count() >= MAX_SHELL_SESSIONS_PER_UID:
                    return self._forbidden(peer, req.ACTION, f"uid {peer.uid} already has {count()} live shell "
                                           f"sessions (limit {MAX_SHELL_SESSIONS_PER_UID})")
        return self._grant_session(peer, facts, "shell", shell, started, sid=sid)

    def credentials(self, peer, req):
        if req.grant is None:
            reply = self.env(peer, protocol.Env())
            if isinstance(reply, protocol.ErrorReply):
                return reply
            if not reply.get("granted"):
                return protocol.ErrorReply(protocol.E_NO_GRANT, reply.get("reason"))
            key = reply.get("grant")
        else:
            key = req.grant
        with self._lock:
            grant = self._grants.get(key)
        if grant is None or (peer.uid != 0 and peer.uid != grant.target_uid):
            # The same answer whether the grant exists or is someone else's: no probing.
            if grant is not None:
                self.log.decision("refused", uid=peer.uid, pid=peer.pid, action=req.ACTION, grant=key)
            return protocol.ErrorReply(protocol.E_NO_GRANT, f"no live grant {key} for uid {peer.uid}; log in again")
        if grant.credentials.seconds_left(self._now_dt()) <= SDK_MIN_LEFT + 60 \
                and grant.request.duration > SDK_MIN_LEFT + 120 and grant.next_refresh <= self.clock():
            grant = self._refresh(grant) or grant
        c = grant.credentials
        return protocol.Reply({"Version": 1, "AccessKeyId": c.access_key_id, "SecretAccessKey": c.secret_access_key,
                               "SessionToken": c.session_token, "Expiration": _iso(c.expiration)})

    def status(self, peer, req):
        now = self._now_dt()
        with self._lock:
            grants = []
            for g in sorted(self._grants.values(), key=lambda g: g.id):
                if peer.uid != 0 and peer.uid not in (g.target_uid, g.principal_uid):
                    continue
                sessions = [s for s in self._sessions.values() if s.grant_id == g.id]
                entry = {"grant": g.id, "principal": g.principal, "target": g.target, "role": g.role,
                         "expires": _iso(g.credentials.expiration),
                         "seconds_left": int(g.credentials.seconds_left(now)),
                         "next_refresh": _iso(_epoch_to_dt(g.next_refresh)), "failures": g.failures,
                         "sessions": len(sessions), "path": self._pointer(g)[1]}
                if peer.uid == 0:
                    entry["session_list"] = [{"id": s.id, "kind": s.kind, "pid": s.pid, "service": s.service,
                                              "rhost": s.rhost, "tty": s.tty} for s in sessions]
                grants.append(entry)
        return protocol.Reply({"grants": grants, "delivery": self.cfg.delivery})

    # -- lifecycle --------------------------------------------------------------------------------

    def _drop_session(self, sid, event):
        """Forget a session (lock held); release its grant when no session is left."""
        session = self._sessions.pop(sid)
        grant = self._grants.get(session.grant_id)
        self.log.decision(event, session=sid, kind=session.kind, pid=session.pid, service=session.service,
                          principal=grant.principal if grant else None, grant=session.grant_id)
        self._release_if_unused(session.grant_id, event)

    def _release_if_unused(self, key, event):
        if any(s.grant_id == key for s in self._sessions.values()) or self._pending.get(key):
            return False
        grant = self._grants.pop(key, None)
        try:
            removed = self.store.remove(key)
        except OSError as err:
            self.log.error(f"could not remove grant {key}: {err}")
            removed = False
        if grant is not None or removed:
            self.log.decision(event, grant=key, principal=grant.principal if grant else None,
                              role=grant.role if grant else None, files="removed")
        return True

    def _refresh(self, grant):
        """Re-assume one grant. On any failure the old (still valid) file stays; retry with backoff."""
        with self._lock:
            live = any(s.grant_id == grant.id for s in self._sessions.values())
            if grant.id not in self._grants or not live:
                # Its last session ended while this refresh was queued: release, do not revive.
                self._release_if_unused(grant.id, "released")
                return None
            self._pending[grant.id] = self._pending.get(grant.id, 0) + 1
        facts = mapping.LoginFacts(user=grant.target, service=grant.service,
                                   ruser=grant.principal if grant.principal != grant.target else None,
                                   rhost=grant.rhost)
        try:
            # A user NSS cannot resolve right now (LDAP/SSSD down) is a failed refresh, not a
            # revocation: only a rule that answers differently releases the grant.
            ident = mapping.resolve(facts)
            rule = mapping.decide(self.cfg, ident).rule
            if rule is None or rule.role != grant.role:
                with self._lock:
                    self.log.decision("released", grant=grant.id, principal=grant.principal, role=grant.role,
                                      reason="the rules no longer map this login to this role")
                    for sid in [s.id for s in self._sessions.values() if s.grant_id == grant.id]:
                        self._sessions.pop(sid)
                return None  # `finally` releases the grant once this refresh no longer holds it
            new = self._obtain(ident, rule, grant.rhost, force=True)
            self.log.decision("refreshed", grant=grant.id, principal=grant.principal, role=grant.role,
                              key=new.credentials.masked_key, expires=_iso(new.credentials.expiration))
            return new
        except Exception as err:  # STS, IMDS, NSS, a full tmpfs: one grant's trouble stays its own
            with self._lock:
                current = self._grants.get(grant.id)
                if current is None:
                    return None
                failures = current.failures + 1
                backoff = min(5 * 2 ** (failures - 1), 300)
                self._grants[grant.id] = dataclasses.replace(current, failures=failures,
                                                             next_refresh=self.clock() + backoff)
                self._save()
            self.log.decision("failed", grant=grant.id, principal=grant.principal, role=grant.role,
                              action="refresh", attempt=failures, retry_in=f"{backoff}s", reason=str(err))
            return None
        finally:
            with self._lock:
                self._pending[grant.id] -= 1
                if not self._pending[grant.id]:
                    del self._pending[grant.id]
                if self._release_if_unused(grant.id, "released"):
                    self._save()

    def reap(self):
        """Release sessions whose process is gone, and grants nothing holds."""
        with self._lock:
            dead = [s.id for s in self._sessions.values() if not procs.alive(s.pid, s.started)]
            for sid in dead:
                self._drop_session(sid, "reaped")
            for key in [k for k in self._grants if k not in self._inflight]:
                self._release_if_unused(key, "released")
            if dead:
                self._save()
        return dead

    def tick(self):
        """One pass of the background loop: reap when due, refresh what is due. Returns seconds to sleep."""
        now = self.clock()
        if now >= self._next_reap:
            self.reap()
            self._next_reap = now + self.cfg.reap_interval
        with self._lock:
            due = [g for g in self._grants.values() if g.next_refresh <= now and g.id not in self._inflight]
        for grant in due:
            self._refresh(grant)
        with self._lock:
            times = [g.next_refresh for g in self._grants.values()] + [self._next_reap]
        return max(0.2, min(min(times) - self.clock(), 5.0))

    def run_background(self):
        while not self._stopping.is_set():
            try:
                delay = self.tick()
            except Exception as err:
                self.log.error(f"background loop: {type(err).__name__}: {err}")
                delay = 5.0
            with self._wake:
                self._wake.wait(delay)

    # -- records across restarts ----------------------------------------------------------------

    def _save(self):
        """Write grants and sessions to state/ (lock held). Root-only, on tmpfs, like the files."""
        data = {"version": 1, "grants": [], "sessions": [dataclasses.asdict(s) for s in self._sessions.values()]}
        for g in self._grants.values():
            d = dataclasses.asdict(g)
            d["request"] = dataclasses.asdict(g.request)
            c = g.credentials
            d["credentials"] = {"access_key_id": c.access_key_id, "secret_access_key": c.secret_access_key,
                                "session_token": c.session_token, "expiration": _iso(c.expiration)}
            data["grants"].append(d)
        try:
            self.store.write_state(STATE_FILE, json.dumps(data).encode())
        except (OSError, StoreError) as err:
            self.log.error(f"could not save records: {err}")

    def recover(self):
        """Load records left by a previous broker: keep live sessions, reap dead ones, drop strays."""
        raw = self.store.read_state(STATE_FILE)
        kept = reaped = 0
        if raw:
            try:
                data = json.loads(raw)
                grants = {}
                for d in data.get("grants", []):
                    c = d.pop("credentials")
                    expiry = datetime.strptime(c["expiration"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc) \
                        if c["expiration"] else None
                    d["credentials"] = Credentials(c["access_key_id"], c["secret_access_key"], c["session_token"], expiry)
                    r = d.pop("request")
                    r["tags"] = tuple(tuple(t) for t in r["tags"])
                    r["policy_arns"] = tuple(r["policy_arns"])
                    d["request"] = AssumeRequest(**r)
                    grants[d["id"]] = Grant(**d)
                sessions = {d["id"]: Session(**d) for d in data.get("sessions", [])}
            except (ValueError, KeyError, TypeError) as err:
                self.log.error(f"ignoring unreadable records from the previous broker: {err}")
                grants, sessions = {}, {}
            with self._lock:
                self._grants, self._sessions = grants, {}
                for sid, s in sessions.items():
                    if s.grant_id in grants and procs.alive(s.pid, s.started):
                        self._sessions[sid] = s
                        kept += 1
                    else:
                        reaped += 1
                        self.log.decision("reaped", session=sid, kind=s.kind, pid=s.pid, service=s.service,
                                          grant=s.grant_id, reason="ended while the broker was down")
        with self._lock:
            for key in list(self._grants):
                self._release_if_unused(key, "released")
            for key in self.store.grant_ids():
                if key not in self._grants:
                    self.store.remove(key)
                    self.log.decision("released", grant=key, reason="stray file with no grant", files="removed")
            self._save()
        if raw:
            self.log.decision("recovered", sessions=kept, reaped=reaped, grants=len(self._grants))

    def reload(self, path):
        """SIGHUP: reread the config; a bad file leaves the running one in force."""
        try:
            cfg = config_mod.load(path)
        except ConfigError as err:
            self.log.decision("failed", action="reload", reason=str(err), kept="previous config")
            return False
        with self._lock:
            old = self.cfg
            runtime_changed = cfg.runtime_dir != old.runtime_dir
            if runtime_changed:
                cfg = dataclasses.replace(cfg, runtime_dir=old.runtime_dir)
            if (cfg.region, cfg.source, cfg.sts_timeout) != (old.region, old.source, old.sts_timeout):
                self.engine = StsEngine.from_config(cfg, client_factory=self.engine.client_factory,
                                                    clock=self.engine.clock)
            self.cfg = cfg
            # Re-check every grant against the new rules at once; refresh releases those that moved.
            for key, g in self._grants.items():
                self._grants[key] = dataclasses.replace(g, next_refresh=min(g.next_refresh, self.clock()))
            self._wake.notify_all()
        self.log.decision("reloaded", path=path, rules=len(cfg.roles),
                          note="runtime_dir changes need a restart" if runtime_changed else None)
        return True

    def stop(self):
        self._stopping.set()
        with self._wake:
            self._wake.notify_all()


# -- the socket server -----------------------------------------------------------------------------


class _Handler(socketserver.BaseRequestHandler):
    def handle(self):
        server = self.server
        sock = self.request
        pid, uid, gid = peer_credentials(sock)
        if not server.admit(uid):
            self._reply(protocol.ErrorReply(protocol.E_BUSY, "too many connections from you; try again"))
            return
        try:
            try:
                first = _recv_until(sock, 4, time.monotonic() + FRAME_DEADLINE, allow_empty=True)
                if not first:
                    return  # connected and left without a word (a liveness probe): nothing to log
                deadline = time.monotonic() + FRAME_DEADLINE
                body = _recv_until(sock, protocol.body_length(first), deadline)
            except (ProtocolError, OSError) as err:
                server.broker.log.decision("refused", uid=uid, pid=pid, reason=f"bad frame: {err}")
                self._reply(protocol.ErrorReply(protocol.E_BAD_REQUEST, str(err)))
                return
            self._reply(server.broker.dispatch(Peer(pid, uid, gid), body))
        finally:
            server.leave(uid)

    def _reply(self, reply):
        try:
            data = protocol.encode_reply(reply)
        except ProtocolError as err:  # a reply too large for one frame
            data = protocol.encode_reply(protocol.ErrorReply(protocol.E_INTERNAL, str(err)))
        try:
            self.request.sendall(data)
        except OSError:
            pass  # the client gave up (its own deadline); nothing to do


def _recv_until(sock, n, deadline, allow_empty=False):
    """Exactly n bytes before `deadline` (a whole-frame bound, not a per-recv one)."""
    data = b""
    while len(data) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ProtocolError(f"frame not received within {FRAME_DEADLINE:g}s")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(n - len(data))
        except socket.timeout:
            raise ProtocolError(f"frame not received within {FRAME_DEADLINE:g}s") from None
        if not chunk:
            if allow_empty and not data:
                return b""
            raise ProtocolError("connection closed mid-frame")
        data += chunk
    return data


class BrokerServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, path, broker):
        self.broker = broker
        self._conn_lock = threading.Lock()
        self._per_uid = {}
        try:
            os.unlink(path)  # a stale socket from a previous broker (the directory is root-only)
        except FileNotFoundError:
            pass
        super().__init__(path, _Handler)
        os.chmod(path, 0o666)  # anyone may connect; the broker authorises by SO_PEERCRED

    def admit(self, uid):
        """Count a connection in, unless its uid (or all non-root callers) already hold their share."""
        with self._conn_lock:
            mine = self._per_uid.get(uid, 0)
            others = sum(n for u, n in self._per_uid.items() if u != 0)
            if uid == 0:
                if mine >= MAX_ROOT:
                    return False
            elif mine >= MAX_PER_UID or others >= MAX_UNPRIVILEGED:
                return False
            self._per_uid[uid] = mine + 1
            return True

    def leave(self, uid):
        with self._conn_lock:
            self._per_uid[uid] -= 1
            if not self._per_uid[uid]:
                del self._per_uid[uid]


def serve(config_path, engine=None, log=None, ready=None):
    """Run the broker until SIGTERM/SIGINT; SIGHUP reloads. Returns an exit status."""
    log = log or Log("rolegated")
    try:
        cfg = config_mod.load(config_path)
    except ConfigError as err:
        log.error(f"not starting: {err}")
        return 1
    broker = Broker(cfg, engine=engine, log=log)
    try:
        broker.store.prepare()
    except (StoreError, OSError) as err:
        log.error(f"not starting: {err}")
        return 1
    broker.recover()
    path = os.path.join(cfg.runtime_dir, SOCKET_NAME)
    server = BrokerServer(path, broker)
    reload_requested = threading.Event()
    stop_requested = threading.Event()
    signal.signal(signal.SIGHUP, lambda *a: reload_requested.set())
    signal.signal(signal.SIGTERM, lambda *a: stop_requested.set())
    signal.signal(signal.SIGINT, lambda *a: stop_requested.set())
    threads = [threading.Thread(target=server.serve_forever, name="server", daemon=True),
               threading.Thread(target=broker.run_background, name="lifecycle", daemon=True)]
    for t in threads:
        t.start()
    log.decision("started", socket=path, pid=os.getpid(), rules=len(cfg.roles), delivery=cfg.delivery,
                 source=str(cfg.source))
    if ready is not None:
        ready()
    while not stop_requested.is_set():
        stop_requested.wait(0.5)
        if reload_requested.is_set():
            reload_requested.clear()
            broker.reload(config_path)
    # Sessions outlive the broker: files and records stay, so a restarted broker picks them up.
    server.shutdown()
    server.server_close()
    try:
        os.unlink(path)  # so clients say "is rolegated running?" rather than hang on a dead socket
    except OSError:
        pass
    broker.stop()
    log.decision("stopped", pid=os.getpid(), grants=len(broker._grants), note="files kept for restart")
    return 0
