"""Fleet rules (rules_from: ssm:/NAME): the config keys and the rules document's located errors (no
processes); then rolegated against moto's Parameter Store — a change picked up within rules_poll, a
broken document refused while the old rules grant, the last good copy serving while SSM is down, no
rules and a clear line when there is none — with real logins through sshd and the pam_python hook;
`rolegate policy`'s statement and `rolegate doctor`'s check."""

import io
import json
import os
import shutil
import signal
import socket
import stat
import time
import types

import boto3
import pytest

from conftest import free_port, require_sandbox
from harness import ACCOUNT, CONFIG_PATH, Held, Shell, run, sandbox_host
from pam_rolegate.admin import cli, doctor, exitcodes
from pam_rolegate.rules import config
from pam_rolegate.backends import fleet
from pam_rolegate.errors import ConfigError, StoreError

PARAM = "/rolegate/fleet-test/rules"
SOURCE = "ssm:" + PARAM
BASE = """version: 1
region: us-east-1
"""


def cfg_with(extra):
    return config.parse(BASE + extra, "rolegate.yaml")


def rules_error(text, cfg=None):
    with pytest.raises(ConfigError) as err:
        config.parse_rules(text, SOURCE, cfg or cfg_with(f"rules_from: {SOURCE}\n"))
    return str(err.value)


# -- config keys -----------------------------------------------------------------------------------


def test_fleet__config_keys_parse_with_their_defaults():
    cfg = cfg_with(f"rules_from: {SOURCE}\n")
    assert (cfg.rules_from, cfg.rules_parameter, cfg.rules_poll, cfg.rules_cache, cfg.ssm_endpoint) == \
        (SOURCE, PARAM, 300, "/var/lib/rolegate/rules.yaml", None), f"defaults: {cfg}"
    cfg = cfg_with(f"rules_from: {SOURCE}\nrules_poll: 1m\nrules_cache: /var/lib/rg//x.yaml\n"
                   f"ssm_endpoint: https://vpce-0a1b.ssm.us-east-1.vpce.amazonaws.com/\n")
    assert (cfg.rules_poll, cfg.rules_cache, cfg.ssm_endpoint) == \
        (60, "/var/lib/rg/x.yaml", "https://vpce-0a1b.ssm.us-east-1.vpce.amazonaws.com/"), f"given (endpoints are kept as written): {cfg}"


@pytest.mark.parametrize("extra,line,col,words", [
    ("rules_from: s3://bucket/rules\n", 3, 13, "is unknown; allowed: ssm:/NAME"),
    ("rules_from: ssm:rolegate/rules\n", 3, 13, "fully qualified"),
    ("rules_from: ssm:/rolegate/ru les\n", 3, 13, "fully qualified"),
    ("rules_from: ssm:/rolegate//rules\n", 3, 13, "fully qualified"),
    ("rules_from: ssm:/rolegate/rules/\n", 3, 13, "fully qualified"),
    ("rules_from: ssm:/" + "a" * 1011 + "\n", 3, 13, "SSM allows 1011"),
    ("rules_from: ssm:" + "/a" * 16 + "\n", 3, 13, "16 levels; SSM allows 15"),
    ("rules_from: ssm:/aws/rules\n", 3, 13, "reserved by AWS"),
    ("rules_from: ssm:/SSMrules\n", 3, 13, "reserved by AWS"),
    (f"rules_from: {SOURCE}\nroles: []\n", 4, 1, "roles and rules_from exclude each other"),
    ("rules_poll: 5m\n", 3, 1, "rules_poll applies only with rules_from"),
    ("ssm_endpoint: https://ssm.example\n", 3, 1, "ssm_endpoint applies only with rules_from"),
    (f"rules_from: {SOURCE}\nrules_poll: 5s\n", 4, 13, "between 10s and 86400s"),
    (f"rules_from: {SOURCE}\nrules_poll: 25h\n", 4, 13, "between 10s and 86400s"),
    (f"rules_from: {SOURCE}\nrules_cache: rules.yaml\n", 4, 14, "absolute file path"),
    (f"rules_from: {SOURCE}\nssm_endpoint: http://ssm.example.com\n", 4, 15, "must use https"),
    (f"rules_from: {SOURCE}\nssm_endpoint: https://ssm.example.com/x?y=1\n", 4, 15, "must not have a query"),
    (f"rules_from: {SOURCE}\nssm_endpoint: ftp://ssm.example.com\n", 4, 15, "must start with https://"),
    (f"rules_from: {SOURCE}\nssm_endpoint: https://ssm.example.com:99999\n", 4, 15, "is not a valid URL"),
])
def test_fleet__config_mistakes_are_located(extra, line, col, words):
    with pytest.raises(ConfigError) as err:
        cfg_with(extra)
    assert (err.value.line, err.value.column) == (line, col), f"wrong position: {err.value}"
    assert words in err.value.message, f"the message should say {words!r}: {err.value}"


