"""`rolegate doctor`: every check of an installation, each a small object with a name, a verdict and the fix.

A closed registry (CHECKS): a root process loads no check from anywhere else.
"""

import errno
import os
import socket
import stat
import sys
import time
from dataclasses import dataclass

from . import install

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"
PAM_DIR = "/etc/pam.d"
PAM_PYTHON = ("/lib/security/pam_python.so", "/lib/x86_64-linux-gnu/security/pam_python.so",
              "/usr/lib/x86_64-linux-gnu/security/pam_python.so", "/lib/aarch64-linux-gnu/security/pam_python.so")
NOBODY = 65534
SSM_USER = "ssm-user"  # the account Session Manager's shells run as without Run As


@dataclass(frozen=True)
class Result:
    name: str
    verdict: str
    detail: str
    fix: str = ""


# -- PAM stack reading -----------------------------------------------------------------------------


def session_lines(service, pam_dir=PAM_DIR, _depth=0):
    """The effective `session` lines of a service, @include and include/substack followed."""
    path = os.path.join(pam_dir, service)
    if _depth > 10 or not os.path.exists(path):
        return []
    lines = []
    for raw in open(path):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("@include"):
            lines += session_lines(line.split()[1], pam_dir, _depth + 1)
            continue
        parts = line.split()
        kind = parts[0].lstrip("-")
        if kind != "session" or len(parts) < 3:
            continue
        if parts[1] in ("include", "substack"):
            lines += session_lines(parts[2], pam_dir, _depth + 1)
        else:
            lines.append(line)
    return lines


def hook_runs_for(service, pam_dir=PAM_DIR):
    """True when rolegate's hook line would run for `service`: present, and not jumped over by
    the allow-list guard right before it (`[success=1 ...] pam_succeed_if.so ... service notin A:B`)."""
    lines = session_lines(service, pam_dir)
    for i, line in enumerate(lines):
        if "pam_python.so" in line and "pam_rolegate" in line:
            guard = lines[i - 1] if i else ""
            if "pam_succeed_if.so" in guard and "success=1" in guard and "service notin" in guard:
                allowed = guard.split("service notin", 1)[1].split()[0].split(":")
                if service not in allowed:
                    continue
            return True
    return False


# -- checks ----------------------------------------------------------------------------------------


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


def check_pam_python(ctx):
    found = [p for p in PAM_PYTHON if os.path.exists(p)]
    if found:
        return [Result("pam-python", PASS, found[0])]
    return [Result("pam-python", FAIL, "pam_python.so is not installed", "apt-get install libpam-python")]


def check_pam_stacks(ctx):
    out = []
    for svc in install.HOOK_SERVICES:
        if not os.path.exists(os.path.join(PAM_DIR, svc)):
            out.append(Result(f"pam-{svc}", WARN, f"{PAM_DIR}/{svc} does not exist (service not installed)"))
        elif hook_runs_for(svc):
            out.append(Result(f"pam-{svc}", PASS, f"the hook runs in {svc}'s session stack"))
        else:
            out.append(Result(f"pam-{svc}", FAIL, f"the hook is not in {svc}'s effective session stack",
                              "rolegate install (or pam-auth-update --enable rolegate)"))
    exposed = sorted(s for s in os.listdir(PAM_DIR) if s not in install.HOOK_SERVICES
                     and not s.startswith("common-") and os.path.isfile(os.path.join(PAM_DIR, s))
                     and hook_runs_for(s))
    if exposed:
        out.append(Result("pam-allow-list", FAIL, f"the hook is reachable from {', '.join(exposed)}: a user's "
                          f"PATH can choose root's Python there (docs/security.md: the PATH hazard)",
                          "put the guard `[success=1 default=ignore] pam_succeed_if.so quiet service notin "
                          "sshd:sudo:sudo-i:login` right before the hook line; rolegate install does"))
    else:
        out.append(Result("pam-allow-list", PASS, "su, su-l and every other service skip the hook"))
    return out


