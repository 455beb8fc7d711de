"""Named profiles with real parts: several roles per person on every delivery and entry path, their
STS cost counted at the stand-in, a source_profile chain from the user's own config, and rules
changes reaching live sessions (docs/profiles-and-elevation.md "Several roles per person").

Runs in test_imds's lab (its own network namespace, moto, sshd and the broker in it), where every
delivery works, container's loopback endpoint included.
"""

import json
import os
import signal
import sys
import time

import pytest

from harness import (ACCOUNT, AWS_CLI, AWS_CLIS, JS_SDK, RUNTIME_DIR, VENV, Shell,
                     assert_refused_by_container_endpoint, cli_sts_arn, refused_by_container_endpoint, run)
from test_imds import alice_aws_config, lab, role_arn_prefix  # noqa: F401 (lab: the fixture)

ROLEGATE = os.path.join(VENV, "bin", "rolegate")


def rule(match, role, profile=None):
    named = f"    profile: {profile}\n" if profile else ""
    return f"  - match: {match}\n{named}    role: arn:aws:iam::{ACCOUNT}:role/{role}\n"


# alice's ssh and shell logins: alice-role (test_imds's first rule) plus profiles a and b; her
# `sudo -i` (target root): a default and an a and b of its own.
PROFILES = (rule("{user: alice}", "alice-a", "a") + rule("{user: alice}", "alice-b", "b")
            + rule("{user: alice, service: sudo-i, target: root}", "alice-root")
            + rule("{user: alice, service: sudo-i, target: root}", "alice-root-a", "a")
            + rule("{user: alice, service: sudo-i, target: root}", "alice-root-b", "b"))
EXPECTED = {"ssh": {"default": "alice-role", "a": "alice-a", "b": "alice-b"},
            "sudo-i": {"default": "alice-root", "a": "alice-root-a", "b": "alice-root-b"}}

# Who each client says the caller is, for the default and each named profile, and for AWS_PROFILE.
# One line of `;`-separated commands: `sudo -i` joins its arguments and escapes newlines away.
CLIENT_NAMES = (*AWS_CLIS, "BOTO", "WHOAMI", "JS")


def _clients(profile):
    """No shell variables: `sudo -i` hands the line to a login shell that expands them first."""
    o = "" if profile == "default" else f"--profile {profile}"
    name = "None" if profile == "default" else repr(profile)
    return [
        f"echo \"{cli}_{profile}=$({cli_sts_arn(cli, profile)} 2>&1 | tail -n 1)\"" for cli in AWS_CLIS] + [
        f"echo \"BOTO_{profile}=$({sys.executable} -c \"import boto3; print(boto3.session.Session(profile_name={name})"
        f".client('sts').get_caller_identity()['Arn'])\" 2>&1 | tail -n 1)\"",
        f"echo \"WHOAMI_{profile}=$({ROLEGATE} whoami {o} 2>&1 | tail -n 1)\"",
        f"echo \"JS_{profile}=$({JS_SDK} whoami {profile} 2>&1 | tail -n 1)\"",
    ]


CLIENTS = "; ".join(
    ["export AWS_ENDPOINT_URL_STS=%(sts)s"] + _clients("default") + _clients("a") + _clients("b") + [
        *[f"echo \"{cli}_ENV_b=$(AWS_PROFILE=b {cli_sts_arn(cli)} 2>&1 | tail -n 1)\"" for cli in AWS_CLIS],
        f"echo \"JS_ENV_b=$(AWS_PROFILE=b {JS_SDK} whoami 2>&1 | tail -n 1)\"",
        "echo \"POINTERS=${AWS_SHARED_CREDENTIALS_FILE:-}|${AWS_CONFIG_FILE:-}|${AWS_CONTAINER_CREDENTIALS_FULL_URI:-}\"",
    ])


def in_session(lab, path, user, script, timeout=120):
    """`script` in a session of `user` entered through `path`, all of it in the lab's namespace."""
    if path in ("ssh", "ssh-login"):
        return lab.h.session(path, user, script, timeout=timeout)
    who = ["setpriv", "--reuid", user, "--regid", user, "--init-groups", "--reset-env"]
    if path == "sudo-i":
        import shlex
        return run(lab.ns + who + ["sh", "-c", shlex.join(["sudo", "-i", "sh", "-c", script])],
                   timeout=timeout, check=False)
    if path == "shell":  # a PAM-less login shell, as SSM Session Manager starts one
        return run(lab.ns + ["setsid", "--wait"] + who + ["bash", "-l", "-c", script], timeout=timeout, check=False)
    if path == "su-l":
        return run(lab.ns + ["su", "-l", user, "-c", script], timeout=timeout, check=False)
    raise ValueError(path)


