"""Reading the config's top level and its sections (session, refresh, imds, the fleet keys), and a
fleet rules document against the config it serves."""

import dataclasses
import os
import re

import yaml

from . import crosschecks, names
from .settings import (DELIVERIES, IMDS_MODES, MIN_REFRESH_INTERVAL, RULES_POLL_MAX, RULES_POLL_MIN,
                       RULES_SCHEMES, SOURCES, SSM_LEVELS_MAX, SSM_NAME_MAX, SSM_NAME_RE, SUPPORTED_VERSIONS,
                       Config, ImdsSettings, RefreshSettings, SessionSettings, Source)
from .roles import RolesReader
from .yamlnodes import USER_RE

REGION_RE = re.compile(r"[a-z]{2}(-[a-z]+)+-\d+", re.ASCII)
# Directories the broker would hide under a tmpfs mount, or share with others.
_SYSTEM_DIRS = frozenset({"/", "/run", "/var/run", "/tmp", "/var/tmp", "/dev", "/dev/shm", "/etc", "/var", "/usr",
                          "/home", "/root", "/boot", "/proc", "/sys", "/opt", "/srv", "/bin", "/sbin", "/lib"})


class ConfigReader(RolesReader):
    """Turns a composed YAML node tree into a Config, raising at the first mistake."""

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
            kw["imds_allow_users"] = self.strings(node, "imds_allow_users", USER_RE, " (expected a user name)")
            # Each name located for hostcheck.check_users, which resolves them on the host.
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
            crosschecks.imds_durations(self, cfg, keys, roles_node)
        return cfg

    def version(self, node):
        version = self.value(node)
        if type(version) is not int or version not in SUPPORTED_VERSIONS:
            self.fail(node, f"version {version!r} is not supported; this rolegate reads version 1")
        return version

    def rules_document(self, root, cfg):
        """A fleet rules document: its rules checked against `cfg` as if they stood in its `roles`."""
        keys = self.mapping(root, "the rules document", ("version", "roles"), required=("roles",))
        if "version" in keys:
            self.version(keys["version"][1])
        roles_node = keys["roles"][1]
        self.source = cfg.source
        new = dataclasses.replace(cfg, roles=self.roles(roles_node, cfg.session))
        if new.imds.mode == "emulate":
            crosschecks.imds_durations(self, new, None, roles_node)
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