def test_fleet__http_endpoint_is_allowed_to_privileged_loopback_ports_only():
    for url in ("http://127.0.0.1:500", "http://[::1]:1023", "http://localhost", "http://127.0.0.1:80"):
        assert cfg_with(f"rules_from: {SOURCE}\nssm_endpoint: {url}\n").ssm_endpoint == url
    assert config.endpoint_problem("http://10.0.0.5") is not None, "plain http to another host must be refused"
    for url in ("http://127.0.0.1:5000", "http://[::1]:1024", "http://localhost:8080"):
        problem = config.endpoint_problem(url)
        assert problem and "below 1024" in problem, \
            f"{url}: any user may listen on that port while the stand-in is down, yet it was accepted ({problem})"


# -- the rules document ----------------------------------------------------------------------------


def test_fleet__rules_document_reads_like_the_configs_roles():
    text = f"""version: 1
roles:
  - match: {{user: alice}}
    role: arn:aws:iam::{ACCOUNT}:role/a
  - match: {{group: devs, service: [sshd]}}
    role: arn:aws:iam::{ACCOUNT}:role/b
    duration: 30m
"""
    base = cfg_with(f"rules_from: {SOURCE}\n")
    cfg = config.parse_rules(text, SOURCE, base)
    assert [(r.index, r.line, r.role) for r in cfg.roles] == \
        [(1, 3, f"arn:aws:iam::{ACCOUNT}:role/a"), (2, 5, f"arn:aws:iam::{ACCOUNT}:role/b")], cfg.roles
    assert cfg.roles[1].match.services == ("sshd",) and cfg.roles[1].duration == 1800
    assert (cfg.region, cfg.rules_from, cfg.path) == (base.region, SOURCE, base.path), "the config is kept"
    local = config.parse(BASE + text.replace("version: 1\n", ""), "x")
    assert [r.role for r in local.roles] == [r.role for r in cfg.roles], "the same rules as a local roles list"


@pytest.mark.parametrize("text,where,words", [
    (f"roles:\n  - match: {{user: alice}}\n    role: arn:aws:iam::{ACCOUNT}:role/a\n"
     f"  - match: {{user: bob}}\n    role: arn:aws:iam::12345:role/b\n", "5:11", "roles[2].role"),
    (f"roles:\n  - match: {{usr: alice}}\n    role: arn:aws:iam::{ACCOUNT}:role/a\n", "2:13", "unknown key 'usr'"),
    ("roles:\n  - match: {user: alice\n", "3:1", "YAML syntax error"),
    ("version: 2\nroles: []\n", "1:10", "version 2 is not supported"),
    ("region: us-east-1\nroles: []\n", "1:1", "unknown key 'region'; allowed: version, roles"),
    ("version: 1\n", "1:1", "missing required key 'roles'"),
    ("roles: {user: alice}\n", "1:8", "roles must be a list"),
])
def test_fleet__a_broken_document_is_refused_naming_the_parameter_and_line(text, where, words):
    message = rules_error(text)
    assert message.startswith(f"{SOURCE}:{where}: "), f"expected {SOURCE}:{where}: …, got {message}"
    assert words in message, f"the message should say {words!r}: {message}"


def test_fleet__an_empty_document_is_refused():
    assert rules_error("# nothing\n") == f"{SOURCE}: the rules document is empty; it needs 'roles:', a list of " \
                                         f"rules as in the config"


def test_fleet__checks_spanning_config_and_rules_run_on_the_document():
    """imds.mode emulate needs 30-minute sessions: a document rule under the config's 20m is refused
    at that rule; a rule duration shorter than the config's refresh_before too."""
    cfg = cfg_with(f"rules_from: {SOURCE}\nimds: {{mode: emulate}}\nsession: {{duration: 20m, refresh_before: 5m}}\n")
    message = rules_error(f"roles:\n  - match: {{user: a}}\n    role: arn:aws:iam::{ACCOUNT}:role/a\n", cfg)
    assert message.startswith(f"{SOURCE}:2:5: imds.mode emulate needs sessions of at least 30m") and \
        "session.duration in rolegate.yaml" in message, message
    message = rules_error(f"roles:\n  - match: {{user: a, service: sshd}}\n    role: arn:aws:iam::{ACCOUNT}:role/a\n"
                          f"    duration: 15m\n", cfg_with(f"rules_from: {SOURCE}\nsession: {{refresh_before: 20m}}\n"))
    assert message.startswith(f"{SOURCE}:4:15: roles[1].duration (900s) must be longer than session.refresh_before"), \
        message


