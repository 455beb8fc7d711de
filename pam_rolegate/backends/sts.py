"""The only module that talks to AWS: gatekeeper (source) credentials, AssumeRole, GetCallerIdentity,
and the fleet rules' GetParameter.

boto3 is imported lazily, inside the functions that need it, so `rolegate env` (run by every
login shell) and `check-user` without `--assume` never pay its ~0.5 s import.
"""

import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable, Optional, Tuple

from ..rules import names
from ..errors import AccessDenied, InvalidRequest, ParameterError, SourceCredentialsError, StsUnavailable, Throttled

IMDS_ENDPOINT_ENV = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
IMDS_DEFAULT = "http://169.254.169.254"
IMDS_TOKEN_TTL = 300
KEYRING_SERVICE = "rolegate"
# Re-fetch gatekeeper credentials this long before they expire.
SOURCE_MARGIN = timedelta(minutes=5)

_THROTTLE_CODES = {"Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException"}
# HTTP 429 Too Many Requests is throttling whoever says it: a proxy or gateway in front of STS
# answers it with a body of its own (an HTML page), which botocore names by no STS error code.
_THROTTLE_STATUS = 429
_DENIED_CODES = {"AccessDenied", "AccessDeniedException", "InvalidClientTokenId", "SignatureDoesNotMatch",
                 "UnrecognizedClientException"}
_INVALID_CODES = {"ValidationError", "InvalidParameterValue", "MalformedPolicyDocument",
                  "PackedPolicyTooLarge", "RegionDisabledException", "InvalidIdentityToken"}


def utcnow():
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str
    session_token: Optional[str]
    expiration: Optional[datetime]  # timezone-aware UTC; None for long-term keys

    def seconds_left(self, now):
        if self.expiration is None:
            return float("inf")
        return (self.expiration - now).total_seconds()

    @property
    def masked_key(self):
        """The access key id as logs may show it: all but the last 4 characters hidden."""
        return "*" * max(len(self.access_key_id) - 4, 0) + self.access_key_id[-4:]

    def __repr__(self):  # never let a secret reach a log through repr()
        return f"Credentials({self.masked_key}, expires={self.expiration})"


@dataclass(frozen=True)
class AssumeRequest:
    role_arn: str
    session_name: str
    source_identity: str
    duration: int
    tags: Tuple[Tuple[str, str], ...] = ()
    external_id: Optional[str] = None
    policy_arns: Tuple[str, ...] = ()


@dataclass(frozen=True)
class HostFacts:
    hostname: str
    instance_id: str = ""


def build_request(config, rule, ident, rhost=None, host=None):
    """Render the rule and session templates for one identity into a valid AssumeRequest."""
    host = host or HostFacts(socket.gethostname())
    values = {"principal": ident.principal, "user": ident.target, "service": ident.service,
              "hostname": host.hostname, "instance_id": host.instance_id, "rhost": rhost or ""}
    s = config.session
    request = AssumeRequest(
        role_arn=rule.role,
        session_name=names.sts_name(names.render(s.name, values)),
        source_identity=names.sts_name(names.render(s.source_identity, values)),
        duration=config.duration_for(rule),
        tags=tuple((k, names.tag_value(names.render(v, values))) for k, v in s.tags),
        external_id=rule.external_id,
        policy_arns=rule.policy_arns,
    )
    names.check_request(request.session_name, request.source_identity, dict(request.tags),
                        request.policy_arns, request.external_id)
    return request


# -- gatekeeper (source) credentials ---------------------------------------------------------


