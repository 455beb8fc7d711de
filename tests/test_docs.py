"""The docs are the contract: README.md (the front door), docs/*.md (by task) and CONTRIBUTING.md.

Everything is checked against the real code, never against a list kept here: config keys are asked
of the real config parser (its "unknown key; allowed: ..." refusal for each section), commands and
flags of the real argument parser, and the quick start's config is run through the real CLI. So a
key, command or flag added without documentation, or documented without existing, fails here.
"""

import contextlib
import glob
import io
import json
import os
import re
import shlex
import subprocess

import pytest

import conftest
from pam_rolegate.admin import cli
from pam_rolegate.errors import ConfigError
from pam_rolegate.rules import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
PAGES = [README, os.path.join(ROOT, "CONTRIBUTING.md")] + sorted(glob.glob(os.path.join(DOCS, "*.md")))
README_MAX_LINES = 250
BASE = "version: 1\nregion: us-east-1\n"
# Each section of the config, and a document that puts an unknown key into it.
SECTIONS = {
    "": BASE + "zz_unknown: 1\n",
    "session.": BASE + "session: {zz_unknown: 1}\n",
    "refresh.": BASE + "refresh: {zz_unknown: 1}\n",
    "imds.": BASE + "imds: {zz_unknown: 1}\n",
    "roles[].": BASE + "roles: [{zz_unknown: 1}]\n",
    "roles[].elevate.": BASE + "roles: [{match: {}, role: 'arn:aws:iam::111111111111:role/x', profile: p, "
                              "elevate: {zz_unknown: 1}}]\n",
}
TABLE_HEADER = "| key | default | meaning |"


def read(path):
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def rel(path):
    return os.path.relpath(path, ROOT)


def page(name):
    return os.path.join(DOCS, name)


# -- markdown: code, headings, anchors, links ------------------------------------------------------

FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.M | re.S)


def fenced_blocks(text):
    """[(language, body)] of the fenced code blocks, in order."""
    return [(m.group(1).strip(), m.group(2)) for m in FENCE.finditer(text)]


def prose(text):
    """The text with fenced code blocks blanked out: the same length, so offsets and lines stay."""
    return FENCE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def code_spans(text):
    """Inline code spans of the prose, and every line of every fenced block."""
    spans = re.findall(r"`([^`\n]+)`", prose(text))
    for _, body in fenced_blocks(text):
        spans.extend(body.splitlines())
    return spans


def github_anchor(heading):
    """GitHub's id for a heading: lowercase, markup and punctuation dropped (letters, digits, '_'
    and '-' kept), each space a '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text):
    found, seen = set(), {}
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose(text), re.M):
        slug = github_anchor(m.group(1))
        n = seen.get(slug, 0)
        found.add(slug if n == 0 else f"{slug}-{n}")
        seen[slug] = n + 1
    return found


def links(text):
    """(line, target) of every markdown link in the prose (not in code)."""
    plain = re.sub(r"`[^`\n]*`", "", prose(text))
    for m in re.finditer(r"\[[^\]\n]*\]\(([^)\s]+)\)", plain):
        yield plain.count("\n", 0, m.start()) + 1, m.group(1)


def section(text, heading):
    """The text from `heading` (a line) to the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    start = text.index(heading + "\n")
    nxt = re.compile(r"^#{1,%d} " % level, re.M)
    body = prose(text)
    m = nxt.search(body, start + len(heading) + 1)
    return text[start:m.start() if m else len(text)]


# -- 1. the README is a front door ----------------------------------------------------------------

def test_the_readme_is_at_most_250_lines():
    n = read(README).count("\n")
    assert n <= README_MAX_LINES, (f"README.md has {n} lines; the front door holds at most {README_MAX_LINES}: "
                                   f"move the detail into a page of docs/ and link to it")


# -- 2. links and anchors ------------------------------------------------------------------------

