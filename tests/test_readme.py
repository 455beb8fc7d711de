"""The README is the contract: every config key and every command it does not name is a bug.

The keys are asked of the real config parser (its "unknown key; allowed: ..." refusal for each
section), the commands of the real argument parser, so a key or command added without a README
line fails here.
"""

import os
import re

import pytest

from pam_rolegate import cli, config
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
