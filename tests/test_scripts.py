"""The README's first commands work verbatim for root and for a user who may sudo.

scripts/demo, scripts/test, scripts/bench and scripts/sandbox source scripts/as-root, which
lets root through and re-runs anyone else's command through sudo. Driven here with a probe that
sources the real file, as real users through real sudo (inside the test sandbox's /etc).
"""

import os
import shutil
import subprocess
import tempfile

import pytest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AS_ROOT = os.path.join(HERE, "scripts", "as-root")
SUDOER = "rgscript"  # may sudo without a password
PLAIN = "rgplain"  # may not sudo
DROPIN = "/etc/sudoers.d/rolegate-scripts-test"

PROBE = """#!/bin/bash
set -euo pipefail
source {as_root}
echo "uid=$(id -u) args=$# venv=${{ROLEGATE_TEST_VENV:-}}"
for a in "$@"; do echo "arg=[$a]"; done
"""


def _user(name):
    if subprocess.run(["id", name], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], check=True)


@pytest.fixture(scope="module")
def probe_dir():
    assert os.environ.get("ROLEGATE_SANDBOX_INSIDE") == "1", "run through scripts/test: this adds users and sudoers"
    _user(SUDOER)
    _user(PLAIN)
    with open(DROPIN, "w") as fh:
        fh.write(f"{SUDOER} ALL=(ALL:ALL) NOPASSWD: ALL\n")
    os.chmod(DROPIN, 0o440)
    folder = tempfile.mkdtemp(prefix="rolegate-scripts-")
    os.chmod(folder, 0o755)
    # A copy of the real file, so the probe sources exactly what the scripts source.
    shutil.copy(AS_ROOT, os.path.join(folder, "as-root"))
    probe = os.path.join(folder, "probe")
    with open(probe, "w") as fh:
        fh.write(PROBE.format(as_root=os.path.join(folder, "as-root")))
    os.chmod(probe, 0o755)
    # A PATH without sudo: what a root-only image (or a user's shell there) has.
    bare = os.path.join(folder, "bin")
    os.mkdir(bare)
    for tool in ("id", "basename", "dirname", "bash"):
        os.symlink(shutil.which(tool), os.path.join(bare, tool))
    os.chmod(bare, 0o755)
    yield folder
    os.unlink(DROPIN)
    shutil.rmtree(folder)


def _run_as(user, argv, path="/usr/local/bin:/usr/bin:/bin"):
    cmd = ["env", "-i", f"PATH={path}", "HOME=/", *argv]
    if user != "root":
        cmd = ["runuser", "-u", user, "--"] + cmd
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)


def test_root_runs_on_without_sudo(probe_dir):
    done = _run_as("root", [os.path.join(probe_dir, "probe"), "a b"], path=os.path.join(probe_dir, "bin"))
    assert done.returncode == 0 and "uid=0 args=1" in done.stdout and "arg=[a b]" in done.stdout, \
        f"root without sudo on PATH should run the script itself: rc={done.returncode} out={done.stdout!r} err={done.stderr!r}"


def test_a_user_who_may_sudo_is_taken_through_sudo_with_arguments_intact(probe_dir):
    done = _run_as(SUDOER, [os.path.join(probe_dir, "probe"), "-q", "two words", ""])
    assert done.returncode == 0, f"the sudoer's run failed: rc={done.returncode} out={done.stdout!r} err={done.stderr!r}"
    assert "uid=0 args=3" in done.stdout, f"the script did not re-run as root with its 3 arguments: {done.stdout!r}"
    assert "arg=[two words]" in done.stdout and "arg=[]" in done.stdout, f"arguments were mangled: {done.stdout!r}"


def test_the_test_venv_variable_survives_the_trip_through_sudo(probe_dir):
    done = _run_as(SUDOER, ["env", "ROLEGATE_TEST_VENV=/opt/x venv", os.path.join(probe_dir, "probe")])
    assert done.returncode == 0 and "uid=0" in done.stdout and "venv=/opt/x venv" in done.stdout, \
        f"sudo's reset environment lost ROLEGATE_TEST_VENV: rc={done.returncode} out={done.stdout!r} err={done.stderr!r}"


def test_a_user_who_may_not_sudo_is_refused_by_sudo_not_run_unprivileged(probe_dir):
    done = _run_as(PLAIN, ["setsid", "-w", os.path.join(probe_dir, "probe")])  # no tty: sudo cannot ask a password
    assert done.returncode != 0 and "uid=" not in done.stdout, \
        f"a user without sudo rights must not get the script run (as anyone): rc={done.returncode} out={done.stdout!r}"
    assert "sudo" in done.stderr, f"the refusal should come from sudo and say so: {done.stderr!r}"


def test_without_sudo_a_user_is_told_to_run_it_as_root(probe_dir):
    done = _run_as(PLAIN, [os.path.join(probe_dir, "probe"), "x"], path=os.path.join(probe_dir, "bin"))
    assert done.returncode == 1 and "uid=" not in done.stdout, f"it ran without root: {done.stdout!r}"
    assert "sudo is not installed: run it as root" in done.stderr and "probe x" in done.stderr, \
        f"the message should say to run the same command as root: {done.stderr!r}"


@pytest.mark.parametrize("script", ["demo", "test", "bench", "sandbox"])
def test_every_root_script_sources_as_root(script):
    with open(os.path.join(HERE, "scripts", script)) as fh:
        text = fh.read()
    assert 'source "$(dirname "$0")/as-root"' in text, f"scripts/{script} does not source scripts/as-root"
    assert "sudo $0" not in text, f"scripts/{script} still tells the user to type sudo itself"
