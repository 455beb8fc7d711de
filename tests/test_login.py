"""Login to logout with real parts: moto, rolegated, pam_python under sshd and sudo, su -l, PAM-less shells."""

import json
import os
import socket
import stat
import time

import pytest

from harness import ACCOUNT, PAM_SOCKET, REPORT, RUNTIME_DIR, SOCKET, Held, sandbox_host, parse_report, run, wait_gone

HOSTNAME = socket.gethostname()
ENTRY_PATHS = ["ssh", "ssh-login", "su-l", "shell"]  # the ways a user reaches their own grant

@pytest.fixture(scope="module")
def host():
    with sandbox_host() as h:
        h.add_user("alice", groups=("admins",))
        h.add_user("carol", groups=("developers",))
        h.add_user("dave", groups=("admins",))
        h.add_user("bob")
        h.allow_sudo("alice", "dave", "bob")
        h.write_config()
        h.install_pam()
        h.start_broker()
        h.start_sshd()
        yield h


def report(host, path, user):
    done = host.session(path, user, REPORT % host.moto.url)
    assert done.returncode == 0, f"{path} login of {user} failed ({done.returncode}): {done.stderr}"
    return parse_report(done.stdout)


def role_arn(role, session):
    return f"arn:aws:sts::{ACCOUNT}:assumed-role/{role}/{session}"


@pytest.mark.parametrize("path", ENTRY_PATHS)
@pytest.mark.parametrize("user,role", [("alice", "alice-role"), ("carol", "developer")])
def test_login__mapped_user_gets_their_role(host, path, user, role):
    got = report(host, path, user)
    assert got.get("ARN") == role_arn(role, f"{user}@{HOSTNAME}"), \
        f"{user} via {path}: GetCallerIdentity said {got.get('ARN')!r}, expected role {role}"
    assert got.get("FILE", "").startswith(RUNTIME_DIR + "/"), f"no rolegate credentials file: {got}"
    assert got.get("REGION") == "us-east-1", f"AWS_REGION not set: {got}"


@pytest.mark.parametrize("path", ENTRY_PATHS)
def test_login__unmapped_user_logs_in_without_rolegate_variables(host, path):
    done = host.session(path, "bob", REPORT % host.moto.url)
    assert done.returncode == 0, f"bob's {path} login failed: {done.stderr}"
    got = parse_report(done.stdout)
    assert got.get("FILE") == "" and got.get("REGION") == "", f"an unmapped user got rolegate variables: {got}"
    assert "has no AWS credentials" in got.get("ARN", ""), f"an unmapped user has some credentials: {got}"


def test_login__credentials_file_is_private_tmpfs_0600(host):
    s = Held(host, "alice")
    try:
        path = s.info["FILE"]
        st = os.lstat(path)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, f"mode {stat.S_IMODE(st.st_mode):o}"
        assert st.st_uid == int(run(["id", "-u", "alice"]).stdout), "the file must belong to alice"
        fstype = run(["stat", "-f", "-c", "%T", path]).stdout.strip()
        assert fstype == "tmpfs", f"credentials are on {fstype}, not tmpfs"
        d = os.path.dirname(path)
        while d != "/":
            dst = os.lstat(d)
            assert dst.st_uid == 0 and not dst.st_mode & 0o022, f"{d} is writable by a non-root user"
            d = os.path.dirname(d)
        peek = run(["setpriv", "--reuid", "bob", "--regid", "bob", "--init-groups", "cat", path], check=False)
        assert peek.returncode != 0 and "aws_secret_access_key" not in peek.stdout, "bob could read alice's file"
        listing = run(["setpriv", "--reuid", "bob", "--regid", "bob", "--init-groups", "ls",
                       os.path.dirname(os.path.dirname(path))], check=False)
        assert listing.returncode != 0, f"bob could list everyone's grants: {listing.stdout}"
    finally:
        s.release()
    assert wait_gone(path), "alice's file outlived her only session"


def test_login__two_sessions_of_one_grant_share_a_file_until_the_last_ends(host):
    first, second = Held(host, "alice"), Held(host, "alice")
    try:
        assert first.info["FILE"] == second.info["FILE"], "two sessions of one grant should share one file"
        path = first.info["FILE"]
        first.release()
        time.sleep(0.5)
        assert os.path.exists(path), "closing one of two sessions removed the shared file"
    finally:
        second.release()
        if first.proc.poll() is None:
            first.release()
    assert wait_gone(path), "the file outlived the grant's last session"


