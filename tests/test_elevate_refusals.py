"""Every refused elevation leaves one `denied: action=elevate` line naming the person, the profile
and the reason, refusals decided before PAM runs too (issue 21), rate-limited per person like the
doors' `refused:` lines, and counted by the metrics all the same. Real parts: rolegated, the
`rolegate` CLI run as each user, sudo, pam_unix, the stand-in STS (README "Elevation on demand")."""

import json
import os
import re
import shlex
import sys
import time

import pytest

from harness import ACCOUNT, SOCKET, VENV, run, sandbox_host
from pam_rolegate.doors import sockets
from test_elevate import password_stack

ROLEGATE = os.path.join(VENV, "bin", "rolegate")
PASSWORD = "Dan-pw-5"
# One person per refusal class: each has a rate-limit window of their own, so every class's
# line is seen however fast the tests run.
PEOPLE = ("rfann", "rfben", "rfcat", "rfdan", "rfeve", "rffay", "rfgus", "rfhal", "rfivy", "rfjon", "rfkim", "rflee", "rfsvc")


def arn(role):
    return f"arn:aws:iam::{ACCOUNT}:role/{role}"


def config(metrics_file):
    return f"""
version: 1
region: us-east-1
sts_timeout: 3
reap_interval: 2s
metrics_file: {metrics_file}
metrics_interval: 1s
roles:
  - match: {{user: [rfann, rfben, rfcat, rfdan, rfeve, rfgus, rfhal, rfivy, rfjon, rfkim, rflee]}}
    role: {arn("base")}
  - match: {{user: rfhal, service: sudo, target: rfsvc}}
    role: {arn("svc")}
  - match: {{user: [rfann, rfben, rfcat, rfdan, rfgus, rfhal, rfjon, rfkim]}}
    profile: admin
    role: {arn("admin")}
    elevate: {{reason: required, max: 30m}}
"""


@pytest.fixture(scope="module")
def host():
    with sandbox_host() as h:
        for name in PEOPLE:
            h.add_user(name)
        run(["chpasswd"], input=f"rfdan:{PASSWORD}\n")
        h.allow_sudo("rfhal")
        h.metrics_file = os.path.join(h.workdir, "rolegate.prom")
        h.write_config(config(h.metrics_file))
        h.install_pam()
        password_stack()
        h.start_broker()
        yield h


def elevate_as(user, args, answers=(), via=""):
    """`rolegate elevate ARGS` run as `user` from a shell of theirs (whose session the broker opens
    as it opens an SSM shell's), PAM's questions answered from standard input: (exit code, output)."""
    command = f"{via}{ROLEGATE} elevate {args}; exit $?"  # not the shell's last word: sh stays its parent
    done = run(["setpriv", "--reuid", user, "--regid", user, "--init-groups", "--reset-env", "sh", "-c", command],
               check=False, input="".join(f"{a}\n" for a in answers), timeout=120)
    return done.returncode, done.stdout + done.stderr


def denied_lines(log, person=None):
    return [l for l in log.splitlines() if "denied: action=elevate " in l
            and (person is None or f" principal={person} " in l)]


LONG_REASON = "x" * 300
REFUSALS = [
    # (id, person, elevate arguments, what the line's reason= says)
    ("no reason", "rfann", "admin", "needs a reason"),
    ("a reason over 256 characters", "rfben", f"admin --reason {LONG_REASON}", "the reason has 300 characters"),
    # past what one frame's string holds: the CLI sends what fits, and the broker refuses that
    ("a reason over 1024 characters", "rfjon", f"admin --reason {'y' * 3000}", "the reason has 1024 characters"),
    ("--for below STS's least", "rfkim", "admin --reason INC-1 --for 5m", "--for must be between 15m and 30m"),
    ("--for above the rule's max", "rfcat", "admin --reason INC-1 --for 2h", "--for must be between 15m and 30m"),
    ("a login the rules give no such profile", "rfeve", "admin --reason INC-1", "no on-demand profile 'admin'"),
    ("a profile nobody has", "rfivy", "nosuch --reason INC-1", "no on-demand profile 'nosuch'"),
    ("a person with no login grant", "rffay", "admin --reason INC-1", ""),
    ("a profile name longer than a frame's string", "rflee", f"{'p' * 2000} --reason INC-1", "no on-demand profile"),
]


