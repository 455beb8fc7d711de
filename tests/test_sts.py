"""The STS grant engine against the real moto server, and against endpoints that misbehave."""

import http.server
import json
import socket
import threading
import time

import pytest

from conftest import free_port
from pam_rolegate.rules import config, mapping, names
from pam_rolegate.backends import sts
from pam_rolegate.errors import AccessDenied, SourceCredentialsError, StsUnavailable, Throttled

CONFIG = """
version: 1
region: us-east-1
session:
  duration: 15m
  refresh_before: 5m
  tags: {host: "{hostname}", service: "{service}", who: "{principal}"}
roles:
  - match: {user: alice}
    role: arn:aws:iam::123456789012:role/s3-full-access
  - match: {group: developers}
    role: arn:aws:iam::123456789012:role/developer
    external_id: example-id
    policy_arns: [arn:aws:iam::aws:policy/ReadOnlyAccess]
"""


def ident(principal="alice", target=None, groups=(), service="sshd"):
    return mapping.Identity(principal=principal, principal_uid=1000, groups=tuple(groups),
                            target=target or principal, target_uid=1000, target_gid=1000, service=service)


@pytest.fixture
def cfg():
    return config.parse(CONFIG, "test.yaml")


def assume_for(cfg, identity, **engine_kw):
    decision = mapping.decide(cfg, identity)
    assert decision.rule is not None, f"expected a rule for {identity.principal}: {decision.reason}"
    request = sts.build_request(cfg, decision.rule, identity, host=sts.HostFacts("bastion-1", "i-fake"))
    engine = sts.StsEngine.from_config(cfg, **engine_kw)
    return request, engine.assume(request)


def test_sts__mapped_user_gets_the_mapped_role(moto, cfg):
    request, creds = assume_for(cfg, ident("alice"))
    who = sts.caller_identity(creds, cfg.region)
    assert who["Arn"] == "arn:aws:sts::123456789012:assumed-role/s3-full-access/alice@bastion-1", \
        f"GetCallerIdentity with the new keys named the wrong role/session: {who['Arn']}"
    assert request.source_identity == "alice", f"SourceIdentity should be the Linux user: {request}"
    assert dict(request.tags) == {"host": "bastion-1", "service": "sshd", "who": "alice"}, request.tags
    assert creds.expiration is not None and creds.seconds_left(sts.utcnow()) > 800, \
        f"15m credentials should have ~900 s left, have {creds.seconds_left(sts.utcnow())}"
    assert moto.assume_role_calls() == 1, "exactly one AssumeRole should have reached the server"


def test_sts__group_member_maps_by_group_with_external_id_and_policies(moto, cfg):
    request, creds = assume_for(cfg, ident("carol", groups=("carol", "developers")))
    assert request.role_arn.endswith(":role/developer"), request
    assert request.external_id == "example-id" and request.policy_arns == ("arn:aws:iam::aws:policy/ReadOnlyAccess",)
    who = sts.caller_identity(creds, cfg.region)
    assert who["Arn"].endswith(":assumed-role/developer/carol@bastion-1"), who["Arn"]


def test_sts__unicode_and_long_user_names_get_valid_session_names(moto, cfg):
    long_name = "jörg.ü" + "x" * 80
    rule = cfg.roles[0]
    request = sts.build_request(cfg, rule, ident(long_name), host=sts.HostFacts("h", ""))
    assert names.is_sts_name(request.session_name) and names.is_sts_name(request.source_identity), request
    creds = sts.StsEngine.from_config(cfg).assume(request)
    arn = sts.caller_identity(creds, cfg.region)["Arn"]
    assert arn.endswith("/" + request.session_name), f"session name did not arrive intact: {arn}"


def test_sts__environment_credentials_never_become_the_source(moto, cfg, monkeypatch):
    # An IMDS that is not there, and tempting keys in the broker's environment.
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAENVIRONMENT0001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    with pytest.raises(SourceCredentialsError) as err:
        assume_for(cfg, ident("alice"))
    assert "instance metadata" in str(err.value), f"error should name IMDS: {err.value}"
    assert moto.assume_role_calls() == 0, "no AssumeRole may be made with environment credentials"


