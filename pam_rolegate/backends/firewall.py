"""The IMDS lockdown: an nftables table of rolegate's own that lets only root (and listed users)
reach the instance metadata service, so only the broker can ever see the gatekeeper credentials.

The owner match (`meta skuid`) sees a socket's uid only, not supplementary groups: access is
granted per user (`imds_allow_users`), never per group.

imds.mode audit locks nothing: the same table counts, per uid, the connections users open to IMDS
(kernel per-element counters in a dynamic set), so an admin learns who depends on the instance
role before reject mode takes it away.
"""

import json
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass

from ..errors import RolegateError

TABLE = "rolegate"
IMDS_V4 = "169.254.169.254"
IMDS_V6 = "fd00:ec2::254"


class FirewallError(RolegateError):
    pass


def allowed_uids(users):
    uids = {0}
    for name in users:
        try:
            uids.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            raise FirewallError(f"imds_allow_users names {name!r}, which is not a user here") from None
    return sorted(uids)


MODES = ("reject", "emulate", "audit")
# audit mode's dynamic sets, keyed by uid, each element with the kernel's counter: new TCP
# connections to IMDS (the counter's packets: a connection's first packet, its SYN), and every
# packet sent to IMDS (packets and bytes). 65536 uids at most; past that a new uid is not
# counted, and still passes (a full set makes the rule not match; nothing is ever refused).
AUDIT_CONNECTIONS = "imds-audit"
AUDIT_TRAFFIC = "imds-audit-traffic"
AUDIT_SIZE = 65536


@dataclass(frozen=True)
class UidCount:
    """One uid's IMDS use in audit mode, as the kernel counted it since the rules were applied."""

    uid: int
    connections: int  # new TCP connections (their SYN packets)
    syn_bytes: int  # those SYNs' bytes: only kept to carry the counter over a re-apply exactly
    packets: int  # every packet sent to IMDS
    bytes: int

    @property
    def name(self):
        """The user name from NSS, or "-" for a uid no account has."""
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return "-"
LOOPBACK = (("ip", IMDS_V4, "127.0.0.1"), ("ip6", IMDS_V6, "::1"))
# One uid's connections at once to each of the broker's loopback HTTP doors (the IMDS emulator,
# the container endpoint). An SDK opens one per request and keeps at most a few alive (botocore's
# IMDS fetcher: one), so 64 covers `xargs -P 64` of SDK processes; 16 uids at their full share
# would be needed to fill a door's 1024. The doors enforce it at accept too (doors/web.py); the
# kernel enforcing it first is what keeps a flood of connects in flight from overflowing the
# door's listen queue, where the kernel would drop the SYNs of everyone else (a dropped SYN is
# retried after 1 s: botocore's whole IMDS timeout).
DOOR_CONNECTIONS_PER_UID = 64


def door_ports(cfg):
    """The loopback ports of the broker's HTTP doors that this config opens."""
    ports = []
    if cfg.imds.mode == "emulate":
        ports.append(cfg.imds.port)
    if cfg.delivery == "container":
        ports.append(cfg.container_port)
    return ports


def shared_ports(table):
    """The ports whose per-uid share is in force in `table` (what show() printed), as ints."""
    ports = set()
    for line in (table or "").splitlines():
        if "@door-connections" in line and "ct count over" in line and "tcp dport" in line:
            listed = line.split("tcp dport", 1)[1].split("ct state", 1)[0]
            ports.update(int(p) for p in listed.replace("{", " ").replace("}", " ").replace(",", " ").split()
                         if p.isdigit())
    return ports


