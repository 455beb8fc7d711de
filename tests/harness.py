"""A whole host inside the sandbox: users, the AWS stand-in, rolegated, PAM, sshd on 127.0.0.1, sudo.

Only for use inside scripts/sandbox (conftest.require_sandbox): it runs useradd, writes /etc and
starts daemons, all of which vanish with the sandbox's mount namespace.
"""

import contextlib
import functools
import os
import select
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time

from conftest import free_port, require_sandbox, start_moto

VENV = os.environ.get("ROLEGATE_TEST_VENV") or os.path.dirname(os.path.dirname(sys.executable))
# The AWS SDK for JavaScript v3 (scripts/test installs it from tests/js): `{JS_SDK} whoami [PROFILE]`
# prints the caller's ARN, `{JS_SDK} region [PROFILE]` the region a client resolves.
JS_DIR = os.environ.get("ROLEGATE_TEST_JS") or os.path.join(os.path.dirname(VENV), "js")
JS_SDK = f"node {JS_DIR}/sdk.js"
# The AWS CLIs. Both are called `aws`, so tests name each by its full path and PATH order never
# decides which one runs: the v1 from PyPI in the test venv (pyproject's `test` extra; not on any
# session's PATH), the v2 from Debian's awscli package (scripts/deps; 2.9.19 on Debian 12), which a
# session finds first on its PATH as plain `aws`. Tests report them as CLI (v1) and CLI2 (v2).
AWS_CLI = os.path.join(VENV, "bin", "aws")
AWS_CLI_V2 = "/usr/bin/aws"
AWS_CLIS = {"CLI": AWS_CLI, "CLI2": AWS_CLI_V2}
# CLI v2 releases that predate AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE (the token file EKS Pod
# Identity brought, late 2023): they send `container` delivery's endpoint no token, and it refuses
# them (403), so their default profile has no credentials under that delivery. Their named profiles
# work there: those come from the credentials file through credential_process. A listed version is
# expected to be refused there, and the test fails if it gets the role; any other is expected to get it.
CLI_V2_WITHOUT_CONTAINER_TOKEN_FILE = {"2.9.19"}
# The last line such a refused CLI v2 prints (the endpoint's 403, as its container provider reports it).
CLI_V2_CONTAINER_REFUSAL = "Received non 200 response (403) from ECS metadata"
ROLEGATE = "/usr/local/bin/rolegate"
ROLEGATED = "/usr/local/bin/rolegated"
RUNTIME_DIR = "/run/rolegate"
SOCKET = RUNTIME_DIR + "/rolegated.sock"  # the user door
PAM_SOCKET = RUNTIME_DIR + "/pam/pam.sock"  # the root-only PAM door
CONFIG_PATH = "/etc/rolegate/rolegate.yaml"
# The PATH sshd runs with (systemd's default for services, and OpenSSH's own default). pam_python
# takes its interpreter's prefix from the first `python3` on the PAM program's own PATH, so a
# pamtester that inherited a pyenv or venv `python3` ahead of /usr/bin would embed, and measure, an
# interpreter no sshd runs (docs/security.md "The PATH hazard"; docs/internals.md says what the bench once measured).
SSHD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

ACCOUNT = "123456789012"

# Opens argv[1] loopback connections to a listener of its own and closes them, over and over, until
# its stdin closes or argv[2] seconds pass; prints how many connections it made.
CHURN = """
import socket, sys, threading, time
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(4096)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
until, made = time.monotonic() + float(sys.argv[2]), 0
print("CHURNING", flush=True)
while not stop.is_set() and time.monotonic() < until:
    pairs = []
    for _ in range(int(sys.argv[1])):
        c = socket.create_connection(listener.getsockname())
        pairs.append((c, listener.accept()[0]))
    made += len(pairs)
    for c, a in pairs:
        c.close()
        a.close()
print(made, flush=True)
"""

E2E_CONFIG = f"""
version: 1
region: us-east-1
sts_timeout: 2
reap_interval: 2s
session:
  duration: 1h
  refresh_before: 20m
roles:
  - match: {{group: admins, service: [sudo-i, sudo], target: root}}
    role: arn:aws:iam::{ACCOUNT}:role/admin
  - match: {{user: alice}}
    role: arn:aws:iam::{ACCOUNT}:role/alice-role
  - match: {{group: developers}}
    role: arn:aws:iam::{ACCOUNT}:role/developer
"""


