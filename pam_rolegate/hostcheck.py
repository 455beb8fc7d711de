"""A config checked against this host (its directories by the store's own safe walk, its user names
by the firewall's own lookup): a module outside rules/, which only reads text, and backends/, which
it asks, so the broker, check-config, doctor and the firewall share one check and rules/ imports
nothing from backends/.
"""

import os

from .backends import firewall, store
from .errors import ConfigError, StoreError
from .rules.settings import Config


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
