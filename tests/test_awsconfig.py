"""rules/awsconfig.py: does a config file name a region for a profile — a table of cases, each also
asked of the real botocore (the tests' venv: boto3 and the AWS CLI v1 run on it), so the rule
rolegate applies is the one the SDKs apply; plus `rolegate region`/`env`'s reading of the file."""

import io
import json
import os
import subprocess
import types

import botocore.session
import pytest

from harness import AWS_CLI_V2
from pam_rolegate.admin import cli, verbs_session
from pam_rolegate.rules import awsconfig

# (name, file text, profile, the region botocore resolves from the file or None)
CASES = [
    ("default", "[default]\nregion = eu-west-2\n", "default", "eu-west-2"),
    ("no-region", "[default]\noutput = json\n", "default", None),
    ("empty-file", "", "default", None),
    ("profile-default-spelling", "[profile default]\nregion = eu-west-2\n", "default", "eu-west-2"),
    ("later-default-section-wins", "[profile default]\nregion = eu-west-1\n[default]\nregion = eu-west-2\n",
     "default", "eu-west-2"),
    ("later-profile-default-wins", "[default]\nregion = eu-west-2\n[profile default]\noutput = json\n",
     "default", None),
    ("named-profile", "[default]\n[profile dev]\nregion = ap-south-1\n", "dev", "ap-south-1"),
    ("named-profile-not-default", "[profile dev]\nregion = ap-south-1\n", "default", None),
    ("bare-name-is-no-profile", "[dev]\nregion = ap-south-1\n", "dev", None),
    ("profile-prefix-extra-spaces", "[profile   dev]\nregion = ap-south-1\n", "dev", "ap-south-1"),
    ("profile-quoted-name", '[profile "my dev"]\nregion = ap-south-1\n', "my dev", "ap-south-1"),
    ("profile-three-words", "[profile my dev]\nregion = ap-south-1\n", "my dev", None),
    ("spaces-inside-brackets", "[ default ]\nregion = eu-west-2\n", "default", None),
    ("upper-case-key", "[default]\nREGION = eu-west-2\n", "default", "eu-west-2"),
    ("colon-separator", "[default]\nregion: eu-west-2\n", "default", "eu-west-2"),
    ("spaces-around", "[default]\n   region   =   eu-west-2   \n", "default", "eu-west-2"),
    ("hash-comment", "[default]\n# region = eu-west-2\n", "default", None),
    ("semicolon-comment", "[default]\n; region = eu-west-2\n", "default", None),
    ("indented-comment", "[default]\n  # region = eu-west-2\n", "default", None),
    ("empty-value", "[default]\nregion =\n", "default", None),
    ("nested-under-s3", "[default]\ns3 =\n  region = eu-west-2\n", "default", None),
    ("sso-session-region", "[sso-session corp]\nsso_region = eu-west-2\nregion = eu-west-2\n", "default", None),
    ("services-section", "[services dev]\ns3 =\n  region = eu-west-2\n", "default", None),
    ("region-in-other-profile", "[default]\noutput = json\n[profile x]\nregion = eu-west-2\n", "default", None),
    ("DEFAULT-section-applies-everywhere", "[DEFAULT]\nregion = eu-west-2\n[default]\noutput = json\n",
     "default", "eu-west-2"),
    ("crlf-line-ends", "[default]\r\nregion = eu-west-2\r\n", "default", "eu-west-2"),
    ("duplicate-section-refused", "[default]\nregion = eu-west-2\n[default]\noutput = json\n", "default", None),
    ("line-outside-a-section", "region = eu-west-2\n[default]\n", "default", None),
    # Long runs of blanks inside a line are cut before parsing (awsconfig.BLANK_RUN): same answers.
    ("blanks-before-the-equals", "[default]\nregion" + " " * 40 + "= eu-west-2\n", "default", "eu-west-2"),
    ("blanks-in-another-value", "[default]\noutput = json" + " " * 40 + "x\nregion = eu-west-2\n", "default",
     "eu-west-2"),
    ("blanks-in-a-profile-header", "[profile" + " " * 20 + "x]\nregion = eu-west-2\n", "x", "eu-west-2"),
    ("blanks-in-a-broken-line", "[default]\nregion = eu-west-2\na" + " " * 40 + "b\n", "default", None),
]


def botocore_region(tmp_path, text, profile):
    """The region botocore's own loader finds for `profile` in a config file holding `text`, or None
    when botocore refuses the file (no environment variable in play)."""
    path = tmp_path / "config"
    path.write_text(text)
    session = botocore.session.Session()
    session.set_config_variable("config_file", str(path))
    try:
        return session.full_config["profiles"].get(profile, {}).get("region") or None
    except botocore.exceptions.ConfigParseError:
        return None


