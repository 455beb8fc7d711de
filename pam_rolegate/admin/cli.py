"""The `rolegate` command's front: the parser (flag wiring; the man pages are made from it), main
and rolegated's entry point. Each verb is a run_<verb>(args, deps) in a module of its area:
verbs_checks (check-config, check-user, policy), verbs_session (env, region, credentials, status,
whoami, profiles), verbs_elevation (elevate, drop, approve, deny, approvals) and verbs_host
(firewall, install, uninstall, doctor, daemon); deps holds what they share.

Imports of heavy modules (boto3 through sts, yaml through config) happen inside the verbs
that need them, and a verb's module is imported only when it runs (_verb): `rolegate env` runs
in every login shell and must start fast.
"""

import argparse
import importlib
import io
import os
import sys

from .. import __version__
from ..errors import RolegateError
from . import exitcodes
from .deps import Deps, report_failure


# -- wiring --------------------------------------------------------------------------------------


RULES_HELP = "with rules_from: a rules document to read the rules from (default: the broker's last good copy)"
CONFIG_HELP = "the config file (default: $ROLEGATE_CONFIG, else /etc/rolegate/rolegate.yaml)"
JSON_HELP = "print one JSON object on standard output instead of text (errors too, with their exit code)"
VERSION = f"rolegate {__version__}"
SHELL_HELP = "the shell syntax to write: sh (the default; bash, dash and zsh too), csh or fish"


def _add_config(p, default, where=""):
    """--config on `p`. Each command takes it too, after its name, with a SUPPRESS default so that a
    value given before the command is not overwritten by the command's parser."""
    p.add_argument("--config", metavar="PATH", default=default, help=CONFIG_HELP + where)


