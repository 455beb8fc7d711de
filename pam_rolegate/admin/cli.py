"""The `rolegate` command: one run_<verb>(args, deps) per subcommand, flag wiring in `parser()`.

Imports of heavy modules (boto3 through sts, yaml through config) happen inside the verbs
that need them: `rolegate env` runs in every login shell and must start fast.
"""

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, TextIO

from ..errors import ConfigError, RolegateError

EXIT_OK, EXIT_FAIL, EXIT_ERROR = 0, 1, 2
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


def run_check_config(args, deps):
    from ..rules import config

    path = args.path or config.config_path(args.config, deps.environ)
    try:
        cfg = config.load(path)
        # What the broker would refuse at start, by the same functions; a user who may not search
        # some directory on the way is told what stayed unchecked (root's check-config sees all).
        unchecked = config.check_paths(cfg)
    except ConfigError as err:
        deps.say(str(err))
        return EXIT_FAIL
    for note in unchecked:
        deps.say(f"{path}: not checked: {note}")
    deps.say(f"{path}: OK ({len(cfg.roles)} rule{'s' if len(cfg.roles) != 1 else ''}, "
             f"source {cfg.source}, delivery {cfg.delivery}, region {cfg.region})")
    return EXIT_OK


def run_check_user(args, deps):
    from ..rules import mapping

    cfg = _load_rules(args, deps)
    facts = mapping.LoginFacts(user=args.target or args.user, service=args.service,
                               ruser=args.ruser if args.ruser else (args.user if args.target else None))
    try:
        ident = mapping.resolve(facts)
    except mapping.UnknownUser as err:
        deps.warn(f"{err}; check the name, or whether NSS (LDAP/SSSD) is reachable")
        return EXIT_ERROR
    decision = mapping.decide(cfg, ident)
    for line in mapping.explain(decision):
        deps.say(line)
    if decision.rule is None:
        return EXIT_FAIL
    from ..backends import sts

    engine = _engine(cfg, deps) if args.assume else None
    host = engine.host_facts() if engine else None
    for name, rule in (("default", decision.rule),) + decision.profiles:
        request = sts.build_request(cfg, rule, ident, host=host)
        if name != "default":
            deps.say(f"[{name}]")
        deps.say(f"session:   {request.session_name}")
        deps.say(f"source id: {request.source_identity}")
        deps.say(f"duration:  {request.duration}s")
        if args.assume:
            creds = engine.assume(request)
            who = engine.caller_identity(creds)
            deps.say(f"assumed:   {who['Arn']}")
            deps.say(f"key:       {creds.masked_key}, expires {creds.expiration:%Y-%m-%dT%H:%M:%SZ}")
    return EXIT_OK


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
    return EXIT_OK


def _broker_call(request, deps, timeout=5.0):
    from ..hookside import client, protocol

    reply = client.call(request, path=client.socket_path(environ=deps.environ), timeout=timeout)
    if isinstance(reply, protocol.ErrorReply):
        raise BrokerRefused(reply.code, reply.message)
    return reply


class BrokerRefused(RolegateError):
    def __init__(self, code, message):
        self.code = code
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
        return False  # rolegate's own file (process delivery): the user's config is not in use
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
    # The user's own region for the profile in use wins (README "Whose region wins").
    if awsconfig.REGION_VARS[0] in env and awsconfig.CONFIG_FILE_VAR not in env \
            and own_region_named(deps.environ, runtime_dir):
        env = {k: v for k, v in env.items() if k not in awsconfig.REGION_VARS}
        unset += [k for k in awsconfig.REGION_VARS if k in deps.environ]
    for line in shell_lines(env, unset, args.shell):
        deps.say(line)
    if not reply.get("granted") and args.verbose:
        deps.warn(f"no role for you on this host: {reply.get('reason')}")
    return EXIT_OK


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

    cfg = load() if awsconfig.CONFIG_FILE_VAR in deps.environ else None  # is that file rolegate's own?
    if awsconfig.CONFIG_FILE_VAR in deps.environ and cfg is None:
        return EXIT_OK
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
    return EXIT_OK


def run_credentials(args, deps):
    from ..hookside import protocol

    reply = _broker_call(protocol.GetCredentials(grant=args.grant, profile=args.profile), deps)
    deps.say(json.dumps({k: reply.get(k) for k in
                         ("Version", "AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration")}))
    return EXIT_OK


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
        return EXIT_OK
    if not grants:
        deps.say("no grants" + ("" if os.getuid() == 0 else " for you") + " on this host")
        return EXIT_OK
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
    return EXIT_OK


