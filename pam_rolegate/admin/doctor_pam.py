"""Doctor's checks of the PAM side: the PAM stacks read as PAM would (includes followed), pam_python,
the hook's services and no others, sudo's secure_path, profile.d and the elevation service."""

import os

from . import install
from .doctor_common import FAIL, PASS, WARN, Result

PAM_DIR = "/etc/pam.d"
PAM_PYTHON = ("/lib/security/pam_python.so", "/lib/x86_64-linux-gnu/security/pam_python.so",
              "/usr/lib/x86_64-linux-gnu/security/pam_python.so", "/lib/aarch64-linux-gnu/security/pam_python.so")


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