def parser():
    p = argparse.ArgumentParser(prog="rolegate", description="Per-user AWS IAM roles for logins on shared Linux "
                                "hosts: check and explain the rules, set up a host, and reach the broker "
                                "(rolegated) for your own credentials.",
                                epilog="Exit codes: " + "; ".join(f"{c} {what}" for c, what in exitcodes.SHORT)
                                + ". See rolegate(8).")
    p.add_argument("--version", action="version", version=VERSION, help="print the version and exit")
    _add_config(p, None, "; before or after the command")
    sub = p.add_subparsers(dest="verb", metavar="COMMAND", title="commands",
                           help="one of these; `rolegate COMMAND --help` says more")
    sub.required = True

    def command(name, help, description=None, run=None):
        s = sub.add_parser(name, help=help, description=description or help[0].upper() + help[1:] + ".")
        _add_config(s, argparse.SUPPRESS)
        s.set_defaults(run=run)
        return s

    s = command("check-config", "validate a config file; warn when no rule maps anyone",
                run="verbs_checks.run_check_config")
    s.add_argument("path", nargs="?", help="the file to check (default: the config --config names)")
    s.add_argument("--json", action="store_true", help=JSON_HELP)

    s = command("check-user", "which rule and role a login would get, and why", run="verbs_checks.run_check_user",
                description="Which rule and role a login would get, and why: every named profile it would get "
                            "with the rule that gives each, and the session name and source identity of each. "
                            "Exit 1 when no rule matches, and for a service the PAM hook never runs for.")
    s.add_argument("user", help="the user logging in (for sudo/su: the invoking user)")
    s.add_argument("--service", default="sshd", help="the PAM service (default sshd); the hook runs for sshd, "
                                                     "sudo, sudo-i and login, the broker serves shell and imds")
    s.add_argument("--ruser", help="PAM_RUSER: the invoking user, for sudo/su services")
    s.add_argument("--target", help="the account the session runs as (default: USER)")
    s.add_argument("--assume", action="store_true", help="really call AssumeRole and GetCallerIdentity")
    s.add_argument("--rules", metavar="FILE", help=RULES_HELP)
    s.add_argument("--json", action="store_true", help=JSON_HELP)

    command("daemon", "run the broker (rolegated) in the foreground", run="verbs_host.run_daemon",
            description=DAEMON_DESCRIPTION)

    s = command("env", "shell lines that point this shell at your credentials", run="verbs_session.run_env")
    s.add_argument("--shell", choices=("sh", "csh", "fish"), default="sh", help=SHELL_HELP)
    s.add_argument("-v", "--verbose", action="store_true", help="say why when you have no role")

    s = command("region", "shell lines: rolegate's region, or none where your own AWS config names one for the "
                          "profile in use (profile.d runs it when AWS_PROFILE is set)", run="verbs_session.run_region")
    s.add_argument("--shell", choices=("sh", "csh", "fish"), default="sh", help=SHELL_HELP)

    s = command("credentials", "credential_process JSON for your grant", run="verbs_session.run_credentials")
    s.add_argument("--grant", help="the grant id (written into the session's AWS config file)")
    s.add_argument("--profile", help="one of the grant's named profiles (assumed on first use)")

    s = command("profiles", "the profiles this session can use, their roles, which are held and until when",
                run="verbs_session.run_profiles")
    s.add_argument("--json", action="store_true", help=JSON_HELP)

    s = command("elevate", "an on-demand profile for this session: PAM asks who you are, then STS is called with "
                           "your reason in the session tags", run="verbs_elevation.run_elevate",
                description="An on-demand profile for this session: the broker runs the rolegate PAM service and "
                            "relays its questions to this terminal (from standard input when there is none), waits "
                            "for an approver where the rule names one, then assumes the role with your reason in "
                            "the session tags. With -- CMD, runs CMD with AWS_PROFILE=PROFILE, drops the profile "
                            "when CMD exits and exits with CMD's code (125: rolegate failed before CMD ran; 126: "
                            "CMD is not executable; 127: CMD was not found).")
    s.add_argument("profile", help="the on-demand profile (`rolegate check-user` lists yours)")
    s.add_argument("--reason", help="why (kept by CloudTrail as a session tag; required unless the rule says "
                                    "optional)")
    s.add_argument("--for", dest="duration", metavar="DURATION", help="how long (15m up to the rule's max, "
                                                                      "which is the default)")
    s.add_argument("--json", action="store_true", help="print the result as one JSON object (PAM's questions "
                                                       "still go to the terminal); not with -- CMD")
    s.add_argument("command", nargs="*", metavar="CMD", help="after --: one command to run with the profile, "
                                                              "which is dropped when it exits")

    s = command("drop", "end an elevation now", run="verbs_elevation.run_drop")
    s.add_argument("profile", help="the elevated profile to drop")

    for verb, what in (("approve", "approve an elevation request (members of its approvers group)"),
                       ("deny", "deny an elevation request (members of its approvers group)")):
        s = command(verb, what, run="verbs_elevation.run_approve")
        s.add_argument("id", help="the request's id (`rolegate approvals` lists them)")

    s = command("approvals", "elevation requests waiting for your approval", run="verbs_elevation.run_approvals")
    s.add_argument("--json", action="store_true", help=JSON_HELP)

    s = command("status", "grants, roles and expiry (yours; root sees all)", run="verbs_session.run_status")
    s.add_argument("--json", action="store_true", help=JSON_HELP)

    s = command("whoami", "GetCallerIdentity with this session's credentials", run="verbs_session.run_whoami")
    s.add_argument("--profile", help="a profile's instead of the default's (as aws --profile)")
    s.add_argument("--json", action="store_true", help=JSON_HELP)

    s = command("doctor", "check every piece of the installation: PASS/WARN/FAIL with the fix",
                run="verbs_host.run_doctor")
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    s.add_argument("--assume", action="store_true", help="also assume every configured role")

    s = command("install", "put rolegate in place: PAM, profile.d, systemd unit, firewall",
                run="verbs_host.run_install")
    s.add_argument("--options", default="", help="hook options for the PAM line, e.g. 'on_error=deny timeout=2'")
    s.add_argument("--no-firewall", action="store_true", help="do not apply the IMDS lockdown now")

    command("uninstall", "remove exactly what install put in place", run="verbs_host.run_uninstall")

    s = command("firewall", "the IMDS lockdown: apply, remove or show the nftables rules",
                run="verbs_host.run_firewall")
    s.add_argument("action", choices=("apply", "remove", "show"), help="apply or remove the lockdown (root), "
                                                                       "or show the rules in force")

    s = command("policy", "IAM policies the config needs, as JSON", run="verbs_checks.run_policy")
    s.add_argument("--gatekeeper", default="arn:aws:iam::ACCOUNT_ID:role/GATEKEEPER_ROLE",
                   help="the gatekeeper (instance) role's ARN, for the trust policies")
    s.add_argument("--rules", metavar="FILE", help=RULES_HELP)
    return p


