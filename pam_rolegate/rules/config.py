"""The configuration file: YAML in, frozen dataclasses out, every mistake refused as FILE:LINE:COL.

We walk PyYAML's node tree (yaml.compose) instead of loading plain dicts, because only nodes
carry positions, and because a plain load silently keeps the last of two duplicate keys.
"""

import dataclasses
import ipaddress
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Optional, Tuple

import yaml

from . import names
from ..errors import ConfigError

DEFAULT_PATH = "/etc/rolegate/rolegate.yaml"
CONFIG_ENV = "ROLEGATE_CONFIG"
SUPPORTED_VERSIONS = (1,)
SOURCES = ("instance-profile", "profile:NAME", "keyring:NAME")
DELIVERIES = ("file", "process", "container")
IMDS_MODES = ("reject", "emulate", "audit")
# imds.mode emulate serves credentials with at least 20 minutes left (imds.MIN_LEFT): SDKs treat
# IMDS keys that expire sooner as an outage and stretch their expiry on their own, then sign with
# expired keys. A session no longer than that would cost an AssumeRole on every IMDS request and
# still be stretched; 30 minutes leaves each AssumeRole at least 10 minutes of use.
IMDS_MIN_DURATION = 30 * 60
IMDS_SERVICE = "imds"  # the service IMDS requests are matched as
# Fleet rules (rules_from): the only source so far is a Parameter Store parameter, named as SSM
# allows: fully qualified (a leading /), at most 1011 characters and 15 levels, not under the
# reserved aws/ssm prefixes.
RULES_SCHEMES = ("ssm:/NAME",)
SSM_NAME_RE = re.compile(r"(/[A-Za-z0-9_.-]+)+", re.ASCII)
SSM_NAME_MAX = 1011
SSM_LEVELS_MAX = 15
# The least rules_poll: Parameter Store's default throughput is 40 GetParameter calls per second
# per account and region, shared by the whole fleet; 10 s already lets 400 hosts use it all.
RULES_POLL_MIN = 10
RULES_POLL_MAX = 24 * 3600
# The least time a grant's credentials serve before they are re-assumed (duration - refresh_before,
# for session.duration and every rule's own duration). Each refresh is an AssumeRole and a
# CloudTrail event per live grant, for as long as the session lives: 59m55s of a 1 h session would
# re-assume every grant every 5 s for ever and spend refresh.rate on nothing. 10 s is the least
# that lets a refresh run its STS budget (sts_timeout, 3 s by default) and its first retry (5 s
# later, registry's backoff) before the grant falls due again; it is also what lets a test see
# refreshes of 900 s credentials (refresh_before 890) without waiting 15 minutes.
MIN_REFRESH_INTERVAL = 10

# re.ASCII everywhere: \d and \w must not accept other scripts' digits and letters.
ROLE_ARN_RE = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:role/([\w+=,.@-]+/)*[\w+=,.@-]{1,64}", re.ASCII)
POLICY_ARN_RE = re.compile(r"arn:aws[a-z-]*:iam::(\d{12}|aws):policy/([\w+=,.@-]+/)*[\w+=,.@-]{1,128}", re.ASCII)
REGION_RE = re.compile(r"[a-z]{2}(-[a-z]+)+-\d+", re.ASCII)
_DURATION_RE = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", re.ASCII)
# A profile name lands in an INI section header and in a credential_process command line: no
# spaces, brackets or shell characters, whatever a YAML string allows.
PROFILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", re.ASCII)
_USER_RE = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.@-]*\$?", re.ASCII)
# Directories the broker would hide under a tmpfs mount, or share with others.
_SYSTEM_DIRS = frozenset({"/", "/run", "/var/run", "/tmp", "/var/tmp", "/dev", "/dev/shm", "/etc", "/var", "/usr",
                          "/home", "/root", "/boot", "/proc", "/sys", "/opt", "/srv", "/bin", "/sbin", "/lib"})
# An endpoint URL's host: a DNS name or an IPv4 address, or an IPv6 address in brackets.
_HOST_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*\.?|\[[0-9A-Fa-f:.]+\]",
                      re.ASCII)
ENDPOINT_EXAMPLES = {"sts_endpoint": "https://sts.us-east-1.amazonaws.com",
                     "ssm_endpoint": "https://ssm.us-east-1.amazonaws.com"}
