"""The administrator's verbs on this host: firewall, install, uninstall, doctor and daemon (rolegated)."""

import json
import os

from . import exitcodes
from .deps import load_config


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
    cfg = load_config(args, deps)
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
