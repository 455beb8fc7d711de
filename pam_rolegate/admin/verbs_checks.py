"""The verbs that check a config without the broker: check-config, check-user (which rule and role a
login gets, and why) and policy (the IAM policies the config needs)."""

import json

from . import exitcodes
from .deps import load_rules, report_failure, sts_engine
from ..errors import ConfigError


def maps_nobody(cfg):
    """Why no login can get a role from this config, or None. Rules with a profile only sit beside
    a default role, so without a rule for the default nobody gets anything; with rules_from the
    rules are the parameter's, which this file does not show."""
    if cfg.rules_from is not None:
        return None
    if not cfg.roles:
        return "it has no rules (roles is empty or missing, and there is no rules_from)"
    if all(rule.profile is not None for rule in cfg.roles):
        return "every rule names a profile, and a login gets named profiles only beside a default role"
    return None


def run_check_config(args, deps):
    from .. import hostcheck
    from ..rules import config

    path = args.path or config.config_path(args.config, deps.environ)
    try:
        cfg = config.load(path)
        # What the broker would refuse at start and the firewall at apply, by the same functions; a
        # user who may not search some directory on the way is told what stayed unchecked (root's
        # check-config sees all). Host checks: run it on the host the config is for.
        unchecked = hostcheck.check_host(cfg)
    except ConfigError as err:
        if args.json:
            deps.say(json.dumps({"path": path, "valid": False, "error": str(err), "line": err.line,
                                 "column": err.column}, indent=2))
        else:
            deps.say(str(err))
        return exitcodes.NEGATIVE
    why = maps_nobody(cfg)
    warnings = [f"{path} maps nobody: {why}; every login gets no role until a rule without a profile "
                f"matches it (add one under roles:, see rolegate.yaml(5))"] if why else []
    for warning in warnings:
        deps.warn(f"warning: {warning}")
    if args.json:
        deps.say(json.dumps({"path": path, "valid": True, "rules": len(cfg.roles), "rules_from": cfg.rules_from,
                             "source": str(cfg.source), "delivery": cfg.delivery, "region": cfg.region,
                             "not_checked": list(unchecked), "warnings": warnings}, indent=2))
        return exitcodes.OK
    for note in unchecked:
        deps.say(f"{path}: not checked: {note}")
    deps.say(f"{path}: OK ({len(cfg.roles)} rule{'s' if len(cfg.roles) != 1 else ''}, "
             f"source {cfg.source}, delivery {cfg.delivery}, region {cfg.region})")
    return exitcodes.OK


# The PAM hook runs for install.HOOK_SERVICES only (its guard in the PAM profile), the broker serves
# `shell` and `imds` itself. su's services are the ones people expect to work: their shells do ask,
# as `shell` (mapping.SWITCH_USER_SERVICES lists them for the rules' principal).
SU_SERVICES = ("su", "su-l")


def _hookless(service):
    """Why no rolegate credentials come from a login through `service`, or None when they can."""
    from ..rules import config, mapping
    from .install import HOOK_SERVICES

    if service in HOOK_SERVICES or service in (mapping.SHELL_SERVICE, config.IMDS_SERVICE):
        return None
    hook = f"the hook never runs for {service} (its PAM guard admits {', '.join(HOOK_SERVICES)} only"
    if service in SU_SERVICES:
        return hook + ": su keeps the caller's PATH, which the hook's interpreter would trust)"
    return hook + f"; {mapping.SHELL_SERVICE} and {config.IMDS_SERVICE} are the broker's own): " \
                  f"no rolegate credentials come from {service}, whatever the rules say"


def _describe(cfg, decision, engine):
    """(lines, dict) for check-user: the decision explained (mapping.explain) and, for the default
    and each named profile, the AssumeRole request it makes; with an engine, performed."""
    from ..backends import sts
    from ..rules import mapping

    ident = decision.identity
    lines = list(mapping.explain(decision))
    found = {"principal": ident.principal, "principal_uid": ident.principal_uid, "groups": list(ident.groups),
             "target": ident.target, "target_uid": ident.target_uid, "service": ident.service,
             "granted": decision.rule is not None, "decision": decision.reason,
             "role": decision.rule.role if decision.rule else None, "profiles": [],
             "on_demand": [{"profile": name, "role": rule.role, "rule": rule.index, "line": rule.line,
                            "reason": rule.elevate.reason, "max": rule.elevate.max,
                            "approvers": rule.elevate.approvers} for name, rule in decision.on_demand]}
    if decision.rule is None:
        return lines, found
    host = engine.host_facts() if engine else None
    for name, rule in (("default", decision.rule),) + decision.profiles:
        request = sts.build_request(cfg, rule, ident, host=host)
        profile = {"profile": name, "role": rule.role, "rule": rule.index, "line": rule.line,
                   "session_name": request.session_name, "source_identity": request.source_identity,
                   "duration": request.duration}
        if name != "default":
            lines.append(f"[{name}]")
        lines += [f"session:   {request.session_name}", f"source id: {request.source_identity}",
                  f"duration:  {request.duration}s"]
        if engine:
            creds = engine.assume(request)
            who = engine.caller_identity(creds)
            expires = f"{creds.expiration:%Y-%m-%dT%H:%M:%SZ}"
            lines += [f"assumed:   {who['Arn']}", f"key:       {creds.masked_key}, expires {expires}"]
            profile.update(assumed=who["Arn"], key=creds.masked_key, expires=expires)
        found["profiles"].append(profile)
    return lines, found


