"""CLI verbs called directly as run_<verb>(args, deps), with real config files and the real moto server;
the CLI's conventions as a table run as real `rolegate`/`rolegated` processes from the test venv; the
manual pages scripts/manpages generates, checked against the parsers and the docs' key table."""

import argparse
import io
import json
import os
import re
import runpy
import shutil
import signal
import socket
import subprocess

import pytest

from conftest import REPO
from harness import VENV
from pam_rolegate import __version__
from pam_rolegate.admin import cli, exitcodes, verbs_session

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
    lines = verbs_session.shell_lines({"AWS_REGION": "it's"}, ["AWS_ACCESS_KEY_ID"], "sh")
    assert lines == ["unset AWS_ACCESS_KEY_ID", "export AWS_REGION='it'\\''s'"], lines
    assert verbs_session.shell_lines({"A": "x"}, ["B"], "csh") == ["unsetenv B", "setenv A 'x'"]
    assert verbs_session.shell_lines({"A": "x"}, ["B"], "fish") == ["set -e B", "set -gx A 'x'"]


# -- the conventions, as a table: real `rolegate` and `rolegated` processes from the test venv ----------

ROLEGATE = os.path.join(VENV, "bin", "rolegate")
ROLEGATED = os.path.join(VENV, "bin", "rolegated")
NO_BROKER = "/nonexistent/rolegate/rolegated.sock"  # what every process below reaches unless told otherwise
MAPPED = "arn:aws:iam::123456789012:role/root-role"
SUBCOMMANDS = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
JSON_COMMANDS = ("check-user", "check-config", "whoami", "elevate", "status", "profiles", "approvals", "doctor")


def rolegate(*argv, config=None, env=None, prog=ROLEGATE, timeout=60, **kw):
    """A real rolegate process: (exit code, stdout, stderr). Never the sandbox's own broker
    (ROLEGATE_SOCKET points nowhere) nor a real AWS (no keys, no IMDS)."""
    base = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
            "HOME": "/nonexistent", "ROLEGATE_SOCKET": NO_BROKER, "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": "/nonexistent/aws-config", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-creds"}
    if config:
        base["ROLEGATE_CONFIG"] = config
    done = subprocess.run([prog, *argv], env=dict(base, **(env or {})), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, **kw)
    return done.returncode, done.stdout, done.stderr


def walk(p, name):
    """(name, parser) for `p` and every subcommand's parser below it."""
    yield name, p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for verb, sub in action.choices.items():
                yield from walk(sub, f"{name} {verb}")


def test_cli__every_command_and_every_argument_has_help():
    missing = []
    for top in (cli.parser(), cli.daemon_parser()):
        for name, p in walk(top, top.prog):
            for action in p._actions:
                if not action.help or action.help == argparse.SUPPRESS:
                    missing.append(f"{name}: {'/'.join(action.option_strings) or action.dest}")
                if isinstance(action, argparse._SubParsersAction):
                    missing += [f"{name} {a.dest}" for a in action._choices_actions if not a.help]
    assert not missing, f"arguments and commands without a help string: {missing}"


@pytest.mark.parametrize("argv", [[], *([verb] for verb in SUBCOMMANDS)], ids=lambda a: " ".join(a) or "rolegate")
def test_cli__help_exits_0(argv):
    code, out, err = rolegate(*argv, "--help")
    assert code == 0 and out.startswith(f"usage: rolegate {' '.join(argv)}".rstrip()), \
        f"rolegate {' '.join(argv)} --help: exit {code}\n{out}{err}"


@pytest.mark.parametrize("prog", [ROLEGATE, ROLEGATED], ids=os.path.basename)
def test_cli__version_prints_the_version_and_exits_0(prog):
    code, out, err = rolegate("--version", prog=prog)
    assert (code, out) == (0, f"rolegate {__version__}\n"), f"{prog} --version: exit {code}, {out!r} {err!r}"
    code, _, err = rolegate("--help", prog=prog)
    assert code == 0 and "--config" in _ and "--version" in _, f"{prog} --help: exit {code} {err}"


@pytest.mark.parametrize("argv", [["check-user", "root"], ["check-user", "root", "--json"], ["check-config"],
                                  ["check-config", "--json"], ["policy"]], ids=" ".join)
