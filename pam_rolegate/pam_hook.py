# pam_python entry points for rolegate: load the package from this file's folder, hand each call
# to pam_rolegate.hookside.hook. Standard library only.
#
# PAM line (behind the service allow-list guard, see docs/security.md, "The PATH hazard"):
#
#     session optional pam_python.so /PATH/TO/pam_rolegate/pam_hook.py [OPTIONS]
#
# pam_python executes this file in Debian's /usr/bin/python3, in isolated mode and without this
# folder on sys.path, compiling it from source at every login (its bytecode is never cached): so
# it holds the least code that can load the package (compiling costs by the statement, and these
# are comments, not docstrings), and the glue lives in hookside/hook.py (options, the broker call, log
# lines), which loads from its cached bytecode. Nothing here may raise: pam_python turns an
# exception into PAM_SERVICE_ERR, which would abort sudo.

import os
import sys
import time

_session = None  # the broker's id for the session this PAM handle opened (pam_python keeps
                 # one module namespace per PAM handle, so open and close share it)


# pam_rolegate.hookside.hook, imported from this file's own folder, wherever it is installed. The folder
# must be root's and not writable by others: code loaded here runs as root. The loader is the
# interpreter's own frozen bootstrap (always loaded already), because `importlib.util` costs ~3 ms
# of imports at every login; the modules then load from their cached bytecode through the
# ordinary import system.
def _package():
    here = os.path.dirname(os.path.abspath(__file__))
    pkg = sys.modules.get("pam_rolegate")
    if pkg is None or os.path.dirname(os.path.abspath(pkg.__file__)) != here:
        st = os.stat(here)
        if st.st_uid != 0 or st.st_mode & 0o022:
            raise RuntimeError(f"{here} must be owned by root and not group/world-writable")
        # The interpreter's startup objects go out of the cyclic collector's sight: loading the
        # package otherwise sets off a collection over all of them, ~0.8 ms of every login. They
        # live as long as the interpreter anyway; only cycles among them would never be freed.
        import gc

        gc.freeze()
        import _frozen_importlib as bootstrap
        import _frozen_importlib_external as external

        spec = external.spec_from_file_location("pam_rolegate", here + "/__init__.py",
                                                submodule_search_locations=[here])
        pkg = sys.modules["pam_rolegate"] = bootstrap.module_from_spec(spec)
        spec.loader.exec_module(pkg)
    from pam_rolegate.hookside import hook

    return hook


# -- pam_python entry points: a few lines each, and none may raise ----------------------------------


def pam_sm_open_session(pamh, flags, argv):
    global _session
    try:
        started = time.monotonic()
        try:
            hook = _package()
        except Exception as err:  # the package itself would not load: no logger, so stderr; on_error decides
            deny = "on_error=deny" in argv
            try:
                sys.stderr.write(f"rolegate-pam: failed: cannot load pam_rolegate: {err}; "
                                 f"{'session refused' if deny else 'session opened without credentials'}\n")
            except Exception:
                pass
            return pamh.PAM_SESSION_ERR if deny else pamh.PAM_SUCCESS
        code, _session = hook.open_session(pamh, argv[1:], started)
        return code
    except BaseException:
        return pamh.PAM_SUCCESS


def pam_sm_close_session(pamh, flags, argv):
    global _session
    try:
        _package().close_session(pamh, argv[1:], _session)
        _session = None
    except BaseException:
        pass
    return pamh.PAM_SUCCESS


def _ignore(pamh, flags, argv):
    return pamh.PAM_IGNORE  # rolegate only takes part in sessions


pam_sm_authenticate = pam_sm_setcred = pam_sm_acct_mgmt = pam_sm_chauthtok = _ignore
