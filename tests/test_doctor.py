"""rolegate doctor on a complete sandbox installation inside a network namespace with a real IMDS
stand-in (moto on 169.254.169.254), then with each piece broken on purpose."""

import json
import os
import secrets
import signal
import subprocess
import sys
import time

import pytest

import imds_standin
from conftest import require_sandbox
from harness import make_host, run
from pam_rolegate.backends import firewall


AUDIT_LINE = "imds: {mode: audit}\n"


@pytest.fixture(scope="module")
def site():
    require_sandbox()
    h = make_host()
    h.install_commands()
    for user in ("eve", "mal"):  # the audit test's IMDS users
        h.add_user(user)
    name = "rg-doc-" + secrets.token_hex(3)
    run(["ip", "netns", "add", name])
    ns = ["ip", "netns", "exec", name]
    run(ns + ["ip", "link", "set", "lo", "up"])
    run(ns + ["ip", "addr", "add", firewall.IMDS_V4 + "/32", "dev", "lo"])
    run(ns + ["ip", "-6", "addr", "add", firewall.IMDS_V6 + "/128", "dev", "lo", "nodad"], check=False)
    moto_bin = os.path.join(os.path.dirname(sys.executable), "moto_server")
    procs = [subprocess.Popen(ns + [moto_bin, "-H", addr, "-p", "80"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for addr in (firewall.IMDS_V4, firewall.IMDS_V6)]
    env = dict(os.environ, AWS_ENDPOINT_URL_STS=f"http://{firewall.IMDS_V4}")
    deadline = time.monotonic() + 30
    while run(ns + ["python3", "-c", f"import socket; socket.create_connection(('{firewall.IMDS_V4}', 80), 1)"],
              check=False).returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    # install writes its example config only where none exists: a config an earlier module of this
    # run left in the sandbox's /etc (other rules, other durations) would otherwise be the one tested.
    if os.path.exists("/etc/rolegate/rolegate.yaml"):
        os.unlink("/etc/rolegate/rolegate.yaml")
    installed = run(ns + ["rolegate", "install"], check=False, env=env)
    assert installed.returncode == 0, f"install failed: {installed.stdout} {installed.stderr}"
    # The example config ships imds.mode audit (tests/test_install.py checks what that does); the
    # tests here start from an enforced host, as an admin's after `imds.mode: reject`, and the audit
    # test below puts the shipped text back.
    with open("/etc/rolegate/rolegate.yaml") as fh:
        shipped = fh.read()
    assert AUDIT_LINE in shipped, f"the example config should ship {AUDIT_LINE!r}:\n{shipped}"
    with open("/etc/rolegate/rolegate.yaml", "w") as fh:
        fh.write(shipped.replace(AUDIT_LINE, ""))
    run(ns + ["rolegate", "firewall", "apply"], env=env)
    broker = {}

    def start():
        broker["p"] = subprocess.Popen(ns + ["rolegated"], env=env, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 20
        while not os.path.exists("/run/rolegate/rolegated.sock") and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop():
        broker["p"].send_signal(signal.SIGTERM)
        broker["p"].wait(15)

    start()

    def doctor():
        done = run(ns + ["rolegate", "doctor", "--json"], check=False, env=env)
        return done.returncode, {r["name"]: r for r in json.loads(done.stdout)}

    yield ns, doctor, start, stop, env
    stop()
    with open("/etc/rolegate/rolegate.yaml", "w") as fh:
        fh.write(shipped)  # as install wrote it, so uninstall takes it away and later modules start without it
    run(ns + ["rolegate", "uninstall"], check=False)
    for p in procs:
        p.terminate()
        p.wait(10)
    run(["ip", "netns", "delete", name], check=False)
    h.stop()


def test_doctor__passes_on_a_complete_installation(site):
    _ns, doctor, *_ = site
    code, results = doctor()
    failed = {n: r["detail"] for n, r in results.items() if r["verdict"] == "FAIL"}
    assert code == 0 and not failed, f"doctor failed on a complete installation: {failed}"
    for name in ("config", "pam-sshd", "pam-sudo", "pam-sudo-i", "pam-allow-list", "sudo-secure-path",
                 "profile-d", "runtime-dir", "broker", "imds-ipv4", "gatekeeper"):
        assert results.get(name, {}).get("verdict") == "PASS", f"check {name}: {results.get(name)}"


def _expect_fail(doctor, name):
    code, results = doctor()
    failed = sorted(n for n, r in results.items() if r["verdict"] == "FAIL")
    assert code == 1, f"doctor exited {code} with {name} broken"
    assert name in failed, f"breaking {name} should fail check {name}; failed: {failed}"
    assert results[name].get("fix"), f"the failing check {name} gives no fix"
    return failed


def test_doctor__names_each_broken_piece(site):
    ns, doctor, start, stop, env = site
    # firewall removed
    run(ns + ["rolegate", "firewall", "remove"])
    assert _expect_fail(doctor, "imds-ipv4")
    run(ns + ["rolegate", "firewall", "apply"], env=env)
    # broker stopped
    stop()
    _expect_fail(doctor, "broker")
    start()
    # PAM line missing
    run(["pam-auth-update", "--package", "--remove", "rolegate"], env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    _expect_fail(doctor, "pam-sshd")
    run(["pam-auth-update", "--package", "--enable", "rolegate"], env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    # hook reachable from su (no guard)
    with open("/etc/pam.d/su", "a") as fh:
        fh.write("session optional pam_python.so /x/pam_rolegate/pam_hook.py\n")
    _expect_fail(doctor, "pam-allow-list")
    lines = open("/etc/pam.d/su").read().splitlines()[:-1]
    with open("/etc/pam.d/su", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    # bad config
    cfg = open("/etc/rolegate/rolegate.yaml").read()
    with open("/etc/rolegate/rolegate.yaml", "a") as fh:
        fh.write("rols: []\n")
    _expect_fail(doctor, "config")
    with open("/etc/rolegate/rolegate.yaml", "w") as fh:
        fh.write(cfg)
    # runtime dir world-writable
    os.chmod("/run/rolegate", 0o777)
    _expect_fail(doctor, "runtime-dir")
    os.chmod("/run/rolegate", 0o755)
    code, results = doctor()
    assert code == 0, f"with every piece mended doctor should pass: " \
                      f"{ {n: r['detail'] for n, r in results.items() if r['verdict'] == 'FAIL'} }"


def test_doctor__emulate_mode_passes_with_the_emulator_up_and_names_it_when_down(site):
    ns, doctor, _start, _stop, env = site
    port = 254
    cfg = open("/etc/rolegate/rolegate.yaml").read()
    stand_in = None
    try:
        with open("/etc/rolegate/rolegate.yaml", "a") as fh:
            fh.write(f"imds:\n  mode: emulate\n  port: {port}\n")
        run(ns + ["rolegate", "firewall", "apply"], env=env)
        stand_in = imds_standin.start(ns, [("127.0.0.1", port, "stand-in-v4"), ("::1", port, "stand-in-v6")])
        code, results = doctor()
        failed = {n: r["detail"] for n, r in results.items() if r["verdict"] == "FAIL"}
        assert code == 0 and not failed, f"doctor in emulate mode with the emulator up should pass: {failed}"
        for name in ("imds-ipv4", "imds-ipv6"):
            r = results.get(name, {})
            assert r.get("verdict") == "PASS" and "redirected" in r.get("detail", ""), \
                f"{name} should pass as redirected to the emulator: {r}"
        share = results.get("door-share", {})
        assert share.get("verdict") == "PASS" and str(port) in share.get("detail", ""), \
            f"the emulator's port should have its per-user share in the firewall: {share}"
        imds_standin.stop(stand_in)
        _expect_fail(doctor, "imds-ipv4")
        _code, results = doctor()
        for name in ("imds-ipv4", "imds-ipv6"):
            r = results[name]
            assert r["verdict"] == "FAIL" and "emulator down" in r["detail"] and "rolegated" in r["fix"], \
                f"{name} should name the emulator as down, with the fix: {r}"
        # emulate mode asked for, but the rules in force are reject mode's: not "emulator down"
        with open("/etc/rolegate/rolegate.yaml", "w") as fh:
            fh.write(cfg)
        run(ns + ["rolegate", "firewall", "apply"], env=env)
        with open("/etc/rolegate/rolegate.yaml", "a") as fh:
            fh.write(f"imds:\n  mode: emulate\n  port: {port}\n")
        stand_in = imds_standin.start(ns, [("127.0.0.1", port, "stand-in-v4"), ("::1", port, "stand-in-v6")])
        _expect_fail(doctor, "imds-ipv4")
        _code, results = doctor()
        r = results["imds-ipv4"]
        assert "not redirected" in r["detail"] and "firewall apply" in r["fix"], \
            f"reject rules under an emulate config should say so: {r}"
        share = results.get("door-share", {})
        assert share.get("verdict") == "FAIL" and "firewall apply" in share.get("fix", ""), \
            f"rules without the emulator port's share should fail door-share, with the fix: {share}"
    finally:
        if stand_in is not None and stand_in.poll() is None:
            imds_standin.stop(stand_in)
        with open("/etc/rolegate/rolegate.yaml", "w") as fh:
            fh.write(cfg)
        run(ns + ["rolegate", "firewall", "apply"], env=env)
    code, results = doctor()
    assert code == 0, f"back in reject mode doctor should pass: " \
                      f"{ {n: r['detail'] for n, r in results.items() if r['verdict'] == 'FAIL'} }"


def test_doctor__config_and_runtime_dir_walk_the_parents_as_the_broker_does(tmp_path):
    """doctor's config check is check-config's (runtime_dir's parents, located at the key), and its
    runtime-dir check looks at the parents too, not only at runtime_dir itself."""
    import shutil

    from pam_rolegate.rules import config
    from pam_rolegate.admin import doctor

    require_sandbox()
    base = f"/run/rg-doc-walk-{os.getpid()}"
    os.makedirs(base + "/open/rt")
    os.chmod(base, 0o755)
    os.chmod(base + "/open", 0o777)
    os.chmod(base + "/open/rt", 0o755)
    path = str(tmp_path / "rolegate.yaml")
    text = f"version: 1\nregion: us-east-1\nruntime_dir: {base}/open/rt\n"
    with open(path, "w") as fh:
        fh.write(text)
    try:
        [result] = doctor.check_config({"config_path": path})
        assert result.verdict == doctor.FAIL and f"{path}:3:14: runtime_dir" in result.detail \
               and f"{base}/open is writable by group or others" in result.detail, \
            f"doctor's config check must refuse the world-writable parent, located: {result}"
        [result] = doctor.check_runtime_dir({"config": config.parse(text, path)})
        assert result.verdict == doctor.FAIL and f"{base}/open is writable by group or others" in result.detail, \
            f"doctor's runtime-dir check must look at runtime_dir's parents: {result}"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_doctor__on_demand_rules_need_the_rolegate_pam_service(tmp_path, monkeypatch):
    from pam_rolegate.admin import doctor, install
    from pam_rolegate.rules import config

    cfg = config.parse("version: 1\nregion: us-east-1\nroles:\n  - match: {user: a}\n"
                       "    role: arn:aws:iam::123456789012:role/admin\n    profile: admin\n    elevate: {}\n")
    monkeypatch.setattr(install, "ELEVATE_PAM", str(tmp_path / "rolegate"))
    [missing] = doctor.check_elevation({"config": cfg})
    assert missing.verdict == doctor.FAIL and "rolegate install" in missing.fix, missing
    (tmp_path / "rolegate").write_text("@include common-auth\n")
    [present] = doctor.check_elevation({"config": cfg})
    assert present.verdict == doctor.PASS, present
    [none] = doctor.check_elevation({"config": config.parse("version: 1\nregion: us-east-1\n")})
    assert none.verdict == doctor.PASS and "no on-demand" in none.detail, none


# Each request on a connection of its own (urllib keeps none alive): n requests, n connections.
IMDS_REQUESTS = """
import sys, urllib.request
reached = 0
for _ in range(int(sys.argv[1])):
    req = urllib.request.Request("http://169.254.169.254/latest/api/token", method="PUT",
                                 headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    try:
        urllib.request.urlopen(req, timeout=5).read()
        reached += 1
    except OSError as err:
        print(repr(err))
print("REACHED", reached)
"""


def _imds_requests(ns, user, n):
    cmd = ns + ([] if user == "root" else ["setpriv", "--reuid", user, "--regid", user, "--init-groups"])
    out = run(cmd + [sys.executable, "-c", IMDS_REQUESTS, str(n)], check=False).stdout
    return int(out.split()[-1]) if "REACHED" in out else -1, out


def _write(text):
    with open("/etc/rolegate/rolegate.yaml", "w") as fh:
        fh.write(text)


def test_doctor__audit_mode_names_who_used_imds_and_fails_once_rules_map_anyone(site):
    import pwd

    ns, doctor, _start, _stop, env = site
    enforced = open("/etc/rolegate/rolegate.yaml").read()
    audit = enforced + AUDIT_LINE  # the shipped example, as install wrote it
    eve, mal = (pwd.getpwnam(u).pw_uid for u in ("eve", "mal"))
    try:
        _write(audit)
        assert run(ns + ["rolegate", "firewall", "apply"], check=False, env=env).returncode == 0, "apply (audit) failed"
        for user, n in (("eve", 2), ("mal", 4), ("root", 3)):
            reached, out = _imds_requests(ns, user, n)
            assert reached == n, f"audit mode must refuse nobody: {user} reached IMDS {reached} of {n} times: {out}"
        code, results = doctor()
        failed = {n: r["detail"] for n, r in results.items() if r["verdict"] == "FAIL"}
        assert code == 0 and not failed, f"audit mode without rules should warn, not fail: {code} {failed}"
        for name in ("imds-ipv4", "imds-ipv6"):
            r = results.get(name, {})
            assert r.get("verdict") == "PASS" and "counted" in r.get("detail", ""), \
                f"{name} should expect uid 65534 reachable and counted in audit mode: {r}"
        used = results.get("imds-audit", {})
        assert used.get("verdict") == "WARN" and "NOT locked" in used.get("detail", ""), \
            f"doctor should warn that IMDS is not locked in audit mode: {used}"
        for who in (f"eve (uid {eve}) 2 connections", f"mal (uid {mal}) 4 connections"):
            assert who in used["detail"], f"doctor should name {who!r} from the kernel's counters: {used['detail']}"
        assert "root" not in used["detail"] and "nobody" not in used["detail"], \
            f"neither root's requests nor doctor's own probes (uid 65534) are anyone's use of IMDS: {used['detail']}"
        assert "imds_allow_users" in used.get("fix", "") and "imds.mode: reject" in used["fix"], \
            f"the audit warning should say how to enforce: {used}"
        assert "imds-audit-rules" not in results, f"no rule maps anyone yet: {results.get('imds-audit-rules')}"
        # doctor's probes were taken back out of the counts: a second run names the same figures
        _code, again = doctor()
        assert again["imds-audit"]["detail"] == used["detail"], \
            f"doctor's own probes changed the counts: {used['detail']!r} then {again['imds-audit']['detail']!r}"

        # a rule while IMDS is open: every mapped user can take the gatekeeper's keys
        _write(audit.replace("roles: []\n", "roles:\n  - match: {user: eve}\n"
                                            "    role: arn:aws:iam::123456789012:role/eve\n"))
        code, results = doctor()
        mapped = results.get("imds-audit-rules", {})
        assert code == 1 and mapped.get("verdict") == "FAIL" and "imds.mode: reject" in mapped.get("fix", ""), \
            f"audit mode with a rule should FAIL (exit 1), with the fix: {code} {mapped}"
    finally:
        _write(enforced)
        run(ns + ["rolegate", "firewall", "apply"], env=env)
    for user in ("eve", "mal"):
        reached, out = _imds_requests(ns, user, 1)
        assert reached == 0, f"back in reject mode {user} should be refused: {out}"
    code, results = doctor()
    assert code == 0 and "imds-audit" not in results, \
        f"back in reject mode doctor should pass without the audit warning: {code} {results.get('imds-audit')}"


def test_doctor__warns_when_the_rules_map_ssm_user_in_shells(site):
    from pam_rolegate.admin import doctor as doctor_mod
    from pam_rolegate.rules import config

    ns, doctor, _start, _stop, env = site
    enforced = open("/etc/rolegate/rolegate.yaml").read()

    def rules(*matches):
        return enforced.replace("roles: []\n", "roles:\n" + "".join(
            f"  - match: {m}\n    role: arn:aws:iam::123456789012:role/r{i}\n" for i, m in enumerate(matches)))

    try:
        _write(rules("{user: eve}"))
        _code, results = doctor()
        assert results.get("ssm-user", {}).get("verdict") == "PASS", \
            f"no rule maps ssm-user, so no warning: {results.get('ssm-user')}"
        _write(rules("{user: eve}", "{user: ssm-user}"))
        _code, results = doctor()
        r = results.get("ssm-user", {})
        assert r.get("verdict") == "WARN" and "every SSM user shares one role" in r.get("detail", "") \
            and "rule 2" in r["detail"] and "SSMSessionRunAs" in r.get("fix", ""), \
            f"a rule mapping ssm-user should WARN, naming the rule, with Run As as the fix: {r}"
    finally:
        _write(enforced)

    # as check-user evaluates it: the account's shells (service shell), its groups from NSS; before the
    # SSM agent has created the account, as a user ssm-user in a group ssm-user
    def verdict(*matches):
        cfg = config.parse(rules(*matches), "rolegate.yaml")
        [result] = doctor_mod.check_ssm_user({"config": cfg})
        return result.verdict, result.detail

    assert verdict("{group: ssm-user}")[0] == "WARN" and "no such account yet" in verdict("{group: ssm-user}")[1], \
        f"before the account exists, a rule for its group should WARN: {verdict('{group: ssm-user}')}"
    run(["useradd", "-m", "-U", "ssm-user"])  # as the SSM agent does at the first session
    try:
        assert verdict("{group: ssm-user}")[0] == "WARN", "a rule for ssm-user's group should WARN"
        assert verdict("{user: ssm-user, service: shell}")[0] == "WARN", "a rule for ssm-user's shells should WARN"
        assert verdict("{user: ssm-user, service: sshd}")[0] == "PASS", \
            f"ssm-user's SSM shells are service shell; a rule for its sshd logins only gives them nothing: " \
            f"{verdict('{user: ssm-user, service: sshd}')}"
    finally:
        run(["userdel", "-r", "ssm-user"], check=False)
