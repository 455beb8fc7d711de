"""What every run_<verb>(args, deps) is given and shares: Deps (its reach outside itself), failure
reported by the exit-code table, the config and its rules loaded, the STS engine, a call to the broker."""

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Mapping, TextIO

from ..errors import ConfigError, RolegateError


@dataclass(frozen=True)
class Deps:
    """What the verbs reach outside themselves; tests pass their own."""

    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)
    stdin: TextIO = field(default_factory=lambda: sys.stdin)  # where PAM's questions are answered
    engine_factory: Callable = None  # config -> sts.StsEngine; None means the real one

    def say(self, text=""):
        print(text, file=self.out)

    def warn(self, text):
        print(f"rolegate: {text}", file=self.err)


def report_failure(args, deps, message, code):
    """Report a failure: on stderr, and with --json also as the one JSON object on stdout."""
    deps.warn(message)
    if getattr(args, "json", False):
        deps.say(json.dumps({"error": message, "exit_code": code}, indent=2))
    return code


def load_config(args, deps):
    from ..rules import config

    return config.load(config.config_path(getattr(args, "config", None), deps.environ))


def load_rules(args, deps):
    """The config with its rules. With rules_from they are the parameter's: from `--rules FILE` (a
    copy of the rules document), else the broker's last good copy (readable by root only)."""
    from ..rules import config
    from ..backends import fleet

    cfg = load_config(args, deps)
    if cfg.rules_from is None:
        return cfg
    if getattr(args, "rules", None):
        try:
            with open(args.rules, encoding="utf-8") as fh:
                return config.parse_rules(fh.read(), args.rules, cfg)
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot read the rules document: {err}", args.rules) from None
    try:
        doc = fleet.read_cache(cfg)
    except (OSError, RolegateError) as err:
        doc, why = None, str(err)
    else:
        why = f"there is no last good copy at {cfg.rules_cache} yet"
    if doc is None:
        raise RolegateError(f"the rules come from {cfg.rules_from} and {why}; pass --rules FILE (the rules "
                            f"document), or run this as root where rolegated has read the parameter")
    return doc.rules_for(cfg)


def sts_engine(cfg, deps):
    if deps.engine_factory is not None:
        return deps.engine_factory(cfg)
    from ..backends import sts

    return sts.StsEngine.from_config(cfg)


def broker_call(request, deps, timeout=5.0):
    from ..hookside import client, protocol

    reply = client.call(request, path=client.socket_path(environ=deps.environ), timeout=timeout)
    if isinstance(reply, protocol.ErrorReply):
        raise BrokerRefused(reply.code, reply.message)
    return reply


class BrokerRefused(RolegateError):
    """The broker answered with an error reply; `refusal` is its code (exitcodes.BROKER_REFUSAL)."""

    def __init__(self, code, message):
        self.refusal = code
        super().__init__(message)


def session_grant(environ, runtime_dir=None):
    """The grant id this environment's rolegate variables point at (RUNTIME_DIR/grants/ID/FILE), or
    None. Without runtime_dir, any .../grants/ID/FILE (the broker checks whose it is anyway)."""
    from ..hookside import protocol

    for var in protocol.POINTER_VARS:
        path = environ.get(var, "")
        if runtime_dir is not None:
            prefix = runtime_dir.rstrip("/") + "/grants/"
            if path.startswith(prefix):
                return path[len(prefix):].split("/", 1)[0] or None
        elif "/grants/" in path:
            parts = path.rsplit("/grants/", 1)[1].split("/")
            if len(parts) == 2 and parts[0]:
                return parts[0]
    return None
