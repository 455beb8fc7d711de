"""The Debian package: built by scripts/build-deb with Debian's tooling, lintian without errors,
installed with dpkg into overlays over /usr, /etc and /var in a mount and network namespace of its
own (never the host), where a real ssh login gets its role through the packaged hook and the
packaged broker (Debian's python3 and botocore 1.29); purged, it leaves /etc byte for byte as it was.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import REPO, Moto, free_port, require_sandbox
from harness import Held, Host, diff, run, snapshot, wait_gone

# Debian's programs first: dpkg and the maintainer scripts need /usr/sbin, and the packaged
# commands must run on Debian's python3, never a pyenv or venv one found earlier on PATH.
DEBIAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
USER = "pkguser"
ROLE = "arn:aws:iam::123456789012:role/deb-role"
METRICS = "/run/rolegate-deb-test.prom"  # outside the broker's tmpfs, so the test can read it
BUILD_TIMEOUT = 300
STEP_TIMEOUT = 120

# The child namespace: loopback up, a tmpfs of its own for the overlays' upper and work dirs, then
# the overlays. /var/lib is the sandbox's own overlay (pam-auth-update's state there matches the
# sandbox's /etc/pam.d), so it is staged before /var is covered and becomes /var/lib's lower layer.
# /run is a fresh tmpfs: the package's broker and purge work on /run/rolegate, which the other
# tests' brokers use in the sandbox's /run.
NAMESPACE_SETUP = r"""
set -euo pipefail
ip link set lo up
mount -t tmpfs -o mode=0755 rolegate-deb-run /run
mkdir -p /run/sshd /run/lock
touch /run/utmp
layers=$1
mount -t tmpfs -o mode=0700 rolegate-deb-layers "$layers"
mkdir "$layers/varlib-lower"
mount --bind /var/lib "$layers/varlib-lower"
for d in usr etc var; do
    mkdir -p "$layers/$d/upper" "$layers/$d/work"
    mount -t overlay "rolegate-deb-$d" -o "lowerdir=/$d,upperdir=$layers/$d/upper,workdir=$layers/$d/work" "/$d"
done
mkdir -p "$layers/varlib/upper" "$layers/varlib/work"
mount -t overlay rolegate-deb-varlib \
    -o "lowerdir=$layers/varlib-lower,upperdir=$layers/varlib/upper,workdir=$layers/varlib/work" /var/lib
echo READY
exec sleep 900
"""

CONFIG = """version: 1
region: us-east-1
source: instance-profile
sts_endpoint: {sts}
sts_timeout: 5s
metrics_file: {metrics}
metrics_interval: 1s
roles:
  - match: {{user: {user}}}
    role: {role}
