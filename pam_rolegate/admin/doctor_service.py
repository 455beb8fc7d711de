"""Doctor's checks of the config and the service it runs: the config against this host, runtime_dir,
the broker's doors, ssm-user, the gatekeeper's access to AWS and the fleet rules."""

import os
import socket
import stat
import time

from .doctor_common import FAIL, PASS, WARN, Result, rules_in_force

SSM_USER = "ssm-user"  # the account Session Manager's shells run as without Run As


def check_config(ctx):
    from .. import hostcheck
    from ..rules import config
    from ..errors import ConfigError

    try:
        cfg = config.load(ctx["config_path"])
    except ConfigError as err:
        return [Result("config", FAIL, str(err), "fix the file at that position; `rolegate check-config`")]
    ctx["config"] = cfg
    try:
        # The broker's start checks (runtime_dir, rules_cache and their parents) and the firewall's
        # (imds_allow_users resolved: a user deleted since leaves the lockdown unapplied), located.
        unchecked = hostcheck.check_host(cfg)
    except ConfigError as err:
        return [Result("config", FAIL, str(err), "fix the file at that position, or the directory or user it "
                                                 "names; `rolegate check-config`")]
    if unchecked:
        return [Result("config", WARN, f"{ctx['config_path']} is valid, but " + "; ".join(unchecked),
                       "run rolegate doctor as root")]
    return [Result("config", PASS, f"{ctx['config_path']} is valid")]


def check_runtime_dir(ctx):
    from ..backends import store
    from ..errors import StoreError

    cfg = ctx.get("config")
    path = cfg.runtime_dir if cfg else "/run/rolegate"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return [Result("runtime-dir", FAIL, f"{path} does not exist", "start rolegated; it creates it")]
    try:  # its parents too, by the broker's own walk
        store.probe_safe_dir(os.path.dirname(path), "runtime_dir", "choose a directory under /run")
    except StoreError as err:
        return [Result("runtime-dir", FAIL, str(err), "fix that directory (root-owned, not writable by others), "
                                                      "or move runtime_dir; restart rolegated")]
    problems = []
    if not stat.S_ISDIR(st.st_mode):
        problems.append("is not a directory")
    if st.st_uid != 0:
        problems.append(f"is owned by uid {st.st_uid}")
    if st.st_mode & 0o022:
        problems.append(f"is writable by group/others (mode {stat.S_IMODE(st.st_mode):o})")
    if store.fs_type(path) not in ("tmpfs", "ramfs"):
        problems.append(f"is on {store.fs_type(path)}, not tmpfs")
    if problems:
        return [Result("runtime-dir", FAIL, f"{path} " + "; ".join(problems),
                       f"stop rolegated, remove {path}, start rolegated (it recreates it safely)")]
    return [Result("runtime-dir", PASS, f"{path}: tmpfs, root-owned, mode {stat.S_IMODE(st.st_mode):o}")]


def check_broker(ctx):
    """Both doors answer: the user door (anyone) and the root-only PAM door the hook uses."""
    from ..hookside import client, protocol
    from ..errors import BrokerUnavailable

    cfg = ctx.get("config")
    runtime_dir = cfg.runtime_dir if cfg else client.DEFAULT_RUNTIME_DIR
    answered = []
    for door, name in (("user", protocol.USER_SOCKET), ("PAM", protocol.PAM_SOCKET)):
        path = os.path.join(runtime_dir, name)
        try:
            reply = client.call(protocol.Ping(), path=path, timeout=3)
        except BrokerUnavailable as err:
            return [Result("broker", FAIL, f"{door} door: {err}",
                           "systemctl start rolegated (journalctl -u rolegated for why)")]
        if isinstance(reply, protocol.ErrorReply):
            return [Result("broker", FAIL, f"{door} door refused a ping: {reply.message}", "restart rolegated")]
        answered.append(f"{door} door {path}")
    pam_dir = os.path.dirname(os.path.join(runtime_dir, protocol.PAM_SOCKET))
    st = os.lstat(pam_dir)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or stat.S_IMODE(st.st_mode) & 0o077:
        return [Result("broker", FAIL, f"{pam_dir} is not a root-only directory (mode {stat.S_IMODE(st.st_mode):o}, "
                                       f"uid {st.st_uid}): users could reach the PAM door",
                       "restart rolegated (it makes the directory 0700 root)")]
    return [Result("broker", PASS, f"rolegated pid {reply.get('pid')} answers on its " + " and ".join(answered))]


