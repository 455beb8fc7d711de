"""Reading `roles`: each rule, its match and its elevate (the same reader serves a fleet rules
document's `roles`)."""

import re

import yaml

from . import crosschecks, names
from .settings import (ELEVATE_MAX, ELEVATE_MIN, ELEVATION_TAGS, MIN_REFRESH_INTERVAL, REASON_MODES, Elevate,
                       Match, Rule)
from .yamlnodes import USER_RE, NodeReader

# re.ASCII everywhere: \d and \w must not accept other scripts' digits and letters.
ROLE_ARN_RE = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:role/([\w+=,.@-]+/)*[\w+=,.@-]{1,64}", re.ASCII)
POLICY_ARN_RE = re.compile(r"arn:aws[a-z-]*:iam::(\d{12}|aws):policy/([\w+=,.@-]+/)*[\w+=,.@-]{1,128}", re.ASCII)
# A profile name lands in an INI section header and in a credential_process command line: no
# spaces, brackets or shell characters, whatever a YAML string allows.
PROFILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", re.ASCII)


class RolesReader(NodeReader):
    """A NodeReader that also reads `roles`."""

    def roles(self, node, session):
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, "roles must be a list of rules, each '- match: {...}' with a 'role'")
        roles = tuple(self.rule(i + 1, n, session) for i, n in enumerate(node.value))
        crosschecks.profile_kinds(self, roles, node)
        return roles

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
            kw["approvers"] = self.string(keys["approvers"][1], f"{what}.approvers", USER_RE, " (expected a group name)")
        if len(session.tags) + ELEVATION_TAGS > names.TAGS_MAX:
            self.fail(node, f"{what}: an elevation adds {ELEVATION_TAGS} session tags to session.tags' "
                            f"{len(session.tags)}; STS allows {names.TAGS_MAX} in all")
        return Elevate(**kw)

    def match(self, node, what):
        keys = self.mapping(node, f"{what}.match", ("user", "group", "service", "target"))
        fields = {}
        for key, attr in (("user", "users"), ("group", "groups"), ("service", "services"), ("target", "targets")):
            if key in keys:
                fields[attr] = self.strings(keys[key][1], f"{what}.match.{key}", USER_RE,
                                            f" (expected a {key} name)")
        return Match(**fields)