class ImdsSource:
    """The instance role's credentials through IMDSv2 only (a session token, then the role).

    The endpoint is the SDKs' standard variable, so tests point it at moto and nothing else
    changes. Environment credentials are never consulted: only root can reach IMDS once the
    firewall is applied, and the broker's environment must not silently become the source.
    """

    name = "instance-profile"

    def __init__(self, endpoint=None, timeout=1.0):
        self.endpoint = (endpoint or os.environ.get(IMDS_ENDPOINT_ENV) or IMDS_DEFAULT).rstrip("/")
        self.timeout = timeout

    def _call(self, method, path, headers, timeout):
        req = urllib.request.Request(self.endpoint + path, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.read().decode("utf-8")
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise SourceCredentialsError(
                f"instance metadata service at {self.endpoint} failed on {path}: {err}; is an "
                f"instance role attached, IMDSv2 enabled, and is this process root?") from None

    def _token(self, timeout):
        return self._call("PUT", "/latest/api/token",
                          {"X-aws-ec2-metadata-token-ttl-seconds": str(IMDS_TOKEN_TTL)}, timeout)

    def get(self, timeout=None):
        """Token, role name, credentials: three calls within one `timeout` in total."""
        deadline = time.monotonic() + (timeout or self.timeout)

        def left():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SourceCredentialsError(f"instance metadata service at {self.endpoint} did not answer in time")
            return remaining

        hdr = {"X-aws-ec2-metadata-token": self._token(left())}
        roles = self._call("GET", "/latest/meta-data/iam/security-credentials/", hdr, left()).split()
        if not roles:
            raise SourceCredentialsError("no instance role is attached to this instance; attach the gatekeeper role")
        data = json.loads(self._call("GET", f"/latest/meta-data/iam/security-credentials/{roles[0]}", hdr, left()))
        return Credentials(data["AccessKeyId"], data["SecretAccessKey"], data.get("Token"),
                           _parse_time(data.get("Expiration")))

    def instance_id(self, timeout=None):
        return self.metadata("/latest/meta-data/instance-id", timeout).strip()

    def metadata(self, path, timeout=None):
        """Any metadata path's text (the IMDS door's allow-listed, non-secret paths)."""
        timeout = timeout or self.timeout
        hdr = {"X-aws-ec2-metadata-token": self._token(timeout)}
        return self._call("GET", path, hdr, timeout)


class ProfileSource:
    """A named profile from root's AWS config files (for hosts without an instance role)."""

    def __init__(self, profile):
        self.profile = profile
        self.name = f"profile:{profile}"

    def get(self, timeout=None):
        import botocore.exceptions
        import botocore.session

        try:
            session = botocore.session.Session(profile=self.profile)
            creds = session.get_credentials()
        except botocore.exceptions.ProfileNotFound:
            creds = None
        if creds is None:
            raise SourceCredentialsError(f"AWS profile {self.profile!r} has no credentials; "
                                         f"add it to root's ~/.aws/credentials or change 'source'")
        frozen = creds.get_frozen_credentials()
        expiry = getattr(creds, "_expiry_time", None)
        return Credentials(frozen.access_key, frozen.secret_key, frozen.token, expiry)

    def instance_id(self, timeout=None):
        return ""


class KeyringSource:
    """Credentials kept in the system keyring: service 'rolegate', user NAME, password a JSON
    object with AccessKeyId and SecretAccessKey (and optionally SessionToken)."""

    def __init__(self, entry):
        self.entry = entry
        self.name = f"keyring:{entry}"

    def get(self, timeout=None):
        try:
            import keyring
        except ImportError:
            raise SourceCredentialsError("source keyring:… needs the optional 'keyring' package: "
                                         "pip install 'rolegate[keyring]' in rolegate's environment") from None
        try:
            secret = keyring.get_password(KEYRING_SERVICE, self.entry)
        except Exception as err:  # keyring backends raise their own types
            raise SourceCredentialsError(f"the keyring refused entry {self.entry!r}: {err}") from None
        if not secret:
            raise SourceCredentialsError(
                f"no keyring entry service={KEYRING_SERVICE!r} user={self.entry!r}; store a JSON object "
                f"with AccessKeyId and SecretAccessKey there")
        try:
            data = json.loads(secret)
            return Credentials(data["AccessKeyId"], data["SecretAccessKey"], data.get("SessionToken"),
                               _parse_time(data.get("Expiration")))
        except (ValueError, KeyError, TypeError):
            raise SourceCredentialsError(f"keyring entry {self.entry!r} is not a JSON object with "
                                         f"AccessKeyId and SecretAccessKey") from None

    def instance_id(self, timeout=None):
        return ""


def make_source(source):
    """config.Source -> provider. A closed registry: nothing is loaded by name from outside."""
    if source.kind == "instance-profile":
        return ImdsSource()
    if source.kind == "profile":
        return ProfileSource(source.name)
    if source.kind == "keyring":
        return KeyringSource(source.name)
    raise SourceCredentialsError(f"unknown source {source}")


def _parse_time(text):
    if not text:
        return None
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


# -- STS ------------------------------------------------------------------------------------


def aws_client(service, creds, region, timeout, endpoint=None, profile=None):
    """A boto3 client of `service` that uses exactly `creds` (None: the SDK's default chain, for
    `whoami`) and gives up after `timeout` seconds. Every AWS client rolegate makes comes from here.

    botocore's own retries are off: callers retry themselves, inside their time budget.
    `endpoint` is the config's `sts_endpoint` / `ssm_endpoint`; without one, botocore picks the
    regional endpoint, or AWS_ENDPOINT_URL_STS / _SSM from botocore 1.31 on (Debian 12's 1.29
    ignores those variables, which is why the config can name the endpoints).
    """
    import boto3
    import botocore.session
    from botocore.config import Config as BotoConfig

    cfg = BotoConfig(connect_timeout=max(timeout, 0.1), read_timeout=max(timeout, 0.1),
                     retries={"total_max_attempts": 1}, **_user_agent())
    # The regional endpoint, never the global sts.amazonaws.com: botocore before 1.33 (Debian 12's
    # 1.29) defaults to the global one for us-east-1 and other early regions, which an STS VPC
    # endpoint's private DNS (regional names only) does not cover.
    core = botocore.session.Session(profile=profile)  # profile: `whoami --profile`, with creds None
    core.set_config_variable("sts_regional_endpoints", "regional")
    core.register_component("response_parser_factory", _status_named_parsers())
    keys = {} if creds is None else {"aws_access_key_id": creds.access_key_id,
                                     "aws_secret_access_key": creds.secret_access_key,
                                     "aws_session_token": creds.session_token}
    return boto3.session.Session(botocore_session=core).client(
        service, region_name=region, config=cfg, endpoint_url=endpoint or None, **keys)


def _status_named_parsers():
    """botocore's response parsers, except that a 429 whose body they cannot read (a proxy's HTML
    page, its plain text) becomes an error named by its status, as botocore names 5xx pages,
    rather than a parser error with no status: _call then counts it as throttling.
    (botocore's hook for this, the before-parse event, is newer than Debian 12's 1.29.)"""
    import http.client

    from botocore.parsers import ResponseParserError, ResponseParserFactory

    class Factory(ResponseParserFactory):
        def create_parser(self, protocol_name):
            parser = super().create_parser(protocol_name)
            parse = parser.parse

            def parse_or_name(response, shape):
                try:
                    return parse(response, shape)
                except ResponseParserError:
                    if response.get("status_code") != _THROTTLE_STATUS:
                        raise
                    error = {"Code": str(_THROTTLE_STATUS), "Message": http.client.responses[_THROTTLE_STATUS]}
                    return {"Error": error, "ResponseMetadata": {"HTTPStatusCode": _THROTTLE_STATUS}}

            parser.parse = parse_or_name
            return parser

    return Factory()


def _user_agent():
    """rolegate's name in the User-Agent header (CloudTrail's userAgent): botocore >= 1.31 has a
    field for an application id; older ones (Debian 12's 1.29) only take free text after theirs."""
    from botocore.config import Config as BotoConfig

    if "user_agent_appid" in BotoConfig.OPTION_DEFAULTS:
        return {"user_agent_appid": "rolegate"}
    return {"user_agent_extra": "app/rolegate"}


def default_client_factory(creds, region, timeout, endpoint=None):
    """The engine's STS client (see aws_client)."""
    return aws_client("sts", creds, region, timeout, endpoint)


class StsEngine:
    """AssumeRole with the gatekeeper credentials, within a time budget, errors sorted by kind."""

    def __init__(self, region, source, budget=3.0, client_factory=default_client_factory,
                 clock: Callable[[], datetime] = utcnow, sleep=time.sleep, endpoint=None):
        self.region = region
        self.endpoint = endpoint  # the config's sts_endpoint (None: the SDK's own choice)
        self.source = source
        self.budget = budget
        self.client_factory = client_factory
        self.clock = clock
        self.sleep = sleep
        self._lock = threading.Lock()
        self._source_creds = None
        self._client = None
        # observer(seconds, error) after each assume(), retries included; error is what it raised
        # (an StsError, whose `code` says which), or None (the broker's metrics).
        self.observer = None

    @classmethod
    def from_config(cls, config, **kw):
        return cls(config.region, make_source(config.source), budget=config.sts_timeout,
                   endpoint=config.sts_endpoint, **kw)

    def _gatekeeper(self, remaining):
        """The gatekeeper credentials, fetched anew when near expiry. Called with the lock held."""
        creds = self._source_creds
        if creds is None or creds.seconds_left(self.clock()) < SOURCE_MARGIN.total_seconds():
            creds = self.source.get(timeout=max(min(remaining, 2.0), 0.1))
            self._source_creds, self._client = creds, None
        return creds

    def gatekeeper_credentials(self, remaining=None):
        """The gatekeeper credentials the engine holds (the fleet rules' GetParameter uses them too)."""
        with self._lock:
            return self._gatekeeper(self.budget if remaining is None else remaining)

    def warm(self, timeout):
        """Pay now what the first AssumeRole would: the gatekeeper's keys (IMDSv2 token, role,
        credentials), boto3's import and the STS client (its service model loaded). Raises what the
        source raises; `timeout` bounds the keys' fetch."""
        with self._lock:
            creds = self._gatekeeper(timeout)
            if self._client is None:
                self._client = self.client_factory(creds, self.region, self.budget, self.endpoint)

    def _client_for(self, remaining, fresh):
        """The cached client, or (on a retry, or when gatekeeper keys changed) a new one."""
        with self._lock:
            creds = self._gatekeeper(remaining)
            if self._client is None or fresh:
                client = self.client_factory(creds, self.region, remaining, self.endpoint)
                if self._client is None:
                    self._client = client
                return client
            return self._client

    def _forget_source(self):
        with self._lock:
            self._source_creds, self._client = None, None

    def _call(self, what, invoke, budget=None):
        """Run `invoke(client)` with retries for throttling and outages until the budget is spent.

        `invoke` may itself raise StsUnavailable for a reply it cannot use; that is retried too.
        """
        import botocore.exceptions as bex
        from botocore.parsers import ResponseParserError

        budget = self.budget if budget is None else min(budget, self.budget)
        deadline = time.monotonic() + budget
        attempt, last = 0, None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0.05:
                raise last or StsUnavailable(f"{what}: no time left in the {budget:g}s budget")
            client = self._client_for(remaining, fresh=attempt > 0)
            attempt += 1
            try:
                return invoke(client)
            except bex.ClientError as err:
                code = err.response.get("Error", {}).get("Code", "")
                msg = err.response.get("Error", {}).get("Message", "")
                status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                # A 429 is throttling unless STS itself named another error in it (a parseable
                # AccessDenied stays a denial whatever status a proxy put on it).
                named = code in _DENIED_CODES or code in _INVALID_CODES or code == "ExpiredToken"
                if code in _THROTTLE_CODES or (status == _THROTTLE_STATUS and not named):
                    last = Throttled(f"{what}: STS is throttling requests ({code or 'no STS error'}, HTTP {status}); "
                                     f"retry later")
                elif code == "ExpiredToken" and attempt == 1:
                    self._forget_source()  # gatekeeper keys rotated under us: fetch anew, once
                    last = StsUnavailable(f"{what}: gatekeeper credentials expired")
                    continue
                elif (not code or code.isdigit()) and status >= 500:
                    # botocore names a reply without an STS error in it by its HTTP status: a proxy
                    # or load balancer answered, not STS.
                    last = StsUnavailable(f"{what}: the STS endpoint answered HTTP {status} ({msg or 'no message'}) "
                                          f"without an STS error; is a proxy in the way?")
                elif code in _DENIED_CODES:
                    raise AccessDenied(f"{what}: access denied ({code}: {msg}); run 'rolegate policy' for the "
                                       f"permissions and trust the gatekeeper and role need") from None
                elif code in _INVALID_CODES or 400 <= status < 500:
                    raise InvalidRequest(f"{what}: STS rejected the request ({code}: {msg})") from None
                else:
                    last = StsUnavailable(f"{what}: STS error {code or status}: {msg}")
            except (bex.EndpointConnectionError, bex.ConnectionError, bex.HTTPClientError) as err:
                last = StsUnavailable(f"{what}: STS did not answer within the {budget:g}s budget ({err})")
            except bex.ParamValidationError as err:
                raise InvalidRequest(f"{what}: botocore refused the request before sending it ({err})") from None
            except StsUnavailable as err:
                last = err
            except (ResponseParserError, KeyError, ValueError, bex.BotoCoreError) as err:
                # An answer botocore cannot read (a proxy's text page, a cut-off body) is an outage
                # like any other, not an internal error. Its parser raises KeyError for XML without
                # the result element, ValueError for a bad timestamp.
                last = StsUnavailable(f"{what}: could not parse the reply from the STS endpoint "
                                      f"({_first_line(err)}); is a proxy in the way?")
            backoff = min(0.1 * 2 ** attempt, 1.0)
            if deadline - time.monotonic() <= backoff + 0.05:
                raise last
            self.sleep(backoff)

    def assume(self, request, budget=None):
        """AssumeRole; `budget` (seconds) may shorten the configured time budget for this call."""
        params = {"RoleArn": request.role_arn, "RoleSessionName": request.session_name,
                  "DurationSeconds": request.duration, "SourceIdentity": request.source_identity}
        if request.tags:
            params["Tags"] = [{"Key": k, "Value": v} for k, v in request.tags]
        if request.external_id:
            params["ExternalId"] = request.external_id
        if request.policy_arns:
            params["PolicyArns"] = [{"arn": a} for a in request.policy_arns]
        what = f"AssumeRole {request.role_arn}"
        observer, start, error = self.observer, time.monotonic(), None
        try:
            return self._call(what, lambda c: _assumed_credentials(what, c.assume_role(**params)), budget)
        except Exception as err:
            error = err
            raise
        finally:
            if observer is not None:
                observer(time.monotonic() - start, error)

    def caller_identity(self, creds):
        """GetCallerIdentity with `creds` through this engine's endpoint and region."""
        return caller_identity(creds, self.region, self.budget, self.client_factory, self.endpoint)

    def host_facts(self):
        """Hostname, and the instance id when the source is the instance profile (else empty)."""
        try:
            instance_id = self.source.instance_id(timeout=1.0)
        except SourceCredentialsError:
            instance_id = ""
        return HostFacts(socket.gethostname(), instance_id)


def get_parameter(engine, name, endpoint=None, client_factory=aws_client):
    """Parameter Store's GetParameter (decrypted) with the engine's gatekeeper credentials, region
    and time budget -> (value, version). Raises ParameterError with AWS's error code, or with
    unreachable / source_unavailable / bad_reply."""
    import botocore.exceptions as bex
    from botocore.parsers import ResponseParserError

    what = f"GetParameter ssm:{name}"
    for attempt in (1, 2):
        try:
            creds = engine.gatekeeper_credentials()
        except SourceCredentialsError as err:
            raise ParameterError(f"{what}: no gatekeeper credentials: {err}", "source_unavailable") from None
        try:
            client = client_factory("ssm", creds, engine.region, engine.budget, endpoint)
            reply = client.get_parameter(Name=name, WithDecryption=True)
        except bex.ClientError as err:
            code = err.response.get("Error", {}).get("Code", "") or str(
                err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "error"))
            msg = err.response.get("Error", {}).get("Message", "")
            if code in ("ExpiredTokenException", "ExpiredToken") and attempt == 1:
                engine._forget_source()  # gatekeeper keys rotated under us: fetch anew, once
                continue
            raise ParameterError(f"{what}: {code}: {msg}{_PARAMETER_FIXES.get(code, '')}", code) from None
        except (bex.EndpointConnectionError, bex.ConnectionError, bex.HTTPClientError) as err:
            raise ParameterError(f"{what}: SSM did not answer within {engine.budget:g}s ({err}); is SSM "
                                 f"reachable from this host (a VPC endpoint and ssm_endpoint in private "
                                 f"subnets)?", "unreachable") from None
        except (ResponseParserError, KeyError, ValueError, bex.BotoCoreError) as err:
            raise ParameterError(f"{what}: could not read the reply ({_first_line(err)}); is a proxy in the way?",
                                 "bad_reply") from None
        param = reply.get("Parameter") or {}
        if not isinstance(param.get("Value"), str):
            raise ParameterError(f"{what}: the reply holds no value; is a proxy in the way?", "bad_reply")
        return param["Value"], int(param.get("Version") or 0)
    raise AssertionError("unreachable")