# -- the cache -------------------------------------------------------------------------------------


BASE_WEST = "version: 1\nregion: us-west-2\n"


def test_fleet__cache_round_trip_is_root_only_and_refuses_another_parameter():
    require_sandbox()
    base = f"/run/rg-fleet-cache-{os.getpid()}"
    cfg = cfg_with(f"rules_from: {SOURCE}\nrules_cache: {base}/sub/rules.yaml\n")
    doc = fleet.Document(SOURCE, "roles: []\n", 7, 1_700_000_000.0, SOURCE)
    fleet.write_cache(cfg, doc)
    st_dir, st_file = os.stat(f"{base}/sub"), os.stat(cfg.rules_cache)
    assert stat.S_IMODE(st_dir.st_mode) == 0o700 and st_dir.st_uid == 0, f"dir mode {st_dir.st_mode:o}"
    assert stat.S_IMODE(st_file.st_mode) == 0o600 and st_file.st_uid == 0, f"file mode {st_file.st_mode:o}"
    back = fleet.read_cache(cfg)
    assert (back.version, back.fetched, back.where) == (7, 1_700_000_000.0, cfg.rules_cache), back
    assert config.parse_rules(back.text, back.where, cfg).roles == (), "the header is a YAML comment"
    other = cfg_with(f"rules_from: ssm:/other\nrules_cache: {base}/sub/rules.yaml\n")
    with pytest.raises(StoreError, match=f"holds the rules of {SOURCE} in us-east-1, not of ssm:/other"):
        fleet.read_cache(other)
    # A same-named parameter of another region is another document.
    west = config.parse(BASE_WEST + f"rules_from: {SOURCE}\nrules_cache: {base}/sub/rules.yaml\n", "t.yaml")
    with pytest.raises(StoreError, match=f"in us-east-1, not of {SOURCE} in us-west-2"):
        fleet.read_cache(west)
    # A damaged header is a StoreError (the broker then starts without the copy), never a crash.
    good = open(cfg.rules_cache).read()
    with open(cfg.rules_cache, "w") as fh:
        fh.write(good.replace("fetched 2023-11-14T22:13:20Z", "fetched 2023-13-40T22:13:20Z"))
    with pytest.raises(StoreError, match="damaged first line"):
        fleet.read_cache(cfg)
    with open(cfg.rules_cache, "w") as fh:
        fh.write(good)
    os.chmod(cfg.rules_cache, 0o644)
    with pytest.raises(StoreError, match="not a root-only file"):
        fleet.read_cache(cfg)
    os.unlink(cfg.rules_cache)
    assert fleet.read_cache(cfg) is None, "no file: no copy"
    os.chmod(base, 0o777)
    with pytest.raises(StoreError, match=f"{base} is writable by group or others"):
        fleet.write_cache(cfg, doc)


# -- rolegated against moto's Parameter Store ------------------------------------------------------

USER = "flalice"
CACHE_DIR = "/run/rolegate-fleet-test"
CACHE = CACHE_DIR + "/rules.yaml"
POLL = 10  # seconds: rules_poll's least


def document(role_name, bad_line=False):
    arn = f"arn:aws:iam::{'12345' if bad_line else ACCOUNT}:role/{role_name}"
    return f"""version: 1
roles:
  - match: {{user: nobody-here}}
    role: arn:aws:iam::{ACCOUNT}:role/unused
  - match: {{user: {USER}}}
    role: {arn}
"""


def fleet_config(endpoint):
    return f"""version: 1
region: us-east-1
sts_timeout: 2
reap_interval: 2s
rules_from: {SOURCE}
rules_poll: {POLL}s
rules_cache: {CACHE}
ssm_endpoint: {endpoint}
"""


