"""The config's values: the frozen dataclasses a config file becomes (Config, Rule, Match, ...) and
the limits the readers hold them to; no parsing here (see yamlnodes, toplevel, roles)."""

import re
from dataclasses import dataclass, field
from typing import Optional, Tuple

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
    # (key, line, column) of keys whose checks need the filesystem (hostcheck.check_paths), so that what
    # the broker would refuse at start is located in the file like any other mistake.
    marks: Tuple[Tuple[str, int, int], ...] = field(default=(), compare=False, repr=False)

    def duration_for(self, rule):
        return rule.duration or self.session.duration

    @property
    def rules_parameter(self):
        """rules_from's parameter name (/rolegate/rules), or None."""
        return self.rules_from[len("ssm:"):] if self.rules_from else None

