"""The pam_python PATH hazard (docs/security.md): a user's PATH must never pick root's Python.

pam_python starts its interpreter on first use and Python finds its standard library through
`python3` on PATH. A user who plants ~/x/bin/python3 and ~/x/lib/python3.11/ and runs a setuid
program that keeps their PATH (su) gets their code run as root, unless rolegate's hook line is
skipped for that service. These tests plant exactly that and check no planted code runs as root.
"""

import os
import shutil

import pytest

from conftest import require_sandbox
from harness import make_host, run

MARKER = "/run/rolegate-path-hazard-marker"
PYVER = "python3.11"
# encodings is imported before builtins.open exists, so the payload writes with os calls.
PAYLOAD = (
    "import os as _os\n"
    "if _os.geteuid() == 0:\n"
    f"    _fd = _os.open({MARKER!r}, _os.O_WRONLY | _os.O_CREAT | _os.O_APPEND, 0o644)\n"
    "    _os.write(_fd, b'planted code ran as root in pid %d\\n' % _os.getpid())\n"
    "    _os.close(_fd)\n"
)


@pytest.fixture(scope="module")
def planted():
    require_sandbox()
    if not os.path.isdir(f"/usr/lib/{PYVER}"):
        pytest.fail(f"/usr/lib/{PYVER} is missing; pam_python embeds Debian's {PYVER}")
    h = make_host()
    h.install_commands()
    h.add_user("mallory")
    h.allow_sudo("mallory")
    run(["passwd", "-d", "mallory"])  # su to oneself then needs no password (pam_unix nullok)
    hook = h.install_pam()
    home = os.path.expanduser("~mallory")
    fake = os.path.join(home, "x")
    os.makedirs(f"{fake}/bin", exist_ok=True)
    with open(f"{fake}/bin/python3", "w") as fh:
        fh.write("#!/bin/sh\nexit 0\n")
    os.chmod(f"{fake}/bin/python3", 0o755)
    shutil.copytree(f"/usr/lib/{PYVER}", f"{fake}/lib/{PYVER}", symlinks=True,
                    ignore=shutil.ignore_patterns("test", "__pycache__", "dist-packages", "site-packages",
                                                  "idlelib", "tkinter", "lib2to3", "ensurepip", "pydoc_data"))
    enc = f"{fake}/lib/{PYVER}/encodings/__init__.py"
    with open(enc) as fh:
        original = fh.read()
    with open(enc, "w") as fh:
        fh.write(PAYLOAD + original)
    run(["chown", "-R", "mallory:", fake])
    yield h, hook, f"{fake}/bin:/usr/local/bin:/usr/bin:/bin"
    h.stop()


def as_mallory(path_value, *cmd):
    return run(["setpriv", "--reuid", "mallory", "--regid", "mallory", "--init-groups", "--reset-env",
                "env", f"PATH={path_value}", *cmd], check=False, timeout=60)


def marker_text():
    try:
        with open(MARKER) as fh:
            return fh.read()
    except FileNotFoundError:
        return ""


def test_path_hazard__is_real_when_the_hook_is_not_guarded(planted):
    """Control: with an unguarded pam_python line in su's stack, the planted code runs as root.
    Without this the other tests could pass for the wrong reason (a payload that never loads)."""
    _host, hook, path_value = planted
    with open("/etc/pam.d/su") as fh:
        original = fh.read()
    try:
        with open("/etc/pam.d/su", "a") as fh:
            fh.write(f"session optional pam_python.so {hook}\n")
        if os.path.exists(MARKER):
            os.unlink(MARKER)
        done = as_mallory(path_value, "su", "mallory", "-c", "true")
        assert "planted code ran as root" in marker_text(), \
            f"the control did not reproduce the hazard (su exit {done.returncode}: {done.stderr}); " \
            f"the guard tests below would prove nothing"
    finally:
        with open("/etc/pam.d/su", "w") as fh:
            fh.write(original)
        if os.path.exists(MARKER):
            os.unlink(MARKER)


@pytest.mark.parametrize("cmd", [
    ("su", "mallory", "-c", "true"),
    ("su", "-l", "mallory", "-c", "true"),
    ("sudo", "-n", "true"),
    ("sudo", "-n", "-i", "true"),
], ids=["su", "su-l", "sudo", "sudo-i"])
def test_path_hazard__planted_python_never_runs_as_root(planted, cmd):
    _host, _hook, path_value = planted
    if os.path.exists(MARKER):
        os.unlink(MARKER)
    done = as_mallory(path_value, *cmd)
    assert done.returncode == 0, f"{' '.join(cmd)} failed for mallory: {done.stderr}"
    assert marker_text() == "", f"{' '.join(cmd)} ran mallory's planted Python as root: {marker_text()}"