_TEXT_TAGS = ("tag:yaml.org,2002:str", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")


@dataclass(frozen=True)
class Source:
    """Where the gatekeeper (source) credentials come from."""

    kind: str  # "instance-profile" | "profile" | "keyring"
    name: Optional[str] = None

    def __str__(self):
        return self.kind if self.name is None else f"{self.kind}:{self.name}"


@dataclass(frozen=True)
class Match:
    """Login facts a rule requires; an empty tuple means 'any'. A tuple means any of."""

    users: Tuple[str, ...] = ()
    groups: Tuple[str, ...] = ()
    services: Tuple[str, ...] = ()
    targets: Tuple[str, ...] = ()


# Role chaining: STS refuses DurationSeconds over 1 h when the caller's keys are themselves a role's
# session (AssumeRole from a role). With source instance-profile they always are (the gatekeeper is
# the instance's role), so a longer session.duration or roles[].duration would fail every login at
# run time; it is refused here instead. profile: and keyring: sources may hold an IAM user's
# long-term keys, which allow up to 12 h (names.DURATION_MAX); whether a profile is itself a role
# (role_arn, SSO) only STS can tell, at the first AssumeRole (doctor --assume finds it first).
CHAINED_MAX = 3600
CHAINED_SOURCES = ("instance-profile",)
# Elevation on demand: at most role chaining's cap, whatever the source.
ELEVATE_MAX = CHAINED_MAX
ELEVATE_MIN = 900  # STS's least DurationSeconds
ELEVATE_DEFAULT_MAX = 1800
REASON_MODES = ("required", "optional")
# What an elevation adds to the session tags: its kind and its reason (session.tags leaves room).
ELEVATION_TAGS = 2


@dataclass(frozen=True)
class Elevate:
    """A rule's `elevate:`: no login gets its profile by itself, only `rolegate elevate`."""

    reason: str = "required"  # "required" or "optional"
    max: int = ELEVATE_DEFAULT_MAX  # seconds an elevation may last, at most
    approvers: Optional[str] = None  # a group one of whose other members must approve


@dataclass(frozen=True)
class Rule:
    index: int  # 1-based position in `roles`, for explanations and logs
    line: int  # where the rule starts in the file
    match: Match
    role: str
    duration: Optional[int] = None  # overrides session.duration
    external_id: Optional[str] = None
    policy_arns: Tuple[str, ...] = ()
    # A named profile (`aws --profile NAME`) this rule gives beside the default; None: the rule
    # is one of the default's candidates, exactly as before profiles existed.
    profile: Optional[str] = None
    elevate: Optional[Elevate] = None  # on demand only (rolegate elevate); needs a profile


@dataclass(frozen=True)
class SessionSettings:
    duration: int = 3600
    refresh_before: int = 1200
    name: str = "{principal}@{hostname}"
    source_identity: str = "{principal}"
    tags: Tuple[Tuple[str, str], ...] = ()
    # How long a grant's credentials stay in the broker's memory after its last session ends,
    # so the next login of the same grant costs no STS call (0: release at once).
    linger: int = 900


@dataclass(frozen=True)
class RefreshSettings:
    workers: int = 4  # STS calls of one refresh pass in parallel
    rate: float = 20.0  # refresh AssumeRole calls per second at most (STS throttles per account)


@dataclass(frozen=True)
class ImdsSettings:
    # reject: users' IMDS traffic is refused (only root and imds_allow_users reach it);
    # emulate: it is redirected to the broker, which answers each user with their own role;
    # audit: it passes, and the firewall counts each uid's connections (a rollout's first step:
    # learn who depends on the instance role before reject takes it away; nothing is locked).
    mode: str = "reject"
    v1: bool = False  # answer GETs without a session token (IMDSv1)
    port: int = 254  # the broker's loopback IMDS listener (127.0.0.1 and ::1); privileged (see port())


@dataclass(frozen=True)
class Config:
    path: str
    region: str
    source: Source = Source("instance-profile")
    runtime_dir: str = "/run/rolegate"
    delivery: str = "file"
    sts_timeout: int = 3
    # The STS endpoint URL the broker calls (an STS VPC endpoint, say); None: the SDK's own choice,
    # the regional endpoint (or AWS_ENDPOINT_URL_STS where botocore honours it, from 1.31).
    sts_endpoint: Optional[str] = None
    reap_interval: int = 30
    imds_allow_users: Tuple[str, ...] = ()
    session: SessionSettings = field(default_factory=SessionSettings)
    refresh: RefreshSettings = field(default_factory=RefreshSettings)
    imds: ImdsSettings = field(default_factory=ImdsSettings)
    container_port: int = 255  # delivery: container: the broker's loopback credentials endpoint
    # Prometheus metrics, node_exporter textfile style: the file (None: no metrics) and how often
    # it is rewritten.
    metrics_file: Optional[str] = None
    metrics_interval: int = 15
    # Fleet rules: `ssm:/NAME` means the rules come from that parameter (polled every rules_poll,
    # the last good copy kept at rules_cache) instead of `roles`; ssm_endpoint overrides the URL.
    rules_from: Optional[str] = None
    rules_poll: int = 300
    rules_cache: str = "/var/lib/rolegate/rules.yaml"
    ssm_endpoint: Optional[str] = None
    roles: Tuple[Rule, ...] = ()
    version: int = 1
    # (key, line, column) of keys whose checks need the filesystem (check_paths), so that what
    # the broker would refuse at start is located in the file like any other mistake.
    marks: Tuple[Tuple[str, int, int], ...] = field(default=(), compare=False, repr=False)

    def duration_for(self, rule):
        return rule.duration or self.session.duration

    @property
    def rules_parameter(self):
        """rules_from's parameter name (/rolegate/rules), or None."""
        return self.rules_from[len("ssm:"):] if self.rules_from else None


def parse_duration(value):
    """900, "900", "15m", "1h", "1h30m" -> seconds. Raises ValueError with the accepted forms."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like 15m, 1h, 1h30m")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if text.isascii() and text.isdigit():
        return int(text)
    m = _DURATION_RE.fullmatch(text)
    if not text or not m or not any(m.groups()):
        raise ValueError(f"{value!r} is not a duration; use seconds (900) or 15m, 1h, 1h30m, 90s")
    h, mi, s = (int(g or 0) for g in m.groups())
    return h * 3600 + mi * 60 + s


def config_path(explicit=None, environ=os.environ):
    return explicit or environ.get(CONFIG_ENV) or DEFAULT_PATH


def load(path=None):
    """Read and validate the config file; raises ConfigError located at the mistake."""
    path = config_path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as err:
        raise ConfigError(f"cannot read the config: {err.strerror}", path) from None
    except UnicodeDecodeError:
        raise ConfigError("the config is not UTF-8 text", path) from None
    return parse(text, path)


def parse(text, path="<config>"):
    root = _compose(text, path)
    if root is None:
        raise ConfigError("the config is empty; it needs at least 'version: 1' and 'region'", path)
    return _Reader(path).config(root)


def check_paths(cfg):
    """The filesystem checks the broker makes at start, without changing anything: runtime_dir and
    (with rules_from) rules_cache's directory reached from / without following links, each parent
    root-owned and not writable by group or others (store.probe_safe_dir, the walk the broker's
    own open_safe_dir makes). Raises ConfigError located at the key. check-config, the broker (at
    start and on SIGHUP) and doctor call this.

    Returns notes on what this user could not verify: an unprivileged caller cannot look below a
    directory it may not search (such as a 0700 /var/lib/rolegate); root sees everything. What
    only the start itself can tell (whether a tmpfs can be mounted on runtime_dir) is not judged.
    """
    from ..backends import store  # the broker's own walk: one check for check-config and the start
    from ..errors import StoreError

    checks = [("runtime_dir", cfg.runtime_dir, "choose a directory under /run, such as /run/rolegate")]
    if cfg.rules_from:
        checks.append(("rules_cache", os.path.dirname(cfg.rules_cache),
                       "put rules_cache in a root-owned directory, such as /var/lib/rolegate"))
    marks = {key: (line, column) for key, line, column in cfg.marks}
    notes = []
    for key, path, hint in checks:
        try:
            store.probe_safe_dir(path, key, hint)
        except store.NotVisible as err:
            notes.append(f"{key}: {err}")
        except (StoreError, OSError) as err:
            line, column = marks.get(key, (None, None))
            default = "" if key in marks else f" (the default {getattr(Config, key)})"
            raise ConfigError(f"{key}{default}: the broker would refuse it: {err}", cfg.path, line, column) from None
    return notes


def check_users(cfg):
    """imds_allow_users resolved through NSS, by the lookup `rolegate firewall apply` makes
    (firewall.allowed_uids); raises ConfigError located at the first name no user has here.

    A host check, like check_paths: check-config and doctor call it on the host the config is for
    (on a build machine the accounts may differ). The broker does not: it never uses the list (the
    firewall does), and a service account deleted later must not take every user's credentials
    away at the next start. The lockdown fails closed instead: the boot's root-only rule stays, and
    doctor FAILs naming the user.
    """
    from ..backends import firewall  # the firewall's own lookup: one resolution of the names

    marks = {key: (line, column) for key, line, column in cfg.marks}
    for i, name in enumerate(cfg.imds_allow_users):
        try:
            firewall.allowed_uids((name,))
        except firewall.FirewallError:
            line, column = marks.get(f"imds_allow_users[{i}]", (None, None))
            raise ConfigError(f"imds_allow_users: no such user: {name!r}; `rolegate firewall apply` could not "
                              f"lock IMDS with it; create the user, or remove the name",
                              cfg.path, line, column) from None


def check_host(cfg):
    """Every check of `cfg` against this host (check_paths, then check_users), for check-config and
    doctor; returns check_paths' notes on what this user could not verify."""
    notes = check_paths(cfg)
    check_users(cfg)
    return notes


def parse_rules(text, where, cfg):
    """A fleet rules document (rules_from's parameter, or its cached copy) -> `cfg` with those rules.

    The document is `version: 1` (optional) and `roles:`, read by the same code as a config's own
    `roles`, with every mistake located as WHERE:LINE:COL (WHERE is ssm:/NAME or the cache file).
    """
    root = _compose(text, where)
    if root is None:
        raise ConfigError("the rules document is empty; it needs 'roles:', a list of rules as in the config", where)
    return _Reader(where).rules_document(root, cfg)


def endpoint_problem(url):
    """Why `url` cannot be an AWS endpoint override (sts_endpoint, ssm_endpoint), or None.

    https only, except to a privileged loopback port (a local stand-in): the replies carry
    credentials and decrypted parameters, which must not cross a network in clear text nor come
    from a user's listener. Credentials, a query or a
    fragment in the URL would be sent (or dropped) by botocore in ways nobody meant, so they are
    refused rather than guessed at.
    """
    if not url.isascii() or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        return "contains spaces, control or non-ASCII characters"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # raises ValueError for a port that is not a number from 0 to 65535
    except ValueError as err:
        return f"is not a valid URL ({err})"
    if parts.scheme.lower() not in ("https", "http"):
        return "must start with https:// (or http:// to a loopback address, for a local stand-in)"
    if "@" in parts.netloc:
        return "must not contain a user name or password (the gatekeeper's keys sign the requests)"
    host = parts.netloc.rsplit(":", 1)[0] if not parts.netloc.endswith("]") else parts.netloc
    if not parts.netloc or not _HOST_RE.fullmatch(host) or port == 0:
        return "names no valid host (and optional port from 1 to 65535)"
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        return "must not have a query (?) or fragment (#)"
    if parts.scheme.lower() == "http":
        try:
            loopback = ipaddress.ip_address(parts.hostname).is_loopback
        except ValueError:
            loopback = parts.hostname == "localhost"
        # A loopback port a user could bind while the stand-in is down would let them read the
        # gatekeeper's signed requests and answer with rules or keys of their choosing; only root
        # can listen below 1024 (the same rule as imds.port and container_port).
        if not loopback or (port or 80) >= 1024:
            return ("must use https (http only to a loopback address on a port below 1024, where no user "
                    "can listen): replies carry credentials and secrets")
    return None


def _compose(text, path):
    """YAML text -> its node tree (None when empty), YAML errors raised located."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        problem = " ".join(p for p in (err.context, err.problem) if p) or "invalid YAML"
        if mark is None:
            raise ConfigError(f"YAML syntax error: {problem}", path) from None
        raise ConfigError(f"YAML syntax error: {problem}", path, mark.line + 1, mark.column + 1) from None
    except yaml.reader.ReaderError as err:
        line = text[:err.position].count("\n") + 1
        column = err.position - (text.rfind("\n", 0, err.position) + 1) + 1
        raise ConfigError(f"YAML error: character {err.character!r} is not allowed in YAML", path, line, column) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"YAML error: {err}", path) from None


class _Reader:
    """Turns a composed YAML node tree into a Config, raising at the first mistake."""

    def __init__(self, path):
        self.path = path
        self._loader = yaml.SafeLoader("")
        self.source = Config.source  # the config's source, read first: it caps session lengths

    # -- located errors and primitive readers ------------------------------------------------

    def fail(self, node, message):
        mark = node.start_mark
        raise ConfigError(message, self.path, mark.line + 1, mark.column + 1)

    @staticmethod
    def mark(key, node):
        return key, node.start_mark.line + 1, node.start_mark.column + 1

    def value(self, node):
        if node.tag == "tag:yaml.org,2002:merge" or (isinstance(node, yaml.MappingNode) and any(
                k.tag == "tag:yaml.org,2002:merge" for k, _ in node.value)):
            self.fail(node, "YAML merge keys (<<) are not supported; write the keys out")
        try:
            return self._loader.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError, AttributeError) as err:
            problem = getattr(err, "problem", None) or str(err)
            self.fail(node, f"cannot read this value ({node.tag}): {problem}")

    def mapping(self, node, what, allowed, required=()):
        """A mapping node -> {key: (key_node, value_node)}, refusing unknown/duplicate/missing keys."""
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, f"{what} must be a mapping of key: value")
        seen = {}
        for key_node, value_node in node.value:
            key = self.value(key_node) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                self.fail(key_node, f"{what}: keys must be plain words")
            if key in seen:
                first = seen[key][0].start_mark.line + 1
                self.fail(key_node, f"{what}: duplicate key '{key}' (first given on line {first})")
            if key not in allowed:
                self.fail(key_node, f"{what}: unknown key '{key}'; allowed: {', '.join(allowed)}")
            seen[key] = (key_node, value_node)
        for key in required:
            if key not in seen:
                self.fail(node, f"{what}: missing required key '{key}'")
        return seen

    def string(self, node, what, pattern=None, hint=""):
        """A scalar taken as written: `user: 007` stays '007', not the number 7."""
        if not isinstance(node, yaml.ScalarNode) or node.tag not in _TEXT_TAGS:
            self.fail(node, f"{what} must be a single text value")
        value = node.value
        if pattern is not None and not pattern.fullmatch(value):
            self.fail(node, f"{what} {value!r} is not valid{hint}")
        return value

    def strings(self, node, what, pattern=None, hint=""):
        """A scalar or a list of scalars -> tuple of strings (a list means 'any of')."""
        if isinstance(node, yaml.SequenceNode):
            if not node.value:
                self.fail(node, f"{what}: an empty list matches nothing; remove the key instead")
            return tuple(self.string(n, what, pattern, hint) for n in node.value)
        return (self.string(node, what, pattern, hint),)

    def duration(self, node, what, low=names.DURATION_MIN, high=names.DURATION_MAX):
        value = self.value(node) if isinstance(node, yaml.ScalarNode) else None
        try:
            seconds = parse_duration(value)
        except ValueError as err:
            self.fail(node, f"{what}: {err}")
        if not low <= seconds <= high:
            self.fail(node, f"{what} is {seconds}s; it must lie between {low}s and {high}s")
        return seconds

    def session_length(self, node, what):
        """session.duration or roles[].duration: STS's 15 min to 12 h, and at most role chaining's
        1 h where the source's keys are a role's (CHAINED_SOURCES; see CHAINED_MAX)."""
        seconds = self.duration(node, what)
        if self.source.kind in CHAINED_SOURCES and seconds > CHAINED_MAX:
            self.fail(node, f"{what} is {seconds}s, but role chaining caps sessions at 1h: source {self.source} "
                            f"gives a role's keys, so STS refuses a longer one at every login; use 1h or less, "
                            f"or a profile:/keyring: source with an IAM user's long-term keys")
        return seconds

    def template(self, node, what):
        text = self.string(node, what)
        problem = names.check_template(text)
        if problem:
            self.fail(node, f"{what}: {problem}")
        return text

    # -- sections ----------------------------------------------------------------------------

    def config(self, root):
        keys = self.mapping(
            root,
            "the config",
            ("version", "region", "source", "runtime_dir", "delivery", "sts_timeout", "sts_endpoint",
             "reap_interval", "imds_allow_users", "session", "refresh", "imds", "container_port",
             "metrics_file", "metrics_interval", "rules_from", "rules_poll", "rules_cache", "ssm_endpoint",
             "roles"),
            required=("version", "region"),
        )
        kw = {"path": self.path, "version": self.version(keys["version"][1])}
        kw["region"] = self.string(keys["region"][1], "region", REGION_RE,
                                   " (expected a region such as us-east-1)")
        if "source" in keys:
            kw["source"] = self.source = self.read_source(keys["source"][1])
        if "runtime_dir" in keys:
            node = keys["runtime_dir"][1]
            runtime_dir = self.string(node, "runtime_dir")
            if not runtime_dir.startswith("/") or os.path.normpath(runtime_dir).replace("//", "/") in _SYSTEM_DIRS:
                self.fail(node, "runtime_dir must be an absolute directory of rolegate's own, such as /run/rolegate")
            kw["runtime_dir"] = os.path.normpath(runtime_dir).replace("//", "/")
            kw["marks"] = kw.get("marks", ()) + (self.mark("runtime_dir", node),)
        if "delivery" in keys:
            node = keys["delivery"][1]
            kw["delivery"] = self.string(node, "delivery")
            if kw["delivery"] not in DELIVERIES:
                self.fail(node, f"delivery {kw['delivery']!r} is unknown; allowed: {', '.join(DELIVERIES)}")
        if "sts_timeout" in keys:
            kw["sts_timeout"] = self.duration(keys["sts_timeout"][1], "sts_timeout", 1, 60)
        if "sts_endpoint" in keys:
            kw["sts_endpoint"] = self.endpoint(keys["sts_endpoint"][1], "sts_endpoint")
        if "reap_interval" in keys:
            kw["reap_interval"] = self.duration(keys["reap_interval"][1], "reap_interval", 1, 3600)
        if "metrics_file" in keys:
            kw["metrics_file"] = self.metrics_file(keys["metrics_file"][1])
        if "metrics_interval" in keys:
            kw["metrics_interval"] = self.duration(keys["metrics_interval"][1], "metrics_interval", 1, 3600)
        self.fleet_keys(keys, kw)
        if "imds_allow_users" in keys:
            node = keys["imds_allow_users"][1]
            kw["imds_allow_users"] = self.strings(node, "imds_allow_users", _USER_RE, " (expected a user name)")
            # Each name located for check_users, which resolves them on the host.
            kw["marks"] = kw.get("marks", ()) + tuple(
                self.mark(f"imds_allow_users[{i}]", n)
                for i, n in enumerate(node.value if isinstance(node, yaml.SequenceNode) else [node]))
        session = self.session(keys["session"][1]) if "session" in keys else SessionSettings()
        kw["session"] = session
        if "refresh" in keys:
            kw["refresh"] = self.refresh(keys["refresh"][1])
        if "imds" in keys:
            kw["imds"] = self.imds(keys["imds"][1])
        if "container_port" in keys:
            kw["container_port"] = self.port(keys["container_port"][1], "container_port")
        if kw.get("imds", ImdsSettings()).port == kw.get("container_port", Config.container_port):
            self.fail(keys.get("container_port", keys.get("imds"))[1], "imds.port and container_port must differ")
        roles_node = keys["roles"][1] if "roles" in keys else None
        kw["roles"] = self.roles(roles_node, session) if roles_node is not None else ()
        cfg = Config(**kw)
        if cfg.imds.mode == "emulate":
            self.check_imds_durations(cfg, keys, roles_node)
        return cfg

    def version(self, node):
        version = self.value(node)
        if type(version) is not int or version not in SUPPORTED_VERSIONS:
            self.fail(node, f"version {version!r} is not supported; this rolegate reads version 1")
        return version

    def roles(self, node, session):
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, "roles must be a list of rules, each '- match: {...}' with a 'role'")
        roles = tuple(self.rule(i + 1, n, session) for i, n in enumerate(node.value))
        self.check_profile_kinds(roles, node)
        return roles

    def rules_document(self, root, cfg):
        """A fleet rules document: its rules checked against `cfg` as if they stood in its `roles`."""
        keys = self.mapping(root, "the rules document", ("version", "roles"), required=("roles",))
        if "version" in keys:
            self.version(keys["version"][1])
        roles_node = keys["roles"][1]
        self.source = cfg.source
        new = dataclasses.replace(cfg, roles=self.roles(roles_node, cfg.session))
        if new.imds.mode == "emulate":
            self.check_imds_durations(new, None, roles_node)
        return new

    def fleet_keys(self, keys, kw):
        """rules_from and the keys that only mean something with it."""
        if "rules_from" in keys:
            if "roles" in keys:
                self.fail(keys["roles"][0], "roles and rules_from exclude each other: with rules_from the rules "
                                            "come from the parameter's rules document; move this list there")
            kw["rules_from"] = self.rules_from(keys["rules_from"][1])
        else:
            for key in ("rules_poll", "rules_cache", "ssm_endpoint"):
                if key in keys:
                    self.fail(keys[key][0], f"{key} applies only with rules_from (fleet rules from SSM)")
        if "rules_poll" in keys:
            kw["rules_poll"] = self.duration(keys["rules_poll"][1], "rules_poll", RULES_POLL_MIN, RULES_POLL_MAX)
        if "rules_cache" in keys:
            kw["rules_cache"] = self.absolute_file(keys["rules_cache"][1], "rules_cache", "/var/lib/rolegate/rules.yaml")
            kw["marks"] = kw.get("marks", ()) + (self.mark("rules_cache", keys["rules_cache"][1]),)
            if self.path.startswith("/") and os.path.realpath(kw["rules_cache"]) == os.path.realpath(self.path):
                self.fail(keys["rules_cache"][1], "rules_cache must not be the config file itself: the broker "
                                                  "rewrites it with every new version of the rules")
        if "ssm_endpoint" in keys:
            kw["ssm_endpoint"] = self.endpoint(keys["ssm_endpoint"][1], "ssm_endpoint")

    def rules_from(self, node):
        text = self.string(node, "rules_from")
        scheme, sep, name = text.partition(":")
        if not sep or scheme != "ssm":
            self.fail(node, f"rules_from {text!r} is unknown; allowed: {', '.join(RULES_SCHEMES)} "
                            f"(a Parameter Store parameter, such as ssm:/rolegate/rules)")
        if not SSM_NAME_RE.fullmatch(name):
            self.fail(node, f"rules_from: {name!r} is not a fully qualified parameter name: a leading /, then "
                            f"names of A-Z a-z 0-9 _ . - separated by /, such as /rolegate/rules")
        if len(name) > SSM_NAME_MAX:
            self.fail(node, f"rules_from: the parameter name has {len(name)} characters; SSM allows {SSM_NAME_MAX}")
        levels = name.count("/")
        if levels > SSM_LEVELS_MAX:
            self.fail(node, f"rules_from: the parameter name has {levels} levels; SSM allows {SSM_LEVELS_MAX}")
        if name[1:4].lower() in ("aws", "ssm"):
            self.fail(node, "rules_from: names beginning with 'aws' or 'ssm' are reserved by AWS; choose "
                            "another, such as /rolegate/rules")
        return text

    def absolute_file(self, node, what, example):
        text = self.string(node, what)
        if not text.startswith("/") or text.endswith("/") or "\0" in text:
            self.fail(node, f"{what} must be an absolute file path, such as {example}")
        return os.path.normpath(text).replace("//", "/")

    def check_imds_durations(self, cfg, keys, roles_node):
        """Every rule IMDS requests can match hands out sessions long enough for IMDS (see above).
        `keys` is None for a fleet rules document, whose session.duration is the config's."""
        for rule in cfg.roles:
            if rule.profile is not None or (rule.match.services and IMDS_SERVICE not in rule.match.services):
                continue  # IMDS serves the default only: a named profile is never its answer
            duration = cfg.duration_for(rule)
            if duration >= IMDS_MIN_DURATION:
                continue
            if rule.duration is not None:
                where = next(v for k, v in roles_node.value[rule.index - 1].value if k.value == "duration")
                which = f"roles[{rule.index}].duration"
            elif keys is None:
                where = roles_node.value[rule.index - 1]
                which = f"session.duration in {cfg.path}"
            else:
                where = keys["session"][1] if "session" in keys else keys["imds"][1]
                which = "session.duration"
            self.fail(where, f"imds.mode emulate needs sessions of at least {IMDS_MIN_DURATION // 60}m for the "
                             f"roles IMDS hands out, but roles[{rule.index}] gets {duration}s ({which}): SDKs "
                             f"stretch IMDS credentials with under 20 minutes left past their expiry; lengthen "
                             f"it, or restrict that rule to other services")

    def read_source(self, node):
        text = self.string(node, "source")
        if text == "instance-profile":
            return Source("instance-profile")
        kind, _, name = text.partition(":")
        if kind in ("profile", "keyring") and name:
            return Source(kind, name)
        self.fail(node, f"source {text!r} is unknown; allowed: {', '.join(SOURCES)}")

    def session(self, node):
        keys = self.mapping(node, "session", ("duration", "refresh_before", "name", "source_identity", "tags",
                                              "linger"))
        defaults = SessionSettings()
        duration = self.session_length(keys["duration"][1], "session.duration") if "duration" in keys \
            else defaults.duration
        # Unset, refresh_before is 20 minutes, or a third of a shorter session.
        refresh_before = min(defaults.refresh_before, duration // 3)
        if "refresh_before" in keys:
            rb_node = keys["refresh_before"][1]
            refresh_before = self.duration(rb_node, "session.refresh_before", 0, names.DURATION_MAX)
            if refresh_before >= duration:
                self.fail(rb_node, f"session.refresh_before ({refresh_before}s) must be shorter than "
                                   f"session.duration ({duration}s)")
            if duration - refresh_before < MIN_REFRESH_INTERVAL:
                self.fail(rb_node, f"session.refresh_before ({refresh_before}s) leaves {duration - refresh_before}s "
                                   f"between refreshes of a {duration}s session: every grant would be re-assumed "
                                   f"that often for as long as it lives; leave at least {MIN_REFRESH_INTERVAL}s "
                                   f"(refresh_before at most {duration - MIN_REFRESH_INTERVAL}s)")
        kw = {"duration": duration, "refresh_before": refresh_before}
        for key in ("name", "source_identity"):
            if key in keys:
                kw[key] = self.template(keys[key][1], f"session.{key}")
        if "tags" in keys:
            kw["tags"] = self.tags(keys["tags"][1])
        if "linger" in keys:
            kw["linger"] = self.duration(keys["linger"][1], "session.linger", 0, names.DURATION_MAX)
        return SessionSettings(**kw)

    def metrics_file(self, node):
        # node_exporter's textfile collector reads only *.prom files of its directory: any other
        # name would be written and silently never scraped.
        path = self.absolute_file(node, "metrics_file", "/var/lib/prometheus/node-exporter/rolegate.prom")
        text = self.string(node, "metrics_file")
        if not path.endswith(".prom") or path.endswith("/.prom"):
            self.fail(node, f"metrics_file {text!r} must end in .prom: node_exporter's textfile collector "
                            f"reads no other files")
        return path

    def endpoint(self, node, what):
        """An endpoint URL override (sts_endpoint, ssm_endpoint), kept as written; see endpoint_problem."""
        text = self.string(node, what)
        problem = endpoint_problem(text)
        if problem:
            self.fail(node, f"{what} {text!r} {problem}; expected a URL such as "
                            f"{ENDPOINT_EXAMPLES[what]} (a VPC endpoint's DNS name works too)")
        return text

    def port(self, node, what):
        # Privileged ports only: while the broker is down, a user could otherwise listen on the
        # port and answer other users' credential requests with keys of their own choosing.
        value = self.value(node)
        if type(value) is not int or not 1 <= value <= 1023:
            self.fail(node, f"{what} {value!r} must be a TCP port from 1 to 1023 (only root can listen "
                            f"there, so no user can stand in for the broker)")
        return value

    def imds(self, node):
        keys = self.mapping(node, "imds", ("mode", "v1", "port"))
        kw = {}
        if "mode" in keys:
            kw["mode"] = self.string(keys["mode"][1], "imds.mode")
            if kw["mode"] not in IMDS_MODES:
                self.fail(keys["mode"][1], f"imds.mode {kw['mode']!r} is unknown; allowed: {', '.join(IMDS_MODES)}")
        if "v1" in keys:
            v1 = self.value(keys["v1"][1])
            if type(v1) is not bool:
                self.fail(keys["v1"][1], f"imds.v1 {v1!r} must be true or false")
            kw["v1"] = v1
        if "port" in keys:
            kw["port"] = self.port(keys["port"][1], "imds.port")
        return ImdsSettings(**kw)

    def refresh(self, node):
        keys = self.mapping(node, "refresh", ("workers", "rate"))
        kw = {}
        if "workers" in keys:
            workers = self.value(keys["workers"][1])
            if type(workers) is not int or not 1 <= workers <= 64:
                self.fail(keys["workers"][1], f"refresh.workers {workers!r} must be a whole number from 1 to 64")
            kw["workers"] = workers
        if "rate" in keys:
            rate = self.value(keys["rate"][1])
            if type(rate) not in (int, float) or not 0.1 <= rate <= 1000:
                self.fail(keys["rate"][1], f"refresh.rate {rate!r} must be a number of STS calls per second "
                                           f"from 0.1 to 1000")
            kw["rate"] = float(rate)
        return RefreshSettings(**kw)

    def tags(self, node):
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, "session.tags must be a mapping of tag key: value template")
        if len(node.value) > names.TAGS_MAX:
            self.fail(node, f"session.tags has {len(node.value)} tags; STS allows at most {names.TAGS_MAX}")
        tags, seen = [], set()
        for key_node, value_node in node.value:
            key = self.string(key_node, "session tag key")
            if key in seen:
                self.fail(key_node, f"session.tags: duplicate key '{key}'")
            seen.add(key)
            problem = names.tag_key_problem(key)
            if problem:
                self.fail(key_node, f"session tag {key!r}: {problem}")
            if key.lower() in (names.ELEVATED_TAG, names.REASON_TAG):
                self.fail(key_node, f"session tag {key!r} is rolegate's own: elevations set it (see "
                                    f"docs/profiles-and-elevation.md, \"Elevation on demand\"); use another key")
            tags.append((key, self.template(value_node, f"session tag {key!r}")))
        return tuple(tags)

    def rule(self, index, node, session):
        what = f"roles[{index}]"
        keys = self.mapping(node, what, ("match", "role", "profile", "elevate", "duration", "external_id",
                                         "policy_arns"), required=("match", "role"))
        match = self.match(keys["match"][1], what)
        role = self.string(keys["role"][1], f"{what}.role", ROLE_ARN_RE,
                           " (expected arn:aws:iam::123456789012:role/NAME)")
        kw = {"index": index, "line": node.start_mark.line + 1, "match": match, "role": role}
        if "profile" in keys:
            kw["profile"] = self.string(keys["profile"][1], f"{what}.profile", PROFILE_RE,
                                        " (1-64 of A-Z a-z 0-9 _.-, starting with a letter or digit)")
            if kw["profile"] == "default":
                self.fail(keys["profile"][1], f"{what}.profile: 'default' is the profile a rule without "
                                              f"'profile' gives; leave the key out")
        if "elevate" in keys:
            if "profile" not in keys:
                self.fail(keys["elevate"][0], f"{what}.elevate needs a 'profile': an elevation is a named profile "
                                              f"a login does not get by itself (rolegate elevate PROFILE)")
            kw["elevate"] = self.elevate(keys["elevate"][1], f"{what}.elevate", session)
        if "duration" in keys:
            kw["duration"] = self.session_length(keys["duration"][1], f"{what}.duration")
            if session.refresh_before >= kw["duration"]:
                self.fail(keys["duration"][1], f"{what}.duration ({kw['duration']}s) must be longer than "
                                               f"session.refresh_before ({session.refresh_before}s)")
            if kw["duration"] - session.refresh_before < MIN_REFRESH_INTERVAL:
                self.fail(keys["duration"][1], f"{what}.duration ({kw['duration']}s) leaves "
                                               f"{kw['duration'] - session.refresh_before}s between refreshes with "
                                               f"session.refresh_before {session.refresh_before}s; leave at least "
                                               f"{MIN_REFRESH_INTERVAL}s")
        if "external_id" in keys:
            kw["external_id"] = self.string(keys["external_id"][1], f"{what}.external_id", names.EXTERNAL_ID_RE,
                                            " (2-1224 of A-Z a-z 0-9 _+=,.@:/-)")
        if "policy_arns" in keys:
            arns = self.strings(keys["policy_arns"][1], f"{what}.policy_arns", POLICY_ARN_RE,
                                " (expected arn:aws:iam::aws:policy/NAME or arn:aws:iam::ACCOUNT:policy/NAME)")
            if len(arns) > names.POLICY_ARNS_MAX:
                self.fail(keys["policy_arns"][1], f"{what}.policy_arns has {len(arns)} ARNs; "
                                                  f"STS allows at most {names.POLICY_ARNS_MAX}")
            kw["policy_arns"] = arns
        return Rule(**kw)

    def elevate(self, node, what, session):
        keys = self.mapping(node, what, ("reason", "max", "approvers"))
        kw = {}
        if "reason" in keys:
            kw["reason"] = self.string(keys["reason"][1], f"{what}.reason")
            if kw["reason"] not in REASON_MODES:
                self.fail(keys["reason"][1], f"{what}.reason must be one of {', '.join(REASON_MODES)}")
        if "max" in keys:
            kw["max"] = self.duration(keys["max"][1], f"{what}.max", ELEVATE_MIN, ELEVATE_MAX)
        if "approvers" in keys:
            kw["approvers"] = self.string(keys["approvers"][1], f"{what}.approvers", _USER_RE, " (expected a group name)")
        if len(session.tags) + ELEVATION_TAGS > names.TAGS_MAX:
            self.fail(node, f"{what}: an elevation adds {ELEVATION_TAGS} session tags to session.tags' "
                            f"{len(session.tags)}; STS allows {names.TAGS_MAX} in all")
        return Elevate(**kw)

    def check_profile_kinds(self, roles, roles_node):
        """A profile name is either on demand (elevate) or given at login, never both: `aws
        --profile NAME` must not mean a standing role for some and an elevation for others."""
        kinds = {}
        for rule in roles:
            if rule.profile is None:
                continue
            kind = rule.elevate is not None
            first = kinds.setdefault(rule.profile, (kind, rule.index))
            if first[0] != kind:
                where = next(v for k, v in roles_node.value[rule.index - 1].value if k.value == "profile")
                self.fail(where, f"roles[{rule.index}].profile {rule.profile!r} is "
                                 f"{'on demand' if kind else 'given at login'} here but "
                                 f"{'on demand' if first[0] else 'given at login'} in roles[{first[1]}]; "
                                 f"use another name for one of them")

    def match(self, node, what):
        keys = self.mapping(node, f"{what}.match", ("user", "group", "service", "target"))
        fields = {}
        for key, attr in (("user", "users"), ("group", "groups"), ("service", "services"), ("target", "targets")):
            if key in keys:
                fields[attr] = self.strings(keys[key][1], f"{what}.match.{key}", _USER_RE,
                                            f" (expected a {key} name)")
        return Match(**fields)