_PARAMETER_FIXES = {
    "ParameterNotFound": "; create it (aws ssm put-parameter --name NAME --type String --value file://rules.yaml) "
                         "in this region, or correct rules_from",
    "AccessDeniedException": "; the gatekeeper role needs ssm:GetParameter on it (rolegate policy shows the "
                             "statement), and kms:Decrypt on the key of a SecureString under a customer-managed key",
    "ThrottlingException": "; Parameter Store is throttling this account: lengthen rules_poll",
    "429": "; something between this host and Parameter Store (a proxy) is throttling it: lengthen rules_poll",
}


def _assumed_credentials(what, reply):
    """The Credentials in an AssumeRole reply; a reply without them (a stand-in answering 200
    with something else) is an outage, so the engine retries it within its budget."""
    c = reply.get("Credentials") or {}
    missing = [k for k in ("AccessKeyId", "SecretAccessKey", "SessionToken") if not c.get(k)]
    if not isinstance(c.get("Expiration"), datetime):
        missing.append("Expiration")
    if missing:
        status = reply.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        raise StsUnavailable(f"{what}: the STS endpoint answered HTTP {status} without "
                             f"{'Credentials' if not c else ', '.join(missing)}; is a proxy in the way?")
    return Credentials(c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"],
                       c["Expiration"].astimezone(timezone.utc))