def run_whoami(args, deps):
    from ..backends import sts

    region = deps.environ.get("AWS_REGION") or deps.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    try:  # the host's sts_endpoint, when this user may read the config (it holds no secrets)
        endpoint = _load_config(args, deps).sts_endpoint
    except (ConfigError, OSError):
        endpoint = None
    who = sts.session_identity(region, endpoint, profile=args.profile)
    deps.say(who["Arn"])
    return EXIT_OK


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


def run_elevate(args, deps):
    """rolegate elevate PROFILE --reason TEXT [--for DURATION] [-- CMD ...]: PAM's questions on this
    terminal, an approver's word where the rule wants one, then the profile for this session."""
    import subprocess

    from ..hookside import protocol

    from ..rules.config import parse_duration

    seconds = None
    if args.duration:
        try:
            seconds = parse_duration(args.duration)
        except (ValueError, ConfigError) as err:
            deps.warn(f"--for: {err}")
            return EXIT_ERROR
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    grant = session_grant(deps.environ)
    reply = _broker_call(protocol.Elevate(grant=grant, profile=args.profile, reason=args.reason, seconds=seconds),
                         deps)
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
                        raise KeyboardInterrupt
                else:
                    deps.warn(event.get("text") or "")
            state = reply.get("state")
            if state in ("granted", "denied", "failed"):
                break
            if time.monotonic() > deadline:
                deps.warn(f"the broker did not finish request {rid} in {ELEVATE_CLI_DEADLINE}s; giving up")
                raise KeyboardInterrupt
            if answer is not None:
                reply = _broker_call(protocol.ElevationPoll(id=rid, prompt=answer[0], answer=answer[1]), deps)
                continue
            if state == "awaiting-approval" and not waiting_said:
                deps.warn(f"waiting for a member of {reply.get('approvers')} to run: rolegate approve {rid}")
                waiting_said = True
            time.sleep(0.2)
            reply = _broker_call(protocol.ElevationPoll(id=rid), deps)
    except KeyboardInterrupt:
        try:
            _broker_call(protocol.ElevationCancel(id=rid), deps)
        except RolegateError:
            pass
        deps.warn("elevation cancelled")
        return 130
    if state != "granted":
        deps.warn(f"not elevated: {reply.get('message')}")
        return EXIT_FAIL
    deps.warn(f"elevated: {args.profile} is {reply.get('role')} until {reply.get('until')} "
              f"(aws --profile {args.profile}; rolegate drop {args.profile} ends it sooner)")
    if not args.command:
        return EXIT_OK
    env = dict(deps.environ, AWS_PROFILE=args.profile)
    env.pop("AWS_DEFAULT_PROFILE", None)
    try:
        code = subprocess.call(args.command, env=env)
    except OSError as err:
        deps.warn(f"cannot run {args.command[0]}: {err}")
        code = 127
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
    return EXIT_OK


def _show_request(r):
    return (f"{r.get('id')}: {r.get('principal')} asks for {r.get('profile')} = {r.get('role')} for "
            f"{(r.get('seconds') or 0) // 60}m: {r.get('reason')}")


def run_approve(args, deps):
    from ..hookside import protocol

    request = (protocol.Deny if args.verb == "deny" else protocol.Approve)(id=args.id)
    reply = _broker_call(request, deps)
    deps.say(("denied " if args.verb == "deny" else "approved ") + _show_request(reply.data))
    return EXIT_OK


def run_approvals(args, deps):
    from ..hookside import protocol

    pending = _broker_call(protocol.Approvals(), deps).get("pending") or []
    if args.json:
        deps.say(json.dumps({"pending": pending}, indent=2))
        return EXIT_OK
    if not pending:
        deps.say("no elevation request waits for your approval")
    for r in pending:
        deps.say(_show_request(r))
    return EXIT_OK


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
        return EXIT_OK
    if not rows:
        deps.say("no rolegate profiles in this session" if mine else "no live rolegate session of yours on this host")
        return EXIT_FAIL
    table = [("PROFILE", "ROLE", "SERVICE", "HELD")]
    for r in rows:
        table.append((r["profile"], r["role"], r["service"] or "-",
                      f"until {r['expires']}" if r["held"] else "no (assumed on first use)"))
    widths = [max(len(t[i]) for t in table) for i in range(len(table[0]))]
    for t in table:
        deps.say("  ".join(c.ljust(w) for c, w in zip(t, widths)).rstrip())
    return EXIT_OK


