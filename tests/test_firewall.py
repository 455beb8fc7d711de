"""The IMDS lockdown in a network namespace of the test's own: the IMDS addresses on its loopback,
a real moto server answering there, users refused at once, root (the broker) still served.
Traffic never leaves the namespace."""

import os
import secrets
import subprocess
import sys
import time

import pytest

from conftest import require_sandbox
from harness import make_host, run
from pam_rolegate import firewall

PROBE = """
import sys, time, urllib.request
url = sys.argv[1]
start = time.monotonic()
try:
    req = urllib.request.Request(url + "/latest/api/token", method="PUT",
                                 headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    urllib.request.urlopen(req, timeout=5).read()
    print("REACHED %.2f" % (time.monotonic() - start))
except OSError as err:
    print("REFUSED %.2f %s" % (time.monotonic() - start, err))
"""


@pytest.fixture(scope="module")
def netns():
    require_sandbox()
    h = make_host()
    h.install_commands()
    h.add_user("eve")
    h.add_user("ops")
    name = "rg-" + secrets.token_hex(4)
    run(["ip", "netns", "add", name])
    ns = ["ip", "netns", "exec", name]
    run(ns + ["ip", "link", "set", "lo", "up"])
    run(ns + ["ip", "addr", "add", firewall.IMDS_V4 + "/32", "dev", "lo"])
    v6 = run(ns + ["ip", "-6", "addr", "add", firewall.IMDS_V6 + "/128", "dev", "lo", "nodad"], check=False).returncode == 0
    moto_bin = os.path.join(os.path.dirname(sys.executable), "moto_server")
    servers = [subprocess.Popen(ns + [moto_bin, "-H", firewall.IMDS_V4, "-p", "80"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    if v6:
        servers.append(subprocess.Popen(ns + [moto_bin, "-H", firewall.IMDS_V6, "-p", "80"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    urls = {"v4": f"http://{firewall.IMDS_V4}"}
    if v6:
        urls["v6"] = f"http://[{firewall.IMDS_V6}]"
    for url in urls.values():
        deadline = time.monotonic() + 30
        while "REACHED" not in probe(ns, "root", url) and time.monotonic() < deadline:
            time.sleep(0.2)
    yield ns, urls, h
    for s in servers:
        s.terminate()
        s.wait(10)
    run(["ip", "netns", "delete", name], check=False)
    h.stop()


def probe(ns, user, url):
    cmd = ns + ([] if user == "root" else ["setpriv", "--reuid", user, "--regid", user, "--init-groups"])
    return run(cmd + [sys.executable, "-c", PROBE, url], check=False).stdout


def nft_in(ns, *args, config=None):
    env = dict(os.environ)
    if config:
        env["ROLEGATE_CONFIG"] = config
    return run(ns + ["rolegate", "firewall", *args], check=False, env=env)


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_firewall__only_root_and_allowed_users_reach_imds(netns, family, tmp_path):
    ns, urls, _h = netns
    if family not in urls:
        pytest.skip("this kernel refused the IPv6 IMDS address in the namespace")
    url = urls[family]
    config = tmp_path / "rolegate.yaml"
    config.write_text("version: 1\nregion: us-east-1\nimds_allow_users: [ops]\n")
    assert "REACHED" in probe(ns, "eve", url), "before the lockdown a user should reach IMDS (control)"
    done = nft_in(ns, "apply", config=str(config))
    assert done.returncode == 0, f"firewall apply failed: {done.stderr}"
    try:
        again = nft_in(ns, "apply", config=str(config))
        assert again.returncode == 0, f"a second apply should be a no-op, not an error: {again.stderr}"
        eve = probe(ns, "eve", url)
        assert eve.startswith("REFUSED"), f"an unprivileged user still reaches IMDS: {eve}"
        assert float(eve.split()[1]) < 1.0, f"refusal should be immediate (REJECT), took: {eve}"
        assert "REACHED" in probe(ns, "root", url), "root (the broker) must still reach IMDS"
        assert "REACHED" in probe(ns, "ops", url), "a user in imds_allow_users must still reach IMDS"
        shown = nft_in(ns, "show")
        assert shown.returncode == 0 and "meta skuid" in shown.stdout, f"show should print the table: {shown}"
    finally:
        removed = nft_in(ns, "remove")
    assert removed.returncode == 0, f"remove failed: {removed.stderr}"
    assert nft_in(ns, "show").returncode == 1, "the table should be gone after remove"
    assert run(ns + ["nft", "list", "ruleset"]).stdout.strip() == "", "remove left rules behind"
    assert "REACHED" in probe(ns, "eve", url), "after remove the user reaches IMDS again"


def test_firewall__root_gets_instance_profile_credentials_after_apply(netns, tmp_path):
    ns, urls, _h = netns
    config = tmp_path / "rolegate.yaml"
    config.write_text("version: 1\nregion: us-east-1\n")
    assert nft_in(ns, "apply", config=str(config)).returncode == 0
    try:
        code = ("from pam_rolegate import sts\n"
                f"print(sts.ImdsSource({urls['v4']!r}).get().access_key_id)")
        done = run(ns + [sys.executable, "-c", code], check=False)
        assert done.returncode == 0 and done.stdout.strip(), f"root could not get the instance role: {done.stderr}"
    finally:
        nft_in(ns, "remove")


def test_firewall__unknown_allowed_user_is_a_clear_error(netns, tmp_path):
    ns, _urls, _h = netns
    config = tmp_path / "rolegate.yaml"
    config.write_text("version: 1\nregion: us-east-1\nimds_allow_users: [nosuchuser]\n")
    done = nft_in(ns, "apply", config=str(config))
    assert done.returncode != 0 and "nosuchuser" in done.stderr, f"expected a clear error: {done.stderr}"
    assert nft_in(ns, "show").returncode == 1, "a failed apply must not leave a table"