@pytest.mark.parametrize("person, args, words", [pytest.param(*c[1:], id=c[0]) for c in REFUSALS])
def test_elevate_refusals__each_refusal_before_pam_has_one_denied_line(host, person, args, words):
    host.moto.record()  # AssumeRole requests from here on (the login's own base role is one)
    mark = host.log_mark()
    code, out = elevate_as(person, args)
    assert code != 0 and "rolegate: elevated:" not in out, f"{person}'s `rolegate elevate {args[:40]}` should be refused:\n{out}"
    log = host.log_since(mark)
    lines = denied_lines(log)
    assert len(lines) == 1, f"exactly one `denied: action=elevate` line expected for {person}, got:\n{log}"
    profile = args.split()[0]
    profile = profile if len(profile) <= 64 else profile[:61] + "..."  # a line keeps a valid name's length
    assert f"principal={person} " in lines[0] and f"profile={profile} " in lines[0] and "reason=" in lines[0], \
        f"the line should name the person, the profile and the reason: {lines[0]}"
    assert words in lines[0], f"the line's reason should say {words!r}: {lines[0]}"
    assert words in out, f"the person should be told why ({words!r}):\n{out}"
    elevated = [r for r in host.moto.assume_role_requests() if r.get("RoleArn") != arn("base")]
    assert not elevated, f"STS was called for a refused elevation: {elevated}\n{lines[0]}"


def test_elevate_refusals__a_retry_inside_the_back_off_is_denied_with_when_to_retry(host):
    mark = host.log_mark()
    code, out = elevate_as("rfdan", "admin --reason INC-2", answers=["not-his-password"])
    assert code != 0 and "not elevated" in out, f"a wrong password should fail the elevation ({code}):\n{out}"
    code, out = elevate_as("rfdan", "admin --reason INC-2", answers=[PASSWORD])
    assert code != 0 and "try again in" in out, f"a retry at once should be refused by the back-off:\n{out}"
    lines = denied_lines(host.log_since(mark), "rfdan")
    assert len(lines) == 2, f"one line for the failed password, one for the retry expected:\n{host.log_since(mark)}"
    assert "authentication failed" in lines[0] and "pam=" in lines[0], f"the first is PAM's verdict: {lines[0]}"
    assert "try again in" in lines[1] and "retry_in=" in lines[1] and "profile=admin" in lines[1], \
        f"the retry's line should say it met the back-off, and when to retry: {lines[1]}"


def test_elevate_refusals__sudo_u_to_a_shared_account_is_denied_naming_the_person(host):
    """rfhal's `sudo -u rfsvc` session is rfhal's login as rfsvc: rfsvc (anyone who can act as it)
    may not make the broker run PAM for rfhal. The refusal is a `denied: action=elevate` line
    naming rfhal and the uid that asked, not only a `refused:` line."""
    mark = host.log_mark()
    code, out = elevate_as("rfhal", "admin --reason INC-3", via="sudo -u rfsvc ")
    svc_uid = int(run(["id", "-u", "rfsvc"]).stdout)
    log = host.log_since(mark)
    assert code != 0 and "only rfhal (or root) may elevate that login" in out, \
        f"an elevation from a `sudo -u rfsvc` session should be refused, saying whose login it is:\n{out}\n{log}"
    lines = denied_lines(log)
    assert len(lines) == 1 and " principal=rfhal " in lines[0] and f" uid={svc_uid} " in lines[0] \
        and "profile=admin" in lines[0], f"one `denied: action=elevate` line naming rfhal and uid {svc_uid}:\n{log}"


def _denied_metric(path):
    try:
        with open(path) as fh:
            text = fh.read()
    except FileNotFoundError:
        return None
    m = re.search(r'^rolegate_elevations_total\{outcome="denied"\} ([0-9.e+]+)$', text, re.M)
    return float(m.group(1)) if m else None


def _metric_settles(path, want, timeout=15):
    deadline = time.monotonic() + timeout
    got = _denied_metric(path)
    while got != want and time.monotonic() < deadline:
        time.sleep(0.2)
        got = _denied_metric(path)
    return got


