"""Elevation on demand with real parts: the `rolegate` PAM service (pam_unix with real passwords,
libpam-oath with oathtool's codes), every prompt relayed over the user door, approvals, STS calls
read at the stand-in (moto's recorder), and hostile callers (docs/profiles-and-elevation.md "Elevation on demand")."""

import json
import os
import sys
import time

import pytest

from harness import ACCOUNT, AWS_CLI, PAM_SOCKET, SOCKET, VENV, Shell, cli_sts_arn, run, sandbox_host
from pam_rolegate.hookside import client, protocol

ROLEGATE = os.path.join(VENV, "bin", "rolegate")
PASSWORDS = {"alice": "Alice-pw-1", "carol": "Carol-pw-2", "dave": "Dave-pw-3", "bob": "Bob-pw-4"}
OATH_SECRET = "3132333435363738393031323334353637383930"  # hex, as users.oath and oathtool take it
USERS_OATH = "/etc/users.oath"
ELEVATE_PAM = "/etc/pam.d/rolegate"


def arn(role):
    return f"arn:aws:iam::{ACCOUNT}:role/{role}"


CONFIG = f"""
version: 1
region: us-east-1
sts_timeout: 3
reap_interval: 2s
session:
  duration: 1h
  refresh_before: 20m
roles:
  - match: {{user: [alice, bob, carol, dave]}}
    role: {arn("base")}
  - match: {{user: [alice, dave]}}
    profile: admin
    role: {arn("admin")}
    elevate: {{reason: required, max: 30m}}
  - match: {{user: alice}}
    profile: prod
    role: {arn("prod")}
    elevate: {{max: 15m, approvers: approvers}}
"""


@pytest.fixture(scope="module")
def host():
    with sandbox_host() as h:
        h.add_user("alice")
        h.add_user("bob")
        h.add_user("carol", groups=("approvers",))
        h.add_user("dave", groups=("approvers",))
        run(["chpasswd"], input="".join(f"{u}:{p}\n" for u, p in PASSWORDS.items()))
        h.write_config(CONFIG)
        h.install_pam()
        password_stack()
        h.start_broker()
        h.start_sshd()
        yield h


def password_stack():
    """The `rolegate` PAM service as install ships it: the user's own password."""
    from pam_rolegate.admin import install

    with open(ELEVATE_PAM, "w") as fh:
        fh.write(install.template("elevate-pam"))


def totp_stack():
    with open(ELEVATE_PAM, "w") as fh:
        fh.write("@include common-auth\nauth required pam_oath.so usersfile=/etc/users.oath window=3 digits=6\n"
                 "@include common-account\n")
    with open(USERS_OATH, "w") as fh:
        fh.write(f"HOTP/T30/6 alice - {OATH_SECRET}\n")
    os.chmod(USERS_OATH, 0o600)


def totp(minutes_ago=0):
    when = ["--now", time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(time.time() - 60 * minutes_ago))] \
        if minutes_ago else []
    return run(["oathtool", "--totp"] + when + [OATH_SECRET]).stdout.strip()


def sts(profile=None):
    o = f"--profile {profile} " if profile else ""
    return f"{AWS_CLI} sts get-caller-identity {o}--query Arn --output text 2>&1 | tail -n 1"


def elevate_in(shell, answers, profile="admin", reason="INC-123 restart", extra=""):
    """`rolegate elevate` in a held session, PAM's questions answered from standard input; returns
    (exit code, what it printed)."""
    feed = "printf '%s\\n' " + " ".join(f"'{a}'" for a in answers)
    out = shell.do(f"{feed} | {ROLEGATE} elevate {profile} --reason '{reason}' {extra}; echo EXIT=$?", timeout=90)
    code = int(out.rsplit("EXIT=", 1)[1].strip())
    return code, out.rsplit("EXIT=", 1)[0]


