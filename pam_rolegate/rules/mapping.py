"""Who is logging in, and which rule (if any) gives them a role. Pure except `resolve`, which asks NSS."""

import grp
import os
import pwd
from dataclasses import dataclass
from typing import Optional, Tuple

# PAM services that switch from one account to another: for these PAM_RUSER (the invoking
# user) is the human we hold to account, and PAM_USER is only the account they become.
SWITCH_USER_SERVICES = frozenset({"sudo", "sudo-i", "su", "su-l"})
# The service name for requests a shell makes itself (PAM-less shells: SSM, su -l via profile.d).
SHELL_SERVICE = "shell"


@dataclass(frozen=True)
class LoginFacts:
    user: str  # PAM_USER: the account the session runs as (the target)
    service: str
    ruser: Optional[str] = None
    rhost: Optional[str] = None
    tty: Optional[str] = None


@dataclass(frozen=True)
class Identity:
    """Login facts resolved through NSS: who the principal is, what the target account is."""

    principal: str
    principal_uid: int
    groups: Tuple[str, ...]  # the principal's primary and supplementary groups
    target: str
    target_uid: int
    target_gid: int
    service: str


@dataclass(frozen=True)
class Decision:
    rule: object  # config.Rule or None: the default profile's
    reason: str
    identity: Identity
    # (name, config.Rule) for each named profile the login gets, in the order the config names them
    profiles: Tuple[Tuple[str, object], ...] = ()
    on_demand: Tuple[Tuple[str, object], ...] = ()  # the same for profiles only `rolegate elevate` gives


class UnknownUser(LookupError):
    pass


def principal_name(facts):
    if facts.service in SWITCH_USER_SERVICES and facts.ruser:
        return facts.ruser
    return facts.user


def user_groups(name, gid):
    """Primary and supplementary group names, through NSS (so LDAP/SSSD groups count)."""
    found = []
    for g in os.getgrouplist(name, gid):
        try:
            found.append(grp.getgrgid(g).gr_name)
        except KeyError:
            found.append(str(g))  # a gid with no name still matches a numeric rule
    return tuple(dict.fromkeys(found))


def resolve(facts):
    """LoginFacts -> Identity. Raises UnknownUser when NSS does not know an account."""
    principal = principal_name(facts)
    try:
        p = pwd.getpwnam(principal)
    except KeyError:
        raise UnknownUser(f"no such user {principal!r}") from None
    try:
        t = p if facts.user == principal else pwd.getpwnam(facts.user)
    except KeyError:
        raise UnknownUser(f"no such user {facts.user!r}") from None
    return Identity(
        principal=principal, principal_uid=p.pw_uid, groups=user_groups(principal, p.pw_gid),
        target=facts.user, target_uid=t.pw_uid, target_gid=t.pw_gid, service=facts.service,
    )


def _why_not(match, ident):
    """None when `match` accepts the identity, else the first field that does not fit."""
    if match.users and ident.principal not in match.users:
        return f"user {ident.principal} is not {'/'.join(match.users)}"
    if match.groups and not set(match.groups) & set(ident.groups):
        return f"{ident.principal} is in none of the groups {'/'.join(match.groups)}"
    if match.services and ident.service not in match.services:
        return f"service {ident.service} is not {'/'.join(match.services)}"
    if match.targets and ident.target not in match.targets and str(ident.target_uid) not in match.targets:
        return f"target {ident.target} is not {'/'.join(match.targets)}"
    if ident.target != ident.principal and not match.targets:
        # The file belongs to the target account: alice's keys must not land, readable, in
        # postgres's hands on `sudo -u postgres` unless a rule says so by naming the target.
        return f"the session runs as {ident.target}, not {ident.principal}, and the rule names no target"
    return None


def named_profiles(config, ident, on_demand=False):
    """((name, rule), ...): for each profile name, the first rule naming it that accepts `ident`.
    First match per name, as the default is the first match among rules without a name: a later
    rule with the same name is a fallback for logins the earlier one does not accept. With
    `on_demand`, the profiles only `rolegate elevate` gives (rules with `elevate`), else those a
    login gets by itself; config keeps a name to one kind."""
    found = {}
    for rule in config.roles:
        if rule.profile is not None and (rule.elevate is not None) == on_demand and rule.profile not in found \
                and _why_not(rule.match, ident) is None:
            found[rule.profile] = rule
    return tuple(found.items())


def profile_rule(config, ident, profile):
    """The rule that gives `ident` the profile `profile` (None: the default), on demand or not, or None."""
    if profile is None:
        return decide(config, ident).rule
    return dict(named_profiles(config, ident) + named_profiles(config, ident, on_demand=True)).get(profile)


def decide(config, ident):
    """The default: the first matching rule without a profile wins; named profiles beside it.
    Returns a Decision whose reason explains the outcome."""
    misses = []
    profiles = named_profiles(config, ident)
    on_demand = named_profiles(config, ident, on_demand=True)
    for rule in config.roles:
        if rule.profile is not None:
            continue
        why = _why_not(rule.match, ident)
        if why is None:
            return Decision(rule, f"rule {rule.index} (line {rule.line}) matches", ident, profiles, on_demand)
        misses.append(f"rule {rule.index}: {why}")
    detail = "; ".join(misses) if misses else "the config has no rules"
    if profiles or on_demand:
        detail += "; a login needs a default role to carry its named profiles"
    return Decision(None, f"no rule matches ({detail})", ident, profiles, on_demand)


def explain(decision):
    """Multi-line text for `rolegate check-user`."""
    ident = decision.identity
    lines = [
        f"principal: {ident.principal} (uid {ident.principal_uid})",
        f"groups:    {', '.join(ident.groups) or '-'}",
        f"target:    {ident.target} (uid {ident.target_uid})",
        f"service:   {ident.service}",
        f"decision:  {decision.reason}",
    ]
    if decision.rule is not None:
        lines.append(f"role:      {decision.rule.role}")
    unused = "" if decision.rule is not None else " (unused: no default role)"
    for name, rule in decision.profiles:
        lines.append(f"profile:   {name} = {rule.role} (rule {rule.index}, line {rule.line}){unused}")
    for name, rule in decision.on_demand:
        e = rule.elevate
        how = f"reason {e.reason}, at most {e.max // 60}m" + (f", approved by a member of {e.approvers}"
                                                               if e.approvers else "")
        lines.append(f"elevate:   {name} = {rule.role} (rule {rule.index}, line {rule.line}; {how}){unused}")
    return lines