@pytest.mark.parametrize("path", PAGES, ids=rel)
def test_every_relative_link_and_anchor_resolves(path):
    text = read(path)
    broken = []
    for line, target in links(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, file:
            continue
        file_part, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        if not os.path.exists(dest):
            broken.append(f"line {line}: {target}: no file {rel(dest)}")
            continue
        if anchor:
            if not dest.endswith(".md"):
                broken.append(f"line {line}: {target}: an anchor into a file that is not markdown")
            elif anchor not in anchors(read(dest)):
                broken.append(f"line {line}: {target}: {rel(dest)} has no heading whose anchor is #{anchor}")
    assert not broken, f"{rel(path)} has broken links:\n" + "\n".join(broken)


def test_the_anchor_rules_are_githubs():
    # A few headings of these pages, with the ids GitHub gives them.
    assert github_anchor("The first install: audit until you enforce") == "the-first-install-audit-until-you-enforce"
    assert github_anchor("Who can take the gatekeeper's keys") == "who-can-take-the-gatekeepers-keys"
    assert github_anchor("`sts_endpoint` and ssm_endpoint") == "sts_endpoint-and-ssm_endpoint"
    assert github_anchor("session.refresh_before") == "sessionrefresh_before"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_the_readme_links_every_docs_page_and_contributing():
    linked = {os.path.normpath(os.path.join(ROOT, t.partition("#")[0])) for _, t in links(read(README))}
    missing = [rel(p) for p in PAGES[1:] if p not in linked]
    assert not missing, f"README.md links no page of: {missing}"


# -- 3. config keys: one table, the single source -------------------------------------------------

def _allowed(prefix):
    with pytest.raises(ConfigError) as caught:
        config.parse(SECTIONS[prefix])
    text = str(caught.value)
    assert "allowed: " in text, f"the parser's refusal no longer lists the allowed keys: {text}"
    return [k.strip() for k in text.split("allowed: ", 1)[1].split(",")]


def key_table():
    """The rows' keys of docs/configuration.md's one `| key | default | meaning |` table."""
    text = read(page("configuration.md"))
    assert prose(text).count(TABLE_HEADER) == 1, \
        f"docs/configuration.md must hold exactly one table headed {TABLE_HEADER!r} (the single source)"
    table = text[text.index(TABLE_HEADER):]
    table = table[:table.index("\n\n")]
    return [m.group(1) for m in re.finditer(r"^\| `([^`]+)` \|", table, re.M)]


@pytest.mark.parametrize("prefix", list(SECTIONS))
def test_every_config_key_has_a_row_in_the_key_table(prefix):
    rows = set(key_table())
    # A section (session, imds, ...) is documented by the rows of its keys.
    missing = [prefix + key for key in _allowed(prefix)
               if prefix + key not in rows and not any(r.startswith(prefix + key + ".") for r in rows)]
    assert not missing, f"config keys with no row in docs/configuration.md's key table: {missing}"


def test_every_row_of_the_key_table_is_a_key_the_parser_accepts():
    rows = key_table()
    assert len(rows) == len(set(rows)), f"a key has two rows: {sorted(r for r in rows if rows.count(r) > 1)}"
    wrong = []
    for row in rows:
        prefix = max((p for p in SECTIONS if row.startswith(p) and "." not in row[len(p):]), key=len)
        if row[len(prefix):] not in _allowed(prefix):
            wrong.append(row)
    assert not wrong, f"rows of docs/configuration.md's key table the parser refuses: {wrong}"


# -- 4. commands and flags -----------------------------------------------------------------------

def _subparsers():
    sub = next(a for a in cli.parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices


def _flags(p):
    return {o for a in p._actions for o in a.option_strings}


GLOBAL_FLAGS = _flags(cli.parser())
# Where a command line in the docs ends: a pipe, a list, a comment, a redirect, `-- CMD`.
LINE_END = re.compile(r"\s\|\s|&&|\|\||;|\s#|\s>|\s--(\s|$)|\)")


def named_commands(text):
    """(verb, flags, where) for every `rolegate VERB ...` and `rolegated ...` in the code of a page,
    where it is a command: at the start of a line or span, or after sudo, a shell operator, a
    prompt or `=` (credential_process = rolegate ...); not `journalctl -u rolegated`."""
    for span in code_spans(text):
        for m in re.finditer(r"(?<![\w/.-])(rolegated?)(?=\s|$)(.*)", span):
            before = span[:m.start()].rstrip()
            if before and not before.endswith(("sudo", "&&", "||", ";", "|", "$", "(", "=")):
                continue
            rest = LINE_END.split(m.group(2) + " ", 1)[0]
            words = rest.split()
            if m.group(1) == "rolegated":
                verb = "rolegated"
            else:
                while words and words[0].startswith("-"):  # global options first: --config X
                    words = words[2:] if words[0] == "--config" else words[1:]
                if not words or not re.fullmatch(r"[a-z][a-z-]*", words[0]):
                    continue
                verb, words = words[0], words[1:]
            flags = [f for w in words for f in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", w)]
            yield verb, flags, span.strip()


@pytest.mark.parametrize("path", PAGES, ids=rel)
def test_every_command_and_flag_the_docs_name_exists(path):
    choices = dict(_subparsers(), rolegated=cli.daemon_parser())  # rolegated has a parser of its own
    wrong = []
    for verb, flags, where in named_commands(read(path)):
        if verb not in choices:
            wrong.append(f"`rolegate {verb}` is no command: {where}")
            continue
        known = _flags(choices[verb]) | (GLOBAL_FLAGS if verb != "rolegated" else set())
        wrong += [f"`rolegate {verb}` has no flag {f}: {where}" for f in flags if f not in known]
    assert not wrong, f"{rel(path)} names commands or flags the CLI does not have:\n" + "\n".join(wrong)


def test_the_commands_page_names_every_command_and_every_flag():
    text = read(page("commands.md"))
    named = {}
    for verb, flags, _ in named_commands(text):
        named.setdefault(verb, set()).update(flags)
    missing = []
    for verb, p in dict(_subparsers(), rolegated=cli.daemon_parser()).items():
        if verb not in named:
            missing.append(f"rolegate {verb}")
            continue
        for action in p._actions:
            opts = [o for o in action.option_strings if o not in ("-h", "--help") and o not in GLOBAL_FLAGS]
            if opts and not set(opts) & named[verb]:
                missing.append(f"rolegate {verb} {opts[-1]}")
    assert not missing, f"docs/commands.md does not name: {missing}"


def test_the_commands_page_has_the_exit_code_table():
    from pam_rolegate.admin import exitcodes

    text = read(page("commands.md"))
    table = section(text, "## Exit codes")
    codes = {int(m.group(1)) for m in re.finditer(r"^\| (\d+) \|", table, re.M)}
    values = {code for code, _ in exitcodes.TABLE}
    assert values <= codes, f"exit codes of exitcodes.TABLE with no row in docs/commands.md: {sorted(values - codes)}"
    assert codes <= values, f"docs/commands.md lists exit codes exitcodes.TABLE does not: {sorted(codes - values)}"


# -- 5. the quick start, followed in order ---------------------------------------------------------

QUICK_START = "## Quick start: 15 minutes on an EC2 host"


def quick_start():
    """(blocks, commands): the quick start's fenced blocks in order, and each shell command in
    order as (block number, argv) with `sudo` taken off and comments dropped."""
    text = read(README)
    assert QUICK_START + "\n" in text, f"README.md has no heading {QUICK_START!r}"
    blocks = fenced_blocks(section(text, QUICK_START))
    commands = []
    for n, (lang, body) in enumerate(blocks):
        if lang != "sh":
            continue
        for line in body.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            part = []
            for w in words + ["&&"]:
                if w in ("&&", "||", ";", "|", ">"):
                    if part:
                        commands.append((n, part[1:] if part[0] == "sudo" else part))
                    part = [] if w != ">" else ["#redirect"]
                elif part[:1] != ["#redirect"]:
                    part.append(w)
                else:
                    part = ["#redirect"]
    commands = [(n, argv) for n, argv in commands if argv and argv[0] != "#redirect"]
    return blocks, commands


def _first(commands, what, test):
    for i, (_, argv) in enumerate(commands):
        if test(argv):
            return i
    pytest.fail(f"the quick start has no step that {what}")


def _rolegate(argv):
    return argv[:1] == ["rolegate"]


def test_quick_start_steps_come_in_order():
    _, commands = quick_start()
    steps = [
        ("installs the package (apt-get install ./dist/rolegate_…deb)",
         lambda a: a[:2] == ["apt-get", "install"] and any(w.startswith("./dist/rolegate_") for w in a)),
        ("makes the gatekeeper role (aws iam create-role)", lambda a: a[:3] == ["aws", "iam", "create-role"]),
        ("checks the config (rolegate check-config)", lambda a: a[:2] == ["rolegate", "check-config"]),
        ("asks which role a user gets (rolegate check-user)", lambda a: a[:2] == ["rolegate", "check-user"]),
        ("prints the policies (rolegate policy --gatekeeper)", lambda a: a[:2] == ["rolegate", "policy"]),
        ("attaches the gatekeeper's policy (aws iam put-role-policy)",
         lambda a: a[:3] == ["aws", "iam", "put-role-policy"]),
        ("enforces the lockdown (systemctl restart rolegated)", lambda a: a == ["systemctl", "restart", "rolegated"]),
        ("logs in (ssh)", lambda a: a[:1] == ["ssh"]),
        ("asks who the user is (rolegate whoami)", lambda a: a[:2] == ["rolegate", "whoami"]),
    ]
    at = [(what, _first(commands, what, test)) for what, test in steps]
    for (before, i), (after, j) in zip(at, at[1:]):
        assert i < j, f"the quick start's step that {after} comes before the one that {before}"


def test_quick_start_runs_no_rolegate_command_before_the_install():
    _, commands = quick_start()
    install = _first(commands, "installs the package", lambda a: a[:2] == ["apt-get", "install"])
    early = [" ".join(a) for _, a in commands[:install] if _rolegate(a) or "rolegated" in a]
    assert not early, f"the quick start runs rolegate before the package is installed: {early}"


def test_quick_start_installs_the_version_the_tree_builds():
    _, commands = quick_start()
    with open(os.path.join(ROOT, "pyproject.toml")) as fh:
        version = re.search(r'^version = "([^"]+)"', fh.read(), re.M).group(1)
    debs = [w for _, a in commands for w in a if w.startswith("./dist/rolegate_")]
    assert debs == [f"./dist/rolegate_{version}_all.deb"], \
        f"the quick start installs {debs}; scripts/build-deb makes ./dist/rolegate_{version}_all.deb"


def test_quick_start_rolegate_commands_exist_with_their_flags():
    _, commands = quick_start()
    refused = []
    for n, argv in commands:
        if _rolegate(argv):
            try:
                with contextlib.redirect_stderr(io.StringIO()):  # argparse's usage text
                    cli.parser().parse_args(argv[1:])
            except SystemExit:
                refused.append(" ".join(argv))
    assert not refused, f"quick start commands the rolegate parser refuses: {refused}"


def quick_start_config():
    """The config the quick start writes (its first yaml block) and the line that enforces."""
    blocks, _ = quick_start()
    yaml_blocks = [body for lang, body in blocks if lang == "yaml"]
    assert len(yaml_blocks) == 2, \
        f"the quick start should show the config it writes and then the line that enforces: {len(yaml_blocks)} yaml blocks"
    return yaml_blocks


def test_quick_start_config_is_valid_and_starts_in_audit_mode():
    written, enforce = quick_start_config()
    try:
        cfg = config.parse(written, "README quick start (step 3)")
    except ConfigError as err:
        pytest.fail(f"the config the quick start writes is refused: {err}")
    assert len(cfg.roles) == 1, f"the quick start's step 3 should write one rule, not {len(cfg.roles)}"
    assert cfg.imds.mode == "audit", f"step 3's config should be the first install's audit mode, not {cfg.imds.mode}"
    assert re.fullmatch(r"imds: \{mode: reject\}\n", enforce), f"the enforcing step should set imds.mode: reject: {enforce!r}"
    enforced = config.parse(re.sub(r"^imds:.*$", enforce.strip(), written, flags=re.M), "README quick start (step 8)")
    assert enforced.imds.mode == "reject", f"after the enforcing step imds.mode is {enforced.imds.mode}"
    assert enforced.roles == cfg.roles, "the enforcing step changed the rules"


@pytest.fixture
def quick_start_host(tmp_path):
    """The quick start's config in a temp dir and its user in the sandbox's passwd (the quick
    start creates the user the same way, with useradd)."""
    conftest.require_sandbox()
    written, _ = quick_start_config()
    path = tmp_path / "rolegate.yaml"
    path.write_text(written)
    _, commands = quick_start()
    check = [a for _, a in commands if a[:2] == ["rolegate", "check-user"]]
    assert len(check) == 1, f"the quick start should run check-user once: {check}"
    user = check[0][2]
    adds = [a for _, a in commands if a[:1] == ["useradd"] and a[-1] == user]
    assert adds, f"the quick start checks {user} but never creates that user"
    if subprocess.run(["id", user], capture_output=True).returncode != 0:
        subprocess.run(adds[0], check=True, capture_output=True)
    return str(path), user, config.parse(written)


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(argv, cli.Deps(out=out, err=err, environ={}))
    return code, out.getvalue(), err.getvalue()


def test_quick_start_check_user_gives_the_quick_start_role(quick_start_host):
    path, user, cfg = quick_start_host
    role = cfg.roles[0].role
    code, out, err = _run(["--config", path, "check-user", user])
    assert code == 0 and role in out, \
        f"step 5: `rolegate check-user {user}` with step 3's config gave exit {code}, not the role {role}:\n{out}{err}"
    assert f"role:      {role}" in read(README), f"step 5 should tell what check-user prints: role:      {role}"


def test_quick_start_policy_names_the_quick_start_role(quick_start_host):
    path, user, cfg = quick_start_host
    role = cfg.roles[0].role
    _, commands = quick_start()
    policy = next(a for _, a in commands if a[:2] == ["rolegate", "policy"])
    gatekeeper = policy[policy.index("--gatekeeper") + 1]
    code, out, err = _run(["--config", path] + policy[1:])
    assert code == 0, f"step 6: `{' '.join(policy)}` failed with {code}: {err}"
    docs = json.loads(out)
    resources = [r for s in docs["gatekeeper_policy"]["Statement"] for r in s["Resource"]]
    assert resources == [role], f"step 6: the gatekeeper may assume {resources}, the quick start's rule gives {role}"
    assert list(docs["trust_policies"]) == [role], f"step 6: trust policies for {list(docs['trust_policies'])}"
    principals = [s["Principal"]["AWS"] for s in docs["trust_policies"][role]["Statement"]]
    assert principals == [gatekeeper], f"step 6: {role} would trust {principals}, not the gatekeeper {gatekeeper}"
    jq = [a for _, a in commands if a[:1] == ["jq"]]
    assert [".gatekeeper_policy", f'.trust_policies["{role}"]'] == [a[1] for a in jq], \
        f"step 7 should take the two documents step 6 prints: {jq}"
    made = [a for _, a in commands if a[:3] == ["aws", "iam", "create-role"]]
    assert any(a[a.index("--role-name") + 1] == gatekeeper.rsplit("/", 1)[-1] for a in made), \
        f"step 2 makes no role named as step 6's gatekeeper {gatekeeper}: {made}"
    assert any(a[a.index("--role-name") + 1] == role.rsplit("/", 1)[-1] for a in made), \
        f"step 7 makes no role named as the rule's {role}: {made}"


# -- the examples in the pages ---------------------------------------------------------------------

def _block_after(path, heading, language):
    text = section(read(path), heading)
    blocks = [body for lang, body in fenced_blocks(text) if lang == language]
    assert blocks, f"{rel(path)}: no {language} block under {heading!r}"
    return blocks[0]


def test_the_cloud_init_example_is_cloud_config_whose_rolegate_config_is_valid():
    """An admin pastes it as user data: it must be cloud-config YAML, install the package, and
    write a config the broker accepts (rules_from included)."""
    import yaml

    text = _block_after(page("install.md"), "## A fleet with cloud-init", "yaml")
    assert text.startswith("#cloud-config\n"), "cloud-init ignores user data that does not start with #cloud-config"
    doc = yaml.safe_load(text)
    assert "rolegate" in doc.get("packages", []), f"the example does not install the package: {doc.get('packages')}"
    files = {f["path"]: f for f in doc.get("write_files", [])}
    written = files.get(config.DEFAULT_PATH)
    assert written, f"the example writes no {config.DEFAULT_PATH}: {list(files)}"
    cfg = config.parse(written["content"], "docs/install.md cloud-init example")
    assert cfg.rules_from and not cfg.roles, "the fleet example should take its rules from Parameter Store"
    assert written.get("permissions") == "0644" and written.get("owner") == "root:root", \
        f"the config should be root's and not writable by others: {written}"


def test_the_fleet_rules_example_config_lines_are_valid():
    text = _block_after(page("fleet.md"), "# Fleet rules from SSM Parameter Store", "yaml")
    cfg = config.parse(BASE + text, "docs/fleet.md example")
    assert cfg.rules_from == "ssm:/rolegate/rules", f"the example names another parameter: {cfg.rules_from}"


# -- named profiles: old configs keep their meaning --------------------------------------------------

BEFORE_PROFILES = "80e7df7"  # the last commit whose rules had no `profile`
SERVICES = ("sshd", "sudo", "sudo-i", "su", "su-l", "login", "shell", "imds")


def _old_mapping():
    """mapping.py as it was before named profiles, loaded from git (it imports nothing of ours)."""
    import types

    done = subprocess.run(["git", "-C", ROOT, "show", f"{BEFORE_PROFILES}:pam_rolegate/rules/mapping.py"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"no git history to compare with ({done.stderr.strip()[:200]})")
    module = types.ModuleType("old_mapping")
    exec(compile(done.stdout, "old_mapping.py", "exec"), module.__dict__)
    return module


def _configs_with_rules():
    """(where, Config) for the repository's example config and every yaml block with rules in the docs."""
    import harness

    shipped = read(os.path.join(ROOT, "etc", "rolegate", "rolegate.yaml"))
    # As shipped it has `roles: []` and its example rules commented out below: take those.
    head, _, example = shipped.partition("roles: []\n# roles:\n")
    rules = "".join(line[2:] + "\n" for line in example.splitlines() if line.startswith("#   "))
    found = [("etc/rolegate/rolegate.yaml's example rules", config.parse(head + "roles:\n" + rules, "shipped")),
             ("the tests' E2E config", config.parse(harness.E2E_CONFIG, "E2E_CONFIG"))]
    for path in PAGES:
        for n, (lang, block) in enumerate(fenced_blocks(read(path))):
            if lang != "yaml" or "roles:" not in block or "profile:" in block or block.startswith("#cloud-config"):
                continue
            text = block if block.lstrip().startswith("version:") else BASE + block
            found.append((f"{rel(path)} block {n}", config.parse(text, f"{rel(path)} block {n}")))
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


def test_the_several_roles_example_gives_what_the_page_says():
    from pam_rolegate.rules import mapping

    text = _block_after(page("profiles-and-elevation.md"), "## Several roles per person", "yaml")
    cfg = config.parse(BASE + text, "docs/profiles-and-elevation.md example")

    def got(user, groups):
        d = mapping.decide(cfg, mapping.Identity(principal=user, principal_uid=1000, groups=groups, target=user,
                                                 target_uid=1000, target_gid=1000, service="sshd"))
        return d.rule.role.rsplit("/", 1)[-1] if d.rule else None, \
            {name: r.role.rsplit("/", 1)[-1] for name, r in d.profiles}
    assert got("alice", ("engineers", "deployers")) == ("ReadOnly", {"deploy": "Deploy", "data": "DataAnalyst"})
    assert got("bob", ("engineers",)) == ("ReadOnly", {"deploy": "StagingDeploy"})
    assert got("dan", ("deployers",)) == (None, {"deploy": "Deploy"}), \
        "a login with no default rule gets no default (its named profiles go unused, as the page says)"


def test_the_elevation_example_is_valid_and_on_demand():
    text = _block_after(page("profiles-and-elevation.md"), "## Elevation on demand", "yaml")
    cfg = config.parse(BASE + text, "docs/profiles-and-elevation.md elevation example")
    on_demand = {r.profile for r in cfg.roles if r.elevate}
    assert on_demand == {"admin", "prod-write"}, f"the elevation example's on-demand profiles: {on_demand}"


# -- the glossary: each term once ------------------------------------------------------------------

TERMS = ("grant", "principal", "target", "door", "linger", "single flight", "delivery", "gatekeeper",
         "named profile", "on-demand profile", "elevation", "lockdown", "audit mode", "rules document")


def test_the_glossary_defines_each_term_once():
    headings = [m.group(1).strip().lower() for m in re.finditer(r"^### (.+)$", prose(read(page("glossary.md"))), re.M)]
    twice = sorted({h for h in headings if headings.count(h) > 1})
    assert not twice, f"docs/glossary.md defines these terms more than once: {twice}"
    missing = [t for t in TERMS if t not in headings]
    assert not missing, f"docs/glossary.md does not define: {missing}"
    text = read(page("glossary.md"))
    for door in ("PAM door", "User door", "HTTP doors"):
        assert f"**{door}**" in text, f"docs/glossary.md's door entry does not define the {door}"
