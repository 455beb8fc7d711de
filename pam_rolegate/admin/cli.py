"""The `rolegate` command: one run_<verb>(args, deps) per subcommand, flag wiring in `parser()`.

Imports of heavy modules (boto3 through sts, yaml through config) happen inside the verbs
that need them: `rolegate env` runs in every login shell and must start fast.
"""

import argparse
import io
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, TextIO

from .. import __version__
from ..errors import ConfigError, RolegateError
from . import exitcodes

ELEVATE_CLI_DEADLINE = 600  # past the broker's own bounds: 3 minutes of PAM plus 5 waiting for approval


@dataclass(frozen=True)
class Deps:
    """What the verbs reach outside themselves; tests pass their own."""

    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)
    stdin: TextIO = field(default_factory=lambda: sys.stdin)  # where PAM's questions are answered
    engine_factory: Callable = None  # config -> sts.StsEngine; None means the real one

    def say(self, text=""):
        print(text, file=self.out)

    def warn(self, text):
        print(f"rolegate: {text}", file=self.err)


def _fail(args, deps, message, code):
    """Report a failure: on stderr, and with --json also as the one JSON object on stdout."""
    deps.warn(message)
    if getattr(args, "json", False):
        deps.say(json.dumps({"error": message, "exit_code": code}, indent=2))
    return code


def _load_config(args, deps):
    from ..rules import config

    return config.load(config.config_path(getattr(args, "config", None), deps.environ))


def _load_rules(args, deps):
    """The config with its rules. With rules_from they are the parameter's: from `--rules FILE` (a
    copy of the rules document), else the broker's last good copy (readable by root only)."""
    from ..rules import config
    from ..backends import fleet

    cfg = _load_config(args, deps)
    if cfg.rules_from is None:
        return cfg
    if getattr(args, "rules", None):
        try:
            with open(args.rules, encoding="utf-8") as fh:
                return config.parse_rules(fh.read(), args.rules, cfg)
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot read the rules document: {err}", args.rules) from None
    try:
        doc = fleet.read_cache(cfg)
    except (OSError, RolegateError) as err:
        doc, why = None, str(err)
    else:
        why = f"there is no last good copy at {cfg.rules_cache} yet"
    if doc is None:
        raise RolegateError(f"the rules come from {cfg.rules_from} and {why}; pass --rules FILE (the rules "
                            f"document), or run this as root where rolegated has read the parameter")
    return doc.rules_for(cfg)


def _engine(cfg, deps):
    if deps.engine_factory is not None:
        return deps.engine_factory(cfg)
    from ..backends import sts

    return sts.StsEngine.from_config(cfg)


