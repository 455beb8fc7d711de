"""The README is the contract: every config key and every command it does not name is a bug.

The keys are asked of the real config parser (its "unknown key; allowed: ..." refusal for each
section), the commands of the real argument parser, so a key or command added without a README
line fails here.
"""

import os
import re

import pytest

from pam_rolegate.admin import cli
from pam_rolegate.rules import config
from pam_rolegate.errors import ConfigError

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
BASE = "version: 1\nregion: us-east-1\n"
# Each section of the config, and a document that puts an unknown key into it.
SECTIONS = {
    "": BASE + "zz_unknown: 1\n",
    "session.": BASE + "session: {zz_unknown: 1}\n",
    "refresh.": BASE + "refresh: {zz_unknown: 1}\n",
    "imds.": BASE + "imds: {zz_unknown: 1}\n",
    "roles[].": BASE + "roles: [{zz_unknown: 1}]\n",
}


def _readme():
    with open(README, encoding="utf-8") as fh:
        return fh.read()


def _allowed(document):
    with pytest.raises(ConfigError) as caught:
        config.parse(document)
    text = str(caught.value)
    assert "allowed: " in text, f"the parser's refusal no longer lists the allowed keys: {text}"
    return [k.strip() for k in text.split("allowed: ", 1)[1].split(",")]


@pytest.mark.parametrize("prefix", list(SECTIONS))
def test_every_config_key_has_a_row_in_the_readme_table(prefix):
    text = _readme()
    table = text[text.index("## Configuration"):]
    rows = {m.group(1) for m in re.finditer(r"^\| `([^`]+)` \|", table, re.M)}
    # A section (session, imds, ...) is documented by the rows of its keys.
    missing = [prefix + key for key in _allowed(SECTIONS[prefix])
               if prefix + key not in rows and not any(r.startswith(prefix + key + ".") for r in rows)]
    assert not missing, f"config keys with no row in the README's Configuration table: {missing}"