def run_check_user(args, deps):
    from ..rules import mapping

    cfg = load_rules(args, deps)
    why = _hookless(args.service)
    if why:
        # The rules may well match this service, but no login through it ever asks: say so, never
        # a role. su's shells do ask, as `shell` and as the account they run in: show that instead.
        deps.warn(f"warning: {why}")
        decided = f"no role: the PAM hook never runs for {args.service}"
        found = {"service": args.service, "granted": False, "decision": decided, "warnings": [why]}
        lines = [f"service:   {args.service}", f"decision:  {decided}"]
        if args.service in SU_SERVICES:
            account = args.target or args.user
            lines.append(f"instead:   su's shells ask the broker themselves (profile.d, in a login shell: su -l), "
                         f"as service {mapping.SHELL_SERVICE} and as the account they run in, {account}; "
                         f"`rolegate check-user {account} --service {mapping.SHELL_SERVICE}` gives:")
            try:
                ident = mapping.resolve(mapping.LoginFacts(user=account, service=mapping.SHELL_SERVICE))
            except mapping.UnknownUser as err:
                return report_failure(args, deps, f"{err}; check the name, or whether NSS (LDAP/SSSD) is reachable",
                             exitcodes.NEGATIVE)
            shell_lines, found["instead"] = _describe(cfg, mapping.decide(cfg, ident), None)
            lines += ["  " + line for line in shell_lines]
        deps.say(json.dumps(found, indent=2) if args.json else "\n".join(lines))
        return exitcodes.NEGATIVE
    facts = mapping.LoginFacts(user=args.target or args.user, service=args.service,
                               ruser=args.ruser if args.ruser else (args.user if args.target else None))
    try:
        ident = mapping.resolve(facts)
    except mapping.UnknownUser as err:
        return report_failure(args, deps, f"{err}; check the name, or whether NSS (LDAP/SSSD) is reachable",
                     exitcodes.NEGATIVE)
    decision = mapping.decide(cfg, ident)
    engine = sts_engine(cfg, deps) if args.assume and decision.rule is not None else None
    lines, found = _describe(cfg, decision, engine)
    deps.say(json.dumps(found, indent=2) if args.json else "\n".join(lines))
    return exitcodes.OK if decision.rule is not None else exitcodes.NEGATIVE


def parameter_arn(cfg, gatekeeper_arn):
    """rules_from's parameter as an ARN in the gatekeeper's partition and account and the config's
    region. A name that starts with / follows `parameter` directly: parameter/rolegate/rules."""
    parts = gatekeeper_arn.split(":")
    partition, account = (parts[1], parts[4]) if len(parts) >= 6 and parts[0] == "arn" else ("aws", "ACCOUNT_ID")
    return f"arn:{partition}:ssm:{cfg.region}:{account}:parameter{cfg.rules_parameter}"


def policy_documents(cfg, gatekeeper_arn):
    """The gatekeeper's permission policy and each target role's trust policy, as dicts."""
    actions = ["sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity"]
    roles = sorted({r.role for r in cfg.roles})
    statements = []
    if roles:
        statements.append({"Sid": "RolegateAssumeMappedRoles", "Effect": "Allow", "Action": actions, "Resource": roles})
    if cfg.rules_from:
        statements.append({"Sid": "RolegateReadFleetRules", "Effect": "Allow", "Action": "ssm:GetParameter",
                           "Resource": parameter_arn(cfg, gatekeeper_arn)})
    gatekeeper = {"Version": "2012-10-17", "Statement": statements}
    trust = {}
    for role in roles:
        statements = []
        for ext in sorted({r.external_id for r in cfg.roles if r.role == role}, key=lambda e: e or ""):
            # Require a SourceIdentity, so every session of this role names its Linux user.
            cond = {"StringLike": {"sts:SourceIdentity": "*"}}
            if ext:
                cond["StringEquals"] = {"sts:ExternalId": ext}
            statements.append({"Sid": "TrustRolegateGatekeeper", "Effect": "Allow",
                               "Principal": {"AWS": gatekeeper_arn}, "Action": actions, "Condition": cond})
        trust[role] = {"Version": "2012-10-17", "Statement": statements}
    return {"gatekeeper_policy": gatekeeper, "trust_policies": trust}


def run_policy(args, deps):
    cfg = load_rules(args, deps)
    docs = policy_documents(cfg, args.gatekeeper)
    deps.say(json.dumps(docs, indent=2))
    return exitcodes.OK