@pytest.mark.parametrize("name,text,profile,expected", CASES, ids=[c[0] for c in CASES])
def test_awsconfig__names_region_as_botocore_reads_the_file(name, text, profile, expected, tmp_path):
    assert awsconfig.profile_region(text, profile) == expected, \
        f"{name}: rolegate read {awsconfig.profile_region(text, profile)!r} for {profile}, expected {expected!r}"
    assert botocore_region(tmp_path, text, profile) == expected, \
        f"{name}: the table is wrong about botocore, which reads {botocore_region(tmp_path, text, profile)!r}"
    assert awsconfig.names_region(text, profile) == (expected is not None), name


@pytest.mark.parametrize("environ,expected", [
    ({}, "default"),
    ({"AWS_PROFILE": "dev"}, "dev"),
    ({"AWS_DEFAULT_PROFILE": "ops"}, "ops"),
    ({"AWS_PROFILE": "dev", "AWS_DEFAULT_PROFILE": "ops"}, "ops"),  # botocore reads AWS_DEFAULT_PROFILE first
    ({"AWS_PROFILE": ""}, "default"),
])
def test_awsconfig__profile_in_use_follows_botocores_order(environ, expected):
    assert awsconfig.profile_in_use(environ) == expected, f"{environ}: {awsconfig.profile_in_use(environ)}"
    session = botocore.session.Session()
    with pytest.MonkeyPatch.context() as mp:
        for var in awsconfig.PROFILE_VARS:
            mp.delenv(var, raising=False)
        for k, v in environ.items():
            mp.setenv(k, v)
        assert (session.get_config_variable("profile") or "default") == expected, \
            f"botocore picks {session.get_config_variable('profile')!r} from {environ}"


# The AWS CLI v2 (Debian's awscli) carries its own copy of botocore, which `import botocore` loads once
# `awscli` is imported, on the interpreter /usr/bin/aws names: it is asked the same questions.
CLI_V2_REGIONS = r"""
import json, sys, tempfile
import awscli  # from here on, `botocore` is the CLI v2's own copy
import botocore.exceptions, botocore.session
answers = []
for text, profile in json.load(sys.stdin):
    with tempfile.NamedTemporaryFile("w", newline="") as fh:
        fh.write(text)
        fh.flush()
        session = botocore.session.Session()
        session.set_config_variable("config_file", fh.name)
        try:
            answers.append(session.full_config["profiles"].get(profile, {}).get("region") or None)
        except botocore.exceptions.ConfigParseError:
            answers.append(None)
print(json.dumps({"botocore": botocore.__file__, "answers": answers}))
"""
CLI_V2_PROFILE = r"""
import json, awscli, botocore.session
print(json.dumps({"botocore": botocore.__file__, "profile": botocore.session.Session().get_config_variable("profile")}))
"""