def ruleset(uids, mode="reject", port=None, doors=(), counts=()):
    """The table, as nft script. REJECT (a TCP reset) so refused clients fail at once, not hang.

    mode "audit" refuses nothing: each uid but the allowed ones has its connections and packets to
    IMDS counted in the audit sets, which start from `counts` (UidCount; a re-apply's carry-over).

    mode "emulate" adds a nat chain that DNATs users' TCP to the IMDS addresses' port 80 onto the
    broker's loopback listener, 127.0.0.1:port and [::1]:port; everything else stays rejected.
    `doors`: the HTTP doors' loopback ports, where each uid but root may hold at most
    DOOR_CONNECTIONS_PER_UID connections to each at once; past it a connect is reset."""
    if mode not in MODES:
        raise FirewallError(f"imds.mode {mode!r} is unknown; allowed: {', '.join(MODES)}")
    if mode == "emulate" and not (isinstance(port, int) and 0 < port < 65536):
        raise FirewallError(f"imds.mode emulate needs the emulator's loopback port, not {port!r}")
    allow = ", ".join(str(u) for u in uids)
    lines = [f"table inet {TABLE} {{"]
    if mode == "emulate":
        # Output-hook DNAT at priority dstnat (-100) runs before the filter chain below (priority filter),
        # and conntrack applies it to every later packet of the connection: by the time the filter
        # sees them their daddr is the loopback, so the reject rules do not catch redirected traffic,
        # and the kernel answers a connection to a port nobody listens on with a reset -- an emulator
        # that is down means "connection refused", never the real IMDS. Only TCP to port 80 is
        # redirected; other ports and protocols fall through to the reject rules. Locally generated
        # traffic DNATed to the loopback stays on lo, so net.ipv4.conf.*.route_localnet is not needed.
        # A user who connects to the loopback listener directly needs no rule either way: the
        # emulator identifies every caller by its socket's uid, redirected or not.
        lines += ["  chain imds-redirect {",
                  # -100 is dstnat's value; nft 1.0.6 accepts the name only in the prerouting hook.
                  "    type nat hook output priority -100; policy accept;"]
        for family, addr, lo in LOOPBACK:
            target = f"[{lo}]" if family == "ip6" else lo
            lines.append(f"    {family} daddr {addr} tcp dport 80 meta skuid != {{ {allow} }} "
                         f"dnat {family} to {target}:{port}")
        lines.append("  }")
    doors = sorted(set(doors))
    if any(not (isinstance(p, int) and 0 < p < 65536) for p in doors):
        raise FirewallError(f"the doors' ports must be TCP ports, not {doors!r}")
    if doors:
        # Counted by the kernel's connection tracking (nf_conncount): a connection counts from its
        # SYN until it closes, so one waiting in the door's listen queue counts too.
        lines += ["  set door-connections {",
                  "    type uid . inet_service; size 65536; flags dynamic;",
                  "  }"]
    if mode == "audit":
        # `counter` on the set gives every element its own counter, evaluated each time the rule
        # below updates the element: one counter per uid, kept by the kernel (nft >= 0.9.5).
        for name, field in ((AUDIT_CONNECTIONS, "connections"), (AUDIT_TRAFFIC, "packets")):
            carried = ", ".join(f"{c.uid} counter packets {getattr(c, field)} bytes "
                                f"{c.syn_bytes if field == 'connections' else c.bytes}"
                                for c in counts if c.uid not in uids)
            lines += [f"  set {name} {{",
                      f"    type uid; size {AUDIT_SIZE}; flags dynamic; counter;"]
            if carried:
                lines.append(f"    elements = {{ {carried} }}")
            lines.append("  }")
    lines += ["  chain output {", "    type filter hook output priority filter; policy accept;"]
    if doors:
        # After the redirect above (dstnat runs first), a redirected connection's daddr is the
        # loopback listener's: one rule covers connections to the IMDS address and direct ones.
        listed = ", ".join(str(p) for p in doors)
        for family, _addr, lo in LOOPBACK:
            lines.append(f"    {family} daddr {lo} tcp dport {{ {listed} }} ct state new meta skuid != 0 "
                         f"add @door-connections {{ meta skuid . tcp dport ct count over {DOOR_CONNECTIONS_PER_UID} }} "
                         f"reject with tcp reset")
    if mode == "audit":
        # Counted, never refused: the chain's policy accepts. A socket's first packet of a TCP
        # connection (conntrack's state new: the SYN) counts one connection; packets without an
        # owning socket (the kernel's own) are not any user's and are not counted.
        for family, addr, _lo in LOOPBACK:
            lines += [f"    {family} daddr {addr} meta skuid != {{ {allow} }} meta l4proto tcp ct state new "
                      f"update @{AUDIT_CONNECTIONS} {{ meta skuid }}",
                      f"    {family} daddr {addr} meta skuid != {{ {allow} }} update @{AUDIT_TRAFFIC} {{ meta skuid }}"]
        lines += ["  }", "}"]
        return "\n".join(lines) + "\n"
    # Only packets from a socket another uid owns are refused; packets without an owning socket
    # (the kernel's own, such as the resets this very rule sends) pass.
    for family, addr, _lo in LOOPBACK:
        lines += [f"    {family} daddr {addr} meta skuid != {{ {allow} }} meta l4proto tcp reject with tcp reset",
                  f"    {family} daddr {addr} meta skuid != {{ {allow} }} reject"]
    if mode == "emulate":
        # imds.port is privileged (config refuses others), so no user can bind it even while the
        # broker is down and answer the others' redirected connections with credentials of their
        # own choosing. Should that ever change, this keeps it so: packets sent from the loopback
        # port by a socket root does not own (a squatter's SYN-ACK) are dropped.
        for family, _addr, lo in LOOPBACK:
            lines.append(f"    {family} saddr {lo} tcp sport {port} meta skuid != 0 drop")
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def _nft(args, stdin=None):
    exe = shutil.which("nft") or next((p for p in ("/usr/sbin/nft", "/sbin/nft") if os.path.exists(p)), None)
    if exe is None:
        raise FirewallError("nft is not installed; install the nftables package (apt-get install nftables)")
    done = subprocess.run([exe] + args, input=stdin, capture_output=True, text=True, timeout=30)
    return done