def test_elevate__a_password_relayed_through_pam_gives_the_profile_and_the_reason_reaches_sts(host):
    password_stack()
    shell = Shell(host, "alice")
    try:
        assert "assumed-role/base/" in shell.do(sts()), "alice's session should start on her base role"
        assert "admin" not in shell.do(f"cat $AWS_SHARED_CREDENTIALS_FILE"), \
            "an on-demand profile was named in the session's file before any elevation"
        before = host.moto.assume_role_calls()
        host.moto.record()
        mark = host.log_mark()
        code, out = elevate_in(shell, [PASSWORDS["alice"]])
        assert code == 0 and "elevated: admin" in out, f"the elevation failed ({code}):\n{out}\n{host.log_since(mark)}"
        assert "Password" in out, f"PAM's password prompt did not reach alice's terminal:\n{out}"
        who = shell.do(sts("admin"))
        assert f"assumed-role/admin/alice@" in who, f"aws --profile admin is not the admin role: {who}"
        who = shell.do(cli_sts_arn("CLI2", "admin", host.moto.url) + " 2>&1 | tail -n 1")
        assert f"assumed-role/admin/alice@" in who, f"the AWS CLI v2's --profile admin is not the admin role: {who}"
        requests = host.moto.assume_role_requests()
        admin = [r for r in requests if r.get("RoleArn") == arn("admin")]
        assert len(admin) == 1, f"one AssumeRole of the admin role expected at the stand-in: {requests}"
        tags = {admin[0][k]: admin[0][k.replace(".Key", ".Value")] for k in admin[0] if k.endswith(".Key")}
        assert tags.get("rolegate:reason") == "INC-123 restart" and tags.get("rolegate:elevated") == "true", \
            f"the AssumeRole at the stand-in lacks the reason and elevation tags: {admin[0]}"
        assert admin[0].get("SourceIdentity") == "alice", f"SourceIdentity is not the human: {admin[0]}"
        assert admin[0].get("DurationSeconds") == "1800", f"the rule's max (30m) should be the default: {admin[0]}"
        log = host.log_since(mark)
        assert "elevated: principal=alice profile=admin" in log and 'reason="INC-123 restart"' in log \
            and "pam=success" in log, f"no `elevated:` line with who, profile, reason and PAM's verdict:\n{log}"
        status = shell.do(f"{ROLEGATE} status")
        assert "elevated" in status and "INC-123 restart" in status, f"status does not show the elevation:\n{status}"
        dropped = shell.do(f"{ROLEGATE} drop admin")
        assert "dropped admin" in dropped, dropped
        after = shell.do(sts("admin"))
        assert "assumed-role/admin" not in after, f"the admin profile still works after `rolegate drop`: {after}"
        after = shell.do(cli_sts_arn("CLI2", "admin", host.moto.url) + " 2>&1 | tail -n 1")
        assert "assumed-role/admin" not in after, f"the AWS CLI v2 still has the admin profile after the drop: {after}"
        assert "dropped: principal=alice profile=admin" in host.log_since(mark), "no `dropped:` line"
        assert host.moto.assume_role_calls() == before + 1, "the elevation should cost exactly one AssumeRole"
    finally:
        shell.close()


def test_elevate__a_wrong_password_gets_nothing_and_one_denied_line(host):
    password_stack()
    shell = Shell(host, "alice")
    try:
        before = host.moto.assume_role_calls()
        mark = host.log_mark()
        code, out = elevate_in(shell, ["not-her-password"])
        assert code == 1 and "not elevated" in out, f"a wrong password should fail the elevation ({code}):\n{out}"
        assert host.moto.assume_role_calls() == before, "STS was called for a wrong password"
        denied = [l for l in host.log_since(mark).splitlines() if "denied: action=elevate principal=alice" in l]
        assert len(denied) == 1, f"one `denied:` line expected:\n{host.log_since(mark)}"
        # The failure costs a back-off (4 s after one): asking again at once is refused without PAM.
        code, out = elevate_in(shell, [PASSWORDS["alice"]])
        assert code != 0 and "try again in" in out, f"no back-off after a failed attempt:\n{out}\n{host.log_since(mark)}"
        assert "assumed-role/admin" not in shell.do(sts("admin")), "the profile works after a failed elevation"
        time.sleep(4.5)
        code, out = elevate_in(shell, [PASSWORDS["alice"]])
        assert code == 0, f"after the back-off the right password should work:\n{out}"
        shell.do(f"{ROLEGATE} drop admin")
    finally:
        shell.close()


