"""The installed pieces: where the shipped templates are, and how they are filled for this host."""

import hashlib
import json
import os
import re
import subprocess
import sys

from ..errors import RolegateError

# Services whose PATH the user does not control: the only ones that may run the hook (docs/security.md,
# "The PATH hazard"). su and su-l are deliberately absent: they get credentials via profile.d.
HOOK_SERVICES = ("sshd", "sudo", "sudo-i", "login")
TEMPLATES = {
    "pam-config": ("pam-configs", "rolegate"),
    "profile": ("profile.d", "rolegate.sh"),
    "unit": ("systemd", "rolegated.service"),
    "lockdown-unit": ("systemd", "rolegate-lockdown.service"),
    "config": ("rolegate", "rolegate.yaml"),
    "elevate-pam": ("pam.d", "rolegate"),
}


# The package's folder: the hook file sits at its top, where installed PAM lines point.
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hook_path():
    """The hook file of this installation (pam_python's first argument)."""
    return os.path.join(PACKAGE_DIR, "pam_hook.py")


def bin_path(name):
    """rolegate / rolegated beside this interpreter (the venv's bin)."""
    return os.path.join(os.path.dirname(sys.executable), name)


def template(name):
    """A shipped template's text: from the source tree's etc/ when this code runs from a checkout
    (building the Debian package must use the tree's templates, not an installed copy's), else
    from the installed data files."""
    folder, filename = TEMPLATES[name]
    candidates = [os.path.join(os.path.dirname(PACKAGE_DIR), "etc", folder, filename),
                  os.path.join(sys.prefix, "share", "rolegate", folder, filename)]
    for path in candidates:
        if os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                return fh.read()
    raise FileNotFoundError(f"rolegate's {folder}/{filename} template is missing; reinstall rolegate")


def fill(text, **values):
    for key, value in values.items():
        text = text.replace(f"@{key.upper()}@", value)
    return text


def pam_control(options):
    """`optional` lets a login through whatever the hook returns; on_error=deny needs `required`."""
    return "required" if "on_error=deny" in options.split() else "optional"


def pam_profile(options="", services=HOOK_SERVICES, hook=None):
    return fill(template("pam-config"), services=":".join(services), hook=hook or hook_path(),
                options=options, control=pam_control(options)).replace(" \n", "\n")


def profile_snippet(rolegate_bin=None, runtime_dir="/run/rolegate"):
    return fill(template("profile"), rolegate=rolegate_bin or bin_path("rolegate"), runtime_dir=runtime_dir.rstrip("/"))


def _docdir(docdir):
    return docdir or os.path.join(sys.prefix, "share", "rolegate")


def runtime_directory(runtime_dir):
    """runtime_dir as the unit's RuntimeDirectory= (relative to /run). The hardened unit gives the
    broker no mount of its own (a tmpfs mounted in its private mount namespace would be invisible
    to sshd and users), so runtime_dir must be on /run's tmpfs, which systemd provides."""
    rel = os.path.relpath(os.path.normpath(runtime_dir), "/run")
    if rel in (".", "..") or rel.startswith("../"):
        raise InstallError(f"runtime_dir {runtime_dir} is not under /run: the systemd unit keeps it on /run's "
                           f"tmpfs (RuntimeDirectory=); choose a directory under /run, such as /run/rolegate")
    return rel


def systemd_unit(rolegated_bin=None, runtime_dir="/run/rolegate", docdir=None, rolegate_bin=None):
    return fill(template("unit"), rolegated=rolegated_bin or bin_path("rolegated"),
                rolegate=rolegate_bin or bin_path("rolegate"), runtime_dir=runtime_dir,
                runtime_directory=runtime_directory(runtime_dir), docdir=_docdir(docdir))


NFT = "/usr/sbin/nft"  # Debian's nftables package


def lockdown_unit(lockdown_rules, rolegate_bin=None, docdir=None):
    """rolegate-lockdown.service: the static root-only rule (`lockdown_rules`, see lockdown_ruleset),
    then the configured one, early at boot."""
    return fill(template("lockdown-unit"), nft=NFT, lockdown_rules=lockdown_rules,
                rolegate=rolegate_bin or bin_path("rolegate"), docdir=_docdir(docdir))


