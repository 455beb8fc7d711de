"""The PAM hook: its option table, its return codes and log lines under real pam_python (pamtester),
and the rule that it imports the standard library only."""

import ast
import os
import shutil
import socket
import sys
import threading
import time

import pytest

from conftest import REPO, require_sandbox
from harness import SSHD_PATH, VENV, make_host, pam_environment, pamtester, run
from pam_rolegate.hookside import hook, protocol


@pytest.mark.parametrize("args,expect,problems", [
    ([], {"debug": False, "on_error": "allow", "timeout": 3.0}, 0),
    (["debug", "on_error=deny", "timeout=1.5"], {"debug": True, "on_error": "deny", "timeout": 1.5}, 0),
    (["socket=/x/y.sock"], {"socket": "/x/y.sock"}, 0),
    (["on_error=maybe"], {"on_error": "allow"}, 1),
    (["timeout=abc"], {"timeout": 3.0}, 1),
    (["timeout=0"], {"timeout": 3.0}, 1),
    (["bogus"], {}, 1),
    (["timeout"], {"timeout": 3.0}, 1),
])
def test_hook__options_table(args, expect, problems):
    opts, found = hook.parse_options(args)
    for key, value in expect.items():
        assert opts[key] == value, f"{args}: option {key} is {opts[key]!r}, expected {value!r}"
    assert len(found) == problems, f"{args}: expected {problems} problems, got {found}"


# What the hook may load: its own folder, and the few top-level files it shares with the rest.
HOOK_SIDE = ("pam_rolegate/hookside", "pam_rolegate/pam_hook.py", "pam_rolegate/__init__.py",
             "pam_rolegate/errors.py")


def _hook_side_files():
    files = []
    for entry in HOOK_SIDE:
        path = os.path.join(REPO, entry)
        if os.path.isdir(path):
            files += [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".py")]
        else:
            files.append(path)
    return files