def _first_line(err):
    """botocore's parser errors end with the whole body; the first line says what went wrong."""
    if isinstance(err, KeyError) and err.args:
        return f"no {err.args[0]} element in it"
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def caller_identity(creds, region, timeout=3.0, client_factory=default_client_factory, endpoint=None):
    """GetCallerIdentity with the given (assumed) credentials: which role really arrived. With
    `creds` None, whatever the SDK's default chain finds (session_identity)."""
    import botocore.exceptions as bex
    from botocore.parsers import ResponseParserError

    try:
        reply = client_factory(creds, region, timeout, endpoint).get_caller_identity()
    except bex.ProfileNotFound as err:
        raise AccessDenied(f"{err}; `rolegate profiles` lists the ones rolegate gives you") from None
    except bex.CredentialRetrievalError as err:  # a named profile's credential_process said no
        raise AccessDenied(str(err)) from None
    except bex.NoCredentialsError:
        raise AccessDenied("this session has no AWS credentials: no rolegate grant, and none of your own") from None
    except bex.ClientError as err:
        if err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500:
            raise StsUnavailable(f"GetCallerIdentity: the STS endpoint failed: {err}") from None
        raise AccessDenied(f"GetCallerIdentity failed: {err}") from None
    except (bex.EndpointConnectionError, bex.ConnectionError, bex.HTTPClientError) as err:
        raise StsUnavailable(f"GetCallerIdentity: STS did not answer ({err})") from None
    except (ResponseParserError, KeyError, ValueError, bex.BotoCoreError) as err:  # a proxy's page, cut-off XML
        raise StsUnavailable(f"GetCallerIdentity: could not parse the reply ({_first_line(err)})") from None
    if not all(reply.get(k) for k in ("Account", "Arn", "UserId")):
        raise StsUnavailable("GetCallerIdentity: the STS endpoint's reply names no identity; is a proxy in the way?")
    return {"Account": reply["Account"], "Arn": reply["Arn"], "UserId": reply["UserId"]}


def session_identity(region, endpoint=None, timeout=5.0, profile=None):
    """GetCallerIdentity with whatever the SDK's default chain finds (for `profile`, when given):
    what this session really has. `endpoint`: the config's sts_endpoint, when the caller could read
    the config."""
    def factory(creds, region, timeout, endpoint):
        return aws_client("sts", creds, region, timeout, endpoint, profile=profile)
    return caller_identity(None, region, timeout, factory, endpoint=endpoint)