def test_cli__config_before_and_after_the_command_and_from_the_environment_agree(argv, write_config):
    path = write_config(CONFIG)
    before = rolegate("--config", path, *argv)
    after = rolegate(*argv, "--config", path)
    environ = rolegate(*argv, config=path)
    # Given before the command, the value must survive the command's own --config (a SUPPRESS default).
    assert before[0] == 0 and (path in before[1] or MAPPED in before[1]), \
        f"rolegate --config X {' '.join(argv)} did not read X: {before}"
    assert after == before, f"--config after the command differs from before it:\n{after}\n{before}"
    assert environ == before, f"ROLEGATE_CONFIG differs from --config:\n{environ}\n{before}"
    wrong = write_config(CONFIG.replace("root-role", "wrong-role"), "wrong.yaml")
    assert rolegate("--config", path, *argv, config=wrong) == before, "ROLEGATE_CONFIG won over --config"


@pytest.mark.parametrize("prog,argv", [(ROLEGATED, []), (ROLEGATE, ["daemon"])], ids=["rolegated", "rolegate daemon"])
def test_cli__rolegated_takes_config_as_an_option_and_from_the_environment(prog, argv, write_config):
    if os.geteuid() != 0:
        pytest.skip("rolegated reads its config only as root")
    bad = write_config(CONFIG.replace("roles:", "rols:"), "bad.yaml")
    for how in (dict(argv=[*argv, "--config", bad]), dict(argv=argv, config=bad)):
        code, out, err = rolegate(*how["argv"], prog=prog, config=how.get("config"), timeout=30)
        assert code == exitcodes.NEGATIVE and f"{bad}:3:1" in out + err, \
            f"{os.path.basename(prog)} {how} should refuse the bad config it was given (exit 1, FILE:LINE:COL): " \
            f"exit {code}\n{out}{err}"


