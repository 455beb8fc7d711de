"""The IMDS lockdown in a network namespace of the test's own: the IMDS addresses on its loopback,
a real moto server answering there, users refused at once, root (the broker) still served.
Traffic never leaves the namespace."""

import json
import os
import secrets
import subprocess
import sys
import time

import pytest

import imds_standin
from conftest import require_sandbox
from harness import make_host, run
from pam_rolegate.backends import firewall

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
    h.add_user("mal")
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
        code = ("from pam_rolegate.backends import sts\n"
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


# -- imds.mode: emulate ------------------------------------------------------------------------------

PORT = 254  # the default imds.port; the namespace is the test's own, so nothing else holds it
EMULATE = f"version: 1\nregion: us-east-1\nimds_allow_users: [ops]\nimds:\n  mode: emulate\n  port: {PORT}\n"
REJECT = "version: 1\nregion: us-east-1\nimds_allow_users: [ops]\n"
STAND_IN = "stand-in"


def _hosts(urls):
    out = [("v4", firewall.IMDS_V4, "127.0.0.1")]
    if "v6" in urls:
        out.append(("v6", firewall.IMDS_V6, "::1"))
    return out


def _stand_in(ns, urls):
    return imds_standin.start(ns, [(lo, PORT, f"{STAND_IN}-{fam}") for fam, _imds, lo in _hosts(urls)])


def test_firewall__emulate_redirects_users_port_80_to_the_loopback_emulator(netns, tmp_path):
    ns, urls, _h = netns
    config = tmp_path / "rolegate.yaml"
    config.write_text(EMULATE)
    # a listener on another IMDS port, so a refusal there is the firewall's and not an empty port's
    other = imds_standin.start(ns, [(firewall.IMDS_V4, 81, "real-port-81")])
    stand_in = _stand_in(ns, urls)
    try:
        assert imds_standin.probe(ns, "eve", firewall.IMDS_V4, 81)[:2] == ("HTTP", "real-port-81"), \
            "control: before the lockdown eve reaches port 81 on the IMDS address"
        done = nft_in(ns, "apply", config=str(config))
        assert done.returncode == 0, f"firewall apply (emulate) failed: {done.stderr}"
        again = nft_in(ns, "apply", config=str(config))
        assert again.returncode == 0, f"a second apply should be a no-op, not an error: {again.stderr}"
        for fam, imds, _lo in _hosts(urls):
            kind, who, _s = imds_standin.probe(ns, "eve", imds)
            assert (kind, who) == ("HTTP", f"{STAND_IN}-{fam}"), \
                f"eve's PUT to {imds}:80 should reach the stand-in on the loopback ({fam}), got {kind} {who}"
            kind, who, _s = imds_standin.probe(ns, "root", imds)
            assert (kind, who) == ("HTTP", "real-imds"), f"root must reach the real IMDS at {imds}, got {kind} {who}"
            kind, who, _s = imds_standin.probe(ns, "ops", imds)
            assert (kind, who) == ("HTTP", "real-imds"), \
                f"ops (imds_allow_users) must reach the real IMDS at {imds}, got {kind} {who}"
        kind, why, secs = imds_standin.probe(ns, "eve", firewall.IMDS_V4, 81)
        assert kind == "FAILED" and why == "ConnectionRefusedError" and secs < 1.0, \
            f"eve's connection to another IMDS port should be refused at once, got {kind} {why} in {secs}s"
        assert imds_standin.probe(ns, "root", firewall.IMDS_V4, 81)[:2] == ("HTTP", "real-port-81"), \
            "root still reaches port 81 (the refusal above is the firewall's)"
        shown = nft_in(ns, "show")
        assert shown.returncode == 0 and f"dnat ip to 127.0.0.1:{PORT}" in shown.stdout, \
            f"show should print the redirect in force: {shown.stdout}"

        imds_standin.stop(stand_in)
        for fam, imds, _lo in _hosts(urls):
            kind, why, secs = imds_standin.probe(ns, "eve", imds)
            assert kind == "FAILED" and why == "ConnectionRefusedError" and secs < 1.0, \
                f"with the emulator down eve must be refused at once ({fam}), never served: {kind} {why} {secs}s"

        # imds.port is privileged, so mal cannot bind it while the emulator is down...
        bind = run(ns + ["setpriv", "--reuid", "mal", "--regid", "mal", "--init-groups", sys.executable, "-c",
                         f"import socket; socket.socket().bind(('127.0.0.1', {PORT}))"], check=False)
        assert "PermissionError" in bind.stderr, f"mal could bind the emulator's port {PORT}: {bind.stderr}"
        # ...and where an admin made low ports bindable (containers set this sysctl to 0), the drop
        # rule still keeps a squatter from answering eve.
        run(ns + ["sysctl", "-qw", "net.ipv4.ip_unprivileged_port_start=0"])
        squatter = imds_standin.start(ns, [(lo, PORT, "squatter") for _f, _i, lo in _hosts(urls)], user="mal")
        try:
            for fam, imds, _lo in _hosts(urls):
                kind, who, secs = imds_standin.probe(ns, "eve", imds, timeout=1.5)
                assert (kind, who) != ("HTTP", "squatter"), f"a user's listener on the emulator's port served eve ({fam})"
                assert kind == "FAILED", f"eve should get no answer while a user squats the port ({fam}): {kind} {who}"
        finally:
            imds_standin.stop(squatter)
            run(ns + ["sysctl", "-qw", "net.ipv4.ip_unprivileged_port_start=1024"])
    finally:
        if stand_in.poll() is None:
            imds_standin.stop(stand_in)
        imds_standin.stop(other)
        removed = nft_in(ns, "remove")
    assert removed.returncode == 0, f"remove failed: {removed.stderr}"
    assert run(ns + ["nft", "list", "ruleset"]).stdout.strip() == "", "remove left rules behind"


SWITCHER = """
import http.client, sys, time
host, seconds = sys.argv[1], float(sys.argv[2])
counts = {}
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        conn = http.client.HTTPConnection(host, 80, timeout=2)
        conn.request("PUT", "/latest/api/token", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        key = conn.getresponse().getheader("X-Stand-In") or "real-imds"
        conn.close()
    except OSError as err:
        key = type(err).__name__
    counts[key] = counts.get(key, 0) + 1
print(" ".join("%s=%d" % kv for kv in sorted(counts.items())))
"""


def test_firewall__switching_modes_is_atomic_and_remove_leaves_nothing(netns, tmp_path):
    ns, urls, _h = netns
    reject, emulate = tmp_path / "reject.yaml", tmp_path / "emulate.yaml"
    reject.write_text(REJECT)
    emulate.write_text(EMULATE)
    stand_in = _stand_in(ns, urls)
    try:
        assert nft_in(ns, "apply", config=str(reject)).returncode == 0, "apply (reject) failed"
        ruleset_reject = run(ns + ["nft", "list", "ruleset"]).stdout
        assert "nat" not in ruleset_reject and "dnat" not in ruleset_reject, \
            f"reject mode must not redirect anything: {ruleset_reject}"
        # eve keeps calling IMDS from the first moment to the last while the modes change under her
        watcher = subprocess.Popen(ns + ["setpriv", "--reuid", "eve", "--regid", "eve", "--init-groups",
                                         sys.executable, "-c", SWITCHER, firewall.IMDS_V4, "6"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        switched = 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and switched < 40:
            for cfg in (emulate, reject):
                done = nft_in(ns, "apply", config=str(cfg))
                assert done.returncode == 0, f"apply {cfg.name} failed mid-switching: {done.stderr}"
            switched += 1
        assert nft_in(ns, "apply", config=str(emulate)).returncode == 0, "apply (emulate) failed"
        out, err = watcher.communicate(timeout=30)
        counts = dict(kv.split("=") for kv in out.split())
        assert "real-imds" not in counts, f"eve reached the real IMDS while modes switched: {counts} {err}"
        assert counts.get(f"{STAND_IN}-v4") and counts.get("ConnectionRefusedError"), \
            f"eve should have been both redirected and refused over {switched} switches: {counts} {err}"
        # Leaving emulate mode unregisters the nat hook, and the kernel then drops the NAT state of
        # connections redirected a moment before: the few in flight at that instant are reset or
        # time out. Never do they reach the real IMDS.
        assert set(counts) <= {f"{STAND_IN}-v4", "ConnectionRefusedError", "ConnectionResetError", "TimeoutError"}, \
            f"unexpected outcomes: {counts}"
        ruleset_emulate = run(ns + ["nft", "list", "ruleset"]).stdout
        assert f"dnat ip to 127.0.0.1:{PORT}" in ruleset_emulate and f"dnat ip6 to [::1]:{PORT}" in ruleset_emulate, \
            f"emulate mode should DNAT both families: {ruleset_emulate}"
        assert ruleset_emulate.count("table inet rolegate") == 1, f"exactly one table: {ruleset_emulate}"
        assert nft_in(ns, "apply", config=str(reject)).returncode == 0, "apply (back to reject) failed"
        assert run(ns + ["nft", "list", "ruleset"]).stdout == ruleset_reject, \
            "back in reject mode the rules should be exactly reject mode's again"
        kind, why, _s = imds_standin.probe(ns, "eve", firewall.IMDS_V4)
        assert (kind, why) == ("FAILED", "ConnectionRefusedError"), f"reject mode refuses eve again: {kind} {why}"
    finally:
        imds_standin.stop(stand_in)
        removed = nft_in(ns, "remove")
    assert removed.returncode == 0, f"remove failed: {removed.stderr}"
    assert run(ns + ["nft", "list", "ruleset"]).stdout.strip() == "", "remove left rules behind"
    assert nft_in(ns, "show").returncode == 1, "show should say nothing is in force after remove"


# Holds `want` connections to each address given (as HOST:PORT) through a listener that never
# accepts (they wait in its queue, as a flood's would), and says how many connected and how many
# the kernel refused at once.
HOLD = """
import json, socket, sys, time
want, out = int(sys.argv[1]), {}
for target in sys.argv[2:]:
    host, port = target.rsplit(":", 1)
    held, refused = [], 0
    for _ in range(want):
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        s.settimeout(2)
        try:
            s.connect((host, int(port)))
            held.append(s)
        except ConnectionRefusedError:
            refused += 1
            s.close()
    out[target] = {"held": len(held), "refused": refused}
print(json.dumps(out), flush=True)
"""
DOORS_PORT = 255  # the default container_port: a door reached directly, not through a redirect


def _hold(ns, user, want, *targets):
    cmd = ns + ([] if user == "root" else ["setpriv", "--reuid", user, "--regid", user, "--init-groups"])
    done = run(cmd + [sys.executable, "-c", HOLD, str(want), *targets], check=False, timeout=60)
    assert done.returncode == 0, f"{user}'s connections failed: {done.stderr}"
    return json.loads(done.stdout)


def test_firewall__each_user_holds_at_most_its_share_of_connections_to_the_brokers_doors(netns, tmp_path):
    """The kernel caps each uid but root at DOOR_CONNECTIONS_PER_UID connections at once to each HTTP
    door, redirected or direct, before any reaches the door's listen queue: a flood of connects in
    flight then cannot fill that queue and drop other users' SYNs."""
    ns, urls, _h = netns
    share = firewall.DOOR_CONNECTIONS_PER_UID
    config = tmp_path / "rolegate.yaml"
    config.write_text(EMULATE + f"delivery: container\ncontainer_port: {DOORS_PORT}\n")
    # Listeners that never accept, with room for everything the test sends.
    listen = ("import socket, time, sys\nsocks = []\nfor host, port in [('127.0.0.1', %d), ('127.0.0.1', %d)]:\n"
              "    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
              "    s.bind((host, port)); s.listen(4096); socks.append(s)\nprint('LISTENING', flush=True)\n"
              "time.sleep(120)\n") % (PORT, DOORS_PORT)
    listener = subprocess.Popen(ns + [sys.executable, "-c", listen], stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout.readline().strip() == "LISTENING", "the test's listeners did not start"
        done = nft_in(ns, "apply", config=str(config))
        assert done.returncode == 0, f"firewall apply failed: {done.stderr}"
        assert f"{share} connections" in done.stdout, f"apply should say the doors' share: {done.stdout}"
        imds, door = f"{firewall.IMDS_V4}:80", f"127.0.0.1:{DOORS_PORT}"
        eve = _hold(ns, "eve", share + 20, imds, door)
        assert eve[imds] == {"held": share, "refused": 20}, \
            f"eve's connections to the IMDS address (redirected to port {PORT}) past {share} should be refused " \
            f"at once: {eve[imds]}"
        assert eve[door] == {"held": share, "refused": 20}, \
            f"eve's direct connections to port {DOORS_PORT} past {share} should be refused at once: {eve[door]}"
        mal = _hold(ns, "mal", 8, f"127.0.0.1:{PORT}", door)
        assert all(v == {"held": 8, "refused": 0} for v in mal.values()), \
            f"another user's share must not be taken by eve's: {mal}"
        root = _hold(ns, "root", share + 20, door)
        assert root[door] == {"held": share + 20, "refused": 0}, f"root is never capped: {root}"
    finally:
        listener.kill()
        listener.wait(10)
        nft_in(ns, "remove")


# -- imds.mode: audit --------------------------------------------------------------------------------

AUDIT = "version: 1\nregion: us-east-1\nimds_allow_users: [ops]\nimds: {mode: audit}\n"
# N requests to IMDS, each on a connection of its own (urllib keeps none alive): N connections.
REQUESTS = """
import sys, urllib.request
url, n, reached, failed = sys.argv[1], int(sys.argv[2]), 0, []
for _ in range(n):
    req = urllib.request.Request(url + "/latest/api/token", method="PUT",
                                 headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    try:
        urllib.request.urlopen(req, timeout=5).read()
        reached += 1
    except OSError as err:
        failed.append(repr(err))
print("REACHED %d FAILED %d %s" % (reached, len(failed), failed[:1]))
"""


def requests(ns, user, url, n):
    """`user` makes n IMDS requests; (reached, output)."""
    cmd = ns + ([] if user == "root" else ["setpriv", "--reuid", user, "--regid", user, "--init-groups"])
    out = run(cmd + [sys.executable, "-c", REQUESTS, url, str(n)], check=False).stdout
    return (int(out.split()[1]) if out.startswith("REACHED") else -1), out


def audit_rows(shown):
    """{user name: (uid, connections)} from `firewall show`'s audit listing."""
    lines = shown.splitlines()
    if not any(line.startswith("UID ") and "CONNECTIONS" in line for line in lines):
        return {}
    start = next(i for i, line in enumerate(lines) if line.startswith("UID ") and "CONNECTIONS" in line)
    rows = {}
    for line in lines[start + 1:]:
        fields = line.split()
        if len(fields) != 5 or not fields[0].isdigit():
            break
        rows[fields[1]] = (int(fields[0]), int(fields[2]))
    return rows


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_firewall__audit_counts_each_users_imds_connections_and_refuses_none(netns, family, tmp_path):
    ns, urls, _h = netns
    if family not in urls:
        pytest.skip("this kernel refused the IPv6 IMDS address in the namespace")
    url = urls[family]
    audit, reject = tmp_path / "audit.yaml", tmp_path / "reject.yaml"
    audit.write_text(AUDIT)
    reject.write_text(REJECT)
    done = nft_in(ns, "apply", config=str(audit))
    assert done.returncode == 0, f"firewall apply (audit) failed: {done.stderr}"
    assert "NOT locked" in done.stdout, f"apply in audit mode should say IMDS is not locked: {done.stdout}"
    try:
        shown = nft_in(ns, "show")
        assert shown.returncode == 0 and "IMDS is NOT locked: audit mode" in shown.stdout, \
            f"show should say audit mode is in force (exit 0): {shown.returncode} {shown.stdout}"
        assert audit_rows(shown.stdout) == {}, f"nobody has used IMDS yet, but show lists: {shown.stdout}"
        n, m = 3, 5
        for user, count in (("eve", n), ("mal", m), ("root", 4), ("ops", 2)):
            reached, out = requests(ns, user, url, count)
            assert reached == count, f"audit mode must refuse nobody: {user} reached IMDS {reached} of {count} times: {out}"
        shown = nft_in(ns, "show")
        rows = audit_rows(shown.stdout)
        eve, mal = (run(["id", "-u", u]).stdout.strip() for u in ("eve", "mal"))
        assert rows == {"eve": (int(eve), n), "mal": (int(mal), m)}, \
            f"show should count exactly eve's {n} and mal's {m} connections, and neither root's nor ops's " \
            f"(imds_allow_users): {rows}\n{shown.stdout}"

        # Applying audit mode again keeps the counts; eve's next request adds to hers.
        again = nft_in(ns, "apply", config=str(audit))
        assert again.returncode == 0, f"a second apply (audit) failed: {again.stderr}"
        assert requests(ns, "eve", url, 1)[0] == 1, "eve's request after the re-apply was refused"
        rows = audit_rows(nft_in(ns, "show").stdout)
        assert rows == {"eve": (int(eve), n + 1), "mal": (int(mal), m)}, \
            f"a re-apply in audit mode should keep the counts (eve {n} + 1, mal {m}): {rows}"

        # Enforcing: the same users are refused at once, and the audit listing is gone.
        enforced = nft_in(ns, "apply", config=str(reject))
        assert enforced.returncode == 0, f"firewall apply (reject) failed: {enforced.stderr}"
        for user in ("eve", "mal"):
            reached, out = requests(ns, user, url, 1)
            assert reached == 0 and "Connection refused" in out, f"reject mode should refuse {user} at once: {out}"
        assert requests(ns, "ops", url, 1)[0] == 1, "ops (imds_allow_users) must still reach IMDS in reject mode"
        shown = nft_in(ns, "show")
        assert shown.returncode == 0 and "NOT locked" not in shown.stdout and "imds-audit" not in shown.stdout, \
            f"show in reject mode should list no audit: {shown.stdout}"
    finally:
        removed = nft_in(ns, "remove")
    assert removed.returncode == 0, f"remove failed: {removed.stderr}"
    assert run(ns + ["nft", "list", "ruleset"]).stdout.strip() == "", "remove left rules behind"


def test_firewall__audit_ruleset_counts_per_uid_and_has_no_reject():
    """The audit table as nft script: per-uid dynamic sets with the kernel's counters, rules that
    update them for every uid but the allowed ones, no reject, and carried-over counts kept
    except for uids now allowed (the real counters: the netns test above)."""
    carried = [firewall.UidCount(1001, 3, 180, 20, 1500), firewall.UidCount(998, 2, 120, 9, 700)]
    script = firewall.ruleset([0, 998], "audit", counts=carried)
    assert "reject" not in script and "drop" not in script, f"audit mode must refuse nothing:\n{script}"
    for name in (firewall.AUDIT_CONNECTIONS, firewall.AUDIT_TRAFFIC):
        assert f"set {name} {{\n    type uid; size {firewall.AUDIT_SIZE}; flags dynamic; counter;" in script, \
            f"set {name} should be a dynamic uid set with a counter per element:\n{script}"
        assert f"update @{name} {{ meta skuid }}" in script, f"no rule updates {name}:\n{script}"
    assert "1001 counter packets 3 bytes 180" in script and "1001 counter packets 20 bytes 1500" in script, \
        f"uid 1001's counts should be carried over into both sets:\n{script}"
    assert "998 counter" not in script, f"uid 998 is allowed now: its old counts should not be carried:\n{script}"
    assert script.count("meta skuid != { 0, 998 }") == 4, f"every audit rule should skip root and uid 998:\n{script}"
    with_doors = firewall.ruleset([0], "audit", doors=[255])
    assert firewall.shared_ports(with_doors) == {255} and "ct count over" in with_doors, \
        f"audit mode keeps the per-uid share of the HTTP doors' connections:\n{with_doors}"