def test_every_command_is_in_the_readme_commands_table():
    text = _readme()
    table = text[text.index("## Commands"):]
    table = table[:table.index("\n## ", 1)]
    sub = next(a for a in cli.parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    missing = [verb for verb in sub.choices if not re.search(rf"`(rolegate {re.escape(verb)}\b|{re.escape(verb)}`)", table)]
    assert not missing, f"commands with no line in the README's Commands table: {missing}"


def _block_after(heading, language):
    text = _readme()
    section = text[text.index(heading):]
    start = section.index(f"```{language}\n") + len(language) + 4
    return section[start:section.index("```", start)]


def test_the_cloud_init_example_is_cloud_config_whose_rolegate_config_is_valid():
    """An admin pastes it as user data: it must be cloud-config YAML, install the package, and
    write a config the broker accepts (rules_from included)."""
    import yaml

    text = _block_after("### A fleet with cloud-init", "yaml")
    assert text.startswith("#cloud-config\n"), "cloud-init ignores user data that does not start with #cloud-config"
    doc = yaml.safe_load(text)
    assert "rolegate" in doc.get("packages", []), f"the example does not install the package: {doc.get('packages')}"
    files = {f["path"]: f for f in doc.get("write_files", [])}
    written = files.get(config.DEFAULT_PATH)
    assert written, f"the example writes no {config.DEFAULT_PATH}: {list(files)}"
    cfg = config.parse(written["content"], "README cloud-init example")
    assert cfg.rules_from and not cfg.roles, "the fleet example should take its rules from Parameter Store"
    assert written.get("permissions") == "0644" and written.get("owner") == "root:root", \
        f"the config should be root's and not writable by others: {written}"


def test_the_fleet_rules_example_config_lines_are_valid():
    text = _block_after("## Fleet rules from SSM Parameter Store", "yaml")
    cfg = config.parse(BASE + text, "README fleet example")
    assert cfg.rules_from == "ssm:/rolegate/rules", f"the example names another parameter: {cfg.rules_from}"


# -- named profiles: old configs keep their meaning --------------------------------------------------

BEFORE_PROFILES = "80e7df7"  # the last commit whose rules had no `profile`
SERVICES = ("sshd", "sudo", "sudo-i", "su", "su-l", "login", "shell", "imds")


def _old_mapping():
    """mapping.py as it was before named profiles, loaded from git (it imports nothing of ours)."""
    import subprocess
    import types

    root = os.path.dirname(README)
    done = subprocess.run(["git", "-C", root, "show", f"{BEFORE_PROFILES}:pam_rolegate/rules/mapping.py"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"no git history to compare with ({done.stderr.strip()[:200]})")
    module = types.ModuleType("old_mapping")
    exec(compile(done.stdout, "old_mapping.py", "exec"), module.__dict__)
    return module


def _configs_with_rules():
    """(where, Config) for the repository's example config and every README yaml block with rules."""
    import harness

    with open(os.path.join(os.path.dirname(README), "etc", "rolegate", "rolegate.yaml")) as fh:
        shipped = fh.read()
    # As shipped it has `roles: []` and its example rules commented out below: take those.
    head, _, example = shipped.partition("roles: []\n# roles:\n")
    rules = "".join(line[2:] + "\n" for line in example.splitlines() if line.startswith("#   "))
    found = [("etc/rolegate/rolegate.yaml's example rules", config.parse(head + "roles:\n" + rules, "shipped")),
             ("the tests' E2E config", config.parse(harness.E2E_CONFIG, "E2E_CONFIG"))]
    for n, block in enumerate(re.findall(r"```yaml\n(.*?)```", _readme(), re.S)):
        if "roles:" not in block or "profile:" in block or block.startswith("#cloud-config"):
            continue
        text = block if block.lstrip().startswith("version:") else BASE + block
        found.append((f"README yaml block {n}", config.parse(text, f"README block {n}")))
    return [(where, cfg) for where, cfg in found if cfg.roles]


@pytest.mark.parametrize("where,cfg", _configs_with_rules(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_config_without_profiles_gives_the_same_decisions_as_before_profiles(where, cfg):
    from pam_rolegate.rules import mapping

    old = _old_mapping()
    users = sorted({u for r in cfg.roles for u in r.match.users} | {"someone-else"})
    groups = sorted({g for r in cfg.roles for g in r.match.groups})
    targets = sorted({t for r in cfg.roles for t in r.match.targets} | {"root"})
    compared = 0
    for user in users:
        for group_set in [()] + [(g,) for g in groups] + [tuple(groups)]:
            for service in SERVICES:
                for target in [user] + targets:
                    kw = dict(principal=user, principal_uid=1000, groups=group_set, target=target,
                              target_uid=0 if target == "root" else 1000, target_gid=0, service=service)
                    new_rule = mapping.decide(cfg, mapping.Identity(**kw)).rule
                    old_rule = old.decide(cfg, old.Identity(**kw)).rule
                    assert new_rule == old_rule, f"{where}: {kw} now gets {new_rule}, before profiles {old_rule}"
                    compared += 1
    assert compared > len(SERVICES), f"{where}: only {compared} logins compared"


def test_the_several_roles_example_gives_what_the_readme_says():
    from pam_rolegate.rules import mapping

    text = _block_after("## Several roles per person", "yaml")
    cfg = config.parse(BASE + text, "README profiles example")

    def got(user, groups):
        d = mapping.decide(cfg, mapping.Identity(principal=user, principal_uid=1000, groups=groups, target=user,
                                                 target_uid=1000, target_gid=1000, service="sshd"))
        return d.rule.role.rsplit("/", 1)[-1] if d.rule else None, \
            {name: r.role.rsplit("/", 1)[-1] for name, r in d.profiles}
    assert got("alice", ("engineers", "deployers")) == ("ReadOnly", {"deploy": "Deploy", "data": "DataAnalyst"})
    assert got("bob", ("engineers",)) == ("ReadOnly", {"deploy": "StagingDeploy"})
    assert got("dan", ("deployers",)) == (None, {"deploy": "Deploy"}), \
        "a login with no default rule gets no default (its named profiles go unused, as the README says)"