@pytest.fixture(scope="module")
def host():
    with sandbox_host() as h:
        before = open(CONFIG_PATH).read() if os.path.exists(CONFIG_PATH) else None
        try:
            h.add_user(USER)
            h.install_pam()
            h.start_sshd()
            yield h
        finally:  # later modules of this run share the sandbox's /etc: leave no rules_from there
            if before is None:
                if os.path.exists(CONFIG_PATH):
                    os.unlink(CONFIG_PATH)
            else:
                h.write_config(before)


@pytest.fixture
def ssm(host):
    """An SSM client on the stand-in, a clean parameter and cache, and the broker stopped afterwards."""
    client = boto3.client("ssm", region_name="us-east-1", endpoint_url=host.moto.url,
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    host.moto.reset()
    if os.path.exists(CACHE):
        os.unlink(CACHE)
    yield client
    host.stop_broker()


def put(client, text, **kw):
    return client.put_parameter(Name=PARAM, Value=text, Type=kw.pop("Type", "String"), Overwrite=True, **kw)["Version"]


def wait_log(host, mark, words, timeout):
    """Seconds until `words` appear in the broker's log after `mark`; fails naming what was seen."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if words in host.log_since(mark):
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"no {words!r} in the broker's log within {timeout}s:\n{host.log_since(mark)}")


def login_arn(host):
    """The role a real ssh login of USER gets, by STS's word (GetCallerIdentity in the session)."""
    held = Held(host, USER)
    held.release()
    return held.info.get("ARN", "")


def test_fleet__a_changed_parameter_is_picked_up_within_the_poll_interval(host, ssm):
    put(ssm, document("fleet-a"), Type="SecureString")
    host.write_config(fleet_config(host.moto.url))
    mark = host.log_mark()
    host.start_broker()
    assert f"reloaded: source={SOURCE} version=1 rules=2 revoked=0" in host.log_since(mark), host.log_since(mark)
    assert ":assumed-role/fleet-a/" in login_arn(host), \
        f"{USER}'s ssh login should get fleet-a from the SecureString's rules:\n{host.log_since(mark)}"
    st = os.stat(CACHE)
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, 0), f"the cache is root's 0600: {st}"
    assert "version 1" in open(CACHE).readline(), "the cache holds version 1"

    mark = host.log_mark()
    put(ssm, document("fleet-b"), Type="SecureString")
    took = wait_log(host, mark, f"reloaded: source={SOURCE} version=2 rules=2", POLL + 5)
    print(f"\nfleet rules: a changed parameter was in force {took:.1f}s after put-parameter (rules_poll {POLL}s)")
    assert took <= POLL + 1, f"picked up after {took:.1f}s, past rules_poll ({POLL}s) plus a fetch"
    assert "revoked=1" in host.log_since(mark), \
        f"fleet-a's lingering grant no longer maps and must be revoked through the reload path:\n{host.log_since(mark)}"
    arn = login_arn(host)
    assert ":assumed-role/fleet-b/" in arn, f"after the change {USER} should get fleet-b, got {arn!r}"
    assert "version 2" in open(CACHE).readline(), "the cache follows the parameter"


def test_fleet__a_parameter_change_moves_a_live_session_to_its_new_role_in_place(host, ssm):
    put(ssm, document("fleet-a"))
    host.write_config(fleet_config(host.moto.url))
    host.start_broker()
    shell = Shell(host, USER)
    try:
        ask = "rolegate whoami 2>&1 | tail -n 1"
        assert ":assumed-role/fleet-a/" in shell.do(ask), "the session should start on fleet-a"
        where = shell.do("echo $AWS_SHARED_CREDENTIALS_FILE")
        mark = host.log_mark()
        put(ssm, document("fleet-b"))
        wait_log(host, mark, "moved: ", POLL + 15)
        seen = shell.do(ask)
        assert ":assumed-role/fleet-b/" in seen, f"the live session should see fleet-b after the change: {seen}\n" \
                                                 f"{host.log_since(mark)}"
        assert shell.do("echo $AWS_SHARED_CREDENTIALS_FILE") == where, "the session's location changed"
        assert "revoked=0" in host.log_since(mark), f"a move is not a revocation:\n{host.log_since(mark)}"
    finally:
        shell.close()