def lines_of(done):
    return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)


def configure_profiles(lab, **settings):
    lab.h.allow_sudo("alice")
    lab.configure(extra=PROFILES, **settings)


# su -l takes the same PAM-less path as the SSM-style shell: once, under file delivery, is enough.
CASES = [(d, p) for d in ("file", "process", "container") for p in ("ssh", "ssh-login", "sudo-i", "shell")] \
    + [("file", "su-l")]


@pytest.mark.parametrize("delivery,path", CASES)
def test_profiles__every_client_gets_each_profiles_role_on_every_path_and_delivery(lab, delivery, path):
    configure_profiles(lab, delivery=delivery)
    done = in_session(lab, path, "alice", CLIENTS % {"sts": lab.sts_url})
    got = lines_of(done)
    what = f"alice's {path} login under {delivery} delivery"
    assert done.returncode == 0 and got.get("POINTERS"), f"{what} failed: {done.stdout}\n{done.stderr[-2000:]}"
    expected = EXPECTED["sudo-i" if path == "sudo-i" else "ssh"]
    wrong, refused = {}, {}
    for profile, role in expected.items():
        for client in CLIENT_NAMES:
            arn = got.get(f"{client}_{profile}", "")
            if refused_by_container_endpoint(client, delivery, profile):
                refused[f"{client} {profile}"] = arn
            elif not arn.startswith(role_arn_prefix(role)):
                wrong[f"{client} {profile}"] = f"{arn!r}, expected role {role}"
    for client in (*AWS_CLIS, "JS"):
        if not got.get(f"{client}_ENV_b", "").startswith(role_arn_prefix(expected["b"])):
            wrong[f"AWS_PROFILE=b ({client})"] = got.get(f"{client}_ENV_b")
    assert not wrong, f"{what}: clients named the wrong role:\n" + "\n".join(f"  {k}: {v}" for k, v in wrong.items()) \
        + f"\n{done.stdout}\n{done.stderr[-2000:]}"
    for client, answer in refused.items():  # the CLI v2's known limit under container delivery
        assert_refused_by_container_endpoint(answer, f"{what}, {client}")


def test_profiles__a_login_costs_one_assume_role_and_each_profile_one_on_first_use(lab):
    configure_profiles(lab)
    lab.settings = None  # a fresh broker: no grant of alice's held or lingering
    configure_profiles(lab)
    before = lab.assume_role_calls()
    done = in_session(lab, "ssh", "alice", "true")
    assert done.returncode == 0, f"alice's login failed: {done.stderr}"
    login = lab.assume_role_calls() - before
    script = "; ".join(["export AWS_ENDPOINT_URL_STS=%s" % lab.sts_url] + [
        f"{AWS_CLI} sts get-caller-identity {o} --query Arn --output text"
        for o in ("", "--profile a", "--profile a", "--profile b", "--profile b", "--profile a")])
    before = lab.assume_role_calls()
    done = in_session(lab, "ssh", "alice", script)
    arns = done.stdout.split()
    assert done.returncode == 0 and len(arns) == 6, f"alice's uses of her profiles failed: {done.stdout} {done.stderr}"
    uses = lab.assume_role_calls() - before
    print(f"\nAssumeRole calls: first login {login}; then a login (the grant lingering) using default once, "
          f"a 3 times and b twice: {uses}")
    assert login == 1, f"a login with two named profiles made {login} AssumeRole calls; docs/profiles-and-elevation.md says 1"
    assert uses == 2, f"first use of a and of b should cost one AssumeRole each and nothing more: {uses} calls"