def test_elevate__password_and_totp_both_relayed_and_a_stale_code_fails(host):
    totp_stack()
    shell = Shell(host, "alice")
    try:
        code, out = elevate_in(shell, [PASSWORDS["alice"], totp(minutes_ago=10)], reason="INC-7 stale")
        assert code == 1, f"a TOTP code from 10 minutes ago was accepted:\n{out}"
        assert "Password" in out and "One-time password" in out, f"both prompts should reach the terminal:\n{out}"
        time.sleep(4.5)  # the back-off of that failure
        code, out = elevate_in(shell, [PASSWORDS["alice"], totp()], reason="INC-8 totp")
        assert code == 0 and "elevated: admin" in out, f"password plus a fresh TOTP code failed:\n{out}"
        assert "assumed-role/admin/" in shell.do(sts("admin")), "the TOTP elevation did not give the admin role"
        shell.do(f"{ROLEGATE} drop admin")
    finally:
        shell.close()
        password_stack()


def as_user(user, argv, timeout=30):
    return run(["setpriv", "--reuid", user, "--regid", user, "--init-groups", "--reset-env",
                "env", "HOME=/", "PATH=/usr/bin:/bin"] + argv, timeout=timeout, check=False)


def pending_for(user):
    done = as_user(user, [ROLEGATE, "approvals", "--json"])
    assert done.returncode == 0, f"{user}'s approvals failed: {done.stderr}"
    return json.loads(done.stdout)["pending"]


def elevate_in_background(shell, profile, reason, out_file="/tmp/alice-elevate.out"):
    """alice's `rolegate elevate` left running in her held session (it waits for an approver);
    its output, then EXIT=code, go to `out_file`."""
    shell.do(f"rm -f {out_file}; (printf '%s\\n' '{PASSWORDS['alice']}' | {ROLEGATE} elevate {profile} "
             f"--reason '{reason}' > {out_file} 2>&1; echo EXIT=$? >> {out_file}) &")
    return out_file


def finished_output(shell, out_file):
    text = shell.do(f"cat {out_file} 2>/dev/null || true")
    return text if "EXIT=" in text else ""  # not finished yet


def waited(probe, timeout=30):
    """probe()'s first truthy answer within `timeout` seconds, else its last one."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def test_elevate__an_approver_other_than_the_requester_must_approve_before_sts_is_called(host):
    password_stack()
    shell = Shell(host, "alice")
    try:
        before = host.moto.assume_role_calls()
        out_file = elevate_in_background(shell, "prod", "CHG-42 deploy")
        pending = waited(lambda: pending_for("carol"))
        assert pending and pending[0]["principal"] == "alice" and pending[0]["reason"] == "CHG-42 deploy" \
            and pending[0]["role"] == arn("prod"), f"carol should see alice's request, role and reason: {pending}"
        rid = pending[0]["id"]
        assert pending_for("alice") == [], "the requester is offered her own request to approve"
        own = shell.do(f"{ROLEGATE} approve {rid}; echo EXIT=$?")
        assert "EXIT=0" not in own, f"alice approved her own request: {own}"
        assert pending_for("bob") == [], "bob, no approver, sees alice's request"
        bob = as_user("bob", [ROLEGATE, "approve", rid])
        assert bob.returncode != 0, f"bob, who is not in approvers, approved: {bob.stdout}"
        assert host.moto.assume_role_calls() == before, "STS was called before anyone approved"
        done = as_user("carol", [ROLEGATE, "approve", rid])
        assert done.returncode == 0 and "approved" in done.stdout and "CHG-42 deploy" in done.stdout, \
            f"carol's approval failed: {done.stdout} {done.stderr}"
        text = waited(lambda: finished_output(shell, out_file))
        assert "EXIT=0" in text and "waiting for a member of approvers" in text, \
            f"alice's elevate should wait, say so, and succeed once approved:\n{text}"
        assert "assumed-role/prod/" in shell.do(sts("prod")), "the approved profile does not work"
        shell.do(f"{ROLEGATE} drop prod")
        # A deny ends the next one with a clear message, and no STS call.
        calls = host.moto.assume_role_calls()
        elevate_in_background(shell, "prod", "CHG-43")
        pending = waited(lambda: pending_for("dave"))
        assert pending, "dave should see the second request"
        assert as_user("dave", [ROLEGATE, "deny", pending[0]["id"]]).returncode == 0, "dave's deny failed"
        text = waited(lambda: finished_output(shell, out_file))
        assert "EXIT=1" in text and "denied by dave" in text, f"a denied request should say so:\n{text}"
        assert host.moto.assume_role_calls() == calls, "STS was called for a denied request"
    finally:
        shell.close()


# Run as the user: `n` elevate requests at once on the user door, none ever answered; prints how each
# began (its state, or the error code) as JSON, keeping the accepted ones' ids.
FLOOD = """
import json, sys
from concurrent.futures import ThreadPoolExecutor
from pam_rolegate.hookside import client, protocol
sock, grant, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
def one(_):
    r = client.call(protocol.Elevate(grant=grant, profile="admin", reason="flood"), path=sock, timeout=10)
    return r.code if isinstance(r, protocol.ErrorReply) else r.get("state") + ":" + r.get("id")
