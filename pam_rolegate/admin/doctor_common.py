"""What every `rolegate doctor` check shares: its Result (a name, a verdict and the fix), the three
verdicts, and the rules in force (the file's own, or fleet rules' last good copy)."""

from dataclasses import dataclass

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"


@dataclass(frozen=True)
class Result:
    name: str
    verdict: str
    detail: str
    fix: str = ""


def rules_in_force(cfg):
    """The config whose rules the broker serves: the file's own, or with rules_from the last good
    copy of the parameter (None when there is none yet)."""
    if cfg.rules_from is None:
        return cfg
    from ..backends import fleet

    try:
        doc = fleet.read_cache(cfg)
    except Exception:  # check_fleet_rules reports an unreadable copy
        return None
    return doc.rules_for(cfg) if doc is not None else None