def lockdown_ruleset():
    """The nft script the lockdown unit applies before anything else: table inet rolegate letting
    root alone reach IMDS. Made from the firewall module's own ruleset (one source for the rules),
    and, like its apply(), declared then deleted first so it replaces whatever table is there."""
    from ..backends import firewall as fw

    # No #! line: the unit runs `nft -f` on it, and a data file with one is a script to lintian.
    return (f"# rolegate's boot-time IMDS lockdown (nft -f): only root reaches IMDS until the configured rule "
            f"replaces it.\n# Generated from pam_rolegate.backends.firewall; do not edit.\n"
            f"table inet {fw.TABLE}\ndelete table inet {fw.TABLE}\n" + fw.ruleset([0]))


# -- the Debian package ---------------------------------------------------------------------------
# debian/rules writes these into the package tree at build time, from the same templates and
# functions `rolegate install` uses, with the paths the package installs to.

PACKAGE_NAME = "rolegate"
PACKAGE_HOOK = "/usr/lib/python3/dist-packages/pam_rolegate/pam_hook.py"
PACKAGE_UNIT = "/lib/systemd/system/rolegated.service"
PACKAGE_LOCKDOWN_UNIT = "/lib/systemd/system/rolegate-lockdown.service"
PACKAGE_LOCKDOWN_RULES = "/usr/share/rolegate/lockdown.nft"


def package_files():
    """{path on the installed system: (text, mode)} for the files the package ships besides the code."""
    return {
        PAM_PROFILE: (pam_profile(hook=PACKAGE_HOOK), 0o644),
        PROFILE_D: (profile_snippet(rolegate_bin="/usr/bin/rolegate"), 0o644),
        PACKAGE_UNIT: (systemd_unit(rolegated_bin="/usr/bin/rolegated", rolegate_bin="/usr/bin/rolegate",
                                    docdir="/usr/share/rolegate"), 0o644),
        PACKAGE_LOCKDOWN_UNIT: (lockdown_unit(PACKAGE_LOCKDOWN_RULES, rolegate_bin="/usr/bin/rolegate",
                                              docdir="/usr/share/rolegate"), 0o644),
        PACKAGE_LOCKDOWN_RULES: (lockdown_ruleset(), 0o644),
        CONFIG: (template("config"), 0o644),
        ELEVATE_PAM: (template("elevate-pam"), 0o644),
    }


def write_package_files(destdir):
    """Write package_files() below `destdir` (the package's staging tree, debian/rolegate)."""
    for path, (text, mode) in package_files().items():
        target = os.path.join(destdir, path.lstrip("/"))
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        with open(target, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(target, mode)


def package_installed():
    """True when dpkg knows the package rolegate here in any state but not-installed: also after a
    remove without purge, whose conffiles (profile.d, the config) dpkg still owns and purge deletes."""
    try:
        done = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Status}", PACKAGE_NAME],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False  # no dpkg: not a Debian host, so no package either
    return done.returncode == 0 and done.stdout.strip() not in ("", "not-installed")


# -- putting the pieces in place ------------------------------------------------------------------
# Every file install writes is recorded with its content hash in MANIFEST, so uninstall removes
# exactly what install added (and keeps what the admin changed since, saying so).

MANIFEST = "/var/lib/rolegate/install.json"
PAM_PROFILE = "/usr/share/pam-configs/rolegate"
COMMON_SESSION = "/etc/pam.d/common-session"
PROFILE_D = "/etc/profile.d/rolegate.sh"
UNIT = "/etc/systemd/system/rolegated.service"
LOCKDOWN_UNIT = "/etc/systemd/system/rolegate-lockdown.service"
LOCKDOWN_RULES = "/etc/rolegate/lockdown.nft"  # read at boot, before any file system but the local ones
UNITS = ("rolegate-lockdown.service", "rolegated.service")  # enabled and started in this order
CONFIG = "/etc/rolegate/rolegate.yaml"
ELEVATE_PAM = "/etc/pam.d/rolegate"  # the PAM service `rolegate elevate` authenticates through
MARK_BEGIN = "# BEGIN rolegate (managed by `rolegate install`; remove with `rolegate uninstall`)"
MARK_END = "# END rolegate"


class InstallError(RolegateError):
    pass


def _sha(data):
    return hashlib.sha256(data.encode()).hexdigest()


