"""Doctor's IMDS checks: probes as root and as nobody from a child process, what the kernel counted in
audit mode, and whether the configured lockdown rule is the one in force."""

import errno
import os
import socket
import sys
import time

from .doctor_common import FAIL, PASS, WARN, Result, rules_in_force

NOBODY = 65534


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


def check_imds_audit(ctx):
    """imds.mode audit: who used IMDS, from the kernel's counters, and whether the rules already
    give roles (then every mapped user can still take the gatekeeper's keys from IMDS)."""
    from ..backends import firewall

    cfg = ctx.get("config")
    if cfg is None or cfg.imds.mode != "audit":
        return []
    out = []
    rules = rules_in_force(cfg)
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