DAEMON_DESCRIPTION = ("Run the broker, rolegated, in the foreground (as root). SIGHUP rereads the config (a bad one "
                      "is refused and the last good one kept); SIGTERM stops it, leaving its records and files for "
                      "the next start.")


def daemon_parser():
    """`rolegated`'s own parser (rolegate(8)'s `daemon` is the same program)."""
    p = argparse.ArgumentParser(prog="rolegated", description=DAEMON_DESCRIPTION)
    p.add_argument("--version", action="version", version=VERSION, help="print the version and exit")
    _add_config(p, None)
    p.set_defaults(run="verbs_host.run_daemon", verb="daemon")
    return p


def _split_command(argv):
    """(rolegate's arguments, CMD) for `rolegate elevate PROFILE ... -- CMD ARGS`: argparse's
    subparsers do not pass a `--` through."""
    if "elevate" in argv and "--" in argv[argv.index("elevate"):]:
        cut = argv.index("--", argv.index("elevate"))
        return argv[:cut], argv[cut + 1:]
    return argv, []


def _parse(p, argv, command):
    """parse_args, with env(1)'s rule for `elevate -- CMD`: a usage error there is ELEVATE_FAILED,
    so it cannot be taken for CMD's own 2."""
    try:
        return p.parse_args(argv)
    except SystemExit as stop:
        if command and stop.code == exitcodes.USAGE:
            raise SystemExit(exitcodes.ELEVATE_FAILED) from None
        raise


def _verb(where):
    """The run_<verb> function a parser names as "MODULE.FUNCTION" (a module of admin/), imported
    only when that verb runs: `rolegate env` runs in every login shell and loads its module alone."""
    module, name = where.rsplit(".", 1)
    return getattr(importlib.import_module(f".{module}", __package__), name)


def run(p, argv, deps, command=()):
    """Parse, run the verb and turn what went wrong into the exit-code table's code."""
    args = None
    try:
        args = _parse(p, argv, command)
        if command:
            args.command = list(args.command or []) + list(command)
        code = _verb(args.run)(args, deps)
        deps.out.flush()  # here, so a reader that went away (`| head`) is met below, not at exit
        return code
    except BrokenPipeError:
        # Nobody reads standard output any more: stop quietly. Point it at /dev/null so the
        # interpreter's own flush at exit has nowhere to fail either.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, deps.out.fileno())
        except (OSError, ValueError, io.UnsupportedOperation):
            pass  # not a real file (a test's StringIO): nothing will flush it at exit
        return exitcodes.BROKEN_PIPE
    except KeyboardInterrupt:
        return exitcodes.INTERRUPTED
    except (RolegateError, OSError) as err:
        return report_failure(args, deps, str(err), exitcodes.of_error(err))


def main(argv=None, deps=None):
    argv, command = _split_command(list(sys.argv[1:] if argv is None else argv))
    return run(parser(), argv, deps or Deps(), command)


def daemon_main(argv=None, deps=None):
    """`rolegated`: the broker in the foreground (same as `rolegate daemon`)."""
    return run(daemon_parser(), list(sys.argv[1:] if argv is None else argv), deps or Deps())


if __name__ == "__main__":
    sys.exit(main())
