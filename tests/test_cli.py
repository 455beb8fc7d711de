"""CLI verbs called directly as run_<verb>(args, deps), with real config files and the real moto server."""

import io
import json

from pam_rolegate.admin import cli

CONFIG = """version: 1
region: us-east-1
roles:
  - match: {user: root}
    role: arn:aws:iam::123456789012:role/root-role
  - match: {group: nosuchgroup-xyz}
    role: arn:aws:iam::123456789012:role/other
    external_id: ext-123
"""


def call(argv, environ=None):
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(argv, cli.Deps(out=out, err=err, environ=environ or {}))
    return code, out.getvalue(), err.getvalue()


def test_cli__check_config_ok_and_located_error(write_config):
    code, out, _ = call(["check-config", write_config(CONFIG)])
    assert code == 0 and "OK (2 rules" in out, f"valid config: {code} {out}"
    bad = write_config(CONFIG.replace("roles:", "rols:"), "bad.yaml")
    code, out, _ = call(["check-config", bad])
    assert code == 1 and out.startswith(f"{bad}:3:1: ") and "unknown key 'rols'" in out, f"bad config: {code} {out}"


def test_cli__check_user_explains_and_assumes(moto, write_config):
    path = write_config(CONFIG)
    code, out, _ = call(["--config", path, "check-user", "root"])
    assert code == 0 and "rule 1 (line 4) matches" in out and "role/root-role" in out, out
    code, out, err = call(["--config", path, "check-user", "root", "--assume"])
    assert code == 0, f"--assume failed: {err}"
    assert "assumed:   arn:aws:sts::123456789012:assumed-role/root-role/root@" in out, out
    assert "secret" not in out.lower(), "check-user printed a secret"


def test_cli__check_user_without_a_rule_says_why(write_config):
    path = write_config(CONFIG.replace("user: root", "user: nobody-else"))
    code, out, _ = call(["--config", path, "check-user", "root"])
    assert code == 1 and "no rule matches" in out and "user root is not nobody-else" in out, out


PROFILES = CONFIG + """  - match: {user: root}
    profile: deploy
    role: arn:aws:iam::123456789012:role/deploy-role
  - match: {user: nobody-else}
    profile: data
    role: arn:aws:iam::123456789012:role/data-role
"""


def test_cli__check_user_shows_every_named_profile_and_assumes_each(moto, write_config):
    path = write_config(PROFILES)
    code, out, _ = call(["--config", path, "check-user", "root"])
    assert code == 0 and "profile:   deploy = arn:aws:iam::123456789012:role/deploy-role (rule 3, line 9)" in out, out
    assert "data" not in out, f"a profile whose rule does not match root was shown:\n{out}"
    code, out, err = call(["--config", path, "check-user", "root", "--assume"])
    assert code == 0, f"--assume failed: {err}"
    for role in ("root-role", "deploy-role"):
        assert f"assumed:   arn:aws:sts::123456789012:assumed-role/{role}/root@" in out, f"{role} not assumed:\n{out}"
    code, out, _ = call(["--config", path, "policy"])
    roles = json.loads(out)["gatekeeper_policy"]["Statement"][0]["Resource"]
    assert {"arn:aws:iam::123456789012:role/deploy-role", "arn:aws:iam::123456789012:role/data-role"} <= set(roles), \
        f"the policy must cover named profiles' roles too: {roles}"


def test_cli__policy_lists_exactly_the_configured_roles(write_config):
    code, out, _ = call(["--config", write_config(CONFIG), "policy", "--gatekeeper", "arn:aws:iam::1:role/gk"])
    docs = json.loads(out)
    stmt = docs["gatekeeper_policy"]["Statement"][0]
    assert sorted(stmt["Resource"]) == ["arn:aws:iam::123456789012:role/other", "arn:aws:iam::123456789012:role/root-role"]
    assert set(stmt["Action"]) == {"sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity"}, stmt
    trust = docs["trust_policies"]["arn:aws:iam::123456789012:role/other"]["Statement"][0]
    assert trust["Principal"] == {"AWS": "arn:aws:iam::1:role/gk"}, trust
    assert trust["Condition"]["StringEquals"] == {"sts:ExternalId": "ext-123"}, trust


def test_cli__env_output_quotes_for_each_shell():
    lines = cli.shell_lines({"AWS_REGION": "it's"}, ["AWS_ACCESS_KEY_ID"], "sh")
    assert lines == ["unset AWS_ACCESS_KEY_ID", "export AWS_REGION='it'\\''s'"], lines
    assert cli.shell_lines({"A": "x"}, ["B"], "csh") == ["unsetenv B", "setenv A 'x'"]
    assert cli.shell_lines({"A": "x"}, ["B"], "fish") == ["set -e B", "set -gx A 'x'"]
