"""The configuration file's front door: load and parse a config or a fleet rules document, and the
names callers use (the values live in settings, the readers in yamlnodes, toplevel and roles).

A config is YAML in, frozen dataclasses out, every mistake refused as FILE:LINE:COL.
"""

import os

from ..errors import ConfigError
from .settings import (  # noqa: F401 (re-exported: callers name them config.X)
    CONFIG_ENV, DEFAULT_PATH, ELEVATE_MIN, IMDS_SERVICE, MIN_REFRESH_INTERVAL, Config, Elevate, Match, Rule, Source)
from .roles import PROFILE_RE  # noqa: F401
from .toplevel import ConfigReader
from .yamlnodes import compose, endpoint_problem, parse_duration  # noqa: F401


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
    root = compose(text, path)
    if root is None:
        raise ConfigError("the config is empty; it needs at least 'version: 1' and 'region'", path)
    return ConfigReader(path).config(root)


def parse_rules(text, where, cfg):
    """A fleet rules document (rules_from's parameter, or its cached copy) -> `cfg` with those rules.

    The document is `version: 1` (optional) and `roles:`, read by the same code as a config's own
    `roles`, with every mistake located as WHERE:LINE:COL (WHERE is ssm:/NAME or the cache file).
    """
    root = compose(text, where)
    if root is None:
        raise ConfigError("the rules document is empty; it needs 'roles:', a list of rules as in the config", where)
    return ConfigReader(where).rules_document(root, cfg)