# Under both deliveries that write the credentials file (process delivery too: it leaves AWS_CONFIG_FILE
# alone), alice's own ~/.aws/config stays in use: her profiles, their regions, her output setting.
@pytest.mark.parametrize("delivery", ["file", "process"])
def test_profiles__a_source_profile_chain_from_the_users_own_config_starts_at_a_rolegate_profile(lab, delivery):
    configure_profiles(lab, delivery=delivery)

    def chain(path):
        with open(path, "w") as fh:
            fh.write(f"[default]\nregion = eu-west-2\noutput = json\n[profile chain]\n"
                     f"role_arn = arn:aws:iam::{ACCOUNT}:role/chained\nsource_profile = a\n"
                     f"role_session_name = alice-chain\nregion = ap-south-1\n")
    cleanup = alice_aws_config(chain)
    try:
        script = "; ".join([
            "export AWS_ENDPOINT_URL_STS=%s" % lab.sts_url,
            # her own [profile chain]'s region, as each client resolves it (the CLI v1's `configure list`
            # says from where; the v2 is asked only what it reads, for the reason below)
            f"echo \"BOTO_REGION=$({sys.executable} -c \"import boto3; print(boto3.session.Session("
            "profile_name='chain').region_name)\" 2>&1 | tail -n 1)\"",
            f"echo \"CLI_REGION=$({AWS_CLI} configure list --profile chain 2>&1 | awk '$1 == \"region\" "
            "{print $2 \"/\" $3}')\"",
            f"echo \"CLI2_REGION=$({AWS_CLIS['CLI2']} configure get region --profile chain)\"",
            f"echo \"JS_REGION=$({JS_SDK} region chain 2>&1 | tail -n 1)\"",
            f"echo \"CLI=$({AWS_CLI} sts get-caller-identity --profile chain --query Arn --output text 2>&1 | tail -n 1)\"",
            f"echo \"BOTO=$({sys.executable} -c \"import boto3; print(boto3.session.Session(profile_name='chain')"
            ".client('sts').get_caller_identity()['Arn'])\" 2>&1 | tail -n 1)\"",
            f"echo \"JS=$({JS_SDK} whoami chain 2>&1 | tail -n 1)\"",
            # The CLI v2 is not asked for the chain: 2.9.19 predates AWS_ENDPOINT_URL_STS, and the chain's
            # AssumeRole (which no command-line flag reaches) would go to AWS's own STS, outside the lab.
            *[f"echo \"{cli}_OUTPUT=$({path} configure get output)\"" for cli, path in AWS_CLIS.items()],
        ])
        got = lines_of(in_session(lab, "ssh", "alice", script))
    finally:
        cleanup()
    expected = f"arn:aws:sts::{ACCOUNT}:assumed-role/chained/alice-chain"
    assert got.get("CLI") == expected and got.get("BOTO") == expected and got.get("JS") == expected, \
        f"a chain whose source_profile is rolegate's profile a should reach {expected}: {got}"
    assert got.get("CLI_OUTPUT") == "json" and got.get("CLI2_OUTPUT") == "json", \
        f"alice's own `output` setting was lost (CLI v1, CLI v2): {got}"
    regions = {k: got.get(k) for k in ("BOTO_REGION", "CLI_REGION", "CLI2_REGION", "JS_REGION")}
    assert regions == {"BOTO_REGION": "ap-south-1", "CLI_REGION": "ap-south-1/config-file",
                       "CLI2_REGION": "ap-south-1", "JS_REGION": "ap-south-1"}, \
        f"under {delivery} delivery alice's own profile chain should keep its region ap-south-1: {regions}"


def moved_rules(role):
    """alice's ssh default moved to `role`; her profile a kept, b gone, c new."""
    return (rule("{user: alice, service: sshd}", role) + rule("{user: alice}", "alice-a", "a")
            + rule("{user: alice}", "alice-c", "c"))