# -- verbs -------------------------------------------------------------------------------------


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

    cfg = _load_rules(args, deps)
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
                return _fail(args, deps, f"{err}; check the name, or whether NSS (LDAP/SSSD) is reachable",
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
        return _fail(args, deps, f"{err}; check the name, or whether NSS (LDAP/SSSD) is reachable",
                     exitcodes.NEGATIVE)
    decision = mapping.decide(cfg, ident)
    engine = _engine(cfg, deps) if args.assume and decision.rule is not None else None
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
    cfg = _load_rules(args, deps)
    docs = policy_documents(cfg, args.gatekeeper)
    deps.say(json.dumps(docs, indent=2))
    return exitcodes.OK


def _broker_call(request, deps, timeout=5.0):
    from ..hookside import client, protocol

    reply = client.call(request, path=client.socket_path(environ=deps.environ), timeout=timeout)
    if isinstance(reply, protocol.ErrorReply):
        raise BrokerRefused(reply.code, reply.message)
    return reply


class BrokerRefused(RolegateError):
    """The broker answered with an error reply; `refusal` is its code (exitcodes.BROKER_REFUSAL)."""

    def __init__(self, code, message):
        self.refusal = code
        super().__init__(message)


def _quote(value, shell):
    if shell == "fish":
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return "'" + value.replace("'", "'\\''") + "'"  # sh and csh alike


_SET = {"sh": "export {k}={v}", "csh": "setenv {k} {v}", "fish": "set -gx {k} {v}"}
_UNSET = {"sh": "unset {k}", "csh": "unsetenv {k}", "fish": "set -e {k}"}


def shell_lines(env, unset, shell):
    """Shell code that unsets `unset` and sets `env`, quoted for sh, csh or fish."""
    lines = [_UNSET[shell].format(k=k) for k in unset]
    lines += [_SET[shell].format(k=k, v=_quote(v, shell)) for k, v in sorted(env.items())]
    return lines


def own_region_named(environ, runtime_dir):
    """Does this user's own AWS config (AWS_CONFIG_FILE, else ~/.aws/config, as the SDKs find it)
    name a region for the profile `environ` selects? Read with the user's own rights; a file that
    is missing, unreadable, not a regular file or too large names none (rolegate's region stays)."""
    from ..backends import homefiles
    from ..rules import awsconfig

    path = environ.get(awsconfig.CONFIG_FILE_VAR)
    if path:
        path = os.path.expanduser(os.path.expandvars(path))  # as botocore does
    else:
        path = os.path.join(environ.get("HOME") or os.path.expanduser("~"), *homefiles.AWS_CONFIG)
    if path.startswith(runtime_dir):
        return False  # 0.3.0's process delivery file (a session from before an upgrade): not the user's
    try:
        text = homefiles.read_own(path).decode("utf-8")
    except (homefiles.Unreadable, UnicodeDecodeError):
        return False
    return awsconfig.names_region(text, awsconfig.profile_in_use(environ))


def run_env(args, deps):
    from ..hookside import protocol
    from ..rules import awsconfig

    reply = _broker_call(protocol.Env(), deps)
    env = reply.get("env") or {}
    runtime_dir = (reply.get("runtime_dir") or "/run/rolegate").rstrip("/") + "/"
    # Static keys would shadow the grant; pointers into runtime_dir that are not ours are stale.
    unset = [k for k in protocol.STATIC_KEY_VARS if k in deps.environ]
    unset += [k for k in protocol.POINTER_VARS
              if k not in env and deps.environ.get(k, "").startswith(runtime_dir)]
    if protocol.CONTAINER_TOKEN_VAR in unset and protocol.CONTAINER_URI_VAR in deps.environ:
        unset.append(protocol.CONTAINER_URI_VAR)
    # The user's own region for the profile in use wins (docs/sessions.md "Whose region wins").
    if awsconfig.REGION_VARS[0] in env and own_region_named(deps.environ, runtime_dir):
        env = {k: v for k, v in env.items() if k not in awsconfig.REGION_VARS}
        unset += [k for k in awsconfig.REGION_VARS if k in deps.environ]
    for line in shell_lines(env, unset, args.shell):
        deps.say(line)
    if not reply.get("granted") and args.verbose:
        deps.warn(f"no role for you on this host: {reply.get('reason')}")
    return exitcodes.OK


def run_region(args, deps):
    """For a login shell of a PAM session that selects a profile or config file of its own: the
    broker decided at login for `default` in ~/.aws/config; decide again for what this shell uses.
    rolegate's config (YAML: the slow part of this) is read only when its region or runtime_dir is
    needed, so the common answer, "your profile names a region", costs an interpreter start."""
    from ..rules import awsconfig

    def load():
        try:
            return _load_config(args, deps)
        except (ConfigError, OSError) as err:
            deps.warn(f"cannot read rolegate's config ({err}); leaving the region variables as they are")
            return None

    cfg = load() if awsconfig.CONFIG_FILE_VAR in deps.environ else None  # rolegate's own (0.3.0's)?
    if awsconfig.CONFIG_FILE_VAR in deps.environ and cfg is None:
        return exitcodes.OK
    runtime_dir = (cfg.runtime_dir if cfg else "/run/rolegate").rstrip("/") + "/"
    present = [k for k in awsconfig.REGION_VARS if k in deps.environ]
    lines = []
    if own_region_named(deps.environ, runtime_dir):
        lines = shell_lines({}, present, args.shell)
    elif not present:
        cfg = cfg or load()
        if cfg is not None:
            lines = shell_lines({k: cfg.region for k in awsconfig.REGION_VARS}, [], args.shell)
    for line in lines:
        deps.say(line)
    return exitcodes.OK


def run_credentials(args, deps):
    from ..hookside import protocol

    reply = _broker_call(protocol.GetCredentials(grant=args.grant, profile=args.profile), deps)
    deps.say(json.dumps({k: reply.get(k) for k in
                         ("Version", "AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration")}))
    return exitcodes.OK


def run_status(args, deps):
    from ..hookside import protocol

    reply = _broker_call(protocol.Status(), deps, timeout=30.0)
    grants = reply.get("grants") or []
    # The reply streams sessions apart from their grants (any size fits); put them back together.
    by_grant = {}
    for s in reply.get("sessions") or []:
        by_grant.setdefault(s.get("grant"), []).append({k: v for k, v in s.items() if k != "grant"})
    if os.geteuid() == 0:
        for g in grants:
            g["session_list"] = by_grant.get(g["grant"], [])
    if args.json:
        deps.say(json.dumps({"grants": grants, "delivery": reply.get("delivery")}, indent=2))
        return exitcodes.OK
    if not grants:
        deps.say("no grants" + ("" if os.getuid() == 0 else " for you") + " on this host")
        return exitcodes.OK
    rows = [("PRINCIPAL", "TARGET", "PROFILE", "ROLE", "SERVICE", "STATE", "SESSIONS", "EXPIRES", "NEXT REFRESH")]
    for g in grants:
        e = g.get("elevation")
        state = g.get("state") or "live"
        if e:
            state = f"elevated {e['seconds_left'] // 60}m left: {e['reason']}"
        rows.append((g["principal"], g["target"], g.get("profile") or "default", g["role"], g.get("service") or "-",
                     state,
                     str(g["sessions"]), g["expires"] or "-",
                     g["next_refresh"] + (f" (failed {g['failures']}x)" if g.get("failures") else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        deps.say("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return exitcodes.OK


def run_whoami(args, deps):
    from ..backends import sts

    region = deps.environ.get("AWS_REGION") or deps.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    try:  # the host's sts_endpoint, when this user may read the config (it holds no secrets)
        endpoint = _load_config(args, deps).sts_endpoint
    except (ConfigError, OSError):
        endpoint = None
    who = sts.session_identity(region, endpoint, profile=args.profile)
    deps.say(json.dumps(who, indent=2) if args.json else who["Arn"])
    return exitcodes.OK


def session_grant(environ, runtime_dir=None):
    """The grant id this environment's rolegate variables point at (RUNTIME_DIR/grants/ID/FILE), or
    None. Without runtime_dir, any .../grants/ID/FILE (the broker checks whose it is anyway)."""
    from ..hookside import protocol

    for var in protocol.POINTER_VARS:
        path = environ.get(var, "")
        if runtime_dir is not None:
            prefix = runtime_dir.rstrip("/") + "/grants/"
            if path.startswith(prefix):
                return path[len(prefix):].split("/", 1)[0] or None
        elif "/grants/" in path:
            parts = path.rsplit("/grants/", 1)[1].split("/")
            if len(parts) == 2 and parts[0]:
                return parts[0]
    return None


def _ask(event, deps):
    """One PAM prompt, asked on the terminal (a hidden one without echo); from standard input when
    there is no terminal (scripts, tests). None at end of input."""
    import getpass

    text = event.get("text") or ""
    if event.get("kind") == "echo_off" and deps.stdin.isatty():
        try:
            return getpass.getpass(text)
        except EOFError:
            return None
    deps.err.write(text)
    deps.err.flush()
    line = deps.stdin.readline()
    if not line:
        return None
    return line.rstrip("\n")


def find_command(name, environ):
    """Where `name` would be run from (PATH from `environ`, as execvp looks), or the exit code that
    says why it cannot be: exitcodes.CMD_NOT_FOUND, or CMD_NOT_EXECUTABLE for a file that is there
    but not executable (or a directory), as env(1) tells them apart."""
    if "/" in name:
        candidates = [name]
    else:
        candidates = [os.path.join(d or ".", name) for d in environ.get("PATH", os.defpath).split(os.pathsep)]
    seen = False
    for path in candidates:
        if not os.path.exists(path):
            continue
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
        seen = True
    return exitcodes.CMD_NOT_EXECUTABLE if seen else exitcodes.CMD_NOT_FOUND


def run_command(argv, env):
    """Run CMD to its end and return its exit code (128+N when signal N ended it). Ctrl-C is CMD's
    to act on, as a shell leaves it: rolegate ignores SIGINT meanwhile (so it still drops the
    profile afterwards), and CMD starts with SIGINT's default action."""
    import signal
    import subprocess

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc = subprocess.Popen(argv, env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        code = proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    return exitcodes.SIGNAL_BASE - code if code < 0 else code


class _Ended(Exception):
    """An elevation request that ends before a verdict: cancelled, or given up on."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def run_elevate(args, deps):
    """rolegate elevate PROFILE --reason TEXT [--for DURATION] [-- CMD ...]: PAM's questions on this
    terminal, an approver's word where the rule wants one, then the profile for this session.
    With -- CMD, every failure of rolegate's own before CMD runs is ELEVATE_FAILED (env(1)'s 125),
    so CMD's own codes stay unambiguous."""
    from ..hookside import protocol

    from ..rules.config import parse_duration

    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    before_cmd = exitcodes.ELEVATE_FAILED if args.command else None

    def fail(message, code):
        return _fail(args, deps, message, before_cmd or code)

    seconds = None
    if args.json and args.command:
        return fail("--json reports an elevation of this session; with -- CMD, CMD's own output is what comes out "
                    "(drop one of the two)", exitcodes.USAGE)
    if args.duration:
        try:
            seconds = parse_duration(args.duration)
        except (ValueError, ConfigError) as err:
            return fail(f"--for: {err}", exitcodes.USAGE)
    if args.command:
        # Before PAM asks anything: a mistyped command should not cost a password and an approval.
        found = find_command(args.command[0], deps.environ)
        if isinstance(found, int):
            why = "not found" if found == exitcodes.CMD_NOT_FOUND else "not executable"
            return _fail(args, deps, f"{args.command[0]}: {why}; nothing was asked of the broker", found)
    # The broker decides every refusal (one `denied: action=elevate` line each): a profile, reason
    # or --for it would refuse is sent anyway, only made to fit the wire (a string of at most
    # MAX_STRING characters, valid UTF-8; a 32-bit count), and refused there as unknown, too long
    # or out of range.
    def fit(text):
        return None if text is None else \
            text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")[:protocol.MAX_STRING]

    if seconds is not None:
        seconds = min(seconds, 2 ** 31 - 1)
    grant = session_grant(deps.environ)
    try:
        reply = _broker_call(protocol.Elevate(grant=grant, profile=fit(args.profile), reason=fit(args.reason),
                                              seconds=seconds), deps)
    except RolegateError as err:
        return fail(f"not elevated: {err}", exitcodes.of_error(err))
    rid, waiting_said = reply.get("id"), False
    # The broker's own bounds (every prompt, the conversation, an approval) end a request well within
    # this; past it the broker is not answering as it should, and waiting longer helps nobody.
    deadline = time.monotonic() + ELEVATE_CLI_DEADLINE
    try:
        while True:
            answer = None
            for event in reply.get("events") or []:
                if event.get("kind") in ("echo_off", "echo_on"):
                    answer = (event.get("prompt"), _ask(event, deps))
                    if answer[1] is None:
                        raise _Ended(exitcodes.NEGATIVE, "not elevated: no answer to PAM's question (end of input)")
                else:
                    deps.warn(event.get("text") or "")
            state = reply.get("state")
            if state in ("granted", "denied", "failed"):
                break
            if time.monotonic() > deadline:
                raise _Ended(exitcodes.BROKER_UNREACHABLE,
                             f"the broker did not finish request {rid} in {ELEVATE_CLI_DEADLINE}s; giving up")
            if answer is not None:
                reply = _broker_call(protocol.ElevationPoll(id=rid, prompt=answer[0], answer=answer[1]), deps)
                continue
            if state == "awaiting-approval" and not waiting_said:
                deps.warn(f"waiting for a member of {reply.get('approvers')} to run: rolegate approve {rid}")
                waiting_said = True
            time.sleep(0.2)
            reply = _broker_call(protocol.ElevationPoll(id=rid), deps)
    except (KeyboardInterrupt, _Ended, RolegateError) as err:
        try:
            _broker_call(protocol.ElevationCancel(id=rid), deps)
        except RolegateError:
            pass
        if isinstance(err, KeyboardInterrupt):
            return _fail(args, deps, "elevation cancelled", exitcodes.INTERRUPTED)
        code = err.code if isinstance(err, _Ended) else exitcodes.of_error(err)
        return fail(str(err) if isinstance(err, _Ended) else f"not elevated: {err}", code)
    if state != "granted":
        # denied: PAM or an approver said no; failed: STS refused, or the session ended first.
        return fail(f"not elevated: {reply.get('message')}",
                    exitcodes.NEGATIVE if state == "denied" else exitcodes.FAILED)
    deps.warn(f"elevated: {args.profile} is {reply.get('role')} until {reply.get('until')} "
              f"(aws --profile {args.profile}; rolegate drop {args.profile} ends it sooner)")
    if args.json:
        deps.say(json.dumps({"profile": args.profile, "state": state, "role": reply.get("role"),
                             "until": reply.get("until"), "id": rid}, indent=2))
    if not args.command:
        return exitcodes.OK
    env = dict(deps.environ, AWS_PROFILE=args.profile)
    env.pop("AWS_DEFAULT_PROFILE", None)
    try:
        code = run_command(args.command, env)
    except OSError as err:  # gone or changed since find_command looked
        deps.warn(f"cannot run {args.command[0]}: {err}")
        code = exitcodes.CMD_NOT_FOUND if isinstance(err, FileNotFoundError) else exitcodes.CMD_NOT_EXECUTABLE
    finally:
        try:
            _broker_call(protocol.Drop(grant=grant, profile=args.profile), deps)
        except RolegateError as err:
            deps.warn(f"could not drop {args.profile}: {err}")
    return code


def run_drop(args, deps):
    from ..hookside import protocol

    reply = _broker_call(protocol.Drop(grant=session_grant(deps.environ), profile=args.profile), deps)
    deps.say(f"dropped {reply.get('dropped')} ({reply.get('role')})")
    return exitcodes.OK


def _show_request(r):
    return (f"{r.get('id')}: {r.get('principal')} asks for {r.get('profile')} = {r.get('role')} for "
            f"{(r.get('seconds') or 0) // 60}m: {r.get('reason')}")


def run_approve(args, deps):
    from ..hookside import protocol

    request = (protocol.Deny if args.verb == "deny" else protocol.Approve)(id=args.id)
    reply = _broker_call(request, deps)
    deps.say(("denied " if args.verb == "deny" else "approved ") + _show_request(reply.data))
    return exitcodes.OK


def run_approvals(args, deps):
    from ..hookside import protocol

    pending = _broker_call(protocol.Approvals(), deps).get("pending") or []
    if args.json:
        deps.say(json.dumps({"pending": pending}, indent=2))
        return exitcodes.OK
    if not pending:
        deps.say("no elevation request waits for your approval")
    for r in pending:
        deps.say(_show_request(r))
    return exitcodes.OK


def run_profiles(args, deps):
    """This session's profiles (or, outside one, every login's of yours): default and named, the
    role of each, whether the broker holds its credentials now and until when."""
    from ..hookside import protocol

    reply = _broker_call(protocol.Status(), deps, timeout=30.0)
    grants = reply.get("grants") or []
    runtime_dir = reply.get("runtime_dir") or "/run/rolegate"
    mine = session_grant(deps.environ, runtime_dir)
    views = [g for g in grants if not g.get("profile") and g.get("state") == "live" and g.get("sessions")]
    if mine is not None:
        views = [g for g in views if g["grant"] == mine]
    rows = []
    for view in views:
        held = {g["profile"]: g for g in grants if g.get("profile") and g["principal"] == view["principal"]
                and g["target"] == view["target"] and g.get("service") == view.get("service")}
        rows.append({"profile": "default", "role": view["role"], "service": view.get("service"),
                     "held": True, "expires": view["expires"]})
        for name, role in view.get("profiles") or []:
            g = held.get(name)
            now_held = g is not None and g["role"] == role and g.get("seconds_left", 0) > 0
            rows.append({"profile": name, "role": role, "service": view.get("service"), "held": now_held,
                         "expires": g["expires"] if now_held else None})
    if args.json:
        deps.say(json.dumps({"profiles": rows}, indent=2))
        return exitcodes.OK
    if not rows:
        deps.say("no rolegate profiles in this session" if mine else "no live rolegate session of yours on this host")
        return exitcodes.NEGATIVE
    table = [("PROFILE", "ROLE", "SERVICE", "HELD")]
    for r in rows:
        table.append((r["profile"], r["role"], r["service"] or "-",
                      f"until {r['expires']}" if r["held"] else "no (assumed on first use)"))
    widths = [max(len(t[i]) for t in table) for i in range(len(table[0]))]
    for t in table:
        deps.say("  ".join(c.ljust(w) for c, w in zip(t, widths)).rstrip())
    return exitcodes.OK


def run_firewall(args, deps):
    from ..backends import firewall

    if args.action == "show":
        table = firewall.show()
        deps.say(table.rstrip() if table else f"no IMDS lockdown in force (table inet {firewall.TABLE} is absent)")
        counts = firewall.audit_counts() if table else None
        if counts is not None:
            for line in audit_report(counts):
                deps.say(line)
        return exitcodes.OK if table else exitcodes.NEGATIVE
    if os.geteuid() != 0:
        deps.warn("changing the firewall needs root")
        return exitcodes.FAILED
    if args.action == "remove":
        deps.say("IMDS lockdown removed" if firewall.remove() else "no IMDS lockdown was in force")
        return exitcodes.OK
    cfg = _load_config(args, deps)
    uids = firewall.apply_config(cfg)
    if cfg.imds.mode == "audit":
        deps.say(f"IMDS is NOT locked: audit mode. Every user reaches IMDS ({firewall.IMDS_V4}, {firewall.IMDS_V6}), "
                 f"and the kernel counts the connections of each uid but {', '.join(map(str, uids))}: "
                 f"`rolegate firewall show` lists them. To enforce: imds.mode: reject, then "
                 f"`systemctl restart rolegated`")
    else:
        deps.say(f"IMDS ({firewall.IMDS_V4}, {firewall.IMDS_V6}) is now reachable only by uid "
                 f"{', '.join(map(str, uids))}")
    if cfg.imds.mode == "emulate":
        deps.say(f"every other user's TCP to port 80 there goes to the emulator on 127.0.0.1:{cfg.imds.port} "
                 f"and [::1]:{cfg.imds.port}; the rest is refused")
    ports = firewall.door_ports(cfg)
    if ports:
        deps.say(f"each user but root may hold {firewall.DOOR_CONNECTIONS_PER_UID} connections at once to the "
                 f"broker's port{'s' if len(ports) > 1 else ''} {', '.join(map(str, ports))}")
    return exitcodes.OK


def audit_report(counts):
    """`firewall show`'s lines for audit mode: the warning, then each counted uid's use of IMDS."""
    lines = ["", "IMDS is NOT locked: audit mode. Users' IMDS connections pass and are counted per uid "
                 "(root and imds_allow_users are not counted; PACKETS and BYTES: what each sent to IMDS)."]
    if not counts:
        return lines + ["no user has connected to IMDS since the rules were applied"]
    table = [("UID", "USER", "CONNECTIONS", "PACKETS", "BYTES")]
    table += [(str(c.uid), c.name, str(c.connections), str(c.packets), str(c.bytes)) for c in counts]
    widths = [max(len(t[i]) for t in table) for i in range(len(table[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(t, widths)).rstrip() for t in table]
    return lines + ["to enforce: give these users imds_allow_users or a role of their own, set imds.mode: reject, "
                    "then `systemctl restart rolegated`"]


def run_install(args, deps):
    from . import install

    if os.geteuid() != 0:
        deps.warn("install needs root")
        return exitcodes.FAILED
    try:
        install.install(options=args.options, firewall=not args.no_firewall, say=deps.say)
    except install.InstallError as err:
        deps.warn(str(err))
        return exitcodes.FAILED
    return exitcodes.OK


def run_uninstall(args, deps):
    from . import install

    if os.geteuid() != 0:
        deps.warn("uninstall needs root")
        return exitcodes.FAILED
    install.uninstall(say=deps.say)
    return exitcodes.OK


def run_doctor(args, deps):
    from ..rules import config
    from . import doctor

    if os.geteuid() != 0:
        deps.warn("doctor needs root (it probes IMDS as another uid and reads root-only files)")
        return exitcodes.FAILED
    results = doctor.run_all(config.config_path(args.config, deps.environ), assume=args.assume)
    if args.json:
        deps.say(json.dumps([r.__dict__ for r in results], indent=2))
    else:
        for r in results:
            deps.say(f"{r.verdict:4}  {r.name:18} {r.detail}")
            if r.verdict != doctor.PASS and r.fix:
                deps.say(f"      {'':18} fix: {r.fix}")
    return exitcodes.NEGATIVE if any(r.verdict == doctor.FAIL for r in results) else exitcodes.OK


def run_daemon(args, deps):
    from .. import broker
    from ..rules import config

    if os.geteuid() != 0:
        deps.warn("rolegated must run as root (it reads the gatekeeper credentials and chowns files)")
        return exitcodes.FAILED
    return broker.serve(config.config_path(args.config, deps.environ))


# -- wiring --------------------------------------------------------------------------------------


RULES_HELP = "with rules_from: a rules document to read the rules from (default: the broker's last good copy)"
CONFIG_HELP = "the config file (default: $ROLEGATE_CONFIG, else /etc/rolegate/rolegate.yaml)"
JSON_HELP = "print one JSON object on standard output instead of text (errors too, with their exit code)"
VERSION = f"rolegate {__version__}"
SHELL_HELP = "the shell syntax to write: sh (the default; bash, dash and zsh too), csh or fish"


def _add_config(p, default, where=""):
    """--config on `p`. Each command takes it too, after its name, with a SUPPRESS default so that a
    value given before the command is not overwritten by the command's parser."""
    p.add_argument("--config", metavar="PATH", default=default, help=CONFIG_HELP + where)


def parser():
    p = argparse.ArgumentParser(prog="rolegate", description="Per-user AWS IAM roles for logins on shared Linux "
                                "hosts: check and explain the rules, set up a host, and reach the broker "
                                "(rolegated) for your own credentials.",
                                epilog="Exit codes: " + "; ".join(f"{c} {what}" for c, what in exitcodes.SHORT)
                                + ". See rolegate(8).")
    p.add_argument("--version", action="version", version=VERSION, help="print the version and exit")
    _add_config(p, None, "; before or after the command")
    sub = p.add_subparsers(dest="verb", metavar="COMMAND", title="commands",
                           help="one of these; `rolegate COMMAND --help` says more")
    sub.required = True

    def command(name, help, description=None, run=None):
        s = sub.add_parser(name, help=help, description=description or help[0].upper() + help[1:] + ".")
        _add_config(s, argparse.SUPPRESS)
        s.set_defaults(run=run)
        return s

    s = command("check-config", "validate a config file; warn when no rule maps anyone", run=run_check_config)
    s.add_argument("path", nargs="?", help="the file to check (default: the config --config names)")
    s.add_argument("--json", action="store_true", help=JSON_HELP)

    s = command("check-user", "which rule and role a login would get, and why", run=run_check_user,
                description="Which rule and role a login would get, and why: every named profile it would get "
                            "with the rule that gives each, and the session name and source identity of each. "
                            "Exit 1 when no rule matches, and for a service the PAM hook never runs for.")
    s.add_argument("user", help="the user logging in (for sudo/su: the invoking user)")
    s.add_argument("--service", default="sshd", help="the PAM service (default sshd); the hook runs for sshd, "
                                                     "sudo, sudo-i and login, the broker serves shell and imds")
    s.add_argument("--ruser", help="PAM_RUSER: the invoking user, for sudo/su services")
    s.add_argument("--target", help="the account the session runs as (default: USER)")
    s.add_argument("--assume", action="store_true", help="really call AssumeRole and GetCallerIdentity")
    s.add_argument("--rules", metavar="FILE", help=RULES_HELP)
    s.add_argument("--json", action="store_true", help=JSON_HELP)

    command("daemon", "run the broker (rolegated) in the foreground", run=run_daemon,
            description=DAEMON_DESCRIPTION)

    s = command("env", "shell lines that point this shell at your credentials", run=run_env)
    s.add_argument("--shell", choices=("sh", "csh", "fish"), default="sh", help=SHELL_HELP)
    s.add_argument("-v", "--verbose", action="store_true", help="say why when you have no role")

    s = command("region", "shell lines: rolegate's region, or none where your own AWS config names one for the "
                          "profile in use (profile.d runs it when AWS_PROFILE is set)", run=run_region)
    s.add_argument("--shell", choices=("sh", "csh", "fish"), default="sh", help=SHELL_HELP)

    s = command("credentials", "credential_process JSON for your grant", run=run_credentials)
    s.add_argument("--grant", help="the grant id (written into the session's AWS config file)")
    s.add_argument("--profile", help="one of the grant's named profiles (assumed on first use)")

    s = command("profiles", "the profiles this session can use, their roles, which are held and until when",
                run=run_profiles)
    s.add_argument("--json", action="store_true", help=JSON_HELP)

    s = command("elevate", "an on-demand profile for this session: PAM asks who you are, then STS is called with "
                           "your reason in the session tags", run=run_elevate,
                description="An on-demand profile for this session: the broker runs the rolegate PAM service and "
                            "relays its questions to this terminal (from standard input when there is none), waits "
                            "for an approver where the rule names one, then assumes the role with your reason in "
                            "the session tags. With -- CMD, runs CMD with AWS_PROFILE=PROFILE, drops the profile "
                            "when CMD exits and exits with CMD's code (125: rolegate failed before CMD ran; 126: "
                            "CMD is not executable; 127: CMD was not found).")
    s.add_argument("profile", help="the on-demand profile (`rolegate check-user` lists yours)")
    s.add_argument("--reason", help="why (kept by CloudTrail as a session tag; required unless the rule says "
                                    "optional)")
    s.add_argument("--for", dest="duration", metavar="DURATION", help="how long (15m up to the rule's max, "
                                                                      "which is the default)")
    s.add_argument("--json", action="store_true", help="print the result as one JSON object (PAM's questions "
                                                       "still go to the terminal); not with -- CMD")
    s.add_argument("command", nargs="*", metavar="CMD", help="after --: one command to run with the profile, "
                                                              "which is dropped when it exits")

    s = command("drop", "end an elevation now", run=run_drop)
    s.add_argument("profile", help="the elevated profile to drop")

    for verb, what in (("approve", "approve an elevation request (members of its approvers group)"),
                       ("deny", "deny an elevation request (members of its approvers group)")):
        s = command(verb, what, run=run_approve)
        s.add_argument("id", help="the request's id (`rolegate approvals` lists them)")

    s = command("approvals", "elevation requests waiting for your approval", run=run_approvals)
    s.add_argument("--json", action="store_true", help=JSON_HELP)

    s = command("status", "grants, roles and expiry (yours; root sees all)", run=run_status)
    s.add_argument("--json", action="store_true", help=JSON_HELP)

    s = command("whoami", "GetCallerIdentity with this session's credentials", run=run_whoami)
    s.add_argument("--profile", help="a profile's instead of the default's (as aws --profile)")
    s.add_argument("--json", action="store_true", help=JSON_HELP)

    s = command("doctor", "check every piece of the installation: PASS/WARN/FAIL with the fix", run=run_doctor)
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    s.add_argument("--assume", action="store_true", help="also assume every configured role")

    s = command("install", "put rolegate in place: PAM, profile.d, systemd unit, firewall", run=run_install)
    s.add_argument("--options", default="", help="hook options for the PAM line, e.g. 'on_error=deny timeout=2'")
    s.add_argument("--no-firewall", action="store_true", help="do not apply the IMDS lockdown now")

    command("uninstall", "remove exactly what install put in place", run=run_uninstall)

    s = command("firewall", "the IMDS lockdown: apply, remove or show the nftables rules", run=run_firewall)
    s.add_argument("action", choices=("apply", "remove", "show"), help="apply or remove the lockdown (root), "
                                                                       "or show the rules in force")

    s = command("policy", "IAM policies the config needs, as JSON", run=run_policy)
    s.add_argument("--gatekeeper", default="arn:aws:iam::ACCOUNT_ID:role/GATEKEEPER_ROLE",
                   help="the gatekeeper (instance) role's ARN, for the trust policies")
    s.add_argument("--rules", metavar="FILE", help=RULES_HELP)
    return p


DAEMON_DESCRIPTION = ("Run the broker, rolegated, in the foreground (as root). SIGHUP rereads the config (a bad one "
                      "is refused and the last good one kept); SIGTERM stops it, leaving its records and files for "
                      "the next start.")


def daemon_parser():
    """`rolegated`'s own parser (rolegate(8)'s `daemon` is the same program)."""
    p = argparse.ArgumentParser(prog="rolegated", description=DAEMON_DESCRIPTION)
    p.add_argument("--version", action="version", version=VERSION, help="print the version and exit")
    _add_config(p, None)
    p.set_defaults(run=run_daemon, verb="daemon")
    return p


def _split_command(argv):
    """(rolegate's arguments, CMD) for `rolegate elevate PROFILE ... -- CMD ARGS`: argparse's
    subparsers do not pass a `--` through."""
    if "elevate" in argv and "--" in argv[argv.index("elevate"):]:
        cut = argv.index("--", argv.index("elevate"))
        return argv[:cut], argv[cut + 1:]
    return argv, []


def _parse(p, argv, command):
    """parse_args, with env(1)'s rule for `elevate -- CMD`: a usage error there is ELEVATE_FAILED,
    so it cannot be taken for CMD's own 2."""
    try:
        return p.parse_args(argv)
    except SystemExit as stop:
        if command and stop.code == exitcodes.USAGE:
            raise SystemExit(exitcodes.ELEVATE_FAILED) from None
        raise


def run(p, argv, deps, command=()):
    """Parse, run the verb and turn what went wrong into the exit-code table's code."""
    args = None
    try:
        args = _parse(p, argv, command)
        if command:
            args.command = list(args.command or []) + list(command)
        code = args.run(args, deps)
        deps.out.flush()  # here, so a reader that went away (`| head`) is met below, not at exit
        return code
    except BrokenPipeError:
        # Nobody reads standard output any more: stop quietly. Point it at /dev/null so the
        # interpreter's own flush at exit has nowhere to fail either.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, deps.out.fileno())
        except (OSError, ValueError, io.UnsupportedOperation):
            pass  # not a real file (a test's StringIO): nothing will flush it at exit
        return exitcodes.BROKEN_PIPE
    except KeyboardInterrupt:
        return exitcodes.INTERRUPTED
    except (RolegateError, OSError) as err:
        return _fail(args, deps, str(err), exitcodes.of_error(err))


def main(argv=None, deps=None):
    argv, command = _split_command(list(sys.argv[1:] if argv is None else argv))
    return run(parser(), argv, deps or Deps(), command)


def daemon_main(argv=None, deps=None):
    """`rolegated`: the broker in the foreground (same as `rolegate daemon`)."""
    return run(daemon_parser(), list(sys.argv[1:] if argv is None else argv), deps or Deps())


if __name__ == "__main__":
    sys.exit(main())