def test_fleet__a_broken_parameter_is_refused_and_the_old_rules_stay(host, ssm):
    put(ssm, document("fleet-a"))
    host.write_config(fleet_config(host.moto.url))
    host.start_broker()
    cached = open(CACHE).read()
    mark = host.log_mark()
    put(ssm, document("fleet-b", bad_line=True))
    host.broker.send_signal(signal.SIGHUP)  # a SIGHUP fetches at once
    took = wait_log(host, mark, "failed: action=rules", 5)
    line = next(l for l in host.log_since(mark).splitlines() if "failed: action=rules" in l)
    print(f"\nfleet rules: after SIGHUP the broken version was refused in {took:.2f}s: {line}")
    assert f"source={SOURCE}" in line and f"{SOURCE}:6:11: roles[2].role" in line and "kept=\"previous rules\"" in line, \
        f"the failed line must name the parameter and the line of the mistake: {line}"
    assert ":assumed-role/fleet-a/" in login_arn(host), f"the old rules must still grant:\n{host.log_since(mark)}"
    assert open(CACHE).read() == cached, "a broken document must not overwrite the last good copy"
    mark = host.log_mark()
    host.broker.send_signal(signal.SIGHUP)
    wait_log(host, mark, "failed: action=rules", 5)
    assert "reloaded: path=" in host.log_since(mark), f"the config itself reloads:\n{host.log_since(mark)}"


def test_fleet__ssm_unreachable_at_start_the_last_good_copy_serves(host, ssm):
    put(ssm, document("fleet-a"))
    host.write_config(fleet_config(host.moto.url))
    host.start_broker()
    host.stop_broker()
    assert os.path.exists(CACHE), "the first broker kept a copy"
    put(ssm, document("fleet-b"))  # not seen: the store is unreachable for the next broker
    host.write_config(fleet_config(f"http://127.0.0.1:{free_port(privileged=True)}"))
    mark = host.log_mark()
    host.start_broker()
    log = host.log_since(mark)
    assert f"failed: action=rules source={SOURCE} code=unreachable" in log and \
           f"the last good copy {CACHE} (version 1, fetched" in log, f"it should say the copy serves:\n{log}"
    assert f"reloaded: source={CACHE} version=1 rules=2 revoked=0" in log, log
    assert ":assumed-role/fleet-a/" in login_arn(host), f"the last good copy should grant fleet-a:\n{log}"


def test_fleet__no_parameter_and_no_copy_means_no_grants_and_a_clear_line(host, ssm):
    host.write_config(fleet_config(host.moto.url))  # nothing was put: ParameterNotFound
    mark = host.log_mark()
    host.start_broker()
    # The doors listen a moment before `started:` is written: wait for the line, not the socket.
    wait_log(host, mark, "started:", 15)
    log = host.log_since(mark)
    line = next((l for l in log.splitlines() if "failed: action=rules" in l), "")
    assert "code=ParameterNotFound" in line and f"no rules: nobody gets a role until {SOURCE} can be read" in line \
           and f"no last good copy at {CACHE}" in line, f"the line should say nobody gets a role and why:\n{log}"
    assert "rules=0" in log.split("started:", 1)[1].splitlines()[0], f"the broker starts with no rules:\n{log}"
    held = run(host.ssh_cmd(USER, 'echo "FILE=${AWS_SHARED_CREDENTIALS_FILE:-}"'), check=False)
    assert held.returncode == 0 and "FILE=\n" in held.stdout, f"{USER}'s login must get no credentials: {held}"
    assert f"denied: " in host.log_since(mark), f"the login is denied (no rule):\n{host.log_since(mark)}"
    # Once the parameter exists the broker picks it up without a restart (retrying sooner while it has no rules).
    put(ssm, document("fleet-a"))
    took = wait_log(host, mark, f"reloaded: source={SOURCE} version=1", POLL + 5)
    print(f"\nfleet rules: with no rules at all, the new parameter was in force {took:.1f}s after put-parameter")