def test_sts__profile_source(moto, cfg, tmp_path, monkeypatch):
    (tmp_path / "credentials").write_text("[gate]\naws_access_key_id = AKIAPROFILE00000001\n"
                                          "aws_secret_access_key = s3cret\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    cfg = config.parse(CONFIG.replace("region: us-east-1", "region: us-east-1\nsource: profile:gate"), "t.yaml")
    _, creds = assume_for(cfg, ident("alice"))
    assert creds.access_key_id and creds.access_key_id != "AKIAPROFILE00000001", "expected assumed-role keys"
    missing = sts.ProfileSource("nope")
    with pytest.raises(SourceCredentialsError, match="profile 'nope'"):
        missing.get()


def test_sts__keyring_source(moto, cfg):
    keyring = pytest.importorskip("keyring")
    import keyring.backend

    class MemoryKeyring(keyring.backend.KeyringBackend):
        """A keyring backend kept in memory: the real keyring API, a fake store."""

        priority = 1
        entries = {}

        def get_password(self, service, username):
            return self.entries.get((service, username))

        def set_password(self, service, username, password):
            self.entries[(service, username)] = password

        def delete_password(self, service, username):
            self.entries.pop((service, username), None)

    previous = keyring.get_keyring()
    keyring.set_keyring(MemoryKeyring())
    keyring.set_password("rolegate", "gate", json.dumps({"AccessKeyId": "AKIAKEYRING00000001", "SecretAccessKey": "x"}))
    try:
        creds = sts.KeyringSource("gate").get()
        assert creds.access_key_id == "AKIAKEYRING00000001", creds
        with pytest.raises(SourceCredentialsError, match="no keyring entry"):
            sts.KeyringSource("other").get()
    finally:
        keyring.set_keyring(previous)


class _Blackhole:
    """A TCP server that accepts connections and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.held = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self):
        self.sock.close()
        for c in self.held:
            c.close()


@pytest.mark.parametrize("which", ["sts", "imds"])
def test_sts__endpoint_that_never_answers_costs_at_most_the_budget(moto, cfg, monkeypatch, which):
    hole = _Blackhole()
    try:
        var = "AWS_ENDPOINT_URL_STS" if which == "sts" else "AWS_EC2_METADATA_SERVICE_ENDPOINT"
        monkeypatch.setenv(var, hole.url)
        cfg = config.parse(CONFIG.replace("region: us-east-1", "region: us-east-1\nsts_timeout: 1"), "t.yaml")
        start = time.monotonic()
        with pytest.raises((StsUnavailable, SourceCredentialsError)):
            assume_for(cfg, ident("alice"))
        elapsed = time.monotonic() - start
        # 1 s budget; the bound is generous (it proves "no hang", not a speed).
        assert elapsed < 2.5, f"a silent {which} endpoint held the engine for {elapsed:.2f}s (budget 1 s)"
    finally:
        hole.close()


def _error_server(code, status):
    body = (f'<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type>'
            f"<Code>{code}</Code><Message>made up by the test</Message></Error>"
            f"<RequestId>1</RequestId></ErrorResponse>").encode()
    return _stand_in(status, body)


def _stand_in(status, body, content_type="text/xml"):
    """A local HTTP server that answers every POST with `status` and `body`; returns it and its hit list."""
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            hits.append(self.path)
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, hits


@pytest.mark.parametrize("code,status,error,retried", [
    ("Throttling", 400, Throttled, True),
    ("AccessDenied", 403, AccessDenied, False),
])
def test_sts__throttling_and_access_denied_are_distinct_errors(moto, cfg, monkeypatch, code, status, error, retried):
    server, hits = _error_server(code, status)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_STS", "http://127.0.0.1:%d" % server.server_address[1])
        cfg = config.parse(CONFIG.replace("region: us-east-1", "region: us-east-1\nsts_timeout: 2"), "t.yaml")
        start = time.monotonic()
        with pytest.raises(error) as err:
            assume_for(cfg, ident("alice"))
        assert time.monotonic() - start < 3.5, "the engine overran its 2 s budget"
        assert (len(hits) > 1) == retried, f"{code}: expected retried={retried}, server saw {len(hits)} calls"
        assert code in str(err.value), f"the error should name STS's code: {err.value}"
    finally:
        server.shutdown()


NO_CREDENTIALS = (b'<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><AssumeRoleResult>'
                  b"<AssumedRoleUser><Arn>arn:aws:sts::123456789012:assumed-role/s3-full-access/alice</Arn>"
                  b"<AssumedRoleId>AROAEXAMPLE:alice</AssumedRoleId></AssumedRoleUser></AssumeRoleResult>"
                  b"<ResponseMetadata><RequestId>1</RequestId></ResponseMetadata></AssumeRoleResponse>")


@pytest.mark.parametrize("status,content_type,body,named", [
    (500, "text/plain", b"Internal proxy error", "Unable to parse response"),
    (502, "text/html", b"<html><body>Bad Gateway</body></html>", "HTTP 502"),
    (200, "text/xml", b"garbage<<", "Unable to parse response"),
    (200, "text/xml", NO_CREDENTIALS, "HTTP 200 without Credentials"),
    (200, "text/html", b"<html><body>Welcome to the hotel wifi</body></html>", "no AssumeRoleResult element"),
], ids=["plain-text-500", "html-502", "garbage-200", "no-credentials-200", "html-200"])
def test_sts__unreadable_replies_are_an_outage_retried_within_the_budget(moto, monkeypatch, status, content_type,
                                                                         body, named):
    server, hits = _stand_in(status, body, content_type)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_STS", "http://127.0.0.1:%d" % server.server_address[1])
        cfg = config.parse(CONFIG.replace("region: us-east-1", "region: us-east-1\nsts_timeout: 2"), "t.yaml")
        start = time.monotonic()
        with pytest.raises(StsUnavailable) as err:
            assume_for(cfg, ident("alice"))
        elapsed = time.monotonic() - start
        assert err.value.code == "sts_unavailable", f"expected code sts_unavailable, got {err.value.code}"
        assert named in str(err.value), f"the error should say {named!r}: {err.value}"
        assert elapsed < 3.0, f"the engine took {elapsed:.2f}s on a {status} stand-in (budget 2 s)"
        assert len(hits) > 1, f"an unreadable reply should be retried within the budget; server saw {len(hits)} call"
    finally:
        server.shutdown()


@pytest.mark.parametrize("status,content_type,body", [
    (500, "text/plain", b"Internal proxy error"),
    (502, "text/html", b"<html><body>Bad Gateway</body></html>"),
    (200, "text/xml", b"garbage<<"),
    (200, "text/xml", NO_CREDENTIALS),  # valid XML, but no GetCallerIdentityResult
], ids=["plain-text-500", "html-502", "garbage-200", "wrong-xml-200"])
def test_sts__caller_identity_calls_an_unreadable_reply_an_outage(moto, monkeypatch, status, content_type, body):
    server, hits = _stand_in(status, body, content_type)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_STS", "http://127.0.0.1:%d" % server.server_address[1])
        with pytest.raises(StsUnavailable) as err:
            sts.caller_identity(sts.Credentials("ASIAEXAMPLEKEY123456", "x", "t", None), "us-east-1", timeout=2)
        assert err.value.code == "sts_unavailable", f"expected code sts_unavailable, got {err.value.code}"
        assert hits, "the stand-in never saw the GetCallerIdentity call"
    finally:
        server.shutdown()


def test_sts__an_sts_error_that_arrives_with_429_keeps_its_name(moto, monkeypatch):
    # The status says "slow down" only when nothing better does: a denial is a denial.
    server, hits = _error_server("AccessDenied", 429)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_STS", "http://127.0.0.1:%d" % server.server_address[1])
        cfg = config.parse(CONFIG.replace("region: us-east-1", "region: us-east-1\nsts_timeout: 2"), "t.yaml")
        with pytest.raises(AccessDenied) as err:
            assume_for(cfg, ident("alice"))
        assert err.value.code == "access_denied", f"an AccessDenied under HTTP 429 became {err.value.code}"
        assert len(hits) == 1, f"a denial is not retried; the stand-in saw {len(hits)} calls"
    finally:
        server.shutdown()


# nginx's own limit_req page: what a proxy in front of STS answers when it rate-limits us.
NGINX_429 = (b"<html>\r\n<head><title>429 Too Many Requests</title></head>\r\n<body>\r\n<center><h1>429 Too Many "
             b"Requests</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n")


@pytest.mark.parametrize("content_type,body", [
    ("text/html", NGINX_429), ("text/plain", b"Too Many Requests"), ("application/json", b'{"message":"slow down"}'),
], ids=["nginx-html", "plain-text", "json"])
def test_sts__a_proxys_429_is_throttling_retried_within_the_budget(moto, monkeypatch, content_type, body):
    server, hits = _stand_in(429, body, content_type)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_STS", "http://127.0.0.1:%d" % server.server_address[1])
        cfg = config.parse(CONFIG.replace("region: us-east-1", "region: us-east-1\nsts_timeout: 2"), "t.yaml")
        start = time.monotonic()
        with pytest.raises(Throttled) as err:
            assume_for(cfg, ident("alice"))
        elapsed = time.monotonic() - start
        print(f"\nsts: a proxy's HTTP 429 was asked {len(hits)} times within the 2 s budget ({elapsed:.2f}s): {err.value}")
        assert err.value.code == "throttled", f"a 429 must carry the code throttled, got {err.value.code}"
        assert "HTTP 429" in str(err.value), f"the error should name the status: {err.value}"
        assert len(hits) > 1, f"throttling is retried within the budget; the proxy saw {len(hits)} call"
        assert elapsed < 3.0, f"the engine took {elapsed:.2f}s on a 429 stand-in (budget 2 s)"
    finally:
        server.shutdown()


def test_sts__credentials_repr_masks_the_key():
    creds = sts.Credentials("ASIAEXAMPLEKEY123456", "supersecret", "token", None)
    text = repr(creds) + creds.masked_key
    assert "supersecret" not in text and "ASIAEXAMPLEKEY12" not in text and text.count("3456") == 2, text


def _closed_port_url():
    """A loopback URL where nothing listens: connections to it are refused at once. A port below
    1024, because sts_endpoint takes plain http only there."""
    return f"http://127.0.0.1:{free_port(privileged=True)}"


def test_sts__configured_sts_endpoint_is_the_one_called(moto, monkeypatch):
    # The SDK's own overrides point at a dead port; only sts_endpoint names moto. botocore from
    # 1.31 honours the variables, so success proves the configured endpoint wins over them.
    dead = _closed_port_url()
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", dead)
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    text = CONFIG.replace("region: us-east-1", "region: us-east-1\nsts_timeout: 1s")
    without = config.parse(text, "t.yaml")
    with pytest.raises(StsUnavailable) as err:
        assume_for(without, ident("alice"))
    assert moto.assume_role_calls() == 0, \
        f"control: without sts_endpoint the call should go to the dead {dead}, yet moto answered ({err.value})"
    cfg = config.parse(text.replace("sts_timeout: 1s", f"sts_timeout: 1s\nsts_endpoint: {moto.url}"), "t.yaml")
    request, creds = assume_for(cfg, ident("alice"))
    assert moto.assume_role_calls() == 1, "AssumeRole should have reached moto through sts_endpoint"
    engine = sts.StsEngine.from_config(cfg)
    arn = engine.caller_identity(creds)["Arn"]
    assert arn.endswith(":assumed-role/s3-full-access/" + request.session_name), \
        f"GetCallerIdentity through sts_endpoint named the wrong identity: {arn}"
    # `rolegate whoami` (the session's own keys, here from the environment) takes the same endpoint.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", creds.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", creds.secret_access_key)
    monkeypatch.setenv("AWS_SESSION_TOKEN", creds.session_token)
    arn = sts.session_identity(cfg.region, cfg.sts_endpoint)["Arn"]
    assert arn.endswith(":assumed-role/s3-full-access/" + request.session_name), \
        f"whoami through sts_endpoint named the wrong identity: {arn}"


def test_sts__a_dead_sts_endpoint_is_not_bypassed(moto):
    # The variables point at moto (the fixture); a configured endpoint where nothing listens must
    # fail the call rather than fall back to them.
    dead = _closed_port_url()
    cfg = config.parse(CONFIG.replace("region: us-east-1", f"region: us-east-1\nsts_timeout: 1s\nsts_endpoint: {dead}"),
                       "t.yaml")
    with pytest.raises(StsUnavailable) as err:
        assume_for(cfg, ident("alice"))
    assert moto.assume_role_calls() == 0, f"AssumeRole went to moto although sts_endpoint is {dead}"
    assert dead.rsplit(":", 1)[1] in str(err.value), f"the error should name the configured endpoint: {err.value}"


def test_sts__without_sts_endpoint_the_regional_endpoint_is_called(monkeypatch):
    # botocore's "legacy" setting (the default before 1.33, so Debian 12's) sends us-east-1 to the
    # global sts.amazonaws.com, which an STS VPC endpoint's private DNS does not cover.
    for key in ("AWS_ENDPOINT_URL_STS", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_STS_REGIONAL_ENDPOINTS", "legacy")
    client = sts.default_client_factory(sts.Credentials("AKIAEXAMPLEKEY123456", "x", None, None), "us-east-1", 1.0)
    assert client.meta.endpoint_url == "https://sts.us-east-1.amazonaws.com", \
        f"the STS client should call the regional endpoint, calls {client.meta.endpoint_url}"