@functools.lru_cache(maxsize=None)
def cli_v2_version():
    """The CLI v2's version, from `aws --version` (aws-cli/2.9.19 Python/3.11.2 …)."""
    out = run([AWS_CLI_V2, "--version"]).stdout
    assert out.startswith("aws-cli/2."), f"{AWS_CLI_V2} is not the AWS CLI v2: {out!r} (scripts/deps installs awscli)"
    return out.split()[0].split("/", 1)[1]


def cli_sts_arn(client, profile="default", sts="%(sts)s"):
    """Shell words for the ARN the CLI `client` (a key of AWS_CLIS) gets from STS for `profile`, at the
    stand-in's STS `sts` (by default a %(sts)s for the caller to fill in). The URL is on the command
    line: the v2 2.9.19 predates AWS_ENDPOINT_URL_STS (the v1, boto3 and the JS SDK read it)."""
    words = [AWS_CLIS[client], "sts", "get-caller-identity", "--endpoint-url", sts, "--query", "Arn", "--output", "text"]
    return " ".join(words + ([] if profile == "default" else ["--profile", profile]))


def refused_by_container_endpoint(client, delivery, profile="default"):
    """Whether `client` is expected to be refused for `profile` under `delivery`: the known limit of
    CLI v2 releases without the container token file (CLI_V2_WITHOUT_CONTAINER_TOKEN_FILE)."""
    return client == "CLI2" and delivery == "container" and profile == "default" \
        and cli_v2_version() in CLI_V2_WITHOUT_CONTAINER_TOKEN_FILE


def assert_refused_by_container_endpoint(answer, what):
    """The CLI v2's answer where refused_by_container_endpoint() says it is refused: the endpoint's
    403, nothing else; its role here would mean the version reads the token file after all."""
    assert CLI_V2_CONTAINER_REFUSAL in answer, (
        f"{what}: the AWS CLI v2 {cli_v2_version()} predates AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE, so the "
        f"container endpoint should refuse its default profile ({CLI_V2_CONTAINER_REFUSAL!r}); it answered "
        f"{answer!r}. If that is the user's role, this version reads the token file: take it out of "
        f"CLI_V2_WITHOUT_CONTAINER_TOKEN_FILE in tests/harness.py and the docs' known limit with it")


def snapshot(root="/etc", chroot=""):
    """Every entry under `root`: type, mode, owner and content (or link target). `chroot` (such as
    /proc/PID/root) reads `root` as another mount namespace sees it; the keys leave it out."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(chroot + root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                body = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as fh:
                    body = fh.read()
            else:
                body = None
            state[path[len(chroot):]] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, body)
    return state


def diff(a, b):
    """The paths whose entries differ between two snapshots."""
    return sorted(p for p in set(a) | set(b) if a.get(p) != b.get(p))


def run(cmd, timeout=60, check=True, **kw):
    """subprocess.run with text output and a bound; a failure shows its output."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and done.returncode != 0:
        raise AssertionError(f"{cmd!r} exited {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}")
    return done


def pam_environment():
    """The whole environment of a PAM program started here (pamtester, sshd): sshd's PATH and the C
    locale, nothing inherited from the caller."""
    return {"PATH": SSHD_PATH, "LANG": "C"}


def pamtester(service, user, *operations, timeout=60, check=False, popen=False, **kw):
    """pamtester SERVICE USER OPERATION... (default open_session close_session) as sshd would run the
    stack: in pam_environment(). The one way tests and the bench start pamtester. Returns the
    CompletedProcess, or with popen=True the Popen (`kw` goes to subprocess)."""
    cmd = ["pamtester", service, user, *(operations or ("open_session", "close_session"))]
    if popen:
        return subprocess.Popen(cmd, env=pam_environment(), **kw)
    return run(cmd, timeout=timeout, check=check, env=pam_environment(), **kw)