def run_firewall(args, deps):
    from ..backends import firewall

    if args.action == "show":
        table = firewall.show()
        deps.say(table.rstrip() if table else f"no IMDS lockdown in force (table inet {firewall.TABLE} is absent)")
        return EXIT_OK if table else EXIT_FAIL
    if os.geteuid() != 0:
        deps.warn("changing the firewall needs root")
        return EXIT_ERROR
    if args.action == "remove":
        deps.say("IMDS lockdown removed" if firewall.remove() else "no IMDS lockdown was in force")
        return EXIT_OK
    cfg = _load_config(args, deps)
    uids = firewall.apply_config(cfg)
    deps.say(f"IMDS ({firewall.IMDS_V4}, {firewall.IMDS_V6}) is now reachable only by uid {', '.join(map(str, uids))}")
    if cfg.imds.mode == "emulate":
        deps.say(f"every other user's TCP to port 80 there goes to the emulator on 127.0.0.1:{cfg.imds.port} "
                 f"and [::1]:{cfg.imds.port}; the rest is refused")
    ports = firewall.door_ports(cfg)
    if ports:
        deps.say(f"each user but root may hold {firewall.DOOR_CONNECTIONS_PER_UID} connections at once to the "
                 f"broker's port{'s' if len(ports) > 1 else ''} {', '.join(map(str, ports))}")
    return EXIT_OK


def run_install(args, deps):
    from . import install

    if os.geteuid() != 0:
        deps.warn("install needs root")
        return EXIT_ERROR
    try:
        install.install(options=args.options, firewall=not args.no_firewall, say=deps.say)
    except install.InstallError as err:
        deps.warn(str(err))
        return EXIT_FAIL
    return EXIT_OK


def run_uninstall(args, deps):
    from . import install

    if os.geteuid() != 0:
        deps.warn("uninstall needs root")
        return EXIT_ERROR
    install.uninstall(say=deps.say)
    return EXIT_OK


def run_doctor(args, deps):
    from ..rules import config
    from . import doctor

    if os.geteuid() != 0:
        deps.warn("doctor needs root (it probes IMDS as another uid and reads root-only files)")
        return EXIT_ERROR
    results = doctor.run_all(config.config_path(args.config, deps.environ), assume=args.assume)
    if args.json:
        deps.say(json.dumps([r.__dict__ for r in results], indent=2))
    else:
        for r in results:
            deps.say(f"{r.verdict:4}  {r.name:18} {r.detail}")
            if r.verdict != doctor.PASS and r.fix:
                deps.say(f"      {'':18} fix: {r.fix}")
    return EXIT_FAIL if any(r.verdict == doctor.FAIL for r in results) else EXIT_OK


def run_daemon(args, deps):
    from .. import broker
    from ..rules import config

    if os.geteuid() != 0:
        deps.warn("rolegated must run as root (it reads the gatekeeper credentials and chowns files)")
        return EXIT_ERROR
    return broker.serve(config.config_path(args.config, deps.environ))


# -- wiring --------------------------------------------------------------------------------------


RULES_HELP = "with rules_from: a rules document to read the rules from (default: the broker's last good copy)"


