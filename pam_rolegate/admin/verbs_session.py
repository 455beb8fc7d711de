"""The verbs of a user's session, each asking the broker: env and region (shell lines), credentials
(credential_process), status, whoami and profiles."""

import json
import os

from . import exitcodes
from .deps import broker_call, load_config, session_grant
from ..errors import ConfigError


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

    reply = broker_call(protocol.Env(), deps)
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
            return load_config(args, deps)
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

    reply = broker_call(protocol.GetCredentials(grant=args.grant, profile=args.profile), deps)
    deps.say(json.dumps({k: reply.get(k) for k in
                         ("Version", "AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration")}))
    return exitcodes.OK


def run_status(args, deps):
    from ..hookside import protocol

    reply = broker_call(protocol.Status(), deps, timeout=30.0)
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
        endpoint = load_config(args, deps).sts_endpoint
    except (ConfigError, OSError):
        endpoint = None
    who = sts.session_identity(region, endpoint, profile=args.profile)
    deps.say(json.dumps(who, indent=2) if args.json else who["Arn"])
    return exitcodes.OK




def run_profiles(args, deps):
    """This session's profiles (or, outside one, every login's of yours): default and named, the
    role of each, whether the broker holds its credentials now and until when."""
    from ..hookside import protocol

    reply = broker_call(protocol.Status(), deps, timeout=30.0)
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
