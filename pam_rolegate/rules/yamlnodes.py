"""Reading YAML nodes into located values: the compose step, the primitive readers every section
uses (text, lists, durations, ports, paths, endpoint URLs), each mistake raised as FILE:LINE:COL.

We walk PyYAML's node tree (yaml.compose) instead of loading plain dicts, because only nodes
carry positions, and because a plain load silently keeps the last of two duplicate keys.
"""

import ipaddress
import os
import re
import urllib.parse

import yaml

from . import names
from .settings import CHAINED_MAX, CHAINED_SOURCES, Config
from ..errors import ConfigError

_DURATION_RE = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", re.ASCII)
USER_RE = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.@-]*\$?", re.ASCII)
# An endpoint URL's host: a DNS name or an IPv4 address, or an IPv6 address in brackets.
_HOST_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*\.?|\[[0-9A-Fa-f:.]+\]",
                      re.ASCII)
ENDPOINT_EXAMPLES = {"sts_endpoint": "https://sts.us-east-1.amazonaws.com",
                     "ssm_endpoint": "https://ssm.us-east-1.amazonaws.com"}
_TEXT_TAGS = ("tag:yaml.org,2002:str", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")


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


def compose(text, path):
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


class NodeReader:
    """The primitive readers of a composed YAML node tree, each raising at the first mistake."""

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

    def absolute_file(self, node, what, example):
        text = self.string(node, what)
        if not text.startswith("/") or text.endswith("/") or "\0" in text:
            self.fail(node, f"{what} must be an absolute file path, such as {example}")
        return os.path.normpath(text).replace("//", "/")

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