def parser():
    p = argparse.ArgumentParser(prog="rolegate", description="Per-user IAM roles for shared Linux hosts.")
    p.add_argument("--config", help="config file (default: $ROLEGATE_CONFIG or /etc/rolegate/rolegate.yaml)")
    sub = p.add_subparsers(dest="verb", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("check-config", help="validate a config file")
    s.add_argument("path", nargs="?")
    s.set_defaults(run=run_check_config)

    s = sub.add_parser("check-user", help="which rule and role a login would get, and why")
    s.add_argument("user", help="the user logging in (for sudo/su: the invoking user)")
    s.add_argument("--service", default="sshd", help="PAM service (default sshd)")
    s.add_argument("--ruser", help="PAM_RUSER: the invoking user, for sudo/su services")
    s.add_argument("--target", help="the account the session runs as (default: USER)")
    s.add_argument("--assume", action="store_true", help="really call AssumeRole and GetCallerIdentity")
    s.add_argument("--rules", metavar="FILE", help=RULES_HELP)
    s.set_defaults(run=run_check_user)

    s = sub.add_parser("daemon", help="run the broker (rolegated) in the foreground",
                       description="Run the broker, rolegated, in the foreground (as root). SIGHUP rereads the "
                                   "config (a bad one is refused and the last good one kept); SIGTERM stops it, "
                                   "leaving its records and files for the next start. The config is "
                                   "$ROLEGATE_CONFIG or /etc/rolegate/rolegate.yaml.")
    s.set_defaults(run=run_daemon)

    s = sub.add_parser("env", help="shell lines that point this shell at your credentials")
    s.add_argument("--shell", choices=("sh", "csh", "fish"), default="sh")
    s.add_argument("-v", "--verbose", action="store_true", help="say why when you have no role")
    s.set_defaults(run=run_env)

    s = sub.add_parser("region", help="shell lines: rolegate's region, or none where your own AWS config names "
                                      "one for the profile in use (profile.d runs it when AWS_PROFILE is set)")
    s.add_argument("--shell", choices=("sh", "csh", "fish"), default="sh")
    s.set_defaults(run=run_region)

    s = sub.add_parser("credentials", help="credential_process JSON for your grant")
    s.add_argument("--grant", help="the grant id (written into the session's AWS config file)")
    s.add_argument("--profile", help="one of the grant's named profiles (assumed on first use)")
    s.set_defaults(run=run_credentials)

    s = sub.add_parser("profiles", help="the profiles this session can use, their roles, which are held and until when")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=run_profiles)

    s = sub.add_parser("elevate", help="an on-demand profile for this session: PAM asks who you are, then STS "
                                       "is called with your reason in the session tags")
    s.add_argument("profile")
    s.add_argument("--reason", help="why (kept by CloudTrail as a session tag; required unless the rule says "
                                    "optional)")
    s.add_argument("--for", dest="duration", metavar="DURATION", help="how long (15m up to the rule's max, "
                                                                      "which is the default)")
    s.add_argument("command", nargs="*", help="-- CMD ...: run one command with it, then drop it")
    s.set_defaults(run=run_elevate)

    s = sub.add_parser("drop", help="end an elevation now")
    s.add_argument("profile")
    s.set_defaults(run=run_drop)

    for verb, what in (("approve", "approve an elevation request (members of its approvers group)"),
                       ("deny", "deny an elevation request (members of its approvers group)")):
        s = sub.add_parser(verb, help=what)
        s.add_argument("id")
        s.set_defaults(run=run_approve)

    s = sub.add_parser("approvals", help="elevation requests waiting for your approval")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=run_approvals)

    s = sub.add_parser("status", help="grants, roles and expiry (yours; root sees all)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=run_status)

    s = sub.add_parser("whoami", help="GetCallerIdentity with this session's credentials")
    s.add_argument("--profile", help="a profile's instead of the default's (as aws --profile)")
    s.set_defaults(run=run_whoami)

    s = sub.add_parser("doctor", help="check every piece of the installation: PASS/WARN/FAIL with the fix")
    s.add_argument("--json", action="store_true")
    s.add_argument("--assume", action="store_true", help="also assume every configured role")
    s.set_defaults(run=run_doctor)

    s = sub.add_parser("install", help="put rolegate in place: PAM, profile.d, systemd unit, firewall")
    s.add_argument("--options", default="", help="hook options for the PAM line, e.g. 'on_error=deny timeout=2'")
    s.add_argument("--no-firewall", action="store_true", help="do not apply the IMDS lockdown now")
    s.set_defaults(run=run_install)

    s = sub.add_parser("uninstall", help="remove exactly what install put in place")
    s.set_defaults(run=run_uninstall)

    s = sub.add_parser("firewall", help="the IMDS lockdown: apply, remove or show the nftables rules")
    s.add_argument("action", choices=("apply", "remove", "show"))
    s.set_defaults(run=run_firewall)

    s = sub.add_parser("policy", help="IAM policies the config needs, as JSON")
    s.add_argument("--gatekeeper", default="arn:aws:iam::ACCOUNT_ID:role/GATEKEEPER_ROLE",
                   help="the gatekeeper (instance) role's ARN, for the trust policies")
    s.add_argument("--rules", metavar="FILE", help=RULES_HELP)
    s.set_defaults(run=run_policy)
    return p


def main(argv=None, deps=None):
    deps = deps or Deps()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = []
    if "elevate" in argv and "--" in argv[argv.index("elevate"):]:
        # `rolegate elevate PROFILE ... -- CMD ARGS`: argparse's subparsers do not pass a `--` through
        cut = argv.index("--", argv.index("elevate"))
        argv, command = argv[:cut], argv[cut + 1:]
    args = parser().parse_args(argv)
    if command:
        args.command = list(args.command or []) + command
    try:
        return args.run(args, deps)
    except RolegateError as err:
        deps.warn(str(err))
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def daemon_main(argv=None):
    """`rolegated`: the broker in the foreground (same as `rolegate daemon`)."""
    return main(["daemon"] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
