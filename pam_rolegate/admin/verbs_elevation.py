"""The elevation verbs: elevate (PAM's questions relayed to this terminal, then an optional -- CMD run
with the profile), drop, and an approver's approve, deny and approvals."""

import json
import os
import time

from . import exitcodes
from .deps import broker_call, report_failure, session_grant
from ..errors import ConfigError, RolegateError


ELEVATE_CLI_DEADLINE = 600  # past the broker's own bounds: 3 minutes of PAM plus 5 waiting for approval


def _ask(event, deps):
    """One PAM prompt, asked on the terminal (a hidden one without echo); from standard input when
    there is no terminal (scripts, tests). None at end of input."""
    import getpass

    text = event.get("text") or ""
    if event.get("kind") == "echo_off" and deps.stdin.isatty():
        try:
            return getpass.getpass(text)
        except EOFError:
            return None
    deps.err.write(text)
    deps.err.flush()
    line = deps.stdin.readline()
    if not line:
        return None
    return line.rstrip("\n")


def find_command(name, environ):
    """Where `name` would be run from (PATH from `environ`, as execvp looks), or the exit code that
    says why it cannot be: exitcodes.CMD_NOT_FOUND, or CMD_NOT_EXECUTABLE for a file that is there
    but not executable (or a directory), as env(1) tells them apart."""
    if "/" in name:
        candidates = [name]
    else:
        candidates = [os.path.join(d or ".", name) for d in environ.get("PATH", os.defpath).split(os.pathsep)]
    seen = False
    for path in candidates:
        if not os.path.exists(path):
            continue
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
        seen = True
    return exitcodes.CMD_NOT_EXECUTABLE if seen else exitcodes.CMD_NOT_FOUND


