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


@pytest.fixture(scope="module")
def site():
    require_sandbox()
    h = make_host()
    h.install_commands()
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
    assert run(ns + ["rolegate", "install"], check=False, env=env).returncode == 0, "install failed"
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