def sudoers_has_secure_path(paths=("/etc/sudoers",), dropin="/etc/sudoers.d"):
    """True when an uncommented `Defaults ... secure_path=` is in sudoers or its drop-ins."""
    files = list(paths)
    if os.path.isdir(dropin):
        files += [os.path.join(dropin, f) for f in sorted(os.listdir(dropin)) if "." not in f and not f.endswith("~")]
    pattern = re.compile(r"^\s*Defaults\b[^#]*\bsecure_path\s*=", re.M)
    for path in files:
        try:
            with open(path) as fh:
                if pattern.search(fh.read()):
                    return True
        except OSError:
            continue
    return False


def secure_path_problem(sudoers="/etc/sudoers"):
    """Why the hook may not go into sudo's stack on this host, or None. The package's postinst
    and `rolegate install` both ask (docs/security.md, "The PATH hazard"). Without sudo there is no sudo
    stack to guard: Debian's sudo package brings its secure_path line when it comes."""
    if not os.path.exists(sudoers) or sudoers_has_secure_path((sudoers,)):
        return None
    return ("sudoers has no 'Defaults secure_path=...': with the hook in sudo's stack a user's PATH would "
            "choose root's Python (docs/security.md, 'The PATH hazard'). Add Debian's default line with visudo")


def _write_new(path, text, record, mode=0o644):
    """Write `path` unless identical content is there; remember that we own it."""
    try:
        with open(path) as fh:
            if fh.read() == text:
                record.setdefault("files", {})[path] = _sha(text)
                return False
    except FileNotFoundError:
        pass
    made = []
    d = os.path.dirname(path)
    while not os.path.exists(d):
        made.append(d)
        d = os.path.dirname(d)
    for d in reversed(made):
        os.mkdir(d, 0o755)
        record.setdefault("dirs", []).append(d)
    tmp = path + ".rolegate-tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    record.setdefault("files", {})[path] = _sha(text)
    return True


def _run(cmd):
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    if done.returncode != 0:
        raise InstallError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
    return done


def install(options="", runtime_dir="/run/rolegate", firewall=True, say=print):
    """Put every piece in place; idempotent. Returns the manifest."""
    if package_installed():
        # The package owns the same paths (the PAM profile, profile.d, the unit, the config):
        # writing them again would leave dpkg and install.json disagreeing about who removes them.
        raise InstallError("the Debian package rolegate is installed: it already put every piece in place "
                           "(`dpkg -L rolegate`); edit /etc/rolegate/rolegate.yaml and `systemctl reload "
                           "rolegated`, or `apt-get purge rolegate` before installing this way")
    problem = secure_path_problem()
    if problem:
        raise InstallError(problem + ", then run install again")
    runtime_directory(runtime_dir)  # refuses a runtime_dir the unit cannot keep, before any change
    record = _load_manifest()
    if os.path.exists("/usr/sbin/pam-auth-update"):
        _write_new(PAM_PROFILE, pam_profile(options), record)
        _run(["/usr/sbin/pam-auth-update", "--package", "--enable", "rolegate"])
        record["pam"] = "pam-auth-update"
        say(f"PAM: {PAM_PROFILE} enabled with pam-auth-update (hook behind the service allow-list)")
    else:
        block = MARK_BEGIN + "\n" + "".join("session " + line.strip().replace("\t", " ", 1) + "\n"
                                           for line in pam_profile(options).split("Session:\n", 1)[1].splitlines()
                                           if line.strip()) + MARK_END + "\n"
        with open(COMMON_SESSION) as fh:
            text = fh.read()
        if MARK_BEGIN not in text:
            with open(COMMON_SESSION, "a") as fh:
                fh.write(block)
        record["pam"] = "common-session"
        say(f"PAM: marked block appended to {COMMON_SESSION}")
    _write_new(PROFILE_D, profile_snippet(runtime_dir=runtime_dir), record)
    say(f"shells: {PROFILE_D}")
    if not os.path.exists(CONFIG):
        _write_new(CONFIG, template("config"), record)
        say(f"config: example written to {CONFIG}; edit it, then `rolegate check-config`")
    else:
        say(f"config: {CONFIG} kept as it is")
    if not os.path.exists(ELEVATE_PAM):  # an admin's stack (a second factor added) is theirs
        _write_new(ELEVATE_PAM, template("elevate-pam"), record)
        say(f"elevation: PAM service {ELEVATE_PAM} (your password; add a second factor there)")
    _write_new(LOCKDOWN_RULES, lockdown_ruleset(), record)
    _write_new(LOCKDOWN_UNIT, lockdown_unit(LOCKDOWN_RULES), record)
    _write_new(UNIT, systemd_unit(runtime_dir=runtime_dir), record)
    if firewall:
        from ..rules import config as config_mod
        from ..backends import firewall as fw

        cfg = config_mod.load(CONFIG)
        fw.apply_config(cfg)
        record["firewall"] = True
        say("IMDS: audit mode, counted and NOT locked (nftables table inet rolegate)" if cfg.imds.mode == "audit"
            else "IMDS: locked to root (nftables table inet rolegate)")
    _save_manifest(record)
    if os.path.isdir("/run/systemd/system"):
        _run(["systemctl", "daemon-reload"])
        _run(["systemctl", "enable", "--now", *UNITS])
        say("IMDS lockdown: rolegate-lockdown.service enabled (at boot: root-only first, then the configured "
            "rule, before the network comes up)")
        say("broker: rolegated.service enabled and started")
    else:
        say(f"broker: systemd is not running here; start it with `{bin_path('rolegate')} firewall apply && "
            f"{bin_path('rolegated')} &` (unit file left at {UNIT})")
    notice = audit_notice()
    if notice:
        say(notice)
    return record