def test_login__sudo_i_maps_the_invoking_user_and_keeps_principals_apart(host):
    mark = host.log_mark()
    a, d = Held(host, "alice", path="sudo-i"), Held(host, "dave", path="sudo-i")
    try:
        assert a.info["ARN"] == role_arn("admin", f"alice@{HOSTNAME}"), f"alice's sudo -i got {a.info['ARN']}"
        assert d.info["ARN"] == role_arn("admin", f"dave@{HOSTNAME}"), f"dave's sudo -i got {d.info['ARN']}"
        assert a.info["FILE"] != d.info["FILE"], "two principals' sudo -i sessions share one credentials file"
        for who, info in (("alice", a.info), ("dave", d.info)):
            assert os.stat(info["FILE"]).st_uid == 0, f"{who}'s sudo -i file should belong to the target, root"
        log = host.log_since(mark)
        assert "granted: principal=alice target=root" in log and "granted: principal=dave target=root" in log, \
            f"the broker should log the invoking users as principals:\n{log}"
    finally:
        a.release()
        d.release()


def test_login__unmapped_sudo_i_gets_nothing(host):
    done = host.session("sudo-i", "bob", REPORT % host.moto.url)
    assert done.returncode == 0, f"bob's sudo -i failed: {done.stderr}"
    got = parse_report(done.stdout)
    assert got.get("FILE") == "", f"bob (not an admin) got credentials in sudo -i: {got}"


def test_login__repeated_logins_of_a_live_grant_cost_no_sts_call(host):
    held = Held(host, "carol")
    try:
        before = host.moto.assume_role_calls()
        for _ in range(3):
            got = report(host, "ssh", "carol")
            assert got.get("FILE") == held.info["FILE"], "a new login of a live grant got a different file"
        after = host.moto.assume_role_calls()
        assert after == before, f"{after - before} extra AssumeRole calls for logins of a live grant"
    finally:
        held.release()


def _as_user(user, code):
    """Run Python `code` as `user` (no PAM) with the installed package, return CompletedProcess."""
    import sys
    return run(["setpriv", "--reuid", user, "--regid", user, "--init-groups", sys.executable, "-c", code],
               check=False)


def test_trust__non_root_client_cannot_open_sessions_or_claim_a_service(host):
    mark = host.log_mark()
    code = f"""
from pam_rolegate.hookside import client, protocol
from pam_rolegate.errors import BrokerUnavailable
try:
    client.call(protocol.OpenSession(user="alice", service="sshd", pid=1), path={PAM_SOCKET!r}, timeout=1)
    print("pam-door-reached")
except BrokerUnavailable as err:
    print("pam-door-closed" if "Permission denied" in str(err) else "other:" + str(err).replace(" ", "_"))
for user in ("alice", "bob"):
    r = client.call(protocol.OpenSession(user=user, service="sshd", pid=1), path={SOCKET!r})
    print(type(r).__name__, getattr(r, "code", ""))
"""
    done = _as_user("bob", code)
    assert done.stdout.split() == ["pam-door-closed", "ErrorReply", "unknown_action", "ErrorReply",
                                   "unknown_action"], \
        f"a non-root client was not refused: {done.stdout} {done.stderr}"
    log = host.log_since(mark)
    assert "refused: uid=" in log and "action=open_session" in log, f"refusals were not logged:\n{log}"


@pytest.mark.parametrize("user", ["alice", "bob"])
def test_login__snippet_drops_stale_static_keys(host, user):
    done = run(["setsid", "--wait", "setpriv", "--reuid", user, "--regid", user, "--init-groups", "--reset-env",
                "env", "AWS_ACCESS_KEY_ID=AKIASTALE", "AWS_SECRET_ACCESS_KEY=stale",
                "bash", "-l", "-c", REPORT % host.moto.url], check=False)
    got = parse_report(done.stdout)
    assert got.get("STATIC") == "", f"{user}'s login shell kept a stale AWS_ACCESS_KEY_ID: {got}"


