"""The IMDS door: instance metadata as each user should see it, on a loopback HTTP listener.

With `imds.mode: emulate`, the firewall redirects every non-root user's TCP to 169.254.169.254:80
and [fd00:ec2::254]:80 here (127.0.0.1 and ::1, `imds.port`). Who asks is the kernel's word only:
the exact 4-tuple of the caller's socket (peers.py), never anything in the request; a caller the
kernel does not name is refused. The answers follow what SDKs need of IMDSv2:

    PUT  /latest/api/token                          a session token bound to the caller's uid
    GET  /latest/meta-data/iam/security-credentials/        the caller's role name, or 404
    GET  /latest/meta-data/iam/security-credentials/NAME    the caller's own role credentials
    GET  allow-listed, non-secret paths (instance-id, placement/*, ...), fetched as root, cached
    everything else (user-data, the instance's own iam/info, ...): 404

Credentials come from the registry as a *background* grant (service `imds`, the caller's own
account): shared with the user's login grant when the role is the same, lingering between
requests, and always with at least 20 minutes left, because SDKs stretch IMDS credentials that
near expiry on their own and then fail late.

The listener, its thread and pool and the caller's uid are web.py's.
"""

import asyncio
import hashlib
import hmac
import json
import pwd
import secrets
import time
from datetime import datetime, timezone

from aiohttp import web

from ..rules import config, mapping
from ..errors import RolegateError
from .web import HttpDoor, text
from ..core.grants import iso

SERVICE = config.IMDS_SERVICE
TOKEN_TTL_MAX = 21600  # what the real IMDS allows
MIN_LEFT = 20 * 60  # served credentials keep at least this long (SDKs extend expiring IMDS keys)
METADATA_TTL = 300  # seconds a fetched non-secret path is served from memory
METADATA_PATHS = ("ami-id", "instance-id", "instance-type", "local-ipv4", "local-hostname", "hostname", "mac",
                  "placement/availability-zone", "placement/availability-zone-id", "placement/region",
                  "placement/group-name", "placement/partition-number", "placement/host-id")
DYNAMIC_PATHS = ("instance-identity/document",)
# Host headers a real request to IMDS carries. Anything else (a web page that rebound a DNS name
# to the metadata address) is refused.
HOSTS = frozenset({"169.254.169.254", "169.254.169.254:80", "[fd00:ec2::254]", "[fd00:ec2::254]:80"})
LOOPBACK_HOSTS = ("127.0.0.1", "[::1]", "localhost")


class Tokens:
    """IMDSv2 session tokens: `uid.expiry.mac`, an HMAC under a key made at start (restart = re-ask)."""

    def __init__(self, clock=time.time):
        self._key = secrets.token_bytes(32)
        self.clock = clock

    def _mac(self, uid, expiry):
        return hmac.new(self._key, f"{uid}.{expiry}".encode(), hashlib.sha256).hexdigest()[:40]

    def issue(self, uid, ttl):
        expiry = int(self.clock()) + ttl
        return f"{uid}.{expiry}.{self._mac(uid, expiry)}"

    def valid(self, token, uid):
        try:
            t_uid, t_expiry, mac = token.split(".")
            t_uid, t_expiry = int(t_uid), int(t_expiry)
        except ValueError:
            return False
        return t_uid == uid and t_expiry > self.clock() and hmac.compare_digest(mac, self._mac(t_uid, t_expiry))


def credentials_document(grant):
    """The JSON the real IMDS returns for a role's credentials."""
    c = grant.credentials
    return json.dumps({"Code": "Success", "LastUpdated": iso(datetime.now(timezone.utc)),
                       "Type": "AWS-HMAC", "AccessKeyId": c.access_key_id, "SecretAccessKey": c.secret_access_key,
                       "Token": c.session_token, "Expiration": iso(c.expiration)}, indent=2)


def role_name(arn):
    return arn.rsplit("/", 1)[-1]


