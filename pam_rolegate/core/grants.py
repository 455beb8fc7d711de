"""The core's values: grants, sessions, elevations, what an open gave, and the listener interface.

Frozen values that cross the core's parts and the doors; the constants the parts share; the
grant's id (where a login's credentials live); and the two decision lines a login or an IMDS
request ends with when it gets nothing. Imports no other part of the core.
"""

import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional, Tuple

from ..rules import mapping, names
from ..backends.sts import AssumeRequest, Credentials

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


class RulesChanged(Exception):
    """Credentials came back from STS after a reload took the rule they were asked under (or
    revoked their grant): they were dropped unwritten. The caller's login gets nothing."""


def grant_id(target_uid, principal, service, profile=None):
    """Where a login's credentials live: the same for every role the rules give it over time."""
    digest = hashlib.sha256(f"{target_uid}\0{principal}\0{service}\0{profile or ''}".encode()).hexdigest()[:12]
    return f"{target_uid}-{names.sts_name(principal)}-{digest}"


def login_facts(grant):
    """The login facts a grant was made for: what the rules in force are asked about it again."""
    return mapping.LoginFacts(user=grant.target, service=grant.service, rhost=grant.rhost,
                              ruser=grant.principal if grant.principal != grant.target else None)


def profile_sections(rules):
    """((name, role), ...) of a decision's named profiles: what a grant's files carry."""
    return tuple((name, rule.role) for name, rule in rules)


def iso(dt):
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ") if dt else None


def epoch_to_dt(ts):
    return datetime.fromtimestamp(ts, timezone.utc)



def unmapped_midway(log, ident, service):
    """The one `denied` line for a login (or IMDS request) the rules stopped mapping while it
    was under way; the Opened a login gets."""
    log.decision("denied", principal=ident.principal, target=ident.target, service=service,
                 reason="the rules changed during the login")
    return Opened(False, "the rules no longer map this login (a reload changed them during it)")


def failed(log, ident, rule, service, err):
    """The one `failed` line for a login or IMDS request that got no credentials (STS errors
    carry their code)."""
    log.decision("failed", principal=ident.principal, target=ident.target, role=rule.role,
                 service=service, code=getattr(err, "code", None), reason=str(err))