def _package_imports(path):
    """Each import in a module, lazy ones included, as (absolute module name or None, names)."""
    here = os.path.relpath(os.path.dirname(path), REPO).replace(os.sep, ".")
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[:len(here.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            yield module, [a.name for a in node.names]


def test_hook__its_side_of_the_tree_imports_only_the_standard_library_and_itself():
    """The folder rule the layout promises: nothing under hookside/ (nor the files it shares) reaches
    the broker's side, and nothing outside the standard library — lazy imports included."""
    files = _hook_side_files()
    allowed = {"pam_rolegate", "pam_rolegate.errors", "pam_rolegate.hookside"}
    allowed |= {"pam_rolegate.hookside." + os.path.basename(f)[:-3] for f in files if "/hookside/" in f}
    bad = []
    for path in files:
        for module, names in _package_imports(path):
            if module.split(".")[0] == "pam_rolegate":
                targets = [module] if module != "pam_rolegate" and module != "pam_rolegate.hookside" \
                    else [f"{module}.{n}" for n in names]
                bad += [(os.path.relpath(path, REPO), t) for t in targets if t not in allowed]
            elif module.split(".")[0] not in sys.stdlib_module_names:
                bad.append((os.path.relpath(path, REPO), module))
    assert len(files) >= 7, f"the hook side's files were not found where the layout puts them: {files}"
    assert not bad, f"the hook's side imports what sshd must never load (non-stdlib or broker side): {bad}"


PROBE = '''
import sys
def pam_sm_open_session(pamh, flags, argv):
    before = set(sys.modules)  # what the interpreter's own startup (site, .pth files) loaded
    ns = {"__file__": %(hook)r, "__name__": "rolegate_hook"}
    exec(compile(open(%(hook)r).read(), %(hook)r, "exec"), ns)
    code = ns["pam_sm_open_session"](pamh, flags, [%(hook)r] + argv[1:])
    with open(%(out)r, "w") as fh:
        fh.write("code=%%d\\n" %% code)
        fh.write("\\n".join(sorted(set(sys.modules) - before)))
    return code
def pam_sm_close_session(pamh, flags, argv):
    return pamh.PAM_SUCCESS
'''


@pytest.fixture(scope="module")
def pam_host():
    require_sandbox()
    h = make_host()
    h.install_commands()
    h.add_user("hookuser")
    hook = h.install_pam()
    yield h, hook
    h.stop()


def test_hook__real_pam_python_run_loads_no_third_party_module(pam_host):
    h, hook = pam_host
    out = os.path.join(h.workdir, "modules.txt")
    probe = os.path.join(h.workdir, "probe.py")
    with open(probe, "w") as fh:
        fh.write(PROBE % {"hook": hook, "out": out})
    with open("/etc/pam.d/rgprobe", "w") as fh:
        fh.write(f"session required pam_python.so {probe} socket=/run/nothing-here.sock\n")
    done = pamtester("rgprobe", "hookuser", "open_session")
    assert os.path.exists(out), f"the probe did not run under pam_python: {done.stdout} {done.stderr}"
    lines = open(out).read().splitlines()
    assert lines[0] == "code=0", f"the hook should return PAM_SUCCESS with on_error=allow: {lines[0]}"
    mods = lines[1:]  # the modules the hook itself added to the interpreter
    assert "pam_rolegate.hookside.client" in mods, f"the hook did not load its client module: {mods}"
    broker_side = [m for m in mods if m.startswith("pam_rolegate.") and m != "pam_rolegate.errors"
                   and not m.startswith("pam_rolegate.hookside")]
    assert not broker_side, f"the hook loaded modules from outside its side of the tree: {broker_side}"
    foreign = sorted({m.split(".")[0] for m in mods} - set(sys.stdlib_module_names) - {"pam_rolegate"})
    assert not foreign, f"the hook loaded non-stdlib modules under real pam_python: {foreign}"
    assert "boto3" not in mods and "yaml" not in mods, "boto3/yaml must never load inside sshd"


@pytest.mark.parametrize("options,expect_ok,log", [
    ("socket=/run/nothing-here.sock", True, 'result="session opened without credentials"'),
    ("socket=/run/nothing-here.sock on_error=deny", False, 'result="session refused"'),
    ("socket=/run/nothing-here.sock timeout=oops", True, "timeout='oops' is not valid"),
])
def test_hook__broker_missing_gives_the_on_error_verdict_and_logs_why(pam_host, options, expect_ok, log):
    _h, hook = pam_host
    with open("/etc/pam.d/rghook", "w") as fh:
        fh.write(f"session required pam_python.so {hook} {options}\n")
    done = pamtester("rghook", "hookuser")
    assert (done.returncode == 0) == expect_ok, \
        f"{options}: pamtester exit {done.returncode}, expected success={expect_ok}: {done.stderr}"
    assert log in done.stderr, f"{options}: expected log line containing {log!r}, got:\n{done.stderr}"
    assert "no broker at /run/nothing-here.sock" in done.stderr, f"the reason is missing:\n{done.stderr}"


# -- the interpreter a pamtester run embeds: Debian's, as under sshd, whatever the caller's PATH ----

PREFIX_PROBE = '''
import os, sys
def pam_sm_open_session(pamh, flags, argv):
    with open(%(out)r, "w") as fh:
        fh.write("\\n".join([sys.prefix, sys.executable, os.environ.get("PATH", "")]))
    return pamh.PAM_SUCCESS
def pam_sm_close_session(pamh, flags, argv):
    return pamh.PAM_SUCCESS
'''
CONTROL = "# control: the caller's PATH on purpose"  # marks the one pamtester started outside the helper


def _embedded(h, start):
    """(sys.prefix, sys.executable, PATH) as pam_python's interpreter saw them in `start(service)`'s run."""
    out = os.path.join(h.workdir, "prefix.txt")
    probe = os.path.join(h.workdir, "prefix_probe.py")
    with open(probe, "w") as fh:
        fh.write(PREFIX_PROBE % {"out": out})
    with open("/etc/pam.d/rgprefix", "w") as fh:
        fh.write(f"session required pam_python.so {probe}\n")
    if os.path.exists(out):
        os.unlink(out)
    done = start("rgprefix")
    assert done.returncode == 0 and os.path.exists(out), f"the prefix probe did not run: {done.stdout} {done.stderr}"
    return tuple(open(out).read().split("\n"))


def test_hook__pam_environment_is_sshds_path_and_nothing_inherited():
    env = pam_environment()
    assert env == {"PATH": SSHD_PATH, "LANG": "C"}, f"pamtester must get sshd's PATH and nothing else: {env}"
    first = shutil.which("python3", path=env["PATH"])
    assert first and os.path.realpath(first) == os.path.realpath("/usr/bin/python3"), \
        f"the first python3 on sshd's PATH here is {first}, not Debian's /usr/bin/python3: pam_python would embed it"


def test_hook__pamtester_embeds_debians_python_even_with_a_venv_python3_first_on_the_callers_path(pam_host,
                                                                                                  monkeypatch):
    """A venv's (or pyenv's) python3 ahead of /usr/bin on the caller's PATH: pam_python takes its prefix
    from it. The control shows that happens to a pamtester that inherits the PATH; the helper's does not."""
    h, _hook = pam_host
    venv_python = os.path.join(VENV, "bin", "python3")
    assert os.path.exists(venv_python), f"no venv python3 to plant at {venv_python}"
    monkeypatch.setenv("PATH", f"{VENV}/bin:{SSHD_PATH}")
    control = _embedded(h, lambda service: run(["pamtester", service, "hookuser", "open_session"],  # control: the caller's PATH on purpose
                                                env=dict(os.environ), check=False))
    assert control[0] == VENV, \
        f"control: with {VENV}/bin first on PATH pam_python should embed the venv (the hazard), saw {control}"
    prefix, executable, path = _embedded(h, lambda service: pamtester(service, "hookuser", "open_session"))
    assert (prefix, executable) == ("/usr", "/usr/bin/python3"), \
        f"a pamtester run embedded {executable} (prefix {prefix}), not /usr/bin/python3: it inherited PATH={path}"
    assert path == SSHD_PATH, f"pamtester ran with PATH={path}, not sshd's {SSHD_PATH}"


def test_hook__every_pamtester_in_tests_and_scripts_goes_through_the_helper():
    """harness.pamtester is the one place that starts pamtester (with sshd's environment)."""
    needles = tuple("[" + q + "pamtester" + q for q in ('"', "'"))  # a command list starting with it
    stray = []
    for folder in ("tests", "scripts"):
        for name in sorted(os.listdir(os.path.join(REPO, folder))):
            path = os.path.join(REPO, folder, name)
            if not os.path.isfile(path) or name == "harness.py":
                continue
            for number, line in enumerate(open(path, errors="replace"), 1):
                if any(n in line for n in needles) and CONTROL not in line:
                    stray.append(f"{folder}/{name}:{number}: {line.strip()}")
    assert not stray, "pamtester started outside harness.pamtester (it would inherit the caller's PATH):\n" + \
        "\n".join(stray)


# -- what close_session asks of the broker ----------------------------------------------------------


class _Pamh:
    """The few PamHandle members the hook touches (user, service, env, return codes)."""
    PAM_SUCCESS, PAM_SESSION_ERR = 0, 14
    user, service, ruser, rhost, tty = "hookuser", "sshd", None, None, None

    def __init__(self):
        self.env = {}


def _answering_broker(path, open_reply):
    """A Unix socket at `path` that answers open_session with `open_reply` and anything else with
    released=0; returns the list of actions it was asked, in order. (A stand-in for the broker's
    door: what is tested is which requests the hook sends; tests/test_login.py runs the real one.)"""
    seen = []
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(8)
    srv.settimeout(10)

    def serve():
        with srv:
            while True:
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                with conn:
                    body = conn.recv(4 + protocol.MAX_FRAME)[4:]
                    action = protocol.decode_request(body).ACTION
                    seen.append(action)
                    reply = open_reply if action == "open_session" else protocol.Reply({"released": 0})
                    try:
                        conn.sendall(protocol.encode_reply(reply))
                    except OSError:
                        pass  # the hook sends close_session without reading the reply

    threading.Thread(target=serve, daemon=True).start()
    return seen, srv


@pytest.mark.parametrize("open_reply,actions", [
    (protocol.Reply({"granted": False, "env": {}, "reason": "no rule matches"}), ["open_session"]),
    (protocol.Reply({"granted": True, "session": "s1", "env": {"AWS_REGION": "us-east-1"}, "reason": "rule 0"}),
     ["open_session", "close_session"]),
    (protocol.ErrorReply(protocol.E_STS_FAILED, "sts_unavailable: down"), ["open_session", "close_session"]),
])
def test_hook__close_asks_the_broker_only_when_a_session_may_exist(tmp_path, open_reply, actions):
    """A login the broker answered "not granted" holds no session: its logout costs no round trip.
    Granted, or refused with an error (which may come after a session was made), it does."""
    require_sandbox()  # the client insists on a root peer: the test runs as root in the sandbox
    path = str(tmp_path / "pam.sock")
    seen, srv = _answering_broker(path, open_reply)
    try:
        pamh = _Pamh()
        code, session = hook.open_session(pamh, [f"socket={path}"], time.monotonic())
        assert code == pamh.PAM_SUCCESS, f"open_session returned {code} for {open_reply!r}"
        assert hook.close_session(pamh, [f"socket={path}"], session) == pamh.PAM_SUCCESS, "close must not fail"
        deadline = time.monotonic() + 5
        while len(seen) < len(actions) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen == actions, f"after {open_reply!r} the hook asked the broker {seen}, expected {actions}"
    finally:
        srv.close()
