"""The PAM hook: its option table, its return codes and log lines under real pam_python (pamtester),
and the rule that it imports the standard library only."""

import ast
import os
import sys

import pytest

from conftest import REPO, require_sandbox
from harness import make_host, run
from pam_rolegate.hookside import hook


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
    done = run(["pamtester", "rgprobe", "hookuser", "open_session"], check=False)
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
    done = run(["pamtester", "rghook", "hookuser", "open_session", "close_session"], check=False)
    assert (done.returncode == 0) == expect_ok, \
        f"{options}: pamtester exit {done.returncode}, expected success={expect_ok}: {done.stderr}"
    assert log in done.stderr, f"{options}: expected log line containing {log!r}, got:\n{done.stderr}"
    assert "no broker at /run/nothing-here.sock" in done.stderr, f"the reason is missing:\n{done.stderr}"
