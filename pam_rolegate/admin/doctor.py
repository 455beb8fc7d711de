"""`rolegate doctor`: every check of an installation, each a small object with a name, a verdict and the fix.

A closed registry (CHECKS): a root process loads no check from anywhere else.
"""

from .doctor_common import FAIL, PASS, WARN, Result  # noqa: F401 (callers read doctor.FAIL ...)
from .doctor_imds import check_imds, check_imds_audit, check_imds_rule, root_only  # noqa: F401 (doctor.root_only)
from .doctor_pam import check_elevation, check_pam_python, check_pam_stacks, check_profile, check_secure_path
from .doctor_service import (check_broker, check_config, check_door_share, check_fleet_rules, check_gatekeeper,
                             check_runtime_dir, check_ssm_user)


CHECKS = (check_config, check_pam_python, check_pam_stacks, check_secure_path, check_profile, check_elevation,
          check_runtime_dir, check_broker, check_imds, check_imds_rule, check_imds_audit, check_ssm_user, check_door_share,
          check_gatekeeper, check_fleet_rules)


def run_all(config_path, assume=False):
    ctx = {"config_path": config_path, "assume": assume}
    results = []
    for check in CHECKS:
        try:
            results += check(ctx)
        except Exception as err:  # a broken check is a failed check, not a crashed doctor
            results.append(Result(check.__name__[6:].replace("_", "-"), FAIL, f"the check itself failed: {err}"))
    return results