class Host:
    def __init__(self, workdir):
        self.workdir = workdir
        self.moto = None
        self.broker = None
        self.broker_log_path = os.path.join(workdir, "rolegated.log")
        self.sshd = None
        self.sshd_port = None
        self.sshd_ns = []  # a command prefix (ip netns exec NS) that sshd and ssh run under
        self.keys = {}
        self.env = {}
        self.pam_installed = False

    # -- setup ------------------------------------------------------------------------------

    def install_commands(self):
        os.makedirs("/usr/local/bin", exist_ok=True)
        for name in ("rolegate", "rolegated"):
            target = os.path.join(VENV, "bin", name)
            if os.path.lexists(f"/usr/local/bin/{name}"):
                os.unlink(f"/usr/local/bin/{name}")
            os.symlink(target, f"/usr/local/bin/{name}")

    def start_moto(self):
        self.moto = start_moto()
        self.env = dict(self.moto.env())
        # Sessions reach the stand-in's STS through the standard variable (sshd sessions via
        # pam_env). Their SDKs must not fall back to IMDS: keeping users away from it is the
        # firewall's job, which is tested on its own; here it is simply switched off for them.
        with open("/etc/environment") as fh:
            kept = [l for l in fh if not l.startswith(("AWS_ENDPOINT_URL_STS=", "AWS_EC2_METADATA_DISABLED="))]
        with open("/etc/environment", "w") as fh:
            fh.writelines(kept)
            fh.write(f"AWS_ENDPOINT_URL_STS={self.moto.url}\nAWS_EC2_METADATA_DISABLED=true\n")

    def add_user(self, name, groups=(), shell="/bin/bash"):
        for g in groups:
            if run(["getent", "group", g], check=False).returncode != 0:
                run(["groupadd", g])
        if run(["id", name], check=False).returncode != 0:
            cmd = ["useradd", "-m", "-s", shell, name]
            if groups:
                cmd += ["-G", ",".join(groups)]
            run(cmd)
        elif groups:  # made by an earlier module of this run, perhaps without these groups
            run(["usermod", "-aG", ",".join(groups), name])
        key = os.path.join(self.workdir, f"id_{name}")
        if not os.path.exists(key):
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key])
            home = os.path.expanduser(f"~{name}")
            os.makedirs(f"{home}/.ssh", exist_ok=True)
            shutil.copy(key + ".pub", f"{home}/.ssh/authorized_keys")
            run(["chown", "-R", f"{name}:", f"{home}/.ssh"])
            os.chmod(f"{home}/.ssh", 0o700)
        self.keys[name] = key

    def allow_sudo(self, *users):
        with open("/etc/sudoers.d/rolegate-test", "w") as fh:
            for u in users:
                fh.write(f"{u} ALL=(ALL:ALL) NOPASSWD: ALL\n")
        os.chmod("/etc/sudoers.d/rolegate-test", 0o440)

    def write_config(self, text=E2E_CONFIG):
        os.makedirs(os.path.dirname(CONFIG_PATH), exist_ok=True)
        with open(CONFIG_PATH, "w") as fh:
            fh.write(text)

    def install_pam(self, options="debug"):
        """rolegate's pam-auth-update profile, enabled the Debian way (into the sandbox's /etc)."""
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from pam_rolegate.admin import install

        hook = os.path.join(VENV, "lib", f"python{sys.version_info.major}.{sys.version_info.minor}",
                            "site-packages", "pam_rolegate", "pam_hook.py")
        assert os.path.exists(hook), f"the installed hook is missing at {hook}"
        with open("/usr/share/pam-configs/rolegate", "w") as fh:
            fh.write(install.pam_profile(options, hook=hook))
        run(["pam-auth-update", "--package", "--enable", "rolegate"], env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        with open("/etc/profile.d/rolegate.sh", "w") as fh:
            fh.write(install.profile_snippet(ROLEGATE, RUNTIME_DIR))
        self.pam_installed = True
        return hook

    def remove_pam(self):
        """Undo install_pam, so the next test module starts from a host without rolegate."""
        run(["pam-auth-update", "--package", "--remove", "rolegate"], env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        for path in ("/usr/share/pam-configs/rolegate", "/etc/profile.d/rolegate.sh"):
            if os.path.exists(path):
                os.unlink(path)
        self.pam_installed = False

    # -- the broker ---------------------------------------------------------------------------

    def start_broker(self, wait=True, ns=()):
        """rolegated with this host's environment, under `ns` (a prefix such as ip netns exec NS)."""
        log = open(self.broker_log_path, "a")
        self.broker = subprocess.Popen(list(ns) + [ROLEGATED], stdout=log, stderr=log,
                                       env=dict(os.environ, **self.env), start_new_session=True)
        log.close()
        if wait:
            self.wait_for_socket()
        return self.broker

    def wait_for_socket(self, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.broker is not None and self.broker.poll() is not None:
                raise AssertionError(f"rolegated exited with {self.broker.returncode}:\n{self.broker_log()}")
            try:
                for path in (PAM_SOCKET, SOCKET):
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(path)
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"rolegated did not listen within {timeout}s:\n{self.broker_log()}")

    def stop_broker(self, sig=signal.SIGTERM):
        if self.broker is not None and self.broker.poll() is None:
            self.broker.send_signal(sig)
            self.broker.wait(15)
        self.broker = None

    def broker_log(self):
        try:
            with open(self.broker_log_path) as fh:
                return fh.read()
        except FileNotFoundError:
            return ""

    def log_mark(self):
        return len(self.broker_log())

    def log_since(self, mark):
        return self.broker_log()[mark:]

    # -- sshd ------------------------------------------------------------------------------------

    def start_sshd(self, extra_config="", ns=()):
        """sshd on 127.0.0.1 with its own config; `extra_config` lines are appended to it.
        `ns` (such as ip netns exec NS) runs sshd, and later the ssh clients, in that namespace."""
        hostkey = os.path.join(self.workdir, "ssh_host_ed25519_key")
        if not os.path.exists(hostkey):
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", hostkey])
        self.sshd_port = free_port()
        cfg = os.path.join(self.workdir, "sshd_config")
        with open(cfg, "w") as fh:
            fh.write(f"""Port {self.sshd_port}
ListenAddress 127.0.0.1
HostKey {hostkey}
PidFile {self.workdir}/sshd.pid
UsePAM yes
KbdInteractiveAuthentication no
PasswordAuthentication no
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PermitRootLogin no
PrintMotd no
PrintLastLog no
LogLevel VERBOSE
""")
            fh.write(extra_config)
        log = open(os.path.join(self.workdir, "sshd.log"), "a")
        self.sshd_ns = list(ns)
        self.sshd = subprocess.Popen(self.sshd_ns + ["/usr/sbin/sshd", "-D", "-e", "-f", cfg], stdout=log, stderr=log,
                                     env=pam_environment(), start_new_session=True)  # as systemd starts it
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self._sshd_listening():
                return
            assert self.sshd.poll() is None, f"sshd exited: {self.sshd_log()}"
            time.sleep(0.05)
        raise AssertionError("sshd did not listen within 20 s")

    def _sshd_listening(self):
        if not self.sshd_ns:
            try:
                socket.create_connection(("127.0.0.1", self.sshd_port), timeout=1).close()
                return True
            except OSError:
                return False
        probe = f"import socket; socket.create_connection(('127.0.0.1', {self.sshd_port}), timeout=1).close()"
        return run(self.sshd_ns + [sys.executable, "-c", probe], check=False).returncode == 0

    def sshd_log(self):
        with open(os.path.join(self.workdir, "sshd.log")) as fh:
            return fh.read()

    def ssh_cmd(self, user, command=None, tty=False):
        cmd = self.sshd_ns + ["ssh", "-i", self.keys[user], "-p", str(self.sshd_port), "-o", "StrictHostKeyChecking=no",
               "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
               "-o", "ConnectTimeout=10"]
        cmd += ["-tt"] if tty else ["-T"]
        cmd.append(f"{user}@127.0.0.1")
        if command is not None:
            cmd.append(command)
        return cmd

    # -- entry paths: each runs `script` (sh) in a session of `user` and returns CompletedProcess --

    def session(self, path, user, script, timeout=60):
        """Run `script` in a session of `user` entered through `path`:
        ssh (command), ssh-login (login shell fed on stdin), sudo-i (user runs `sudo -i`),
        su-l (root runs `su -l user`), shell (a PAM-less login shell started with setpriv)."""
        if path == "ssh":
            return run(self.ssh_cmd(user, script), timeout=timeout, check=False)
        if path == "ssh-login":
            return run(self.ssh_cmd(user), input=script + "\nexit\n", timeout=timeout, check=False)
        if path == "sudo-i":
            inner = shlex.join(["sudo", "-i", "sh", "-c", script])
            return run(["setpriv", "--reuid", user, "--regid", user, "--init-groups", "--reset-env",
                        "sh", "-c", inner], timeout=timeout, check=False)
        if path == "su-l":
            return run(["su", "-l", user, "-c", script], timeout=timeout, check=False)
        if path == "shell":
            return run(["setsid", "--wait", "setpriv", "--reuid", user, "--regid", user, "--init-groups",
                        "--reset-env", "bash", "-l", "-c", script], timeout=timeout, check=False)
        raise ValueError(path)

    def stop(self):
        for proc in (self.sshd,):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(10)
        self.stop_broker()
        if self.pam_installed:
            self.remove_pam()
        if self.moto is not None:
            self.moto.proc.terminate()
            self.moto.proc.wait(10)


@contextlib.contextmanager
def sandbox_host():
    """A Host with rolegate's commands and the AWS stand-in running, stopped (with all it started)
    on leaving; only inside scripts/sandbox."""
    require_sandbox()
    h = make_host()
    try:
        h.install_commands()
        h.start_moto()
        yield h
    finally:
        h.stop()


def make_host():
    workdir = tempfile.mkdtemp(prefix="rolegate-host-", dir="/run")
    os.chmod(workdir, 0o700)
    return Host(workdir)


# What a session reports about itself: its rolegate variables and who STS says it is. One line
# of `;`-separated commands, because `sudo -i` joins its arguments and escapes newlines away.
REPORT = "; ".join([
    'echo "FILE=${AWS_SHARED_CREDENTIALS_FILE:-}"',
    'echo "REGION=${AWS_REGION:-}"',
    'echo "STATIC=${AWS_ACCESS_KEY_ID:-}"',
    'echo "ARN=$(AWS_ENDPOINT_URL_STS=%s AWS_EC2_METADATA_DISABLED=true /usr/local/bin/rolegate whoami 2>&1 '
    '| tail -n 1)"',
])


def parse_report(text):
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key in ("FILE", "REGION", "STATIC", "ARN"):
            out[key] = value
    return out


class Held:
    """A session kept open until release(): ssh (or sudo -i) running `read`, after reporting."""

    def __init__(self, host, user, path="ssh"):
        script = (REPORT % host.moto.url) + "; echo READY; read _ignored"
        if path == "ssh":
            cmd = host.ssh_cmd(user, script)
        else:
            cmd = ["setpriv", "--reuid", user, "--regid", user, "--init-groups", "--reset-env",
                   "sh", "-c", shlex.join(["sudo", "-i", "sh", "-c", script])]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # Read the raw pipe (not a buffered reader, which select() cannot see into) until READY.
        out, fd = b"", self.proc.stdout.fileno()
        deadline = time.monotonic() + 30
        while b"READY\n" not in out and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], deadline - time.monotonic())
            chunk = os.read(fd, 4096) if ready else b""
            if not chunk:
                break
            out += chunk
        lines = out.decode().splitlines(keepends=True)
        self.info = parse_report("".join(lines))
        assert self.info.get("FILE"), f"{user}'s held {path} session has no credentials file: {lines} " \
                                      f"{self.proc.stderr.read() if self.proc.poll() is not None else ''}"

    def release(self):
        self.proc.stdin.write(b"\n")
        self.proc.stdin.close()
        self.proc.wait(30)


class Shell:
    """An ssh session kept open, running the commands sent to it one at a time in its own environment."""

    def __init__(self, host, user):
        loop = "while read -r c; do eval \"$c\" 2>&1; echo __DONE__; done"
        self.proc = subprocess.Popen(host.ssh_cmd(user, loop), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.do("true")  # the login (and its PAM session) is done before anyone counts on it

    def do(self, command, timeout=60):
        self.proc.stdin.write((command + "\n").encode())
        self.proc.stdin.flush()
        out, fd = b"", self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"__DONE__\n" not in out and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
            chunk = os.read(fd, 65536) if ready else b""
            if not chunk:
                break
            out += chunk
        assert b"__DONE__\n" in out, f"the held session did not finish {command!r}: {out!r}"
        return out.decode().replace("__DONE__\n", "").strip()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(30)


def wait_gone(path, timeout=10):
    deadline = time.monotonic() + timeout
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not os.path.exists(path)
