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
