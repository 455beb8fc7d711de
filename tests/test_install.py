"""rolegate install / uninstall in the sandbox: idempotent, exactly reversible, refuses sudo without secure_path."""

import os
import secrets

import pytest

from conftest import require_sandbox
from harness import CONFIG_PATH, diff, make_host, run, snapshot


@pytest.fixture(scope="module")
def host():
    require_sandbox()
    h = make_host()
    h.install_commands()
    # install writes its example config only where none exists: a config an earlier module of this
    # run left in the sandbox's /etc would be kept, and the first install here would not be a first.
    leftover = None
    if os.path.exists(CONFIG_PATH):
        with open(CONFIG_PATH) as fh:
            leftover = fh.read()
        os.unlink(CONFIG_PATH)
    yield h
    if leftover is not None:
        with open(CONFIG_PATH, "w") as fh:
            fh.write(leftover)
    h.stop()


def test_install__twice_equals_once_and_uninstall_restores_etc_byte_for_byte(host):
    before = snapshot()
    done = run(["rolegate", "install", "--no-firewall"], check=False)
    assert done.returncode == 0, f"install failed: {done.stdout} {done.stderr}"
    assert "IMDS is NOT locked yet" in done.stdout, \
        f"the example config is in audit mode: install should say IMDS is not locked:\n{done.stdout}"
    once = snapshot()
    common = open("/etc/pam.d/common-session").read()
    assert "pam_succeed_if.so quiet service notin sshd:sudo:sudo-i:login" in common, \
        f"the allow-list guard is missing from common-session:\n{common}"
    assert "pam_python.so" in common and os.path.exists("/etc/profile.d/rolegate.sh"), "pieces missing"
    for unit in ("/etc/systemd/system/rolegated.service", "/etc/systemd/system/rolegate-lockdown.service",
                 "/etc/rolegate/lockdown.nft"):
        assert os.path.exists(unit), f"install did not write {unit} (the broker's unit, the boot lockdown and its rules)"
    assert "/etc/rolegate/lockdown.nft" in open("/etc/systemd/system/rolegate-lockdown.service").read(), \
        "the lockdown unit does not apply the root-only rules install wrote"
    assert os.path.exists("/etc/rolegate/rolegate.yaml"), "no example config was written"
    assert "@include common-auth" in open("/etc/pam.d/rolegate").read(), \
        "no `rolegate` PAM service (rolegate elevate's) was put in place"
    assert run(["rolegate", "check-config"], check=False).returncode == 0, "the installed example is invalid"
    again = run(["rolegate", "install", "--no-firewall"], check=False)
    assert again.returncode == 0, f"second install failed: {again.stderr}"
    assert diff(once, snapshot()) == [], f"install twice differs from once: {diff(once, snapshot())}"
    gone = run(["rolegate", "uninstall"], check=False)
    assert gone.returncode == 0, f"uninstall failed: {gone.stderr}"
    assert diff(before, snapshot()) == [], f"/etc after install+uninstall differs: {diff(before, snapshot())}"


def test_install__never_overwrites_the_admins_config(host):
    os.makedirs("/etc/rolegate", exist_ok=True)
    mine = "version: 1\nregion: eu-west-1\n"
    with open("/etc/rolegate/rolegate.yaml", "w") as fh:
        fh.write(mine)
    try:
        assert run(["rolegate", "install", "--no-firewall"], check=False).returncode == 0
        assert open("/etc/rolegate/rolegate.yaml").read() == mine, "install overwrote the admin's config"
        assert run(["rolegate", "uninstall"], check=False).returncode == 0
        assert open("/etc/rolegate/rolegate.yaml").read() == mine, "uninstall removed the admin's config"
    finally:
        os.unlink("/etc/rolegate/rolegate.yaml")


def test_install__refuses_sudo_stacks_without_secure_path(host):
    original = open("/etc/sudoers").read()
    try:
        with open("/etc/sudoers", "w") as fh:
            fh.write("\n".join("#" + line if "secure_path" in line else line for line in original.splitlines()) + "\n")
        before = snapshot()
        done = run(["rolegate", "install", "--no-firewall"], check=False)
        assert done.returncode != 0 and "secure_path" in done.stderr, f"install should refuse: {done.stderr}"
        assert diff(before, snapshot()) == [], "a refused install changed /etc"
    finally:
        with open("/etc/sudoers", "w") as fh:
            fh.write(original)


def test_install__applies_and_uninstall_removes_the_firewall_in_its_own_netns(host):
    name = "rg-inst-" + secrets.token_hex(3)
    run(["ip", "netns", "add", name])
    ns = ["ip", "netns", "exec", name]
    try:
        # The example config ships imds.mode audit: the rules count users' IMDS connections and lock
        # nothing, and install says so loudly, with the way to enforce.
        done = run(ns + ["rolegate", "install"], check=False)
        assert done.returncode == 0, f"install failed: {done.stdout} {done.stderr}"
        assert "IMDS is NOT locked yet" in done.stdout and "imds.mode: reject" in done.stdout \
            and "rolegate firewall show" in done.stdout and "systemctl restart rolegated" in done.stdout, \
            f"install with the example config should print the audit notice and how to enforce:\n{done.stdout}"
        shown = run(ns + ["rolegate", "firewall", "show"], check=False)
        assert shown.returncode == 0 and "IMDS is NOT locked: audit mode" in shown.stdout \
            and "reject" not in shown.stdout, f"install should have applied audit mode's rules:\n{shown.stdout}"
        # An admin's enforcing config: locked, and no notice.
        with open("/etc/rolegate/rolegate.yaml") as fh:
            shipped = fh.read()
        with open("/etc/rolegate/rolegate.yaml", "w") as fh:
            fh.write(shipped.replace("imds: {mode: audit}\n", "imds: {mode: reject}\n"))
        again = run(ns + ["rolegate", "install"], check=False)
        assert again.returncode == 0 and "IMDS: locked to root" in again.stdout \
            and "NOT locked" not in again.stdout, f"install with imds.mode reject should lock IMDS quietly:\n{again.stdout}"
        shown = run(ns + ["rolegate", "firewall", "show"], check=False)
        assert shown.returncode == 0 and "reject with tcp reset" in shown.stdout and "NOT locked" not in shown.stdout, \
            f"reject mode's rules should be in force:\n{shown.stdout}"
        assert run(ns + ["rolegate", "uninstall"], check=False).returncode == 0
        assert run(ns + ["nft", "list", "ruleset"]).stdout.strip() == "", "uninstall left firewall rules"
    finally:
        run(["ip", "netns", "delete", name], check=False)
        if os.path.exists("/etc/rolegate/rolegate.yaml"):  # changed since install, so uninstall kept it
            os.unlink("/etc/rolegate/rolegate.yaml")