class ImdsDoor(HttpDoor):
    name = "imds"

    def __init__(self, registry, log, refusals, metadata=None, port=None):
        super().__init__(log, refusals, port or registry.cfg.imds.port)
        self.registry = registry
        self.metadata = metadata  # callable(path) -> text, as root from the real IMDS; None off EC2
        self.tokens = Tokens()
        self._cache = {}  # metadata path -> (fetched at, text or None)

    def routes(self, app):
        app.middlewares.append(self._host)
        app.router.add_put("/latest/api/token", self.token)
        app.router.add_route("*", "/{tail:.*}", self.get)

    @web.middleware
    async def _host(self, request, handler):
        host = request.headers.get("Host", "")
        if host not in HOSTS and not host.startswith(LOOPBACK_HOSTS):
            self.count("bad_host")
            self.refusals.refused(request["uid"], None, door="imds", reason=f"Host {host[:64]!r} is not IMDS's")
            return text("Bad Request", 400)
        return await handler(request)

    async def token(self, request):
        if "X-Forwarded-For" in request.headers:
            self.count("forwarded")
            return text("Bad Request", 400)  # as IMDS does: a token never goes through a proxy
        try:
            ttl = int(request.headers.get("X-aws-ec2-metadata-token-ttl-seconds", ""))
        except ValueError:
            ttl = 0
        if not 1 <= ttl <= TOKEN_TTL_MAX:
            self.count("bad_ttl")
            return text("Bad Request", 400)
        self.count("token")
        resp = text(self.tokens.issue(request["uid"], ttl))
        resp.headers["X-aws-ec2-metadata-token-ttl-seconds"] = str(ttl)
        return resp

    def _authorised(self, request):
        token = request.headers.get("X-aws-ec2-metadata-token")
        if token is None:
            return self.registry.cfg.imds.v1
        return self.tokens.valid(token, request["uid"])

    async def get(self, request):
        if request.method not in ("GET", "HEAD"):
            return text("Method Not Allowed", 405)
        if not self._authorised(request):
            self.count("unauthorised")
            return text("Unauthorized", 401)
        path = request.path
        if path.startswith("/latest/meta-data/iam/security-credentials/") or \
                path == "/latest/meta-data/iam/security-credentials":
            return await self._credentials(request, path[len("/latest/meta-data/iam/security-credentials"):])
        for prefix, allowed in (("/latest/meta-data/", METADATA_PATHS), ("/latest/dynamic/", DYNAMIC_PATHS)):
            if path.startswith(prefix) and path[len(prefix):].rstrip("/") in allowed:
                body = await self._metadata(path)
                if body is not None:
                    self.count("metadata")
                    return text(body)
        self.count("not_found")
        return text("Not Found", 404)

    async def _metadata(self, path):
        if self.metadata is None:
            return None
        at, body = self._cache.get(path, (0, None))
        if time.monotonic() - at < METADATA_TTL:
            return body
        try:
            body = await asyncio.get_running_loop().run_in_executor(self.pool, self.metadata, path)
        except Exception:
            body = None  # not on EC2, or no such path here: 404, asked again later
        self._cache[path] = (time.monotonic(), body)
        return body

    async def _credentials(self, request, rest):
        uid = request["uid"]
        if rest in ("", "/"):
            rule = await self.work(uid, self._rule, uid)
            if rule is None:
                self.count("no_role")
                return text("Not Found", 404)
            self.count("role_name")
            return text(role_name(rule.role))
        try:
            grant = await self.work(uid, self._grant, uid)
        except RolegateError as err:
            self.count("failed")
            self.log.decision("failed", door="imds", uid=uid, reason=str(err))
            return text("Service Unavailable", 503)
        if grant is None or role_name(grant.role) != rest.strip("/"):
            self.count("no_role")
            return text("Not Found", 404)
        self.count("credentials")
        return text(credentials_document(grant))

    def _facts(self, uid):
        return mapping.LoginFacts(user=pwd.getpwuid(uid).pw_name, service=SERVICE)

    def _rule(self, uid):
        try:
            return self.registry.rule_for(self._facts(uid))
        except (KeyError, mapping.UnknownUser):
            return None

    def _grant(self, uid):
        try:
            return self.registry.background(self._facts(uid), MIN_LEFT)
        except (KeyError, mapping.UnknownUser):
            return None


def metadata_fetcher(engine):
    """callable(path) -> text from the real IMDS, as root; None when the source is not the instance."""
    source = engine.source
    if not hasattr(source, "metadata"):
        return None
    return lambda path: source.metadata(path, timeout=1.0)

