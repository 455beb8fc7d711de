"""Metrics: decision lines and AssumeRole calls to counters (no processes), the file's writing, and
with real parts (moto, rolegated, the pam_python hook under pamtester) the counts in the file a
node_exporter would read."""

import io
import os
import stat
import threading
import time

import botocore.exceptions
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import ACCOUNT, pamtester, sandbox_host, run
from pam_rolegate.rules import config, mapping
from pam_rolegate import errors
from pam_rolegate.hookside import log
from pam_rolegate.backends import metrics, sts

# -- helpers ------------------------------------------------------------------------------------


def samples(text):
    """The file's text -> {(sample name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(parsed, name, **labels):
    return parsed.get((name, tuple(sorted(labels.items()))), 0.0)


def fresh_metrics(counts=None, doors=lambda: (), log_=None, clock=time.monotonic):
    counts = counts or {"grants": 0, "lingering": 0, "sessions": 0}
    return metrics.Metrics(lambda: counts, doors, log_, clock=clock)


def scraped(m):
    from prometheus_client import generate_latest

    return samples(generate_latest(m.registry).decode())


# -- decision lines and STS calls to counters, no processes ---------------------------------------


def test_metrics__decision_lines_feed_the_login_and_refresh_counters():
    m = fresh_metrics()
    out = io.StringIO()
    lg = log.Log("test", stream=out, use_syslog=False, observer=m.observe)
    for _ in range(3):
        lg.decision("granted", principal="alice", target="alice", role="r", service="sshd", session="s1")
    lg.decision("granted", principal="alice", target="root", role="r", service="sudo-i", session="s2")
    lg.decision("denied", user="ghost", service="sshd", reason="no such user")
    lg.decision("denied", principal="bob", target="bob", service="sshd", reason="no rule matches")
    lg.decision("failed", principal="carol", target="carol", role="r", service="sshd", code="throttled", reason="x")
    lg.decision("failed", grant="g1", principal="carol", role="r", action="refresh", code="throttled", reason="x")
    lg.decision("failed", grant="g1", principal="carol", role="r", action="refresh", code="throttled", reason="x")
    # Not logins: a reload, a door, a release, a refresh, a refusal.
    lg.decision("failed", action="reload", reason="bad file", kept="previous config")
    lg.decision("failed", door="imds", uid=1000, reason="boom")
    lg.decision("released", session="s1", kind="pam", pid=1, service="sshd", principal="alice", grant="g")
    lg.decision("refreshed", grant="g1", principal="carol", role="r")
    lg.decision("refused", uid=1000, pid=1, door="user", reason="too many")
    got = scraped(m)
    expected = {("sshd", "granted"): 3, ("sudo-i", "granted"): 1, ("sshd", "denied"): 2, ("sshd", "failed"): 1}
    for (service, result), n in expected.items():
        assert value(got, "rolegate_logins_total", service=service, result=result) == n, \
            f"logins{{service={service},result={result}}} should be {n}: {got}"
    logins = {k: v for k, v in got.items() if k[0] == "rolegate_logins_total"}
    assert len(logins) == len(expected), f"only the login decisions should be counted, got {logins}"
    assert value(got, "rolegate_refresh_failures_total") == 2, f"two refresh failures were logged: {got}"
    assert out.getvalue().count("\n") == 14, f"every decision must still be logged:\n{out.getvalue()}"


def test_metrics__elevations_are_counted_by_outcome_and_never_as_logins():
    m = fresh_metrics()
    lg = log.Log("test", stream=io.StringIO(), use_syslog=False, observer=m.observe)
    lg.decision("elevated", principal="alice", profile="admin", role="r", reason="INC-1", until="t", pam="success")
    for _ in range(2):
        lg.decision("denied", action="elevate", principal="alice", profile="admin", role="r", reason="auth failed")
    lg.decision("failed", action="elevate", principal="alice", profile="admin", role="r", reason="sts")
    lg.decision("dropped", principal="alice", profile="admin", role="r", reason="rolegate drop")
    lg.decision("granted", principal="alice", target="alice", role="r", service="sshd", profile="deploy",
                action="profile", grant="g")  # a named profile's first use: not a login
    got = scraped(m)
    for outcome, n in (("granted", 1), ("denied", 2), ("failed", 1)):
        assert value(got, "rolegate_elevations_total", outcome=outcome) == n, \
            f"elevations{{outcome={outcome}}} should be {n}: {got}"
    logins = {k: v for k, v in got.items() if k[0] == "rolegate_logins_total"}
    assert not logins, f"elevations and named profiles were counted as logins: {logins}"


def test_metrics__an_observer_that_raises_never_fails_a_decision():
    def broken(event, fields):
        raise RuntimeError("observer bug")

    out = io.StringIO()
    log.Log("test", stream=out, use_syslog=False, observer=broken).decision("granted", service="sshd")
    assert "granted: service=sshd" in out.getvalue(), f"the decision must be logged anyway: {out.getvalue()!r}"


def test_metrics__service_labels_are_capped():
    m = fresh_metrics()
    for i in range(metrics.MAX_SERVICES + 5):
        m.observe("granted", {"service": f"svc{i}"})
    got = scraped(m)
    services = {dict(k[1])["service"] for k in got if k[0] == "rolegate_logins_total"}
    assert len(services) == metrics.MAX_SERVICES + 1, f"expected {metrics.MAX_SERVICES} names and 'other': {services}"
    assert value(got, "rolegate_logins_total", service="other", result="granted") == 5, \
        f"the logins past the cap belong to service 'other': {got}"


class _Source:
    def get(self, timeout=None):
        return sts.Credentials("AKIAEXAMPLEEXAMPLE", "secret", None, None)

    def instance_id(self, timeout=None):
        return ""


class _Client:
    def __init__(self, code, status):
        self.code, self.status, self.calls = code, status, 0

    def assume_role(self, **params):
        self.calls += 1
        raise botocore.exceptions.ClientError(
            {"Error": {"Code": self.code, "Message": "no"}, "ResponseMetadata": {"HTTPStatusCode": self.status}},
            "AssumeRole")


@pytest.mark.parametrize("code,status,error_code", [("AccessDenied", 403, "access_denied"),
                                                    ("Throttling", 400, "throttled")])
def test_metrics__assume_role_errors_and_latency_are_counted_once_per_call(code, status, error_code):
    m = fresh_metrics()
    client = _Client(code, status)
    engine = sts.StsEngine("us-east-1", _Source(), budget=1.0, client_factory=lambda *a: client)
    engine.observer = m.sts_observed
    request = sts.AssumeRequest(role_arn=f"arn:aws:iam::{ACCOUNT}:role/r", session_name="alice", duration=900,
                                source_identity="alice", tags=(), external_id=None, policy_arns=())
    start = time.monotonic()
    with pytest.raises(errors.StsError):
        engine.assume(request)
    took = time.monotonic() - start
    got = scraped(m)
    assert value(got, "rolegate_sts_errors_total", code=error_code) == 1, f"one {error_code} error expected: {got}"
    assert sum(v for k, v in got.items() if k[0] == "rolegate_sts_errors_total") == 1, f"one error in all: {got}"
    assert value(got, "rolegate_sts_seconds_count") == 1, \
        f"one AssumeRole ({client.calls} attempts) is one histogram observation: {got}"
    assert 0 < value(got, "rolegate_sts_seconds_sum") <= took, f"the time observed should be the call's: {got}"


def test_metrics__a_successful_assume_role_is_timed_and_no_error(moto):
    m = fresh_metrics()
    cfg = config.parse("version: 1\nregion: us-east-1\nroles:\n  - match: {user: alice}\n"
                       f"    role: arn:aws:iam::{ACCOUNT}:role/r\n", "t.yaml")
    identity = mapping.Identity(principal="alice", principal_uid=1000, groups=(), target="alice",
                                target_uid=1000, target_gid=1000, service="sshd")
    request = sts.build_request(cfg, cfg.roles[0], identity, host=sts.HostFacts("bastion-1", "i-fake"))
    engine = sts.StsEngine.from_config(cfg)
    engine.observer = m.sts_observed
    engine.assume(request)
    got = scraped(m)
    assert value(got, "rolegate_sts_seconds_count") == 1 == moto.assume_role_calls(), \
        f"one AssumeRole reached moto ({moto.assume_role_calls()}) and one should be observed: {got}"
    assert sum(v for k, v in got.items() if k[0] == "rolegate_sts_errors_total") == 0, f"no errors expected: {got}"


# -- the file -------------------------------------------------------------------------------------


def test_metrics__file_is_world_readable_whatever_the_umask_and_leaves_no_temporary_files(tmp_path):
    m = fresh_metrics(counts={"grants": 2, "lingering": 1, "sessions": 5},
                      doors=lambda: [("imds", {"credentials": 7, "refused": 1})])
    m.path = str(tmp_path / "rolegate.prom")
    old = os.umask(0o077)
    try:
        assert m.write(), "writing into a writable directory should succeed"
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(m.path).st_mode)
    assert mode == 0o644, f"the metrics file should be 0644 for node_exporter, is {mode:o}"
    assert os.listdir(tmp_path) == ["rolegate.prom"], f"temporary files were left: {os.listdir(tmp_path)}"
    with open(m.path) as fh:
        got = samples(fh.read())
    for (name, labels), want in [(("rolegate_grants", {"state": "live"}), 2),
                                 (("rolegate_grants", {"state": "lingering"}), 1), (("rolegate_sessions", {}), 5),
                                 (("rolegate_door_requests_total", {"door": "imds", "outcome": "credentials"}), 7),
                                 (("rolegate_door_requests_total", {"door": "imds", "outcome": "refused"}), 1)]:
        assert value(got, name, **labels) == want, f"{name}{labels} should be {want}: {got}"


def test_metrics__a_file_that_cannot_be_written_is_logged_at_most_once_a_minute(tmp_path):
    now = [1000.0]
    out = io.StringIO()
    m = fresh_metrics(log_=log.Log("test", stream=out, use_syslog=False), clock=lambda: now[0])
    m.path = str(tmp_path / "missing-dir" / "rolegate.prom")
    for step in (0, 10, 30, 49.9, 60.1, 61):
        now[0] = 1000.0 + step
        assert m.write() is False, "writing into a missing directory must report failure, not raise"
    lines = [l for l in out.getvalue().splitlines() if "metrics: cannot write" in l]
    assert len(lines) == 2, f"expected one error line at t=0 and one at t=60.1, got {lines}"


def test_metrics__stop_writes_the_file_one_last_time(tmp_path):
    m = fresh_metrics()
    cfg = config.parse(f"version: 1\nregion: us-east-1\nmetrics_file: {tmp_path}/rolegate.prom\n"
                       "metrics_interval: 1h\n", "t.yaml")
    m.configure(cfg)
    m.observe("denied", {"service": "sshd"})
    m.stop()
    with open(cfg.metrics_file) as fh:
        got = samples(fh.read())
    assert value(got, "rolegate_logins_total", service="sshd", result="denied") == 1, \
        f"the file written at stop should hold the last counts: {got}"


# -- real parts ---------------------------------------------------------------------------------

GROUP = "metricsusers"
MAPPED, UNMAPPED = "mtalice", "mtbob"
SERVICE = "rolegate-metrics"  # pamtester's PAM stack: the installed hook only
METRICS_DIR = "/run/rolegate-metrics-test"
METRICS_FILE = METRICS_DIR + "/rolegate.prom"
CONFIG = f"""
version: 1
region: us-east-1
sts_timeout: 2
reap_interval: 2s
metrics_file: {METRICS_FILE}
metrics_interval: 1s
roles:
  - match: {{group: {GROUP}}}
    role: arn:aws:iam::{ACCOUNT}:role/metrics
