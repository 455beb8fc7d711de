"""The IMDS lockdown: an nftables table of rolegate's own that lets only root (and listed users)
reach the instance metadata service, so only the broker can ever see the gatekeeper credentials.

The owner match (`meta skuid`) sees a socket's uid only, not supplementary groups: access is
granted per user (`imds_allow_users`), never per group.
"""

import os
import pwd
import shutil
import subprocess

from .errors import RolegateError

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


def ruleset(uids):
    """The table, as nft script. REJECT (a TCP reset) so refused clients fail at once, not hang."""
    allow = ", ".join(str(u) for u in uids)
    lines = [f"table inet {TABLE} {{", "  chain output {",
             "    type filter hook output priority filter; policy accept;"]
    # Only packets from a socket another uid owns are refused; packets without an owning socket
    # (the kernel's own, such as the resets this very rule sends) pass.
    for family, addr in (("ip", IMDS_V4), ("ip6", IMDS_V6)):
        lines += [f"    {family} daddr {addr} meta skuid != {{ {allow} }} meta l4proto tcp reject with tcp reset",
                  f"    {family} daddr {addr} meta skuid != {{ {allow} }} reject"]
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def _nft(args, stdin=None):
    exe = shutil.which("nft") or next((p for p in ("/usr/sbin/nft", "/sbin/nft") if os.path.exists(p)), None)
    if exe is None:
        raise FirewallError("nft is not installed; install the nftables package (apt-get install nftables)")
    done = subprocess.run([exe] + args, input=stdin, capture_output=True, text=True, timeout=30)
    return done


def apply(uids):
    """Install (or replace) the table atomically; idempotent."""
    # Declaring then deleting the table first makes one transaction that works whether or not it exists.
    script = f"table inet {TABLE}\ndelete table inet {TABLE}\n" + ruleset(uids)
    done = _nft(["-f", "-"], stdin=script)
    if done.returncode != 0:
        raise FirewallError(f"nft refused the IMDS rules: {done.stderr.strip()}")


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
