"""The installed pieces: where the shipped templates are, and how they are filled for this host."""

import os
import sys

# Services whose PATH the user does not control: the only ones that may run the hook (README,
# "The PATH hazard"). su and su-l are deliberately absent: they get credentials via profile.d.
HOOK_SERVICES = ("sshd", "sudo", "sudo-i", "login")
TEMPLATES = {
    "pam-config": ("pam-configs", "rolegate"),
    "profile": ("profile.d", "rolegate.sh"),
    "unit": ("systemd", "rolegated.service"),
    "config": ("rolegate", "rolegate.yaml"),
}


def hook_path():
    """The hook file of this installation (pam_python's first argument)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "pam_hook.py")


def bin_path(name):
    """rolegate / rolegated beside this interpreter (the venv's bin)."""
    return os.path.join(os.path.dirname(sys.executable), name)


def template(name):
    """A shipped template's text: from the installed data files, or the source tree's etc/."""
    folder, filename = TEMPLATES[name]
    candidates = [os.path.join(sys.prefix, "share", "rolegate", folder, filename),
                  os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc", folder, filename)]
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


def systemd_unit(rolegated_bin=None, runtime_dir="/run/rolegate", docdir=None):
    return fill(template("unit"), rolegated=rolegated_bin or bin_path("rolegated"), runtime_dir=runtime_dir,
                docdir=docdir or os.path.join(sys.prefix, "share", "rolegate"))