def run_command(argv, env):
    """Run CMD to its end and return its exit code (128+N when signal N ended it). Ctrl-C is CMD's
    to act on, as a shell leaves it: rolegate ignores SIGINT meanwhile (so it still drops the
    profile afterwards), and CMD starts with SIGINT's default action."""
    import signal
    import subprocess

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc = subprocess.Popen(argv, env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        code = proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    return exitcodes.SIGNAL_BASE - code if code < 0 else code


class _Ended(Exception):
    """An elevation request that ends before a verdict: cancelled, or given up on."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def run_elevate(args, deps):
    """rolegate elevate PROFILE --reason TEXT [--for DURATION] [-- CMD ...]: PAM's questions on this
    terminal, an approver's word where the rule wants one, then the profile for this session.
    With -- CMD, every failure of rolegate's own before CMD runs is ELEVATE_FAILED (env(1)'s 125),
    so CMD's own codes stay unambiguous."""
    from ..hookside import protocol

    from ..rules.config import parse_duration

    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    before_cmd = exitcodes.ELEVATE_FAILED if args.command else None

    def fail(message, code):
        return report_failure(args, deps, message, before_cmd or code)

    seconds = None
    if args.json and args.command:
        return fail("--json reports an elevation of this session; with -- CMD, CMD's own output is what comes out "
                    "(drop one of the two)", exitcodes.USAGE)
    if args.duration:
        try:
            seconds = parse_duration(args.duration)
        except (ValueError, ConfigError) as err:
            return fail(f"--for: {err}", exitcodes.USAGE)
    if args.command:
        # Before PAM asks anything: a mistyped command should not cost a password and an approval.
        found = find_command(args.command[0], deps.environ)
        if isinstance(found, int):
            why = "not found" if found == exitcodes.CMD_NOT_FOUND else "not executable"
            return report_failure(args, deps, f"{args.command[0]}: {why}; nothing was asked of the broker", found)
    # The broker decides every refusal (one `denied: action=elevate` line each): a profile, reason
    # or --for it would refuse is sent anyway, only made to fit the wire (a string of at most
    # MAX_STRING characters, valid UTF-8; a 32-bit count), and refused there as unknown, too long
    # or out of range.
    def fit(text):
        return None if text is None else \
            text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")[:protocol.MAX_STRING]

    if seconds is not None:
        seconds = min(seconds, 2 ** 31 - 1)
    grant = session_grant(deps.environ)
    try:
        reply = broker_call(protocol.Elevate(grant=grant, profile=fit(args.profile), reason=fit(args.reason),
                                              seconds=seconds), deps)
    except RolegateError as err:
        return fail(f"not elevated: {err}", exitcodes.of_error(err))
    rid, waiting_said = reply.get("id"), False
    # The broker's own bounds (every prompt, the conversation, an approval) end a request well within
    # this; past it the broker is not answering as it should, and waiting longer helps nobody.
    deadline = time.monotonic() + ELEVATE_CLI_DEADLINE
    try:
        while True:
            answer = None
            for event in reply.get("events") or []:
                if event.get("kind") in ("echo_off", "echo_on"):
                    answer = (event.get("prompt"), _ask(event, deps))
                    if answer[1] is None:
                        raise _Ended(exitcodes.NEGATIVE, "not elevated: no answer to PAM's question (end of input)")
                else:
                    deps.warn(event.get("text") or "")
            state = reply.get("state")
            if state in ("granted", "denied", "failed"):
                break
            if time.monotonic() > deadline:
                raise _Ended(exitcodes.BROKER_UNREACHABLE,
                             f"the broker did not finish request {rid} in {ELEVATE_CLI_DEADLINE}s; giving up")
            if answer is not None:
                reply = broker_call(protocol.ElevationPoll(id=rid, prompt=answer[0], answer=answer[1]), deps)
                continue
            if state == "awaiting-approval" and not waiting_said:
                deps.warn(f"waiting for a member of {reply.get('approvers')} to run: rolegate approve {rid}")
                waiting_said = True
            time.sleep(0.2)
            reply = broker_call(protocol.ElevationPoll(id=rid), deps)
    except (KeyboardInterrupt, _Ended, RolegateError) as err:
        try:
            broker_call(protocol.ElevationCancel(id=rid), deps)
        except RolegateError:
            pass
        if isinstance(err, KeyboardInterrupt):
            return report_failure(args, deps, "elevation cancelled", exitcodes.INTERRUPTED)
        code = err.code if isinstance(err, _Ended) else exitcodes.of_error(err)
        return fail(str(err) if isinstance(err, _Ended) else f"not elevated: {err}", code)
    if state != "granted":
        # denied: PAM or an approver said no; failed: STS refused, or the session ended first.
        return fail(f"not elevated: {reply.get('message')}",
                    exitcodes.NEGATIVE if state == "denied" else exitcodes.FAILED)
    deps.warn(f"elevated: {args.profile} is {reply.get('role')} until {reply.get('until')} "
              f"(aws --profile {args.profile}; rolegate drop {args.profile} ends it sooner)")
    if args.json:
        deps.say(json.dumps({"profile": args.profile, "state": state, "role": reply.get("role"),
                             "until": reply.get("until"), "id": rid}, indent=2))
    if not args.command:
        return exitcodes.OK
    env = dict(deps.environ, AWS_PROFILE=args.profile)
    env.pop("AWS_DEFAULT_PROFILE", None)
    try:
        code = run_command(args.command, env)
    except OSError as err:  # gone or changed since find_command looked
        deps.warn(f"cannot run {args.command[0]}: {err}")
        code = exitcodes.CMD_NOT_FOUND if isinstance(err, FileNotFoundError) else exitcodes.CMD_NOT_EXECUTABLE
    finally:
        try:
            broker_call(protocol.Drop(grant=grant, profile=args.profile), deps)
        except RolegateError as err:
            deps.warn(f"could not drop {args.profile}: {err}")
    return code


def run_drop(args, deps):
    from ..hookside import protocol

    reply = broker_call(protocol.Drop(grant=session_grant(deps.environ), profile=args.profile), deps)
    deps.say(f"dropped {reply.get('dropped')} ({reply.get('role')})")
    return exitcodes.OK


def _show_request(r):
    return (f"{r.get('id')}: {r.get('principal')} asks for {r.get('profile')} = {r.get('role')} for "
            f"{(r.get('seconds') or 0) // 60}m: {r.get('reason')}")


def run_approve(args, deps):
    from ..hookside import protocol

    request = (protocol.Deny if args.verb == "deny" else protocol.Approve)(id=args.id)
    reply = broker_call(request, deps)
    deps.say(("denied " if args.verb == "deny" else "approved ") + _show_request(reply.data))
    return exitcodes.OK


def run_approvals(args, deps):
    from ..hookside import protocol

    pending = broker_call(protocol.Approvals(), deps).get("pending") or []
    if args.json:
        deps.say(json.dumps({"pending": pending}, indent=2))
        return exitcodes.OK
    if not pending:
        deps.say("no elevation request waits for your approval")
    for r in pending:
        deps.say(_show_request(r))
    return exitcodes.OK