"""


@pytest.fixture(scope="module")
def deb():
    """scripts/build-deb once for this module, into a directory of its own."""
    require_sandbox()
    out = os.path.join(workdir(), "dist")
    start = time.monotonic()
    done = run([os.path.join(REPO, "scripts", "build-deb"), "--out", out], timeout=BUILD_TIMEOUT, check=False)
    assert done.returncode == 0 or "lintian reported errors" in done.stderr, \
        f"scripts/build-deb failed to build the package:\n{done.stdout}\n{done.stderr}"
    debs = [f for f in os.listdir(out) if re.fullmatch(r"rolegate_[^_]+_all\.deb", f)]
    assert len(debs) == 1, f"expected one rolegate_<version>_all.deb in {out}, found {os.listdir(out)}"
    path = os.path.join(out, debs[0])
    print(f"\nbuild-deb: {time.monotonic() - start:.1f} s, {os.path.getsize(path) // 1024} KiB")
    with open(os.path.join(out, "lintian.txt")) as fh:
        return path, fh.read()


# The release hosts run before this one: the upgrade test builds its package from this commit (0.1.0,
# the last with the flat module layout), so `dpkg -i` of this tree's package is tried over it.
PREVIOUS_RELEASE = "f0e1e6d2c88e80aa2772560c8cc117b84981060a"


@pytest.fixture(scope="module")
def previous_deb():
    """The previous release's package, built by its own scripts/build-deb from `git archive`."""
    require_sandbox()
    if not os.path.exists(os.path.join(REPO, ".git")):  # a directory, or a worktree's file
        pytest.skip("not a git checkout: the previous release's source is not here to build")
    have = run(["git", "-C", REPO, "cat-file", "-e", PREVIOUS_RELEASE + "^{commit}"], check=False)
    assert have.returncode == 0, f"commit {PREVIOUS_RELEASE} (rolegate 0.1.0) is missing from this clone; " \
                                 "fetch the full history (git fetch --unshallow) to test upgrades"
    src = os.path.join(workdir(), "previous")
    os.mkdir(src)
    archive = subprocess.run(["git", "-C", REPO, "archive", PREVIOUS_RELEASE], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", src], input=archive.stdout, check=True)
    out = os.path.join(src, "dist")
    done = run([os.path.join(src, "scripts", "build-deb"), "--out", out], timeout=BUILD_TIMEOUT, check=False)
    debs = [f for f in os.listdir(out) if f.endswith("_all.deb")] if os.path.isdir(out) else []
    assert done.returncode == 0 and len(debs) == 1, \
        f"the previous release's package did not build:\n{done.stdout}\n{done.stderr}"
    return os.path.join(out, debs[0])


def workdir():
    """A directory of this test's in the sandbox's /tmp, which the child namespace shares (its /run
    is a tmpfs of its own)."""
    return tempfile.mkdtemp(prefix="rolegate-deb-", dir="/tmp")


def test_deb__lintian_reports_no_errors_and_no_warnings(deb):
    # docs/install.md promises both; the informational tags it lists are the only ones left.
    _, report = deb
    found = [line for line in report.splitlines() if line.startswith(("E:", "W:"))]
    assert not found, "lintian reported errors or warnings:\n" + "\n".join(found)


class Namespace:
    """A process holding a private mount and network namespace with the overlays in place;
    `ns` is the command prefix that runs a program in it, `root` the path prefix that reads its files."""

    def __init__(self, workdir):
        layers = os.path.join(workdir, "layers")
        os.mkdir(layers, 0o700)
        self.proc = subprocess.Popen(["unshare", "--mount", "--net", "--propagation", "private", "--",
                                      "bash", "-c", NAMESPACE_SETUP, "setup", layers],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        line = self.proc.stdout.readline()
        if line.strip() != "READY":
            self.proc.kill()
            raise AssertionError(f"the namespace with the overlays did not come up: {line}{self.proc.stderr.read()}")
        self.ns = ["nsenter", "-t", str(self.proc.pid), "-m", "-n"]
        self.root = f"/proc/{self.proc.pid}/root"

    def run(self, cmd, check=True, timeout=STEP_TIMEOUT, env=None):
        return run(self.ns + cmd, check=check, timeout=timeout,
                   env=dict(env or {}, PATH=DEBIAN_PATH, DEBIAN_FRONTEND="noninteractive", LANG="C.UTF-8"))

    def start(self, cmd, log, env=None):
        with open(log, "a") as fh:
            return subprocess.Popen(self.ns + cmd, stdout=fh, stderr=fh, start_new_session=True,
                                    env=dict(env or {}, PATH=DEBIAN_PATH, LANG="C.UTF-8"))

    def close(self):
        self.proc.kill()
        self.proc.wait(10)


def stop(proc, sig=signal.SIGTERM):
    """Stop a daemon started in its own session, and whatever it started."""
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def wait_for(what, ready, timeout=30, proc=None, log=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.1)
    text = open(log).read() if log and os.path.exists(log) else ""
    raise AssertionError(f"{what} did not come up within {timeout} s (exit {proc and proc.poll()}):\n{text}")


def unix_listening(path):
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
        return True
    except OSError:
        return False


def start_moto(space, host, log):
    """moto inside the namespace's own network: the only STS (and IMDS) the packaged broker can reach."""
    port = free_port(privileged=True)  # sts_endpoint takes plain http only below 1024
    moto_exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    moto = space.start([moto_exe, "-H", "127.0.0.1", "-p", str(port)], log)
    url = f"http://127.0.0.1:{port}"
    probe = [sys.executable, "-c", f"import urllib.request; urllib.request.urlopen('{url}/moto-api/data.json', timeout=1)"]
    wait_for("moto_server", lambda: space.run(probe, check=False).returncode == 0, proc=moto, log=log)
    host.moto = Moto(url, moto)  # host.stop() ends it with the rest
    return url


def forget_rolegate(space):
    """A host that never had rolegate: earlier test modules of this run may have left their config in
    the sandbox's /etc, which the overlay starts from (dpkg would adopt it as the conffile, and purge
    rightly remove it)."""
    space.run(["rm", "-rf", "/etc/rolegate", "/etc/profile.d/rolegate.sh", "/usr/share/pam-configs/rolegate"])


def configure(space, url):
    """The test's config in place, and what the unit's ExecStartPre does (the IMDS firewall). No
    `imds` key: the parser's default, reject, locks IMDS as an admin's enforced config does."""
    with open(space.root + "/etc/rolegate/rolegate.yaml", "w") as fh:
        fh.write(CONFIG.format(sts=url, metrics=METRICS, user=USER, role=ROLE))
    checked = space.run(["rolegate", "check-config"], check=False)
    assert checked.returncode == 0, f"the test's config is refused: {checked.stdout}"
    space.run(["rolegate", "firewall", "apply"])


def start_broker(space, url, log):
    """The packaged broker, as the unit starts it. IMDS is moto (the SDKs' standard variable); STS is
    reached only through sts_endpoint: Debian's botocore would otherwise call sts.us-east-1.amazonaws.com,
    unreachable here."""
    broker = space.start(["/usr/bin/rolegated"], log, env={"AWS_EC2_METADATA_SERVICE_ENDPOINT": url})
    wait_for("the packaged rolegated", lambda: unix_listening(space.root + "/run/rolegate/pam/pam.sock"),
             proc=broker, log=log)
    return broker


def test_deb__packaged_ssh_login_gets_its_role_and_purge_restores_etc(deb):
    path, _ = deb
    host = Host(workdir())
    # The user exists before the namespace does: it belongs to the host, not to what the package changes.
    host.add_user(USER)
    space = Namespace(host.workdir)
    moto = broker = None
    logs = {name: os.path.join(host.workdir, f"{name}.log") for name in ("moto", "rolegated")}
    try:
        url = start_moto(space, host, logs["moto"])
        forget_rolegate(space)
        before = snapshot("/etc", space.root)

        # A host set up with `rolegate install` is refused before anything is unpacked.
        os.makedirs(space.root + "/var/lib/rolegate")
        with open(space.root + "/var/lib/rolegate/install.json", "w") as fh:
            fh.write("{}")
        refused = space.run(["dpkg", "-i", path], check=False)
        assert refused.returncode != 0 and "rolegate uninstall" in refused.stderr, \
            f"dpkg -i should refuse a host set up by `rolegate install`:\n{refused.stdout}\n{refused.stderr}"
        space.run(["rm", "-rf", "/var/lib/rolegate"])
        space.run(["dpkg", "--purge", "rolegate"], check=False)  # the refused unpack's record, if dpkg kept one

        # Without secure_path in sudoers, configure stops before the hook reaches any PAM stack
        # (docs/security.md, "The PATH hazard"), and finishes once sudoers is fixed.
        sudoers = space.root + "/etc/sudoers"
        with open(sudoers) as fh:
            original = fh.read()
        assert "secure_path" in original, "the sandbox's sudoers should start with Debian's secure_path line"
        with open(sudoers, "w") as fh:
            fh.write("".join("#" + l if "secure_path" in l else l for l in original.splitlines(keepends=True)))
        unsafe = space.run(["dpkg", "-i", path], check=False)
        with open(space.root + "/etc/pam.d/common-session") as fh:
            common = fh.read()
        with open(sudoers, "w") as fh:
            fh.write(original)
        assert unsafe.returncode != 0 and "secure_path" in unsafe.stderr and "dpkg --configure -a" in unsafe.stderr, \
            f"dpkg -i should stop at configure without secure_path, saying what to do:\n{unsafe.stdout}\n{unsafe.stderr}"
        assert "pam_rolegate" not in common, f"the hook reached common-session without secure_path:\n{common}"
        space.run(["dpkg", "--configure", "-a"])

        start = time.monotonic()
        installed = space.run(["dpkg", "-i", path])
        print(f"dpkg -i: {time.monotonic() - start:.1f} s")
        # The shipped config is in imds.mode audit (nothing locked yet): postinst says so, loudly.
        assert "IMDS is NOT locked yet" in installed.stdout and "imds.mode: reject" in installed.stdout, \
            f"postinst should print the audit-mode notice with the way to enforce:\n{installed.stdout}"
        with open(space.root + "/etc/pam.d/common-session") as fh:
            common = fh.read()
        assert "pam_python.so /usr/lib/python3/dist-packages/pam_rolegate/pam_hook.py" in common and \
            "pam_succeed_if.so quiet service notin sshd:sudo:sudo-i:login" in common, \
            f"postinst did not enable the guarded hook in common-session:\n{common}"
        for shipped in ("/usr/bin/rolegate", "/usr/bin/rolegated", "/etc/profile.d/rolegate.sh",
                        "/lib/systemd/system/rolegated.service", "/usr/share/pam-configs/rolegate",
                        "/lib/systemd/system/rolegate-lockdown.service", "/usr/share/rolegate/lockdown.nft"):
            assert os.path.exists(space.root + shipped), f"the package did not install {shipped}"
        shipped_config = space.run(["rolegate", "check-config"], check=False)
        assert shipped_config.returncode == 0, f"the shipped example config is invalid: {shipped_config.stdout}"
        shipped_mode = space.run(["python3", "-c", "from pam_rolegate.rules import config; "
                                  "print(config.load('/etc/rolegate/rolegate.yaml').imds.mode)"])
        assert shipped_mode.stdout.strip() == "audit", f"the shipped config should be in audit mode: {shipped_mode.stdout}"
        nobody = space.run(["rolegate", "check-user", "root"], check=False)
        assert nobody.returncode == 1, f"the shipped config should map nobody, but root gets: {nobody.stdout}"

        # The venv way refuses on a packaged host, and changes nothing.
        etc_installed = snapshot("/etc", space.root)
        mixed = space.run(["rolegate", "install", "--no-firewall"], check=False)
        assert mixed.returncode != 0 and "Debian package rolegate is installed" in mixed.stderr, \
            f"`rolegate install` should refuse on a packaged host:\n{mixed.stdout}\n{mixed.stderr}"
        assert diff(etc_installed, snapshot("/etc", space.root)) == [], "the refused `rolegate install` changed /etc"

        configure(space, url)
        broker = start_broker(space, url, logs["rolegated"])
        host.start_sshd(ns=space.ns)
        script = 'echo "FILE=$AWS_SHARED_CREDENTIALS_FILE"; echo "ARN=$(/usr/bin/rolegate whoami 2>&1 | tail -n 1)"'
        start = time.monotonic()
        login = run(host.ssh_cmd(USER, script), check=False, timeout=STEP_TIMEOUT)
        print(f"ssh login + whoami: {time.monotonic() - start:.1f} s")
        seen = dict(line.split("=", 1) for line in login.stdout.splitlines() if "=" in line)
        assert seen.get("FILE", "").startswith("/run/rolegate/grants/"), \
            f"the packaged hook gave the ssh session no credentials file: {login.stdout!r} {login.stderr!r}\n" \
            f"broker log:\n{open(logs['rolegated']).read()}"
        assert f":assumed-role/deb-role/{USER}@" in seen.get("ARN", ""), \
            f"`rolegate whoami` in the session should name deb-role, got {seen.get('ARN')!r}\n" \
            f"broker log:\n{open(logs['rolegated']).read()}"
        metrics = space.root + METRICS
        wait_for("the granted login in the metrics file (prometheus-client 0.16)", lambda: os.path.exists(metrics) and
                 'rolegate_logins_total{result="granted",service="sshd"} 1.0' in open(metrics).read(), timeout=10)
        with open(metrics) as fh:
            assert "_created" not in fh.read(), "the metrics file has *_created series on prometheus-client 0.16"

        stop(host.sshd)
        stop(broker)
        start = time.monotonic()
        purged = space.run(["dpkg", "--purge", "rolegate"], check=False)
        print(f"dpkg --purge: {time.monotonic() - start:.1f} s")
        assert purged.returncode == 0, f"dpkg --purge failed:\n{purged.stdout}\n{purged.stderr}"
        changed = diff(before, snapshot("/etc", space.root))
        assert changed == [], f"/etc after install and purge differs from before in: {changed}"
        assert space.run(["nft", "list", "table", "inet", "rolegate"], check=False).returncode != 0, \
            "purge left the IMDS firewall table inet rolegate"
        for left in ("/var/lib/rolegate", "/run/rolegate", "/usr/lib/python3/dist-packages/pam_rolegate",
                     "/usr/bin/rolegated"):
            assert not os.path.exists(space.root + left), f"purge left {left}"
    finally:
        stop(broker)
        host.stop()
        space.close()


def test_deb__upgrade_from_the_previous_release_keeps_a_live_sessions_credentials(deb, previous_deb):
    """`dpkg -i` of this package over the previous release while a user is logged in: the PAM line
    still points at the same hook file, the new broker recovers the session from the old one's
    records, the session's credentials file stays, and it goes when that session ends."""
    path, _ = deb
    host = Host(workdir())
    host.add_user(USER)
    space = Namespace(host.workdir)
    broker = held = None
    logs = {name: os.path.join(host.workdir, f"{name}.log") for name in ("moto", "rolegated")}
    try:
        url = start_moto(space, host, logs["moto"])
        forget_rolegate(space)
        space.run(["dpkg", "-i", previous_deb])
        configure(space, url)
        broker = start_broker(space, url, logs["rolegated"])
        host.start_sshd(ns=space.ns)
        held = Held(host, USER)
        creds = space.root + held.info["FILE"]
        with open(creds) as fh:
            issued = fh.read()
        with open(space.root + "/etc/pam.d/common-session") as fh:
            stack = fh.read()

        # What systemd does around an upgrade: the old broker stops (its files and records stay),
        # the new package is unpacked and configured, the new broker starts.
        stop(broker)
        start = time.monotonic()
        # The admin's config stays (the test wrote its own over the shipped example, which has changed
        # since 0.1.0: without this dpkg would ask at its conffile prompt, with nobody to answer).
        upgraded = space.run(["dpkg", "--force-confold", "-i", path], check=False)
        print(f"dpkg -i over {os.path.basename(previous_deb)}: {time.monotonic() - start:.1f} s")
        assert upgraded.returncode == 0, f"the upgrade failed:\n{upgraded.stdout}\n{upgraded.stderr}"
        with open(space.root + "/etc/pam.d/common-session") as fh:
            assert fh.read() == stack, "the upgrade changed the PAM stack (the hook file must stay where it was)"
        package = space.root + "/usr/lib/python3/dist-packages/pam_rolegate"
        assert os.path.exists(package + "/hookside/hook.py") and not os.path.exists(package + "/hook.py"), \
            f"the upgrade did not replace the old release's modules: {sorted(os.listdir(package))}"
        broker = start_broker(space, url, logs["rolegated"])
        with open(creds) as fh:
            assert fh.read() == issued, "the live session's credentials file changed or went across the upgrade"
        status = space.run(["rolegate", "status", "--json"], check=False)
        assert status.returncode == 0 and USER in status.stdout, \
            f"the new broker does not know the session the old one recorded:\n{status.stdout}\n{status.stderr}\n" \
            f"broker log:\n{open(logs['rolegated']).read()}"

        held.release()
        held = None
        assert wait_gone(creds), "the credentials file outlived its session after the upgrade: the new broker " \
                                 f"did not take over the session\nbroker log:\n{open(logs['rolegated']).read()}"
    finally:
        if held is not None:
            held.proc.kill()
        stop(broker)
        host.stop()
        space.close()