def _catches_sighup(pid):
    """Whether process `pid` has a handler for SIGHUP (signal 1: bit 0 of its SigCgt mask)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            caught = next(l for l in fh if l.startswith("SigCgt:")).split()[1]
    except (FileNotFoundError, ProcessLookupError, StopIteration):
        return False
    return bool(int(caught, 16) & 1 << (signal.SIGHUP - 1))


def test_fleet__a_sighup_while_the_first_fetch_hangs_neither_kills_the_broker_nor_is_lost(host, ssm):
    # An endpoint that completes the TCP handshake (the kernel does) and never answers: the first
    # fetch at start waits out sts_timeout. A SIGHUP then (systemctl reload right after boot or
    # install) used to end the broker, and systemd does not restart a broker a signal ended.
    silent = socket.socket()
    silent.bind(("127.0.0.1", free_port(privileged=True)))
    silent.listen(16)
    held = []
    try:
        host.write_config(fleet_config(f"http://127.0.0.1:{silent.getsockname()[1]}"))
        mark = host.log_mark()
        broker = host.start_broker(wait=False)
        # Not a fixed sleep: on a loaded machine the broker may not have reached its SIGHUP handler
        # yet, and the signal's default action would end it for a slow start, not for the bug. Its
        # first fetch connecting here is the moment: under way, waiting for an answer that never
        # comes (accepting it answers nothing), for up to sts_timeout (2 s).
        silent.settimeout(30)
        try:
            fetch, _ = silent.accept()
        except socket.timeout:
            raise AssertionError(f"the broker's first fetch never connected within 30 s:\n"
                                 f"{host.log_since(mark)}") from None
        held.append(fetch)
        assert broker.poll() is None, f"the broker ended before the SIGHUP:\n{host.log_since(mark)}"
        assert _catches_sighup(broker.pid), \
            "the broker has no SIGHUP handler while its first fetch hangs: a SIGHUP now would end it"
        broker.send_signal(signal.SIGHUP)
        host.wait_for_socket(timeout=30)
        assert broker.poll() is None, f"a SIGHUP during start ended the broker ({broker.returncode}):\n" \
                                      f"{host.log_since(mark)}"
        # The reload it asked for still happens, once the broker serves.
        wait_log(host, mark, "reloaded: path=", 15)
        assert "started:" in host.log_since(mark), host.log_since(mark)
    finally:
        for conn in held:
            conn.close()
        silent.close()


def test_fleet__a_reload_that_moves_region_and_parameter_reads_the_new_one_in_the_new_region(host, ssm):
    put(ssm, document("fleet-a"))
    west = boto3.client("ssm", region_name="us-west-2", endpoint_url=host.moto.url,
                        aws_access_key_id="testing", aws_secret_access_key="testing")
    other = PARAM + "-west"
    west.put_parameter(Name=other, Value=document("fleet-b"), Type="String", Overwrite=True)
    host.write_config(fleet_config(host.moto.url))
    host.start_broker()
    mark = host.log_mark()
    host.write_config(fleet_config(host.moto.url).replace("region: us-east-1", "region: us-west-2")
                      .replace(f"rules_from: {SOURCE}", f"rules_from: ssm:{other}"))
    host.broker.send_signal(signal.SIGHUP)
    wait_log(host, mark, "reloaded: path=", 10)
    log = host.log_since(mark)
    assert "failed: action=rules" not in log, f"the new parameter was asked of the old region:\n{log}"
    arn = login_arn(host)
    assert ":assumed-role/fleet-b/" in arn, f"after the reload {USER} should get us-west-2's fleet-b, got {arn!r}:\n{log}"


def _copy():
    """The last good copy's bytes and inode (an atomic rewrite changes the inode even for the same bytes)."""
    with open(CACHE, "rb") as fh:
        return fh.read(), os.fstat(fh.fileno()).st_ino


