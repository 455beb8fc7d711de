"""A warm login answered on the PAM door's loop (no thread hop) gets the answer a worker would give.

The loop reuses a login's NSS answer for up to RESOLVED_TTL and the user's own ~/.aws/config when
a stat shows it unchanged; the rules are decided afresh at every login. Each case opens sessions as
the PAM hook does (root, on the PAM door, naming a live process) against a real broker and moto.
"""

import os
import signal
import subprocess
import time

import pytest

from harness import ACCOUNT, PAM_SOCKET, sandbox_host
from pam_rolegate.hookside import client, protocol

USERS = ("warma", "warmb", "warmc")
CALL_TIMEOUT = 30.0  # one PAM-door request; generous: other suites share these two cores


def config(roles):
    """A config mapping each principal to the role named in `roles` (principal -> role name)."""
    lines = ["version: 1", "region: us-east-1", "sts_timeout: 5", "reap_interval: 2s", "session:",
             "  duration: 900", "  linger: 15m", "roles:"]
    for principal, role in roles.items():
        lines += [f"  - match: {{user: {principal}, target: [{principal}, root]}}",
                  f"    role: arn:aws:iam::{ACCOUNT}:role/{role}"]
    return "\n".join(lines) + "\n"


ROLES = {"warma": "role-a", "warmb": "role-b", "warmc": "role-c"}


@pytest.fixture(scope="module")
def host():
    with sandbox_host() as h:
        for user in USERS:
            h.add_user(user)
        h.write_config(config(ROLES))
        h.start_broker()
        yield h


@pytest.fixture
def holder():
    proc = subprocess.Popen(["sleep", "600"])
    yield proc.pid
    proc.kill()
    proc.wait(10)


def open_session(pid, user, service="sshd", ruser=None):
    reply = client.call(protocol.OpenSession(user=user, service=service, ruser=ruser, pid=pid, budget_ms=3000),
                        path=PAM_SOCKET, timeout=CALL_TIMEOUT)
    assert isinstance(reply, protocol.Reply), f"open_session for {user} (ruser {ruser}) failed: {reply}"
    return reply


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_warm_open__a_rules_change_reaches_the_next_warm_login(host, holder):
    first = open_session(holder, "warma")
    warm = open_session(holder, "warma")  # NSS answered the first: this one may be answered on the loop
    assert warm.get("role", "").endswith("/role-a") and warm.get("grant") == first.get("grant"), \
        f"a warm login of the same grant got another answer: {first} then {warm}"
    mark = host.log_mark()
    host.write_config(config(dict(ROLES, warma="role-moved")))
    host.broker.send_signal(signal.SIGHUP)
    try:
        wait_for(lambda: "reloaded:" in host.log_since(mark), 10, "the reload to be logged")
        moved = open_session(holder, "warma")
        assert moved.get("role", "").endswith("/role-moved"), \
            f"the login after a rules change kept the old role (answered warm from before the reload?): {moved}"
    finally:
        host.write_config(config(ROLES))
        host.broker.send_signal(signal.SIGHUP)
        wait_for(lambda: host.log_since(mark).count("reloaded:") >= 2, 10, "the second reload")


def test_warm_open__each_principal_gets_its_own_answer(host, holder):
    # sudo to root: the principal is the invoking user (ruser); the two never share a grant
    for _round in range(3):  # the first round asks NSS; later ones may be answered on the loop
        a = open_session(holder, "root", service="sudo", ruser="warma")
        b = open_session(holder, "root", service="sudo", ruser="warmb")
        assert a.get("role", "").endswith("/role-a"), f"warma's sudo got {a.get('role')}"
        assert b.get("role", "").endswith("/role-b"), f"warmb's sudo got {b.get('role')}"
        assert a.get("grant") != b.get("grant"), f"two principals share a grant: {a.get('grant')}"


def test_warm_open__the_users_own_region_follows_their_config(host, holder):
    import pwd

    pw = pwd.getpwnam("warmc")
    aws = os.path.join(pw.pw_dir, ".aws")
    os.makedirs(aws, exist_ok=True)
    os.chown(aws, pw.pw_uid, pw.pw_gid)
    path = os.path.join(aws, "config")
    try:
        for _round in range(2):  # no config: rolegate's region, cold then warm
            env = open_session(holder, "warmc").get("env") or {}
            assert env.get("AWS_REGION") == "us-east-1", f"with no ~/.aws/config the session needs a region: {env}"
        with open(path, "w") as fh:
            fh.write("[default]\nregion = eu-west-2\n")
        os.chown(path, pw.pw_uid, pw.pw_gid)
        for _round in range(2):  # the user's own region wins, at once and when warm again
            env = open_session(holder, "warmc").get("env") or {}
            assert "AWS_REGION" not in env, f"the user's own region was overridden after they wrote it: {env}"
        os.unlink(path)
        env = open_session(holder, "warmc").get("env") or {}
        assert env.get("AWS_REGION") == "us-east-1", f"the region stayed away after the user's config went: {env}"
    finally:
        if os.path.exists(path):
            os.unlink(path)