BURST = 50
BURST_SCRIPT = """
import sys
from pam_rolegate.hookside import client, protocol
for _ in range(int(sys.argv[1])):
    reply = client.call(protocol.Elevate(profile="admin"), path=sys.argv[2], timeout=10, require_root=False)
    assert isinstance(reply, protocol.ErrorReply) and "needs a reason" in reply.message, reply
print("REFUSED-ALL")
"""


def test_elevate_refusals__a_burst_from_one_person_is_rate_limited_and_every_refusal_counted(host):
    """50 refusals from rfgus in a burst: a bounded number of lines, and the next line after the
    window carries how many were left out; lines plus counts add up to every refusal, and
    rolegate_elevations_total{outcome="denied"} counts each one."""
    time.sleep(1.5)  # one metrics interval: `before` is what the file says with nothing under way
    before = _denied_metric(host.metrics_file) or 0.0
    mark = host.log_mark()
    started = time.monotonic()
    python = os.path.join(VENV, "bin", "python")
    done = run(["setpriv", "--reuid", "rfgus", "--regid", "rfgus", "--init-groups", "--reset-env", "sh", "-c",
                f"{shlex.quote(python)} -c {shlex.quote(BURST_SCRIPT)} {BURST} {SOCKET}; exit $?"],
               check=False, timeout=120)
    burst_took = time.monotonic() - started
    assert "REFUSED-ALL" in done.stdout, f"each request of the burst should be refused: {done.stdout}{done.stderr}"
    lines = denied_lines(host.log_since(mark), "rfgus")
    windows = int(burst_took // sockets.REFUSED_LOG_INTERVAL) + 1
    assert 1 <= len(lines) <= windows, \
        f"{BURST} refusals in {burst_took:.1f}s should leave at most {windows} line(s), got {len(lines)}:\n" \
        + "\n".join(lines)
    time.sleep(sockets.REFUSED_LOG_INTERVAL)  # the window ends; the next refusal is written, with the count
    code, out = elevate_as("rfgus", "admin")
    assert code != 0, f"rfgus's elevation without a reason should be refused:\n{out}"
    lines = denied_lines(host.log_since(mark), "rfgus")
    counted = sum(1 + int(re.search(r"also_denied=(\d+)", l).group(1) if "also_denied=" in l else 0) for l in lines)
    assert counted == BURST + 1 and "also_denied=" in lines[-1], \
        f"lines plus their also_denied counts should add up to {BURST + 1} refusals, got {counted}:\n" + "\n".join(lines)
    got = _metric_settles(host.metrics_file, before + BURST + 1)
    assert got == before + BURST + 1, \
        f"rolegate_elevations_total{{outcome=\"denied\"}} should grow by {BURST + 1} (every refusal, written or " \
        f"not), from {before} to {before + BURST + 1}; the file says {got}"


# -- the rate limit itself, fast (the real broker's lines above) --------------------------------------


class _Log:
    def __init__(self):
        self.lines, self.observed = [], []
        self.observer = lambda event, fields: self.observed.append((event, fields))

    def decision(self, event, **fields):
        self.lines.append((event, fields))
        self.observer(event, fields)


def test_elevate_refusals__the_limit_is_per_uid_and_event_and_hidden_ones_are_observed():
    now = [100.0]
    log = _Log()
    limit = sockets.RefusalLog(log, interval=10.0, clock=lambda: now[0])
    limit.refused(1000, 5, action="credentials")
    for _ in range(3):
        limit.limited("denied", 1000, action="elevate", principal="alice")
    limit.limited("denied", 1001, action="elevate", principal="bob")
    assert [(e, f.get("principal")) for e, f in log.lines] == [("refused", None), ("denied", "alice"),
                                                               ("denied", "bob")], \
        f"a refused: line must not hide a denied: line, nor one uid another's: {log.lines}"
    assert len(log.observed) == 5, f"every decision, written or hidden, should reach the observer: {log.observed}"
    now[0] += 10.0
    limit.limited("denied", 1000, action="elevate", principal="alice")
    assert log.lines[-1][1].get("also_denied") == 2, f"the next line should count the 2 left out: {log.lines[-1]}"