def check_secure_path(ctx):
    problem = install.secure_path_problem()
    if problem is None:
        return [Result("sudo-secure-path", PASS, "sudoers sets secure_path" if os.path.exists("/etc/sudoers")
                       else "sudo is not installed (Debian's sudo brings secure_path when it comes)")]
    return [Result("sudo-secure-path", FAIL, problem, "add Debian's `Defaults secure_path=...` line with visudo")]


def check_profile(ctx):
    if os.path.exists(install.PROFILE_D):
        return [Result("profile-d", PASS, install.PROFILE_D)]
    return [Result("profile-d", FAIL, f"{install.PROFILE_D} is missing: su -l and SSM shells get no credentials",
                   "rolegate install")]


def check_elevation(ctx):
    """Rules with `elevate` need the `rolegate` PAM service and pamela; without them every
    `rolegate elevate` fails (never a login)."""
    cfg = ctx.get("config")
    if cfg is None or not any(r.elevate is not None for r in cfg.roles):
        return [Result("elevation", PASS, "no on-demand rules")]
    if not os.path.exists(install.ELEVATE_PAM):
        return [Result("elevation", FAIL, f"on-demand rules, but no PAM service {install.ELEVATE_PAM}: every "
                                          f"rolegate elevate fails", "rolegate install (or copy "
                                          "share/rolegate/pam.d/rolegate there)")]
    try:
        import pamela  # noqa: F401
    except Exception as err:  # ImportError, or libpam not loadable
        return [Result("elevation", FAIL, f"pamela cannot be loaded ({err}): every rolegate elevate fails",
                       "apt-get install python3-pamela (or pip install pamela in rolegate's venv)")]
    return [Result("elevation", PASS, f"PAM service {install.ELEVATE_PAM} for "
                                      f"{sum(r.elevate is not None for r in cfg.roles)} on-demand rules")]


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


def _loopback_peers(port):
    """(address, port) of the far end of every TCP socket whose local end is the loopback `port`,
    from /proc/net/tcp and tcp6 (world-readable; every socket of this network namespace)."""
    import ipaddress

    peers = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = open(name).read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            (laddr, lport), (raddr, rport) = (f.split(":") for f in fields[1:3])
            if int(lport, 16) != port:
                continue
            # each 32-bit word is printed in host byte order
            raw = b"".join(bytes.fromhex(raddr[i:i + 8])[::-1 if sys.byteorder == "little" else 1]
                           for i in range(0, len(raddr), 8))
            addr = ipaddress.ip_address(raw)
            addr = getattr(addr, "ipv4_mapped", None) or addr
            peers.add((str(addr), int(rport, 16)))
    return peers


def _ask_credentials(family, addr, timeout):
    """What the emulator answers this uid for its role: an HTTP status, or why there was none."""
    import http.client

    host = addr if family == socket.AF_INET else f"[{addr}]"
    try:
        conn = http.client.HTTPConnection(host.strip("[]"), 80, timeout=timeout)
        conn.request("PUT", "/latest/api/token", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60",
                                                          "Host": host})
        token = conn.getresponse().read().decode("ascii", "replace").strip()
        conn.request("GET", "/latest/meta-data/iam/security-credentials/",
                     headers={"X-aws-ec2-metadata-token": token, "Host": host})
        return str(conn.getresponse().status)
    except socket.timeout:
        return "timeout"
    except (OSError, http.client.HTTPException) as err:
        return type(err).__name__


