"""The PAM hook's glue: options -> one broker call -> a PAM return code. Standard library only.

pam_hook.py (the file pam_python runs) hands every call here: pam_python compiles that file
from source at every login, while this module loads from its cached bytecode. Nothing here may
raise out of the entry points: pam_python turns an exception into PAM_SERVICE_ERR, which would
abort sudo.
"""

import os
import sys
import time

from . import client, protocol

# Hook options: name -> (default, parser, what it does to the session and the return code).
OPTIONS = {
    "debug": (False, None, "also log successful opens and closes (failures are always logged)"),
    "on_error": ("allow", ("allow", "deny"),
                 "allow: when the broker or STS fails, the session opens without credentials "
                 "(PAM_SUCCESS) and the reason is logged; deny: the session fails (PAM_SESSION_ERR)"),
    "socket": ("/run/rolegate/pam/pam.sock", str, "the broker's PAM door (a root-only socket)"),
    "timeout": (3.0, float, "seconds the whole hook may take, whatever the broker or STS do"),
}
_LOG_IDENT = "rolegate-pam"


def parse_options(args):
    """argv after the module path -> (options dict, list of problems). Never raises."""
    opts = {name: spec[0] for name, spec in OPTIONS.items()}
    problems = []
    for arg in args:
        name, has_value, value = arg.partition("=")
        spec = OPTIONS.get(name)
        if spec is None:
            problems.append(f"unknown option {arg!r}")
        elif spec[1] is None:
            opts[name] = True
        elif not has_value:
            problems.append(f"option {name} needs a value")
        elif isinstance(spec[1], tuple):
            if value in spec[1]:
                opts[name] = value
            else:
                problems.append(f"{name}={value!r}: allowed {'|'.join(spec[1])}")
        else:
            try:
                parsed = spec[1](value)
            except ValueError:
                problems.append(f"{name}={value!r} is not valid")
                continue
            if name == "timeout" and not 0.1 <= parsed <= 60:
                problems.append(f"timeout={value} must lie between 0.1 and 60 seconds")
                continue
            opts[name] = parsed
    return opts, problems


def _emit(event, error=False, **fields):
    """Log one `event: key=value ...` line without letting logging fail the hook."""
    try:
        from . import log  # only when there is something to say

        logger = log.Log(_LOG_IDENT)
        text = log.line(event, **fields)
        (logger.error if error else logger.emit)(text)
    except Exception:
        try:
            sys.stderr.write(f"{_LOG_IDENT}: {event}: {fields}\n")
        except Exception:
            pass


def _items(pamh):
    def get(name):
        try:
            return getattr(pamh, name)
        except Exception:
            return None
    return {name: get(name) for name in ("user", "ruser", "service", "rhost", "tty")}


# open_session's second result when the broker answered that this login gets no credentials: it
# made no session, so close_session has nothing to close and spares the login a round trip.
NO_SESSION = ""


def open_session(pamh, args, started):
    """Ask the broker for this login's credentials and put their location in the PAM environment.

    Returns (PAM code, session): the broker's session id; NO_SESSION when the broker answered
    "not granted"; None when it is not known (no answer), so close_session asks by pid.
    `started` is when the hook began.
    """
    session = None
    opts, problems = parse_options(args)
    for p in problems:
        _emit("failed", error=True, action="options", reason=f"{p}; using the default")
    items = _items(pamh)
    try:
        remaining = opts["timeout"] - (time.monotonic() - started)  # loading modules spent some
        request = protocol.OpenSession(
            user=items["user"] or "", service=items["service"] or "", pid=os.getpid(),
            ruser=items["ruser"] or None, rhost=items["rhost"] or None, tty=items["tty"] or None,
            budget_ms=int(remaining * 1000))
        reply = client.call(request, path=opts["socket"], timeout=remaining)
        if isinstance(reply, protocol.ErrorReply):
            raise RuntimeError(f"the broker refused ({reply.code}): {reply.message}")
        if reply.get("granted"):
            for key, value in (reply.get("env") or {}).items():
                pamh.env[key] = value
            session = reply.get("session") or None
        else:
            session = NO_SESSION
        if opts["debug"]:
            _emit("opened", user=items["user"], service=items["service"], granted=bool(reply.get("granted")),
                  session=session or None, ms=int((time.monotonic() - started) * 1000))
        return pamh.PAM_SUCCESS, session
    except Exception as err:  # every failure ends here; on_error decides what it costs the login
        verdict = "session opened without credentials" if opts["on_error"] == "allow" else "session refused"
        _emit("failed", error=True, action="open", user=items.get("user"), service=items.get("service"),
              reason=str(err), result=verdict)
        return (pamh.PAM_SUCCESS if opts["on_error"] == "allow" else pamh.PAM_SESSION_ERR), None


def close_session(pamh, args, session):
    """Tell the broker this session ended, without waiting for its answer. Logout never fails because
    of us. A close the broker never acts on (turned away as `busy`, or a broker restarting) is made
    good by its reaper: the session's process is this one (the pid it was opened with), which the
    broker watches through a pidfd and reaps as soon as it exits, or at its reap_interval sweep."""
    if session == NO_SESSION:
        return pamh.PAM_SUCCESS
    opts, _problems = parse_options(args)
    try:
        request = protocol.CloseSession(session=session) if session else protocol.CloseSession(pid=os.getpid())
        client.send(request, path=opts["socket"], timeout=opts["timeout"])
        if opts["debug"]:
            _emit("closed", session=session, sent=True)
    except Exception as err:
        _emit("failed", error=True, action="close", session=session, reason=str(err),
              result="the broker's reaper will release it")
    return pamh.PAM_SUCCESS