def apply(uids, mode="reject", port=None, doors=()):
    """Install (or replace) the table atomically; idempotent.

    audit mode applied over audit mode keeps each uid's counts (read, then written into the new
    table in the same transaction; what the kernel counts between that read and the transaction,
    a few milliseconds, is lost). Any other change of mode, like `remove`, starts them afresh."""
    counts = (audit_counts() or ()) if mode == "audit" else ()
    # Declaring then deleting the table first makes one transaction that works whether or not it
    # exists, so switching modes never leaves a moment without the table or with both rule sets.
    script = f"table inet {TABLE}\ndelete table inet {TABLE}\n" + ruleset(uids, mode, port, doors, counts)
    done = _nft(["-f", "-"], stdin=script)
    if done.returncode != 0:
        raise FirewallError(f"nft refused the IMDS rules: {done.stderr.strip()}")


def apply_config(cfg):
    """apply() with what the config says: who may reach IMDS, the mode, the doors' ports. Returns
    the uids allowed."""
    from .. import hostcheck  # imports this module: asked at call time

    hostcheck.check_users(cfg)  # a name no user has is refused located in the file, as check-config does
    uids = allowed_uids(cfg.imds_allow_users)
    apply(uids, cfg.imds.mode, cfg.imds.port, door_ports(cfg))
    return uids


def remove():
    """Delete the table; True when there was one. Leaves nothing else behind."""
    if _nft(["list", "table", "inet", TABLE]).returncode != 0:
        return False
    done = _nft(["delete", "table", "inet", TABLE])
    if done.returncode != 0:
        raise FirewallError(f"nft could not delete table inet {TABLE}: {done.stderr.strip()}")
    return True


def show():
    """The table in force, or None."""
    done = _nft(["list", "table", "inet", TABLE])
    return done.stdout if done.returncode == 0 else None


def _set_counters(name):
    """{uid: (packets, bytes)} of one audit set, or None when the table in force has no such set."""
    done = _nft(["-j", "list", "set", "inet", TABLE, name])
    if done.returncode != 0:
        return None
    found = {}
    for item in json.loads(done.stdout).get("nftables", ()):
        for elem in item.get("set", {}).get("elem", ()):
            elem = elem.get("elem", elem)
            uid = elem.get("val")
            if isinstance(uid, str):  # an nft that prints names (-u): back to the uid
                uid = pwd.getpwnam(uid).pw_uid
            counter = elem.get("counter") or {}
            found[int(uid)] = (int(counter.get("packets", 0)), int(counter.get("bytes", 0)))
    return found


def audit_counts():
    """Each counted uid's UidCount, by uid, when audit mode's rules are in force; else None."""
    connections = _set_counters(AUDIT_CONNECTIONS)
    traffic = _set_counters(AUDIT_TRAFFIC)
    if connections is None or traffic is None:
        return None
    return [UidCount(uid, *connections.get(uid, (0, 0)), *traffic.get(uid, (0, 0)))
            for uid in sorted(set(connections) | set(traffic))]


def put_count(uid, count):
    """Set one uid's audit counters back to `count` (a UidCount, or None: not counted at all), in one
    transaction. Doctor uses it to take its own probe's connections out of the admin's figures."""
    lines = []
    for name, value in ((AUDIT_CONNECTIONS, count and (count.connections, count.syn_bytes)),
                        (AUDIT_TRAFFIC, count and (count.packets, count.bytes))):
        # add-then-delete works whether or not the element exists
        lines += [f"add element inet {TABLE} {name} {{ {uid} }}", f"delete element inet {TABLE} {name} {{ {uid} }}"]
        if value:
            lines.append(f"add element inet {TABLE} {name} {{ {uid} counter packets {value[0]} bytes {value[1]} }}")
    done = _nft(["-f", "-"], stdin="\n".join(lines) + "\n")
    if done.returncode != 0:
        raise FirewallError(f"nft could not reset uid {uid}'s IMDS counts: {done.stderr.strip()}")