def check_ssm_user(ctx):
    """ssm-user is the one account every Session Manager user shares without Run As: a rule that maps
    it (as its shells are evaluated, service shell) gives them all one role."""
    from ..rules import mapping

    cfg = ctx.get("config")
    rules = rules_in_force(cfg) if cfg is not None else None
    if rules is None:
        return []
    facts = mapping.LoginFacts(user=SSM_USER, service=mapping.SHELL_SERVICE)
    try:
        ident = mapping.resolve(facts)
        note = ""
    except mapping.UnknownUser:
        # The SSM agent creates it at the first session, with a group of its own name.
        ident = mapping.Identity(SSM_USER, -1, (SSM_USER,), SSM_USER, -1, -1, mapping.SHELL_SERVICE)
        note = " (no such account yet; the SSM agent creates it at the first session)"
    decision = mapping.decide(rules, ident)
    if decision.rule is None and not decision.profiles and not decision.on_demand:
        return [Result("ssm-user", PASS, f"no rule maps {SSM_USER}{note}")]
    rule = decision.rule or (decision.profiles + decision.on_demand)[0][1]
    return [Result("ssm-user", WARN, f"rule {rule.index} (line {rule.line}) maps {SSM_USER} (service "
                   f"{mapping.SHELL_SERVICE}){note}: every SSM user shares one role as {SSM_USER}",
                   f"turn on Session Manager's Run As (the IAM principal's tag SSMSessionRunAs = their Linux "
                   f"user), and map those users rather than {SSM_USER}")]


def check_door_share(ctx):
    """With loopback HTTP doors, the firewall's per-uid share of connections to their ports is in
    force: without it a flood of connects in flight fills a door's listen queue for everyone."""
    from ..backends import firewall

    cfg = ctx.get("config")
    ports = firewall.door_ports(cfg) if cfg is not None else []
    if not ports:
        return []
    missing = sorted(set(ports) - firewall.shared_ports(firewall.show()))
    if missing:
        return [Result("door-share", FAIL, f"no per-user share of connections to port "
                       f"{', '.join(map(str, missing))} in the firewall: one user's flood of connects can keep "
                       f"every other user's SDK from its credentials", "rolegate firewall apply")]
    return [Result("door-share", PASS, f"each user but root holds at most {firewall.DOOR_CONNECTIONS_PER_UID} "
                                       f"connections at once to port {', '.join(map(str, ports))}")]


def check_gatekeeper(ctx):
    from ..backends import sts
    from ..errors import StsError

    cfg = ctx.get("config")
    if cfg is None:
        return [Result("gatekeeper", FAIL, "no valid config", "fix the config first")]
    try:
        creds = sts.make_source(cfg.source).get(timeout=3)
    except StsError as err:
        return [Result("gatekeeper", FAIL, str(err), "see the message; `rolegate policy` for the IAM side")]
    out = [Result("gatekeeper", PASS, f"{cfg.source} credentials {creds.masked_key}"
                  + (" (IMDSv2 token flow)" if cfg.source.kind == "instance-profile" else ""))]
    if ctx.get("assume"):
        from ..rules import mapping

        engine = sts.StsEngine.from_config(cfg)
        for rule in cfg.roles:
            ident = mapping.Identity("rolegate-doctor", 0, (), "root", 0, 0, "doctor")
            try:
                request = sts.build_request(cfg, rule, ident, host=sts.HostFacts(socket.gethostname()))
                engine.assume(request)
                out.append(Result(f"assume-rule-{rule.index}", PASS, f"{rule.role} is assumable"))
            except StsError as err:
                out.append(Result(f"assume-rule-{rule.index}", FAIL, str(err), "rolegate policy shows the trust needed"))
    return out


def check_fleet_rules(ctx):
    """rules_from: the parameter read now with the gatekeeper credentials and checked, and the
    last good copy on disk (present, which version, how old)."""
    from ..backends import fleet, sts
    from ..errors import ConfigError, ParameterError, StoreError

    cfg = ctx.get("config")
    if cfg is None or cfg.rules_from is None:
        return []
    out = []
    try:
        doc = fleet.fetch(cfg, sts.StsEngine.from_config(cfg))
        rules = doc.rules_for(cfg).roles
        out.append(Result("fleet-rules", PASS, f"{cfg.rules_from} version {doc.version}: {len(rules)} valid "
                                               f"rule{'s' if len(rules) != 1 else ''}"))
    except ParameterError as err:
        out.append(Result("fleet-rules", FAIL, str(err), "as the message says; `rolegate policy` prints the "
                                                         "gatekeeper's ssm:GetParameter statement"))
    except ConfigError as err:
        out.append(Result("fleet-rules", FAIL, f"the parameter holds no valid rules: {err}",
                          "fix the document at that line and put it again (aws ssm put-parameter --overwrite); "
                          "rolegated keeps its rules in force meanwhile"))
    try:
        cached = fleet.read_cache(cfg)
    except (StoreError, OSError) as err:
        out.append(Result("fleet-rules-cache", FAIL, str(err), f"remove {cfg.rules_cache}; rolegated writes it "
                                                                f"again after its next good fetch"))
        return out
    if cached is None:
        out.append(Result("fleet-rules-cache", WARN, f"no last good copy at {cfg.rules_cache}: if rolegated starts "
                          f"while the parameter cannot be read, nobody gets a role",
                          "start rolegated once while the parameter is readable; it writes the copy"))
    else:
        age = fleet.age_text(cached.age(time.time()))
        out.append(Result("fleet-rules-cache", PASS, f"{cfg.rules_cache}: version {cached.version}, fetched "
                                                      f"{age} ago (it serves while the parameter cannot be read)"))
    return out