@pytest.mark.parametrize("delivery", ["file", "process"])
def test_profiles__a_reload_that_moves_a_live_session_to_another_role_reaches_it_at_once(lab, delivery):
    configure_profiles(lab, delivery=delivery)
    shell = Shell(lab.h, "alice")
    try:
        ask = f"AWS_ENDPOINT_URL_STS={lab.sts_url} {AWS_CLI} sts get-caller-identity --query Arn --output text"
        before = shell.do(ask)
        assert before.startswith(role_arn_prefix("alice-role")), f"alice's session should start on alice-role: {before}"
        pointers = shell.do("echo ${AWS_SHARED_CREDENTIALS_FILE:-}${AWS_CONFIG_FILE:-}")
        assert pointers.startswith(RUNTIME_DIR + "/grants/"), f"no rolegate file in alice's session: {pointers!r}"
        # The reload: test_imds's rules stay first, so put the move ahead of them in `extra` by
        # replacing the config's text, and SIGHUP the broker (what `systemctl reload` does).
        text = open("/etc/rolegate/rolegate.yaml").read()
        head, _, _ = text.partition("roles:\n")
        moved = head + "roles:\n" + moved_rules("alice-moved") + \
            "  - match: {user: alice}\n    role: arn:aws:iam::%s:role/alice-role\n" % ACCOUNT
        lab.h.write_config(moved)
        mark = lab.h.log_mark()
        lab.h.broker.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "reloaded: " not in lab.h.log_since(mark) and time.monotonic() < deadline:
            time.sleep(0.05)  # the old role is still the rules' answer until then
        assert "reloaded: " in lab.h.log_since(mark), f"the broker did not reload:\n{lab.h.log_since(mark)[-3000:]}"
        seen = []
        while time.monotonic() < deadline:
            arn = shell.do(ask)
            seen.append(arn)
            if arn.startswith(role_arn_prefix("alice-moved")):
                break
            time.sleep(0.2)
        log = lab.h.log_since(mark)
        assert seen and seen[-1].startswith(role_arn_prefix("alice-moved")), \
            f"the live session never saw its new role within 30 s: {seen[-3:]}\n{log[-3000:]}"
        old = [a for a in seen if a.startswith(role_arn_prefix("alice-role"))]
        assert not old, f"the session saw its old role after the reload moved it: {old}"
        assert "moved: " in log, f"no `moved` line in the broker's log:\n{log[-3000:]}"
        after_pointers = shell.do("echo ${AWS_SHARED_CREDENTIALS_FILE:-}${AWS_CONFIG_FILE:-}")
        assert after_pointers == pointers, "the session's environment changed: it cannot have"
        profiles = json.loads(shell.do(f"{ROLEGATE} profiles --json"))["profiles"]
        named = {p["profile"]: p["role"].rsplit("/", 1)[-1] for p in profiles}
        assert named == {"default": "alice-moved", "a": "alice-a", "c": "alice-c"}, \
            f"`rolegate profiles` in the moved session should show the new rules' profiles: {profiles}"
        c = shell.do(f"AWS_ENDPOINT_URL_STS={lab.sts_url} {AWS_CLI} sts get-caller-identity --profile c "
                     f"--query Arn --output text")
        assert c.startswith(role_arn_prefix("alice-c")), f"profile c, added by the reload, did not work: {c}"
        b = shell.do(f"AWS_ENDPOINT_URL_STS={lab.sts_url} {AWS_CLI} sts get-caller-identity --profile b "
                     f"--query Arn --output text")
        assert not b.startswith("arn:"), f"profile b, which the reload took away, still gave credentials: {b}"
    finally:
        shell.close()
        lab.settings = None  # the config on disk is not what configure() last wrote


def test_profiles__profiles_and_status_show_what_is_held_and_until_when(lab):
    configure_profiles(lab)
    shell = Shell(lab.h, "alice")
    try:
        first = json.loads(shell.do(f"{ROLEGATE} profiles --json"))["profiles"]
        held = {p["profile"]: p["held"] for p in first}
        assert held.get("default") is True and held.get("a") is False and held.get("b") is False, \
            f"before any use only the default should be held: {first}"
        shell.do(f"AWS_ENDPOINT_URL_STS={lab.sts_url} {AWS_CLI} sts get-caller-identity --profile a")
        after = {p["profile"]: p for p in json.loads(shell.do(f"{ROLEGATE} profiles --json"))["profiles"]}
        assert after["a"]["held"] and after["a"]["expires"], f"profile a should be held after its use: {after}"
        assert not after["b"]["held"], f"profile b was never used, yet is held: {after}"
        table = shell.do(f"{ROLEGATE} profiles")
        assert "alice-a" in table and "until" in table and "first use" in table, f"the profiles table:\n{table}"
        status = shell.do(f"{ROLEGATE} status")
        assert " a " in status and "alice-a" in status, f"`rolegate status` does not show the held profile a:\n{status}"
    finally:
        shell.close()


def test_profiles__another_user_cannot_use_alices_named_profile(lab):
    configure_profiles(lab)
    shell = Shell(lab.h, "alice")
    try:
        path = shell.do("echo $AWS_SHARED_CREDENTIALS_FILE")
        grant = path.split("/grants/", 1)[1].split("/", 1)[0]
        done = run(lab.cmd("bob", [ROLEGATE, "credentials", "--grant", grant, "--profile", "a"]), check=False)
        assert done.returncode != 0 and "AccessKeyId" not in done.stdout, \
            f"bob got alice's profile a through her grant id: {done.stdout}"
        mine = json.loads(shell.do(f"{ROLEGATE} credentials --grant {grant} --profile a"))
        assert mine.get("AccessKeyId"), f"alice herself should get her profile a: {mine}"
        for name in ("a b", "../x", "a]\n[default"):  # never reaches a file or a shell
            done = run(lab.cmd("alice", [ROLEGATE, "credentials", "--grant", grant, "--profile", name]), check=False)
            assert done.returncode != 0 and "AccessKeyId" not in done.stdout, f"profile {name!r} got keys"
    finally:
        shell.close()


def test_profiles__imds_serves_the_default_role_to_a_user_with_named_profiles(lab):
    configure_profiles(lab)
    got = lab.whoami("alice")
    assert got.get("arn", "").startswith(role_arn_prefix("alice-role")) and got.get("method") == "iam-role", \
        f"IMDS should hand alice her default role, not a named profile: {got}"