def _wait_copy_version(version, timeout):
    """Seconds until the copy's first line names `version`; fails showing what it says."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if f" version {version}, fetched " in _copy()[0].decode().splitlines()[0]:
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"the last good copy still says {_copy()[0].decode().splitlines()[0]!r} {timeout}s after "
                         f"version {version} was put")


def _fetched(data):
    return data.decode().splitlines()[0].rsplit("fetched ", 1)[1]


def test_fleet__the_copy_follows_a_re_put_document_and_never_a_refused_one(host, ssm):
    text = document("fleet-a")
    put(ssm, text)
    host.write_config(fleet_config(host.moto.url))
    host.start_broker()
    first, _ = _copy()
    time.sleep(1.1)  # the copy's fetch time has whole seconds: a later confirmation must show
    # The same text as a new version: the copy takes its version and fetch time, through the poll...
    assert put(ssm, text) == 2
    took = _wait_copy_version(2, POLL + 5)
    print(f"\nfleet copy: an identical document's version 2 reached the copy {took:.1f}s after put (poll)")
    assert _fetched(_copy()[0]) > _fetched(first), f"the copy's fetch time stayed behind: {_copy()[0][:120]!r}"
    # ... and through SIGHUP.
    assert put(ssm, text) == 3
    host.broker.send_signal(signal.SIGHUP)
    took = _wait_copy_version(3, 5)
    print(f"fleet copy: an identical document's version 3 reached the copy {took:.1f}s after put + SIGHUP")
    good = _copy()
    # A refused document leaves the copy byte for byte (and file for file), through SIGHUP...
    mark = host.log_mark()
    put(ssm, document("fleet-b", bad_line=True))
    host.broker.send_signal(signal.SIGHUP)
    wait_log(host, mark, "failed: action=rules", 5)
    assert "reloaded: path=" in host.log_since(mark), f"the config itself reloads:\n{host.log_since(mark)}"
    assert _copy() == good, "a SIGHUP that fetched a refused document rewrote the last good copy"
    # ... and through the poll.
    mark = host.log_mark()
    wait_log(host, mark, "failed: action=rules", POLL + 5)
    assert _copy() == good, "a poll that fetched a refused document rewrote the last good copy"
    assert ":assumed-role/fleet-a/" in login_arn(host), f"the good rules still grant:\n{host.log_since(mark)}"


def test_fleet__a_reload_to_an_unsafe_rules_cache_is_refused_as_check_config_refuses_it(host, ssm):
    put(ssm, document("fleet-a"))
    host.write_config(fleet_config(host.moto.url))
    host.start_broker()
    good = _copy()
    unsafe = f"/run/rolegate-fleet-open-{os.getpid()}"
    os.makedirs(unsafe, exist_ok=True)
    os.chmod(unsafe, 0o777)
    try:
        host.write_config(fleet_config(host.moto.url).replace(f"rules_cache: {CACHE}", f"rules_cache: {unsafe}/r.yaml"))
        checked = run(["rolegate", "check-config", CONFIG_PATH], check=False)
        mark = host.log_mark()
        host.broker.send_signal(signal.SIGHUP)
        wait_log(host, mark, "failed: action=reload", 5)
        line = next(l for l in host.log_since(mark).splitlines() if "failed: action=reload" in l)
        located = f"{CONFIG_PATH}:7:14: rules_cache"
        assert checked.returncode != 0 and located in checked.stdout, f"check-config should refuse it: {checked}"
        assert located in line and "writable by group or others" in line and 'kept="previous config"' in line, \
            f"the reload must be refused at the key, as check-config refuses it: {line}"
        assert _copy() == good and not os.path.exists(f"{unsafe}/r.yaml"), "the refused reload touched a copy"
    finally:
        shutil.rmtree(unsafe, ignore_errors=True)


# -- policy and doctor -----------------------------------------------------------------------------


def test_fleet__policy_allows_get_parameter_on_exactly_that_parameter(tmp_path):
    cfg_path = tmp_path / "rolegate.yaml"
    cfg_path.write_text(BASE.replace("us-east-1", "eu-west-1") + f"rules_from: {SOURCE}\nrules_cache: {tmp_path}/c\n")
    rules = tmp_path / "rules.yaml"
    rules.write_text(document("fleet-a"))
    out, err = io.StringIO(), io.StringIO()
    deps = cli.Deps(out=out, err=err, environ={})
    code = cli.main(["--config", str(cfg_path), "policy", "--gatekeeper", "arn:aws:iam::210987654321:role/gk",
                     "--rules", str(rules)], deps)
    assert code == 0, err.getvalue()
    statements = json.loads(out.getvalue())["gatekeeper_policy"]["Statement"]
    ssm_statement = [s for s in statements if s["Action"] == "ssm:GetParameter"]
    assert ssm_statement == [{"Sid": "RolegateReadFleetRules", "Effect": "Allow", "Action": "ssm:GetParameter",
                              "Resource": f"arn:aws:ssm:eu-west-1:210987654321:parameter{PARAM}"}], statements
    assume = [s for s in statements if s["Action"] != "ssm:GetParameter"]
    assert assume[0]["Resource"] == [f"arn:aws:iam::{ACCOUNT}:role/fleet-a", f"arn:aws:iam::{ACCOUNT}:role/unused"], \
        "the AssumeRole statement names the document's roles"
    # Without --rules and without a last good copy it says what to pass.
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(["--config", str(cfg_path), "policy"], cli.Deps(out=out, err=err, environ={}))
    assert code == exitcodes.FAILED and "pass --rules FILE" in err.getvalue(), err.getvalue()


def test_fleet__doctor_reads_and_checks_the_parameter(moto, tmp_path):
    client = boto3.client("ssm", region_name="us-east-1", endpoint_url=moto.url,
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    cfg = cfg_with(f"rules_from: {SOURCE}\nrules_cache: /run/rg-fleet-doctor-{os.getpid()}/rules.yaml\n"
                   f"ssm_endpoint: {moto.url}\n")
    results = {r.name: r for r in doctor.check_fleet_rules({"config": cfg})}
    assert results["fleet-rules"].verdict == doctor.FAIL and "ParameterNotFound" in results["fleet-rules"].detail, \
        results
    assert results["fleet-rules-cache"].verdict == doctor.WARN and "nobody gets a role" in \
        results["fleet-rules-cache"].detail, results
    put(client, document("fleet-a", bad_line=True))
    result = doctor.check_fleet_rules({"config": cfg})[0]
    assert result.verdict == doctor.FAIL and f"{SOURCE}:6:11:" in result.detail and "put-parameter" in result.fix, result
    put(client, document("fleet-a"))
    result = doctor.check_fleet_rules({"config": cfg})[0]
    assert result.verdict == doctor.PASS and result.detail == f"{SOURCE} version 2: 2 valid rules", result
    dead = cfg_with(f"rules_from: {SOURCE}\nssm_endpoint: http://127.0.0.1:{free_port(privileged=True)}\n")
    result = doctor.check_fleet_rules({"config": dead})[0]
    assert result.verdict == doctor.FAIL and "SSM did not answer" in result.detail, result
    assert doctor.check_fleet_rules({"config": cfg_with("")}) == [], "no rules_from: no check"


def test_fleet__metrics_count_fetches_and_show_the_rules_version_and_age():
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from pam_rolegate.backends import metrics

    state = {"rules": None}
    m = metrics.Metrics(lambda: {"grants": 0, "lingering": 0, "sessions": 0}, rules=lambda: state["rules"])

    def scraped():
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(generate_latest(m.registry).decode()) for s in f.samples}

    assert not [k for k in scraped() if k[0].startswith("rolegate_rules")], "no rules_from: no rules metrics"
    for outcome in ("changed", "unchanged", "unchanged", "error"):
        m.rules_fetched(outcome)
    state["rules"] = (7, 1_700_000_000.0)
    got = scraped()
    expected = {"changed": 1, "unchanged": 2, "invalid": 0, "error": 1}
    for outcome, n in expected.items():
        assert got[("rolegate_rules_fetches_total", (("outcome", outcome),))] == n, f"{outcome}: {got}"
    assert got[("rolegate_rules_version", ())] == 7, got
    assert got[("rolegate_rules_fetched_timestamp_seconds", ())] == 1_700_000_000.0, got


def test_fleet__rules_cache_may_not_be_the_config_itself():
    with pytest.raises(ConfigError) as err:
        config.parse(f"version: 1\nregion: us-east-1\nrules_from: {SOURCE}\nrules_cache: /etc/rolegate/rolegate.yaml\n",
                     "/etc/rolegate/rolegate.yaml")
    assert err.value.line == 4 and "must not be the config file itself" in err.value.message, \
        f"a cache on the config file would let every fetch overwrite the config: {err.value}"


def test_fleet__a_poll_confirming_old_rules_never_pushes_back_newer_ones_put_in_force_meanwhile(monkeypatch):
    """The poll read version 5 again while a SIGHUP's fetch put version 6 in force: the poll's
    'unchanged' must not make version 5 current again, nor write it over version 6's copy."""
    require_sandbox()
    base = f"/run/rg-fleet-race-{os.getpid()}"
    cfg = cfg_with(f"rules_from: {SOURCE}\nrules_cache: {base}/rules.yaml\n")
    logged = []
    log = types.SimpleNamespace(decision=lambda *a, **kw: logged.append((a, kw)))
    v5 = fleet.Document(SOURCE, "roles: []\n", 5, 1_700_000_000.0, SOURCE)
    v6 = fleet.Document(SOURCE, "roles: []\n# six\n", 6, 1_700_000_100.0, SOURCE)

    def observe(outcome):  # runs once the poll has compared, before it confirms: the race's window
        if outcome == "unchanged":
            rules.accept(v6)  # the SIGHUP's apply lands there

    rules = fleet.FleetRules(cfg, engine=lambda: None, apply=lambda f, d: None, log=log, observer=observe)
    rules.accept(v5)
    monkeypatch.setattr(fleet, "fetch", lambda cfg, engine, clock=None:
                        fleet.Document(SOURCE, v5.text, 5, 1_700_000_200.0, SOURCE))
    assert rules.poll_once() == "unchanged", "the poll should have found the text it knew"
    assert rules.current is v6, f"the poll pushed back the newer rules: version {rules.current.version} in force"
    assert fleet.read_cache(cfg).version == 6, "the poll wrote the older version over the newer copy"
