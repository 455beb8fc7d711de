"""The README is the front door: what it promises at the top must stay true.

Everything else it used to check (config keys, commands, the examples) now lives in the docs/
pages and is checked by tests/test_docs.py, which also checks the README's length, links and quick
start.
"""

import os
import re

from test_docs import README, ROOT, fenced_blocks, read, section

TWO_COMMANDS = ("scripts/demo", "scripts/test")


def test_the_readme_opens_with_the_two_commands():
    lang, body = fenced_blocks(read(README))[0]
    commands = [line.split("#", 1)[0].strip() for line in body.splitlines()]
    assert lang == "sh" and tuple(commands) == TWO_COMMANDS, \
        f"the README's first block should be the two commands {TWO_COMMANDS}, not {commands}"
    for cmd in TWO_COMMANDS:
        path = os.path.join(ROOT, cmd)
        assert os.access(path, os.X_OK), f"the README's first block names {cmd}, which is not an executable script"


def test_the_readme_says_which_platforms_are_supported_and_which_not():
    text = section(read(README), "## Supported platforms")
    for needed in ("Debian 12", "13", "Ubuntu", "libpam-python"):
        assert needed in text, f"the README's supported platforms do not name {needed!r}"
    assert re.search(r"Amazon Linux and RHEL are not supported", text) and "no pam_python package" in text, \
        "the README should say plainly that Amazon Linux and RHEL are not supported yet, and why (no pam_python package)"


def test_the_readme_names_the_licence_the_tree_carries():
    licence = read(os.path.join(ROOT, "LICENSE"))
    assert "Apache License" in licence and "Version 2.0" in licence, "LICENSE is not the Apache License 2.0"
    text = section(read(README), "## Licence")
    assert "Apache-2.0" in text and "(LICENSE)" in text, f"the README's licence line should say Apache-2.0 and link LICENSE: {text!r}"
