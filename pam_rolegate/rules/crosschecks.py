"""The checks that span sections: a rule read alone is valid, but with imds.mode, session.duration
or another rule's profile it may not be. Each takes the reader whose `fail` locates the mistake."""

from .settings import IMDS_MIN_DURATION, IMDS_SERVICE


def imds_durations(reader, cfg, keys, roles_node):
    """Every rule IMDS requests can match hands out sessions long enough for IMDS (settings.IMDS_MIN_DURATION).
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
        reader.fail(where, f"imds.mode emulate needs sessions of at least {IMDS_MIN_DURATION // 60}m for the "
                           f"roles IMDS hands out, but roles[{rule.index}] gets {duration}s ({which}): SDKs "
                           f"stretch IMDS credentials with under 20 minutes left past their expiry; lengthen "
                           f"it, or restrict that rule to other services")


def profile_kinds(reader, roles, roles_node):
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
            reader.fail(where, f"roles[{rule.index}].profile {rule.profile!r} is "
                               f"{'on demand' if kind else 'given at login'} here but "
                               f"{'on demand' if first[0] else 'given at login'} in roles[{first[1]}]; "
                               f"use another name for one of them")