def test_trust__env_request_cannot_name_another_user(host):
    body = json.dumps({"v": 2, "action": "env", "user": "alice"}).encode()
    code = f"""
import socket, struct
s = socket.socket(socket.AF_UNIX); s.connect({SOCKET!r})
s.sendall(struct.pack(">I", {len(body)}) + {body!r})
n = struct.unpack(">I", s.recv(4))[0]; print(s.recv(n).decode())
"""
    done = _as_user("bob", code)
    reply = json.loads(done.stdout)
    assert reply.get("ok") is False and reply.get("code") == "bad_request", f"env with a user field: {reply}"


def test_login__broker_stopped_login_still_succeeds_without_credentials(host):
    host.stop_broker()
    try:
        start = time.monotonic()
        got = report(host, "ssh", "alice")
        elapsed = time.monotonic() - start
        assert got.get("FILE") == "", f"credentials appeared with no broker: {got}"
        assert elapsed < 10, f"login took {elapsed:.1f}s with the broker down (should fail fast)"
    finally:
        host.start_broker()


def test_login__on_error_deny_refuses_the_session_when_the_broker_is_down(host):
    host.install_pam("debug on_error=deny")
    host.stop_broker()
    try:
        done = host.session("ssh", "alice", "echo LOGGED-IN")
        assert "LOGGED-IN" not in done.stdout, "on_error=deny let a session open without the broker"
    finally:
        host.install_pam("debug")
        host.start_broker()
    got = report(host, "ssh", "alice")
    assert got.get("FILE"), "with the broker back, logins should get credentials again"


def test_login__sts_that_never_answers_costs_at_most_the_hook_timeout(host):
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(16)
    saved = dict(host.env)
    host.stop_broker()
    host.env["AWS_ENDPOINT_URL_STS"] = "http://127.0.0.1:%d" % blackhole.getsockname()[1]
    host.start_broker()
    try:
        start = time.monotonic()
        got = report(host, "ssh", "carol")
        elapsed = time.monotonic() - start
        assert got.get("FILE") == "", f"carol got a file from a silent STS: {got}"
        # Hook timeout 3 s + ssh's own cost; generous, it proves "no hang".
        assert elapsed < 3 + 5, f"login took {elapsed:.1f}s against a silent STS (hook timeout 3 s)"
    finally:
        blackhole.close()
        host.stop_broker()
        host.env = saved
        host.start_broker()


def test_trust__sudo_to_another_user_does_not_hand_over_the_invokers_role(host):
    import shlex
    done = run(["setpriv", "--reuid", "alice", "--regid", "alice", "--init-groups", "--reset-env", "sh", "-c",
                shlex.join(["sudo", "-u", "carol", "sh", "-c", REPORT % host.moto.url])], check=False)
    got = parse_report(done.stdout)
    assert done.returncode == 0 and got.get("FILE") == "", \
        f"alice's `sudo -u carol` session got credentials (readable by carol): {got} {done.stderr}"


def test_trust__users_cannot_crowd_root_out_of_the_broker(host):
    code = f"""
import socket, struct, time
held = []
for _ in range(40):
    s = socket.socket(socket.AF_UNIX); s.connect({SOCKET!r})
    s.sendall(struct.pack(">I", 65536))  # announce a big frame, then trickle nothing
    held.append(s)
print("HOLDING", flush=True)
time.sleep(6)
"""
    import subprocess
    import sys
    hog = subprocess.Popen(["setpriv", "--reuid", "bob", "--regid", "bob", "--init-groups", sys.executable, "-c", code],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert hog.stdout.readline().strip() == "HOLDING", "the hog could not connect"
        start = time.monotonic()
        got = report(host, "ssh", "alice")
        assert got.get("FILE"), f"a user holding connections kept alice's login from its credentials: {got}"
        assert time.monotonic() - start < 10, "login was slowed by another user's idle connections"
    finally:
        hog.kill()
        hog.wait(10)


def test_trust__malformed_frames_get_a_reply_not_a_crash(host):
    body = b"[" * 60000
    code = f"""
import socket, struct
s = socket.socket(socket.AF_UNIX); s.connect({SOCKET!r})
s.sendall(struct.pack(">I", {len(body)}) + b"[" * {len(body)})
n = struct.unpack(">I", s.recv(4))[0]; print(s.recv(n).decode())
"""
    done = _as_user("bob", code)
    assert '"code":"bad_request"' in done.stdout, f"deeply nested JSON: {done.stdout} {done.stderr}"
    assert host.broker.poll() is None, "the broker died on a malformed frame"