def audit_notice(path=CONFIG):
    """The loud notice `rolegate install` and the package's postinst print while the config in force
    has imds.mode audit (as the shipped example does); "" otherwise, or when the config cannot be
    read (check-config and the broker say why)."""
    from ..errors import ConfigError
    from ..rules import config as config_mod

    try:
        if config_mod.load(path).imds.mode != "audit":
            return ""
    except (ConfigError, OSError):
        return ""
    bar = "*" * 78
    return "\n".join([
        bar,
        f"rolegate: IMDS is NOT locked yet: {path} has imds.mode: audit.",
        "Every user can still reach the instance metadata service and take the instance role's keys;",
        "the firewall only counts who does. To lock it:",
        "  1. see who uses IMDS: `rolegate firewall show` and `rolegate doctor`;",
        "  2. give those users imds_allow_users or a role of their own;",
        "  3. set imds.mode: reject, then `systemctl restart rolegated`.",
        bar])


def uninstall(say=print):
    """Reverse exactly what install recorded; files changed since are kept and named."""
    record = _load_manifest()
    if not record:
        say("rolegate install left no record here; nothing to undo"
            + (" (the Debian package's pieces go with `apt-get purge rolegate`)" if package_installed() else ""))
        return record
    units_ran = os.path.isdir("/run/systemd/system") and UNIT in record.get("files", {})
    if units_ran:
        # Stopping the lockdown unit leaves its rules; fw.remove() below takes them away.
        subprocess.run(["systemctl", "disable", "--now", *reversed(UNITS)], capture_output=True)
    if record.get("firewall") or units_ran:  # the lockdown unit applied it even after --no-firewall
        from ..backends import firewall as fw

        fw.remove()
    if record.get("pam") == "pam-auth-update":
        _run(["/usr/sbin/pam-auth-update", "--package", "--remove", "rolegate"])
    elif record.get("pam") == "common-session":
        with open(COMMON_SESSION) as fh:
            text = fh.read()
        start, end = text.find(MARK_BEGIN), text.find(MARK_END)
        if start >= 0 and end > start:
            with open(COMMON_SESSION, "w") as fh:
                fh.write(text[:start] + text[end + len(MARK_END) + 1:])
    for path, digest in record.get("files", {}).items():
        try:
            with open(path) as fh:
                current = fh.read()
        except FileNotFoundError:
            continue
        if _sha(current) == digest:
            os.unlink(path)
        else:
            say(f"kept {path}: changed since install")
    if units_ran:  # systemd forgets the unit files just removed
        subprocess.run(["systemctl", "daemon-reload"], capture_output=True)
    for d in sorted(record.get("dirs", []), key=len, reverse=True):
        try:
            os.rmdir(d)
        except OSError:
            pass
    os.unlink(MANIFEST)
    try:
        os.rmdir(os.path.dirname(MANIFEST))
    except OSError:
        pass
    say("rolegate uninstalled")
    return record


def _load_manifest():
    try:
        with open(MANIFEST) as fh:
            return json.load(fh)
    except FileNotFoundError:
        return {}


def _save_manifest(record):
    os.makedirs(os.path.dirname(MANIFEST), mode=0o755, exist_ok=True)
    with open(MANIFEST, "w") as fh:
        json.dump(record, fh, indent=1, sort_keys=True)