def _connect_as(uid, family, addr, timeout=2.0, loopback_port=None):
    """Connect to addr:80 from a forked child running as `uid`; returns the errno name or 'connected',
    and with loopback_port 'redirected' when the connection's far end is a socket of this host on
    that loopback port (the IMDS firewall DNATed it there) rather than the real IMDS."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to uid, try, report, exit without cleanup handlers
        try:
            os.close(r)
            if uid:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            s = socket.socket(family, socket.SOCK_STREAM)
            s.settimeout(timeout)
            try:
                s.connect((addr, 80))
                result = "connected"
                if loopback_port:
                    # NAT is invisible to the connecting socket; the kernel's socket table is not:
                    # a redirected connection has its server half here, on the loopback port.
                    me = s.getsockname()[:2]
                    for _ in range(20):
                        if me in _loopback_peers(loopback_port):
                            result = "redirected:" + _ask_credentials(family, addr, timeout)
                            break
                        time.sleep(0.025)
            except socket.timeout:
                result = "timeout"
            except OSError as err:
                result = errno.errorcode.get(err.errno, str(err.errno))
            os.write(w, result.encode())
        finally:
            os._exit(0)
    os.close(w)
    data = os.read(r, 100).decode()
    os.close(r)
    os.waitpid(pid, 0)
    return data or "unknown"


def check_imds(ctx):
    from ..backends import firewall

    cfg = ctx.get("config")
    emulate = cfg is not None and cfg.imds.mode == "emulate"
    audit = cfg is not None and cfg.imds.mode == "audit"
    port = cfg.imds.port if cfg is not None else None
    out = []
    for label, family, addr in (("ipv4", socket.AF_INET, firewall.IMDS_V4), ("ipv6", socket.AF_INET6, firewall.IMDS_V6)):
        root = _connect_as(0, family, addr, loopback_port=port)
        before = firewall.audit_counts() if audit else None
        user = _connect_as(NOBODY, family, addr, loopback_port=port)
        if audit:
            # Read and put back at once, so doctor's probe is not in the admin's figures.
            counted = _take_back_probe(before)
        if root.startswith("redirected"):
            out.append(Result(f"imds-{label}", FAIL, f"root's connection to {addr}:80 is redirected to the emulator "
                              f"on loopback port {port}: the broker cannot reach the real IMDS",
                              "rolegate firewall apply (root is never redirected)"))
            continue
        if root != "connected":
            verdict = FAIL if label == "ipv4" else WARN
            out.append(Result(f"imds-{label}", verdict, f"root cannot reach IMDS at {addr} ({root})",
                              "enable the instance metadata service (and its IPv6 endpoint) on the instance"))
            continue
        if audit:
            out.append(_audit_probe_result(label, addr, user, before, counted))
            continue
        if not emulate:
            if user.startswith("redirected"):
                out.append(Result(f"imds-{label}", FAIL, f"uid {NOBODY}'s IMDS traffic is redirected to the emulator "
                                  f"(port {port}), but imds.mode is reject", "rolegate firewall apply"))
            elif user == "connected":
                out.append(Result(f"imds-{label}", FAIL, f"uid {NOBODY} reaches IMDS at {addr}: any user can take "
                                  f"the gatekeeper role", "rolegate firewall apply"))
            else:
                out.append(Result(f"imds-{label}", PASS, f"root reaches {addr}; uid {NOBODY} is refused ({user})"))
            continue
        lo = "127.0.0.1" if family == socket.AF_INET else "[::1]"
        if user.startswith("redirected"):
            answer = user.partition(":")[2]
            if answer.isdigit():  # 404 for an unmapped uid; 200 would be its own role, never the instance's
                out.append(Result(f"imds-{label}", PASS, f"root reaches {addr}; uid {NOBODY} is redirected to the "
                                  f"emulator on {lo}:{port}, which answers its credentials request with HTTP {answer}"))
            else:
                out.append(Result(f"imds-{label}", FAIL, f"uid {NOBODY} is redirected to the emulator on {lo}:{port}, "
                                  f"but its credentials request got no answer ({answer})",
                                  "systemctl restart rolegated (journalctl -u rolegated for why)"))
        elif user == "connected":
            out.append(Result(f"imds-{label}", FAIL, f"uid {NOBODY} reaches the real IMDS at {addr}: any user can "
                              f"take the gatekeeper role", "rolegate firewall apply"))
        elif user == "ECONNREFUSED" and f"dnat {'ip' if family == socket.AF_INET else 'ip6'} to {lo}:{port}" \
                in (firewall.show() or ""):
            out.append(Result(f"imds-{label}", FAIL, f"IMDS emulator down: uid {NOBODY}'s connection to {addr}:80 "
                              f"is redirected to {lo}:{port}, where nothing listens (connection refused); users "
                              f"get no credentials from IMDS", "systemctl restart rolegated (journalctl -u "
                              "rolegated for why its IMDS emulator is not listening)"))
        else:
            out.append(Result(f"imds-{label}", FAIL, f"imds.mode is emulate but uid {NOBODY}'s connection to {addr}:80 "
                              f"is not redirected to {lo}:{port} ({user})", "rolegate firewall apply"))
    return out


def _take_back_probe(before):
    """After doctor's probe as NOBODY in audit mode: whether the kernel counted it, and NOBODY's
    counters put back to `before` (a connection NOBODY itself opened in those milliseconds is lost)."""
    from ..backends import firewall

    after = firewall.audit_counts()
    if before is None or after is None:
        return False
    was = {c.uid: c for c in before}.get(NOBODY)
    now = {c.uid: c for c in after}.get(NOBODY)
    firewall.put_count(NOBODY, was)
    return now is not None and now.connections > (was.connections if was else 0)


def _audit_probe_result(label, addr, user, before, counted):
    """imds.mode audit: NOBODY is expected to reach IMDS, counted and not refused."""
    if before is None:
        if user == "connected":
            return Result(f"imds-{label}", FAIL, f"uid {NOBODY} reaches IMDS at {addr} and nothing counts it: "
                          f"imds.mode is audit but its rules are not in force", "rolegate firewall apply")
        return Result(f"imds-{label}", WARN, f"imds.mode is audit, but uid {NOBODY} is refused at {addr} ({user}): "
                      f"the rules in force are another mode's", "rolegate firewall apply (or systemctl restart "
                                                                "rolegated, which applies them first)")
    if user != "connected":
        return Result(f"imds-{label}", FAIL, f"imds.mode is audit, which refuses nobody, but uid {NOBODY}'s "
                      f"connection to {addr}:80 failed ({user})", "rolegate firewall apply; then look for "
                                                                   "another firewall refusing IMDS")
    if not counted:
        return Result(f"imds-{label}", FAIL, f"uid {NOBODY} reaches IMDS at {addr} but the audit rules did not "
                      f"count its connection", "rolegate firewall apply")
    return Result(f"imds-{label}", PASS, f"root reaches {addr}; uid {NOBODY} reaches it too, counted (audit "
                                         f"mode: nothing is locked; see imds-audit)")


def _rules_in_force(cfg):
    """The config whose rules the broker serves: the file's own, or with rules_from the last good
    copy of the parameter (None when there is none yet)."""
    if cfg.rules_from is None:
        return cfg
    from ..backends import fleet

    try:
        doc = fleet.read_cache(cfg)
    except Exception:  # check_fleet_rules reports an unreadable copy
        return None
    return doc.rules_for(cfg) if doc is not None else None


def check_imds_audit(ctx):
    """imds.mode audit: who used IMDS, from the kernel's counters, and whether the rules already
    give roles (then every mapped user can still take the gatekeeper's keys from IMDS)."""
    from ..backends import firewall

    cfg = ctx.get("config")
    if cfg is None or cfg.imds.mode != "audit":
        return []
    out = []
    rules = _rules_in_force(cfg)
    if rules is not None and rules.roles:
        out.append(Result("imds-audit-rules", FAIL, f"imds.mode is audit while {len(rules.roles)} rule"
                          f"{'s give' if len(rules.roles) != 1 else ' gives'} roles: IMDS is not locked, so every "
                          f"mapped user (every user, in fact) can take the gatekeeper's keys and assume any "
                          f"role it may", "grant the users who use IMDS imds_allow_users or a role of their "
                                          "own, then set imds.mode: reject and systemctl restart rolegated"))
    counts = firewall.audit_counts()
    fix = ("grant them imds_allow_users or a role of their own, then set imds.mode: reject and "
           "systemctl restart rolegated")
    if counts is None:
        out.append(Result("imds-audit", WARN, "IMDS is NOT locked: audit mode, and its counting rules are not in "
                          "force either", "rolegate firewall apply, then `rolegate firewall show` lists who uses IMDS"))
    elif not counts:
        out.append(Result("imds-audit", WARN, "IMDS is NOT locked: audit mode; no user has connected to IMDS since "
                          "the rules were applied", "when the host has run its usual jobs for a while, set "
                                                    "imds.mode: reject and systemctl restart rolegated"))
    else:
        used = ", ".join(f"{c.name} (uid {c.uid}) {c.connections} connection{'s' if c.connections != 1 else ''}"
                         for c in sorted(counts, key=lambda c: -c.connections))
        out.append(Result("imds-audit", WARN, f"IMDS is NOT locked: audit mode; users who used IMDS since the rules "
                          f"were applied: {used}", fix))
    return out


def check_ssm_user(ctx):
    """ssm-user is the one account every Session Manager user shares without Run As: a rule that maps
    it (as its shells are evaluated, service shell) gives them all one role."""
    from ..rules import mapping

    cfg = ctx.get("config")
    rules = _rules_in_force(cfg) if cfg is not None else None
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


def check_imds_rule(ctx):
    """Whether the configured IMDS rule can be put in force (what rolegate-lockdown.service's second
    step and each start of rolegated do). When it cannot, the boot left the lockdown unit's root-only
    rule in force (fail closed), or an older rule: say which, and why the configured one is refused."""
    from ..backends import firewall

    cfg = ctx.get("config")
    if cfg is None:
        return []  # check_config said why
    if os.geteuid() != 0:
        return [Result("imds-rule", WARN, "not root: cannot check that the configured IMDS rule applies",
                       "run rolegate doctor as root")]
    try:
        uids = firewall.allowed_uids(cfg.imds_allow_users)
        script = firewall.ruleset(uids, cfg.imds.mode, cfg.imds.port, firewall.door_ports(cfg))
        checked = firewall._nft(["-c", "-f", "-"], stdin=script)  # nft's check mode: nothing changes
        if checked.returncode != 0:
            raise firewall.FirewallError(f"nft refuses it: {checked.stderr.strip()}")
    except firewall.FirewallError as err:
        try:
            table = firewall.show()
        except firewall.FirewallError:  # no nft at all: err says so
            table = None
        if table is None:
            state = "and no rolegate table is in force: every user reaches IMDS"
        elif root_only(table):
            state = "only root reaches IMDS (the lockdown's root-only rule holds: fail closed)"
        else:
            state = "an earlier rule of rolegate's stays in force"
        return [Result("imds-rule", FAIL, f"the configured IMDS rule is not applied: {err}; {state}",
                       "correct imds_allow_users or imds in the config (`rolegate check-config`), then "
                       "`systemctl restart rolegate-lockdown rolegated` (journalctl -u rolegate-lockdown says "
                       "what the boot refused)")]
    table = firewall.show()
    configured_root_only = uids == [0] and cfg.imds.mode == "reject" and not firewall.door_ports(cfg)
    if table is not None and root_only(table) and not configured_root_only:
        # It applies now but did not when it was last tried (a user NSS only knew later, at boot).
        return [Result("imds-rule", WARN, "the configured IMDS rule applies, but only the lockdown's root-only rule "
                       "is in force: only root reaches IMDS", "systemctl restart rolegated (or rolegate firewall "
                                                              "apply)")]
    return [Result("imds-rule", PASS, f"the configured IMDS rule (imds.mode {cfg.imds.mode}) applies")]


def root_only(table):
    """True when `table` (nft's listing of table inet rolegate) lets root alone reach IMDS and does
    nothing else: the lockdown unit's static rule, not a configured one."""
    import re

    allowed = re.findall(r"skuid != (\{[^}]*\}|\S+)", table)
    return bool(allowed) and all(a.strip("{} ") == "0" for a in allowed) and "dnat" not in table \
        and "@imds-audit" not in table


CHECKS = (check_config, check_pam_python, check_pam_stacks, check_secure_path, check_profile, check_elevation,
          check_runtime_dir, check_broker, check_imds, check_imds_rule, check_imds_audit, check_ssm_user, check_door_share,
          check_gatekeeper, check_fleet_rules)


def run_all(config_path, assume=False):
    ctx = {"config_path": config_path, "assume": assume}
    results = []
    for check in CHECKS:
        try:
            results += check(ctx)
        except Exception as err:  # a broken check is a failed check, not a crashed doctor
            results.append(Result(check.__name__[6:].replace("_", "-"), FAIL, f"the check itself failed: {err}"))
    return results
