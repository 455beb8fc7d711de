"""pam_python glue: hook options -> one broker call -> a PAM return code. Standard library only.

PAM line (behind the service allow-list guard, see README "The PATH hazard"):

    session optional pam_python.so /PATH/TO/pam_rolegate/pam_hook.py [OPTIONS]

pam_python executes this file in Debian's /usr/bin/python3, in isolated mode and without this
folder on sys.path, so it loads its sibling modules itself. Nothing here may raise: pam_python
turns an exception into PAM_SERVICE_ERR, which would abort sudo.
"""

import os
import sys
import time

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
_session = None  # the broker's id for the session this PAM handle opened (pam_python keeps
                 # one module namespace per PAM handle, so open and close share it)


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


def _package():
    """Import our sibling modules from this file's own folder, wherever it is installed.

    The folder must be root's and not writable by others: code loaded here runs as root.
    The loader is the interpreter's own frozen bootstrap (always loaded already), because
    `importlib.util` costs ~3 ms of imports at every login; submodules then load from their
    cached bytecode through the ordinary import system.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    pkg = sys.modules.get("pam_rolegate")
    if pkg is None or os.path.dirname(os.path.abspath(pkg.__file__)) != here:
        st = os.stat(here)
        if st.st_uid != 0 or st.st_mode & 0o022:
            raise RuntimeError(f"{here} must be owned by root and not group/world-writable")
        import _frozen_importlib as bootstrap
        import _frozen_importlib_external as external

        spec = external.spec_from_file_location(
            "pam_rolegate", os.path.join(here, "__init__.py"), submodule_search_locations=[here])
        pkg = bootstrap.module_from_spec(spec)
        sys.modules["pam_rolegate"] = pkg
        spec.loader.exec_module(pkg)
    from pam_rolegate import client, protocol

    return client, protocol


def _emit(event, error=False, **fields):
    """Log one `event: key=value ...` line without letting logging fail the hook."""
    try:
        _package()
        from pam_rolegate import log  # only when there is something to say

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


def open_session(pamh, args):
    """Ask the broker for this login's credentials and put their location in the PAM environment."""
    global _session
    started = time.monotonic()
    opts, problems = parse_options(args)
    for p in problems:
        _emit("failed", error=True, action="options", reason=f"{p}; using the default")
    items = _items(pamh)
    try:
        client, protocol = _package()
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
            _session = reply.get("session")
        if opts["debug"]:
            _emit("opened", user=items["user"], service=items["service"], granted=bool(reply.get("granted")),
                  session=_session, ms=int((time.monotonic() - started) * 1000))
        return pamh.PAM_SUCCESS
    except Exception as err:  # every failure ends here; on_error decides what it costs the login
        verdict = "session opened without credentials" if opts["on_error"] == "allow" else "session refused"
        _emit("failed", error=True, action="open", user=items.get("user"), service=items.get("service"),
              reason=str(err), result=verdict)
        return pamh.PAM_SUCCESS if opts["on_error"] == "allow" else pamh.PAM_SESSION_ERR


def close_session(pamh, args):
    """Tell the broker this session ended. Logout never fails because of us."""
    global _session
    opts, _problems = parse_options(args)
    try:
        client, protocol = _package()
        request = protocol.CloseSession(session=_session) if _session else protocol.CloseSession(pid=os.getpid())
        reply = client.call(request, path=opts["socket"], timeout=opts["timeout"])
        if isinstance(reply, protocol.ErrorReply):
            raise RuntimeError(f"the broker refused ({reply.code}): {reply.message}")
        if opts["debug"]:
            _emit("closed", session=_session, released=reply.get("released"))
        _session = None
    except Exception as err:
        _emit("failed", error=True, action="close", session=_session, reason=str(err),
              result="the broker's reaper will release it")
    return pamh.PAM_SUCCESS


# -- pam_python entry points: a few lines each, and none may raise ----------------------------------


def pam_sm_open_session(pamh, flags, argv):
    try:
        return open_session(pamh, argv[1:])
    except BaseException:
        return pamh.PAM_SUCCESS


def pam_sm_close_session(pamh, flags, argv):
    try:
        return close_session(pamh, argv[1:])
    except BaseException:
        return pamh.PAM_SUCCESS


def _ignore(pamh, flags, argv):
    return pamh.PAM_IGNORE  # rolegate only takes part in sessions


pam_sm_authenticate = pam_sm_setcred = pam_sm_acct_mgmt = pam_sm_chauthtok = _ignore