with ThreadPoolExecutor(32) as pool:
    print(json.dumps(list(pool.map(one, range(n)))))
"""


def timed(fn, n=7):
    samples = []
    for _ in range(n):
        start = time.monotonic()
        fn()
        samples.append(time.monotonic() - start)
    return sorted(samples)[n // 2]


def test_elevate__a_flood_of_unanswered_requests_delays_no_login_and_no_other_elevation(host):
    password_stack()
    alice, dave = Shell(host, "alice"), Shell(host, "dave")
    try:
        grant = alice.do("echo $AWS_SHARED_CREDENTIALS_FILE").split("/grants/")[1].split("/")[0]
        dave_grant = dave.do("echo $AWS_SHARED_CREDENTIALS_FILE").split("/grants/")[1].split("/")[0]

        def login():  # bob's login, as the hook makes it on the PAM door
            reply = client.call(protocol.OpenSession(user="bob", service="sshd", pid=os.getpid()), path=PAM_SOCKET,
                                timeout=10)
            assert reply.get("granted"), f"bob's login got no grant: {reply}"
            client.call(protocol.CloseSession(session=reply.get("session")), path=PAM_SOCKET, timeout=10)

        def dave_starts():
            r = as_user("dave", [sys.executable, "-c", "import sys; from pam_rolegate.hookside import client, protocol; "
                                 "r = client.call(protocol.Elevate(grant=sys.argv[1], profile='admin', reason='x'), "
                                 "path=sys.argv[2], timeout=10); print(r.get('id') if not isinstance(r, "
                                 "protocol.ErrorReply) else r.code)", dave_grant, SOCKET])
            rid = r.stdout.strip()
            assert len(rid) == 12, f"dave's elevation did not start: {r.stdout} {r.stderr}"
            as_user("dave", [sys.executable, "-c", "import sys; from pam_rolegate.hookside import client, protocol; "
                             "client.call(protocol.ElevationCancel(id=sys.argv[1]), path=sys.argv[2], timeout=10)",
                             rid, SOCKET])

        base_login, base_dave = timed(login), timed(dave_starts, 3)
        flood = as_user("alice", [sys.executable, "-c", FLOOD, SOCKET, grant, "200"], timeout=120)
        assert flood.returncode == 0, f"the flood client failed: {flood.stderr}"
        outcomes = json.loads(flood.stdout)
        started = [o for o in outcomes if ":" in o]
        assert len(started) <= 2 and outcomes.count("limited") >= 198, \
            f"one uid should have at most 2 elevations under way, the rest refused at once: {outcomes[:10]}..."
        flood_login, flood_dave = timed(login), timed(dave_starts, 3)
        print(f"\nmedian ms, before and while alice holds 200 unanswered requests: login {base_login * 1000:.1f} / "
              f"{flood_login * 1000:.1f}; dave's elevation start {base_dave * 1000:.1f} / {flood_dave * 1000:.1f}")
        # No-hang bounds, not speed: medians of 3 whole child processes swing by tens of ms on a
        # shared machine; a flood that held the doors would cost seconds (a request's own deadline).
        assert flood_login < base_login + 2.0, \
            f"a login took {flood_login:.2f}s during the flood, {base_login:.2f}s before: the flood held the PAM door"
        assert flood_dave < base_dave + 2.0, \
            f"dave's elevation start took {flood_dave:.2f}s during the flood, {base_dave:.2f}s before: alice's " \
            f"unanswered requests held another user's"
        # Another user can neither read nor answer nor cancel alice's requests.
        rid = started[0].split(":", 1)[1]
        for request in (protocol.ElevationPoll(id=rid), protocol.ElevationPoll(id=rid, answer="guess"),
                        protocol.ElevationCancel(id=rid), protocol.Approve(id=rid)):
            code = as_user("bob", [sys.executable, "-c", "import sys, json; from pam_rolegate.hookside import client, "
                                   "protocol; r = client.call(protocol.decode_request(sys.argv[1].encode()), "
                                   "path=sys.argv[2], timeout=10); print(getattr(r, 'code', 'ok'))",
                                   protocol.encode_request(request)[4:].decode(), SOCKET])
            assert code.stdout.strip() in ("no_grant", "forbidden"), \
                f"bob's {request.ACTION} on alice's request answered {code.stdout} {code.stderr}"
        for outcome in started:  # alice's own cancel frees her slots at once (else after the prompt's 60 s)
            as_user("alice", [sys.executable, "-c", "import sys; from pam_rolegate.hookside import client, protocol; "
                              "client.call(protocol.ElevationCancel(id=sys.argv[1]), path=sys.argv[2], timeout=10)",
                              outcome.split(":", 1)[1], SOCKET])
    finally:
        alice.close()
        dave.close()


def test_elevate__one_command_runs_with_the_profile_which_is_dropped_when_it_exits(host):
    password_stack()
    shell = Shell(host, "alice")
    try:
        time.sleep(4.5)  # any back-off an earlier test's failure left
        # Both AWS CLIs, each picking the profile from AWS_PROFILE (the v2 reads it first, the v1 after
        # AWS_DEFAULT_PROFILE, which elevate takes out of CMD's environment).
        both = f"{AWS_CLI} sts get-caller-identity --query Arn --output text; {cli_sts_arn('CLI2', sts=host.moto.url)}"
        code, out = elevate_in(shell, [PASSWORDS["alice"]], extra=f"-- sh -c '{both}'")
        assert code == 0 and out.count("assumed-role/admin/alice@") == 2, \
            f"the command's two AWS CLIs (v1, v2) did not both run as the admin role:\n{out}"
        assert "assumed-role/admin" not in shell.do(sts("admin")), "the profile outlived its one command"
        code, out = elevate_in(shell, [PASSWORDS["alice"]], extra="-- sh -c 'exit 7'")
        assert code == 7, f"elevate -- CMD should exit with CMD's code (7), not {code}:\n{out}"
        code, out = elevate_in(shell, [PASSWORDS["alice"]], extra="-- sh -c 'kill -TERM $$'")
        assert code == 128 + 15, f"a CMD ended by SIGTERM should exit 143, as the shell reports it, not {code}:\n{out}"
    finally:
        shell.close()


def test_elevate__a_command_that_cannot_run_is_refused_before_pam_asks_anything(host):
    """env(1)'s codes: 127 for a CMD that is not there, 126 for one that is not executable, and
    neither costs a password, an approval or an STS call."""
    password_stack()
    shell = Shell(host, "alice")
    try:
        mark = host.log_mark()
        for cmd, expected in (("/nonexistent/cmd", 127), ("no-such-command-xyz", 127), ("/etc/passwd", 126)):
            out = shell.do(f"{ROLEGATE} elevate admin --reason 'INC-1 check' -- {cmd} </dev/null; echo EXIT=$?")
            code = int(out.rsplit("EXIT=", 1)[1].strip())
            assert code == expected and "Password" not in out, \
                f"elevate -- {cmd} should exit {expected} before PAM asks anything, got {code}:\n{out}"
        log = host.log_since(mark)
        assert "profile=admin" not in log, f"the broker was asked for an elevation anyway:\n{log}"
    finally:
        shell.close()


def test_elevate__json_puts_only_the_result_on_stdout_and_the_prompts_on_the_terminal(host):
    password_stack()
    shell = Shell(host, "alice")
    try:
        time.sleep(4.5)  # any back-off an earlier test's failure left
        code, out = elevate_in(shell, [PASSWORDS["alice"]], extra="--json > ~/elevate.json")
        assert code == 0 and "Password" in out, f"elevate --json failed, or its prompt left the terminal ({code}):\n{out}"
        text = shell.do("cat ~/elevate.json")
        try:
            found = json.loads(text)
        except ValueError:
            raise AssertionError(f"elevate --json's standard output is not one JSON object:\n{text}") from None
        assert found.get("state") == "granted" and found.get("profile") == "admin" \
            and found.get("role") == arn("admin") and found.get("until"), f"elevate --json's result: {found}"
        assert "dropped admin" in shell.do(f"{ROLEGATE} drop admin"), "the elevation could not be dropped"
    finally:
        shell.close()