"""
FAMILIES = ("rolegate_logins", "rolegate_sts_seconds", "rolegate_sts_errors", "rolegate_grants", "rolegate_sessions",
            "rolegate_refresh_failures", "rolegate_door_requests")


@pytest.fixture(scope="module")
def host():
    with sandbox_host() as h:
        try:
            h.add_user(MAPPED, groups=(GROUP,))
            h.add_user(UNMAPPED)
            h.write_config(CONFIG)
            hook = h.install_pam()
            with open(f"/etc/pam.d/{SERVICE}", "w") as fh:
                fh.write(f"session required pam_python.so {hook} debug\n")
            os.makedirs(METRICS_DIR, exist_ok=True)
            os.chmod(METRICS_DIR, 0o755)
            h.start_broker()
            yield h
        finally:
            if os.path.exists(f"/etc/pam.d/{SERVICE}"):
                os.unlink(f"/etc/pam.d/{SERVICE}")


def read_metrics(timeout=10):
    """The metrics file's text, waiting for it to exist."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(METRICS_FILE) as fh:
                return fh.read()
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise AssertionError(f"no metrics file at {METRICS_FILE} after {timeout}s")
            time.sleep(0.1)


class Reader(threading.Thread):
    """Reads and parses the file in a loop; a read that is not a whole file is kept as a failure."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop_flag = threading.Event()
        self.reads, self.inodes, self.failures = 0, set(), []

    def run(self):
        deadline = time.monotonic() + 120  # bounded even if the test forgets to stop it
        while not self.stop_flag.is_set() and time.monotonic() < deadline:
            try:
                with open(METRICS_FILE) as fh:
                    self.inodes.add(os.fstat(fh.fileno()).st_ino)
                    text = fh.read()
                names = {f.name for f in text_string_to_metric_families(text)}
                missing = [f for f in FAMILIES[:-1] if f not in names]  # no HTTP door here: no requests family
                if missing or not text.endswith("\n"):
                    self.failures.append(f"a partial file (missing {missing}): {text[-200:]!r}")
            except Exception as err:
                self.failures.append(f"{type(err).__name__}: {err}")
            self.reads += 1
            time.sleep(0.005)


def pam_login(user):
    return pamtester(SERVICE, user)


def test_metrics__file_counts_real_logins_exactly(host):
    read_metrics()  # the first write: the broker has started writing
    before = host.moto.assume_role_calls()
    reader = Reader()
    reader.start()
    try:
        for _ in range(3):
            done = pam_login(MAPPED)
            assert done.returncode == 0, f"{MAPPED}'s PAM session failed: {done.stderr}\n{host.broker_log()}"
        for _ in range(2):
            done = pam_login(UNMAPPED)
            assert done.returncode == 0, f"{UNMAPPED}'s PAM session (no rule: no credentials) failed: {done.stderr}"
        # Wait for a rewrite that shows all five logins (the file is rewritten every second).
        deadline = time.monotonic() + 15
        while True:
            got = samples(read_metrics())
            if value(got, "rolegate_logins_total", service=SERVICE, result="denied") == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        # The reader polls every few milliseconds but may not have opened that newest file yet (CI
        # once saw this test read it within the reader's own pause): give it the next rewrites too.
        deadline = time.monotonic() + 5
        while len(reader.inodes) < 2 and reader.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        reader.stop_flag.set()
        reader.join(10)
    calls = host.moto.assume_role_calls() - before
    assert value(got, "rolegate_logins_total", service=SERVICE, result="granted") == 3, \
        f"3 logins of {MAPPED} were granted: {got}\n{host.broker_log()}"
    assert value(got, "rolegate_logins_total", service=SERVICE, result="denied") == 2, \
        f"2 logins of {UNMAPPED} were denied: {got}"
    assert value(got, "rolegate_logins_total", service=SERVICE, result="failed") == 0, f"no login failed: {got}"
    assert calls >= 1, f"the first granted login needs an AssumeRole; moto saw {calls}"
    assert value(got, "rolegate_sts_seconds_count") == calls, \
        f"the STS histogram should count the {calls} AssumeRole calls moto answered: {got}"
    assert sum(v for k, v in got.items() if k[0] == "rolegate_sts_errors_total") == 0, f"no STS errors: {got}"
    # Every session was closed; the grant lingers (session.linger 15m) for the next login.
    assert value(got, "rolegate_sessions") == 0, f"all sessions were closed: {got}"
    assert value(got, "rolegate_grants", state="live") == 0, f"no live grant should be left: {got}"
    assert value(got, "rolegate_grants", state="lingering") == 1, f"{MAPPED}'s grant should linger: {got}"
    assert reader.reads >= 20, f"the reader should have read the file often during the logins, read {reader.reads}"
    assert not reader.failures, f"a reader saw a partial file {len(reader.failures)} times: {reader.failures[:3]}"
    assert len(reader.inodes) >= 2, \
        f"the file should have been replaced (renamed over) during the logins; inodes seen: {reader.inodes}"


def test_metrics__file_is_0644_root_owned_and_readable_by_any_user(host):
    read_metrics()
    st = os.stat(METRICS_FILE)
    assert stat.S_IMODE(st.st_mode) == 0o644, f"the metrics file should be 0644, is {stat.S_IMODE(st.st_mode):o}"
    assert st.st_uid == 0, f"the metrics file should belong to root, belongs to uid {st.st_uid}"
    peek = run(["setpriv", "--reuid", UNMAPPED, "--regid", UNMAPPED, "--init-groups", "cat", METRICS_FILE],
               check=False)
    assert peek.returncode == 0 and "rolegate_logins_total" in peek.stdout, \
        f"an unprivileged user (node_exporter's kind) could not read the metrics: {peek.stderr}"
    leftovers = [n for n in os.listdir(METRICS_DIR) if n != "rolegate.prom"]
    assert not leftovers, f"the writer left temporary files: {leftovers}"