def _dead_socket(tmp_path):
    """A Unix socket nobody listens on: connect is refused."""
    path = str(tmp_path / "dead.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    return s, path


def _json(text, what):
    try:
        value = json.loads(text)
    except ValueError:
        raise AssertionError(f"{what} printed no JSON object on stdout:\n{text}") from None
    assert isinstance(value, dict), f"{what} printed JSON, but not one object: {text}"
    return value


# The table: what is run, the exit code it must give (exitcodes), and text its output must hold.
CASES = [
    # usage
    (["no-such-command"], exitcodes.USAGE, "invalid choice"),
    (["check-user"], exitcodes.USAGE, "required: user"),
    (["firewall", "open"], exitcodes.USAGE, "invalid choice"),
    (["elevate", "admin", "--for", "soon"], exitcodes.USAGE, "--for"),
    # negative answers
    (["check-user", "nobody"], exitcodes.NEGATIVE, "no rule matches"),
    (["check-user", "no-such-user-xyz"], exitcodes.NEGATIVE, "no such user"),
    (["check-config", "{bad}"], exitcodes.NEGATIVE, "unknown key 'rols'"),
    # the broker cannot be reached: no socket
    (["status"], exitcodes.BROKER_UNREACHABLE, "is rolegated running"),
    (["profiles"], exitcodes.BROKER_UNREACHABLE, "is rolegated running"),
    (["approvals"], exitcodes.BROKER_UNREACHABLE, "is rolegated running"),
    (["env"], exitcodes.BROKER_UNREACHABLE, "is rolegated running"),
    (["credentials"], exitcodes.BROKER_UNREACHABLE, "is rolegated running"),
    (["drop", "admin"], exitcodes.BROKER_UNREACHABLE, "is rolegated running"),
    (["approve", "r-1"], exitcodes.BROKER_UNREACHABLE, "is rolegated running"),
    (["elevate", "admin", "--reason", "x"], exitcodes.BROKER_UNREACHABLE, "is rolegated running"),
    # elevate -- CMD: env(1)'s codes, CMD looked for before anything is asked of the broker
    (["elevate", "admin", "--", "/nonexistent/cmd"], exitcodes.CMD_NOT_FOUND, "not found"),
    (["elevate", "admin", "--", "no-such-command-xyz"], exitcodes.CMD_NOT_FOUND, "not found"),
    (["elevate", "admin", "--", "{not_executable}"], exitcodes.CMD_NOT_EXECUTABLE, "not executable"),
    (["elevate", "admin", "--", "/tmp"], exitcodes.CMD_NOT_EXECUTABLE, "not executable"),
    (["elevate", "admin", "--", "true"], exitcodes.ELEVATE_FAILED, "is rolegated running"),
    (["elevate", "admin", "--for", "soon", "--", "true"], exitcodes.ELEVATE_FAILED, "--for"),
    (["elevate", "admin", "--no-such-option", "--", "true"], exitcodes.ELEVATE_FAILED, "unrecognized"),
    (["elevate", "admin", "--json", "--", "true"], exitcodes.ELEVATE_FAILED, "--json"),
    # an operation failed
    (["whoami"], exitcodes.FAILED, "no AWS credentials"),
]


@pytest.mark.parametrize("argv,expected,says", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_cli__exit_codes(argv, expected, says, write_config, tmp_path):
    not_executable = tmp_path / "script"
    not_executable.write_text("#!/bin/sh\nexit 0\n")
    names = {"bad": write_config(CONFIG.replace("roles:", "rols:"), "bad.yaml"), "not_executable": str(not_executable)}
    argv = [a.format(**names) for a in argv]
    code, out, err = rolegate(*argv, config=write_config(CONFIG))
    assert code == expected, f"rolegate {' '.join(argv)}: exit {code}, expected {expected}\n{out}{err}"
    assert says in out + err, f"rolegate {' '.join(argv)} should say {says!r}:\n{out}{err}"
    assert "Traceback" not in err, f"rolegate {' '.join(argv)} ended in a traceback:\n{err}"


@pytest.mark.parametrize("argv", [["status"], ["elevate", "admin", "--reason", "x"], ["env"]], ids=" ".join)
def test_cli__a_dead_socket_is_broker_unreachable(argv, tmp_path):
    held, path = _dead_socket(tmp_path)
    try:
        code, out, err = rolegate(*argv, env={"ROLEGATE_SOCKET": path})
    finally:
        held.close()
    assert code == exitcodes.BROKER_UNREACHABLE and path in err, \
        f"rolegate {' '.join(argv)} with nobody listening at {path}: exit {code}\n{out}{err}"


def test_cli__a_broker_that_never_answers_is_unreachable_and_ctrl_c_is_130(tmp_path):
    """A socket that accepts (root listens on it, as the broker does) but never answers: the
    client's deadline gives 3; a Ctrl-C while it waits gives 130, without a traceback."""
    if os.geteuid() != 0:
        pytest.skip("the client talks only to a root broker")
    def silent_broker(name):
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(tmp_path / name))
        s.listen(8)
        return s, str(tmp_path / name)

    silent, path = silent_broker("never.sock")
    try:
        code, out, err = rolegate("env", env={"ROLEGATE_SOCKET": path}, timeout=60)
        assert code == exitcodes.BROKER_UNREACHABLE and "did not answer" in err, \
            f"rolegate env against a silent broker: exit {code}\n{out}{err}"
    finally:
        silent.close()
    silent, path = silent_broker("waiting.sock")  # a fresh one: nothing queued from the process above
    try:
        waiting = subprocess.Popen([ROLEGATE, "status"], env={"PATH": "/usr/bin:/bin", "ROLEGATE_SOCKET": path},
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        conn, _ = silent.accept()  # its request has arrived: it now waits for the answer
        conn.recv(4096)
        waiting.send_signal(signal.SIGINT)
        out, err = waiting.communicate(timeout=30)
        conn.close()
        assert waiting.returncode == exitcodes.INTERRUPTED and "Traceback" not in err, \
            f"Ctrl-C during rolegate status: exit {waiting.returncode}\n{out}{err}"
    finally:
        silent.close()


def test_cli__needs_root_is_a_failed_operation(write_config):
    """Run as nobody: install, doctor and firewall apply need root (exit 4, saying so)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to become nobody")
    path = write_config(CONFIG)
    os.chmod(os.path.dirname(path), 0o755)
    for argv in (["install"], ["doctor"], ["firewall", "apply"]):
        code, out, err = rolegate("--reuid", "nobody", "--regid", "nogroup", "--clear-groups", ROLEGATE, *argv,
                                  config=path, prog=shutil.which("setpriv"))
        assert code == exitcodes.FAILED and "root" in err, f"rolegate {' '.join(argv)} as nobody: exit {code}\n{out}{err}"


@pytest.mark.parametrize("argv,expected", [
    (["check-user", "root"], exitcodes.OK),
    (["check-user", "nobody"], exitcodes.NEGATIVE),
    (["check-user", "root", "--service", "su-l"], exitcodes.NEGATIVE),
    (["check-user", "no-such-user-xyz"], exitcodes.NEGATIVE),
    (["check-config"], exitcodes.OK),
    (["check-config", "{bad}"], exitcodes.NEGATIVE),
    (["whoami"], exitcodes.FAILED),
    (["elevate", "admin", "--reason", "x"], exitcodes.BROKER_UNREACHABLE),
    (["status"], exitcodes.BROKER_UNREACHABLE),
    (["profiles"], exitcodes.BROKER_UNREACHABLE),
    (["approvals"], exitcodes.BROKER_UNREACHABLE),
], ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_cli__json_prints_one_object_with_the_same_exit_code(argv, expected, write_config):
    bad = write_config(CONFIG.replace("roles:", "rols:"), "bad.yaml")
    argv = [a.format(bad=bad) for a in argv]
    code, out, err = rolegate(*argv, "--json", config=write_config(CONFIG))
    assert code == expected, f"rolegate {' '.join(argv)} --json: exit {code}, expected {expected}\n{out}{err}"
    found = _json(out, f"rolegate {' '.join(argv)} --json")
    if expected != exitcodes.OK and argv[0] not in ("check-user", "check-config"):
        assert found.get("exit_code") == expected and found.get("error"), f"the error is not in the JSON: {found}"


def test_cli__json_answers_of_check_user_check_config_and_whoami(moto, write_config):
    path = write_config(PROFILES)
    found = _json(rolegate("check-user", "root", "--json", config=path)[1], "check-user --json")
    assert found["granted"] and found["role"] == MAPPED and found["principal"] == "root", found
    assert [p["profile"] for p in found["profiles"]] == ["default", "deploy"], found["profiles"]
    assert found["profiles"][0]["source_identity"] == "root", found["profiles"][0]
    found = _json(rolegate("check-user", "nobody", "--json", config=path)[1], "check-user --json")
    assert not found["granted"] and found["role"] is None and "no rule matches" in found["decision"], found
    found = _json(rolegate("check-config", "--json", config=path)[1], "check-config --json")
    assert found["valid"] and found["rules"] == 4 and found["warnings"] == [], found
    found = _json(rolegate("check-config", "--json", config=write_config("version: 1\n", "v.yaml"))[1], "json")
    assert not found["valid"] and found["line"] == 1 and "region" in found["error"], found
    keys = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}
    code, out, err = rolegate("whoami", "--json", config=path, env=dict(moto.env(), **keys))
    found = _json(out, "whoami --json")
    assert code == 0 and found.get("Arn", "").startswith("arn:aws:") and found.get("Account"), f"{found} {err}"
    assert rolegate("whoami", config=path, env=dict(moto.env(), **keys))[1] == found["Arn"] + "\n", \
        "whoami without --json should print the ARN alone, as before"


def test_cli__a_closed_pipe_ends_quietly(write_config):
    # Far more than a pipe holds, so the write meets the closed pipe for certain.
    roles = "".join(f"  - match: {{user: u{i}}}\n    role: arn:aws:iam::123456789012:role/r{i}\n" for i in range(3000))
    path = write_config("version: 1\nregion: us-east-1\nroles:\n" + roles)
    env = {"PATH": "/usr/bin:/bin", "ROLEGATE_CONFIG": path, "LANG": "C.UTF-8"}
    producer = subprocess.Popen([ROLEGATE, "policy"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    head = subprocess.run(["head", "-1"], stdin=producer.stdout, capture_output=True, text=True, timeout=60)
    producer.stdout.close()
    err = producer.stderr.read().decode()
    code = producer.wait(60)
    assert head.stdout == "{\n", f"head should have read the first line: {head.stdout!r}"
    assert err == "", f"`rolegate policy | head -1` wrote to stderr (a traceback?):\n{err}"
    assert code == exitcodes.BROKEN_PIPE, f"`rolegate policy | head -1`: exit {code}, expected {exitcodes.BROKEN_PIPE}"


@pytest.mark.parametrize("text,warns", [
    ("version: 1\nregion: us-east-1\n", "it has no rules"),
    ("version: 1\nregion: us-east-1\nroles: []\n", "it has no rules"),
    ("version: 1\nregion: us-east-1\nroles:\n  - match: {user: root}\n    profile: deploy\n"
     "    role: arn:aws:iam::123456789012:role/deploy\n", "every rule names a profile"),
    (CONFIG, None),
    ("version: 1\nregion: us-east-1\nrules_from: ssm:/rolegate/rules\n", None),
], ids=["no roles", "empty roles", "only named profiles", "rules", "rules_from"])
def test_cli__check_config_warns_when_no_rule_maps_anyone(text, warns, write_config):
    path = write_config(text)
    code, out, err = rolegate("check-config", path)
    assert code == 0 and "OK" in out, f"a valid config stays valid (exit 0): exit {code}\n{out}{err}"
    if warns:
        assert "warning" in err and "maps nobody" in err and warns in err, f"no warning on stderr:\n{err}"
        assert "maps nobody" not in out, "the warning belongs on stderr, not stdout"
    else:
        assert "warning" not in err, f"a warning for a config that maps someone (or whose rules are elsewhere):\n{err}"


@pytest.mark.parametrize("service", ["su", "su-l", "cron", "gdm-password"])
def test_cli__check_user_warns_for_a_service_the_hook_never_runs_for(service, write_config):
    path = write_config(CONFIG.replace("match: {user: root}", "match: {user: root, service: [sshd, shell, %s]}"
                                       % service))
    code, out, err = rolegate("check-user", "root", "--service", service, config=path)
    assert code == exitcodes.NEGATIVE, f"check-user --service {service} should exit 1: exit {code}\n{out}{err}"
    assert "warning" in err and f"never runs for {service}" in err, f"no warning for {service}:\n{err}"
    head = out.split("instead:", 1)[0]
    assert not re.search(r"^\s*role:", head, re.M) and "no role" in head, f"a role was reported for {service}, which the hook skips:\n{out}"
    found = _json(rolegate("check-user", "root", "--service", service, "--json", config=path)[1], "--json")
    assert found["granted"] is False and found["service"] == service, found
    if service.startswith("su"):
        # su's shells ask as `shell`, as the account they run in: what that gives is shown instead.
        assert f"--service shell" in out and f"role:      {MAPPED}" in out.split("instead:", 1)[1], out
        assert found["instead"]["service"] == "shell" and found["instead"]["role"] == MAPPED, found
    else:
        assert "instead" not in found and "no rolegate credentials come from" in err, f"{found}\n{err}"


@pytest.mark.parametrize("service", ["sshd", "sudo", "sudo-i", "login", "shell", "imds"])
def test_cli__check_user_does_not_warn_for_the_services_rolegate_serves(service, write_config):
    code, out, err = rolegate("check-user", "root", "--service", service,
                              config=write_config(CONFIG.replace("match: {user: root}", "match: {}")))
    assert code == 0 and f"role:      arn:aws" in out and "warning" not in err, f"{service}: exit {code}\n{out}{err}"


# -- the manual pages: generated by scripts/manpages on Debian's python3, checked as man reads them -----

MANPAGES = os.path.join(REPO, "scripts", "manpages")
CONFIG_DOC = os.path.join(REPO, "docs", "configuration.md")


def generate(outdir, *extra):
    return subprocess.run(["/usr/bin/python3", MANPAGES, str(outdir), *extra], capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": REPO, "LANG": "C.UTF-8",
                                            "SOURCE_DATE_EPOCH": "1700000000", "PYTHONDONTWRITEBYTECODE": "1"})


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    out = tmp_path_factory.mktemp("man")
    done = generate(out)
    assert done.returncode == 0, f"scripts/manpages failed (scripts/deps installs its tools):\n{done.stderr}"
    return {name: (out / name).read_text() for name in ("rolegate.8", "rolegated.8", "rolegate.yaml.5")}


def plain(roff):
    """roff source as words: escaped hyphens as hyphens, font changes and italic corrections gone."""
    return re.sub(r"\\f[BIRP]|\\[,/&]", "", roff).replace("\\-", "-").replace("\\(aq", "'")


def options(p):
    return [o for a in p._actions for o in a.option_strings if o not in ("-h", "--help")]


def positional(action):
    """A positional argument as usage shows it: its metavar, its choices, or its name."""
    return action.metavar or ("{" + ",".join(action.choices) + "}" if action.choices else action.dest)


def test_manpages__rolegate_8_names_every_command_and_option(pages):
    text = plain(pages["rolegate.8"])
    assert text.startswith('.TH ROLEGATE 8 "2023-11-14"'), f"rolegate.8 should be section 8, dated by " \
                                                           f"SOURCE_DATE_EPOCH: {text.splitlines()[0]}"
    missing = [o for o in options(cli.parser()) if o not in text.split(".SH OPTIONS '", 1)[0]]
    sections = dict(re.findall(r"^\.SH OPTIONS 'rolegate ([a-z-]+)'\n(.*?)(?=^\.SH )", text, re.M | re.S))
    for verb, sub in SUBCOMMANDS.items():
        if f"rolegate {verb}" not in sections.get(verb, "") and verb not in sections:
            missing.append(f"command {verb}")
            continue
        missing += [f"{verb} {o}" for o in options(sub) if o not in sections[verb]]
        missing += [f"{verb} {positional(a)}" for a in sub._actions
                    if not a.option_strings and positional(a) not in sections[verb]]
    assert not missing, f"rolegate.8 does not name: {missing}"
    for heading in ("EXIT STATUS", "ENVIRONMENT", "FILES", "SEE ALSO"):
        assert f".SH {heading}" in text, f"rolegate.8 has no {heading} section"
    exit_status = text.split(".SH EXIT STATUS", 1)[1].split(".SH ", 1)[0]
    absent = [code for code, _ in exitcodes.TABLE if not re.search(rf"^{code}\s", exit_status, re.M)]
    assert not absent, f"rolegate.8's EXIT STATUS lacks the codes {absent}:\n{exit_status}"


def test_manpages__rolegated_8_names_its_options(pages):
    text = plain(pages["rolegated.8"])
    assert text.startswith(".TH ROLEGATED 8 "), text.splitlines()[0]
    missing = [o for o in options(cli.daemon_parser()) if o not in text]
    missing += [h for h in ("SIGNALS", "EXIT STATUS", "FILES", "SEE ALSO") if f".SH {h}" not in text]
    assert not missing, f"rolegated.8 lacks {missing}"


def test_manpages__rolegate_yaml_5_names_every_key_of_the_docs_table(pages):
    rows = runpy.run_path(MANPAGES)["key_table"](CONFIG_DOC)
    text = plain(pages["rolegate.yaml.5"])
    assert re.match(r'(?s).*^\.TH "ROLEGATE\.YAML" "?5"? ', text, re.M), "rolegate.yaml.5 is not in section 5"
    missing = [key for key, _, _ in rows if f"\\fB{key}\\fP" not in pages["rolegate.yaml.5"].replace("\\-", "-")
               and key not in text]
    assert len(rows) > 20 and not missing, f"rolegate.yaml.5 lacks the keys {missing} of {CONFIG_DOC}"
    for heading in ("KEYS", "EXAMPLE", "FILES", "SEE ALSO"):
        assert re.search(rf'^\.SH "?{heading}"?$', text, re.M), f"rolegate.yaml.5 has no {heading} section"


def test_manpages__the_example_config_is_valid():
    from pam_rolegate.rules import config

    example = runpy.run_path(MANPAGES)["EXAMPLE"]
    assert config.parse(example).roles, "rolegate.yaml(5)'s example maps nobody"


@pytest.mark.parametrize("name", ["rolegate.8", "rolegated.8", "rolegate.yaml.5"])
def test_manpages__man_renders_them_without_warnings(name, pages, tmp_path):
    path = tmp_path / name
    path.write_text(pages[name])
    # As lintian's manpage check runs it (manpage-has-errors-from-man).
    done = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(path)], capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "MANWIDTH": "80",
                                                      "MANROFFSEQ": ""})
    assert done.returncode == 0 and done.stderr == "", f"man --warnings on {name}:\n{done.stderr}"


def test_manpages__a_missing_key_table_fails_loudly(tmp_path):
    doc = tmp_path / "configuration.md"
    doc.write_text("# Configuration\n\nNo table here.\n")
    done = generate(tmp_path / "out", "--config-doc", str(doc))
    assert done.returncode != 0 and "| key | default | meaning |" in done.stderr, \
        f"scripts/manpages should refuse a doc without the key table: exit {done.returncode}\n{done.stderr}"
    assert not (tmp_path / "out").exists(), "scripts/manpages wrote pages although the key table was missing"