def cli_v2_python(code, stdin="", env=None):
    """`code` run by the CLI v2's interpreter in a clean environment plus `env`; its JSON answer."""
    assert os.path.exists(AWS_CLI_V2), f"no AWS CLI v2 at {AWS_CLI_V2}: scripts/deps installs Debian's awscli"
    with open(AWS_CLI_V2) as fh:
        python = fh.readline()[2:].strip()  # its #! line
    done = subprocess.run([python, "-I", "-c", code], input=stdin, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", **(env or {})})
    assert done.returncode == 0, f"{python} could not load the CLI v2's botocore: {done.stderr[-2000:]}"
    answer = json.loads(done.stdout)
    assert "/awscli/botocore/" in answer["botocore"], f"not the CLI v2's own botocore: {answer['botocore']}"
    return answer


def test_awsconfig__the_aws_cli_v2_reads_each_file_as_the_table_says():
    answers = cli_v2_python(CLI_V2_REGIONS, json.dumps([[text, profile] for _, text, profile, _ in CASES]))["answers"]
    wrong = {name: f"read {got!r}, the table says {expected!r}"
             for (name, _, _, expected), got in zip(CASES, answers) if got != expected}
    assert len(answers) == len(CASES) and not wrong, f"the AWS CLI v2 reads these files otherwise: {wrong}"


@pytest.mark.parametrize("environ,expected", [
    ({}, None),
    ({"AWS_PROFILE": "dev"}, "dev"),
    ({"AWS_DEFAULT_PROFILE": "ops"}, "ops"),
    ({"AWS_PROFILE": "dev", "AWS_DEFAULT_PROFILE": "ops"}, "dev"),  # the other way round from botocore and the v1
])
def test_awsconfig__the_aws_cli_v2_reads_aws_profile_before_aws_default_profile(environ, expected):
    """docs/sessions.md tells users to set one of the two, or both alike: here is why."""
    got = cli_v2_python(CLI_V2_PROFILE, env=environ)["profile"]
    assert got == expected, f"the AWS CLI v2 picks profile {got!r} from {environ}, expected {expected!r}"


# -- `rolegate region`: the same rule for a login shell that selects another profile -----------------

RG_CONFIG = "version: 1\nregion: us-east-1\nroles: []\n"


def region_lines(tmp_path, environ, config_text):
    (tmp_path / ".aws").mkdir(exist_ok=True)
    if config_text is not None:
        (tmp_path / ".aws" / "config").write_text(config_text)
    rg = tmp_path / "rolegate.yaml"
    rg.write_text(RG_CONFIG)
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(["--config", str(rg), "region"], cli.Deps(out=out, err=err, environ=dict(environ, HOME=str(tmp_path))))
    assert code == 0, f"rolegate region failed: {err.getvalue()}"
    return out.getvalue().splitlines()


OWN = "[default]\nregion = eu-west-2\n[profile dev]\nregion = ap-south-1\n[profile plain]\noutput = json\n"
SET = {"AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.mark.parametrize("environ,text,expected", [
    # PAM kept rolegate's region; the shell's profile names one of its own: drop ours
    (dict(SET, AWS_PROFILE="dev"), OWN, ["unset AWS_REGION", "unset AWS_DEFAULT_REGION"]),
    # PAM kept it and the profile names none: nothing to do
    (dict(SET, AWS_PROFILE="plain"), OWN, []),
    # PAM dropped it (default names one) but the shell's profile names none: rolegate's again
    ({"AWS_PROFILE": "plain"}, OWN, ["export AWS_DEFAULT_REGION='us-east-1'", "export AWS_REGION='us-east-1'"]),
    # PAM dropped it and the shell's profile names one too: nothing to do
    ({"AWS_PROFILE": "dev"}, OWN, []),
    # no config at all
    ({"AWS_PROFILE": "dev"}, None, ["export AWS_DEFAULT_REGION='us-east-1'", "export AWS_REGION='us-east-1'"]),
], ids=["drop-for-profile", "keep", "restore", "already-dropped", "no-file"])
def test_cli__region_decides_for_the_profile_the_shell_selects(tmp_path, environ, text, expected):
    got = region_lines(tmp_path, environ, text)
    assert got == expected, f"rolegate region with {environ}: {got}, expected {expected}"


def test_cli__region_honours_aws_config_file_and_ignores_a_fifo(tmp_path):
    other = tmp_path / "other-config"
    other.write_text("[default]\nregion = sa-east-1\n")
    got = region_lines(tmp_path, dict(SET, AWS_CONFIG_FILE=str(other)), None)
    assert got == ["unset AWS_REGION", "unset AWS_DEFAULT_REGION"], f"AWS_CONFIG_FILE's region not honoured: {got}"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = region_lines(tmp_path, dict(SET, AWS_CONFIG_FILE=str(fifo)), None)  # must return, not block
    assert got == [], f"a FIFO as AWS_CONFIG_FILE should name no region: {got}"


def test_cli__env_drops_the_region_where_the_users_config_names_one(tmp_path, monkeypatch):
    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws" / "config").write_text(OWN)
    reply = {"granted": True, "runtime_dir": "/run/rolegate",
             "env": {"AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_SHARED_CREDENTIALS_FILE": "/run/rolegate/grants/g/credentials"}}
    monkeypatch.setattr(verbs_session, "broker_call", lambda request, deps: reply)  # the broker's part: test_imds
    for environ, kept in [({}, False), ({"AWS_PROFILE": "plain"}, True), ({"AWS_PROFILE": "dev"}, False)]:
        out = io.StringIO()
        args = types.SimpleNamespace(shell="sh", verbose=False)
        verbs_session.run_env(args, cli.Deps(out=out, environ=dict(environ, HOME=str(tmp_path))))
        lines = out.getvalue()
        assert ("AWS_REGION=" in lines) == kept, f"rolegate env with {environ}: {lines}"
        assert "AWS_SHARED_CREDENTIALS_FILE=" in lines, f"rolegate env lost the credentials pointer: {lines}"


def test_awsconfig__a_line_of_blanks_is_parsed_in_linear_time():
    """configparser's option pattern is quadratic in a run of blanks; the broker parses users' files
    holding the GIL, so one crafted ~/.aws/config must not stall every thread (13 s for this file,
    measured before the blanks were cut)."""
    import time

    text = "[default]\nregion = eu-west-2\n" + "a" + " " * 60000 + "b\n"
    start = time.monotonic()
    awsconfig.profile_region(text)
    crowded = "[default]\n" + ("a" + " " * 15 + "b\n") * 3500  # ~64 KiB of runs just over the cut
    awsconfig.profile_region(crowded)
    took = time.monotonic() - start
    print(f"\nawsconfig: a 60 KB blank line and 3,500 runs of 15 blanks parsed in {took * 1000:.1f} ms")
    assert took < 1.0, f"parsing blank-heavy files took {took:.2f}s: the parse is not linear"
