"""The tour behind scripts/demo; runs inside scripts/sandbox (see there)."""

import os
import subprocess
import sys
import textwrap
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from harness import ACCOUNT, E2E_CONFIG, make_host, run  # noqa: E402

# alice also gets a named profile, and one she must ask for (docs/profiles-and-elevation.md "Several roles per person",
# "Elevation on demand").
CONFIG = E2E_CONFIG + f"""  - match: {{user: alice}}
    profile: deploy
    role: arn:aws:iam::{ACCOUNT}:role/deploy
  - match: {{user: alice}}
    profile: admin
    role: arn:aws:iam::{ACCOUNT}:role/alice-admin
    elevate: {{reason: required, max: 15m}}
"""
ALICE_PASSWORD = "demo-Passw0rd"

SHOW = ('echo "  AWS_SHARED_CREDENTIALS_FILE=${AWS_SHARED_CREDENTIALS_FILE:-(unset)}"; '
        'echo "  AWS_REGION=${AWS_REGION:-(unset)}"; '
        'echo "  rolegate whoami: $(AWS_ENDPOINT_URL_STS=%s AWS_EC2_METADATA_DISABLED=true rolegate whoami 2>&1 '
        '| tail -n 1)"')


def say(text):
    print("\n" + textwrap.fill(text, 96))


def show(done):
    for line in (done.stdout + done.stderr).splitlines():
        print(line if line.startswith("  ") else "  " + line)


def main():
    h = make_host()
    try:
        say("1. A fresh sandboxed host: a local AWS stand-in (moto) plays STS and the instance "
            "metadata service; the broker takes the instance role's credentials from it over IMDSv2.")
        h.install_commands()
        h.start_moto()
        for user, groups in (("alice", ()), ("bob", ()), ("dave", ("admins",))):
            h.add_user(user, groups=groups)
        h.allow_sudo("dave")
        run(["chpasswd"], input=f"alice:{ALICE_PASSWORD}\n")
        h.write_config(CONFIG)
        print(f"  users: alice (mapped by name; password {ALICE_PASSWORD}), bob (no rule), dave (group admins, "
              f"may sudo)")
        print("  config /etc/rolegate/rolegate.yaml:")
        print(textwrap.indent(CONFIG.strip(), "    "))
        show(run(["rolegate", "check-config"], check=False))
        say("2. Install: the pam-auth-update profile (hook guarded by a service allow-list), the "
            "profile.d snippet, then start rolegated and sshd on 127.0.0.1.")
        hook = h.install_pam(options="")
        from pam_rolegate.admin import install

        with open(install.ELEVATE_PAM, "w") as fh:  # what `rolegate install` puts there: the user's password
            fh.write(install.template("elevate-pam"))
        print(f"  hook: {hook}")
        print("  " + "\n  ".join(l for l in open("/etc/pam.d/common-session").read().splitlines() if "rolegate" in l
                                 or "pam_python" in l or "pam_succeed_if" in l))
        h.start_broker()
        h.start_sshd()
        show(run(["rolegate", "check-user", "alice"], check=False))
        say("3. alice logs in over ssh and asks STS who she is: her own role, with her name as "
            "the session name and SourceIdentity.")
        show(h.session("ssh", "alice", SHOW % h.moto.url))
        say("3b. alice's named profile `deploy` is in the same file, assumed only when first used; "
            "`admin` is on demand: she asks for it with a reason, PAM asks her password (fed here on "
            "standard input), and it lasts for one command.")
        env = f"export AWS_ENDPOINT_URL_STS={h.moto.url} AWS_EC2_METADATA_DISABLED=true; "
        show(h.session("ssh", "alice", env + "rolegate profiles; echo \"  rolegate whoami --profile deploy: "
                                             "$(rolegate whoami --profile deploy 2>&1 | tail -n 1)\"; "
                                             f"echo '{ALICE_PASSWORD}' | rolegate elevate admin --reason "
                                             "'DEMO-1 look around' -- rolegate whoami 2>&1; rolegate profiles"))
        say("4. bob has no rule: he logs in normally and gets nothing. (On a real host the IMDS "
            "firewall keeps him from the instance role too; this sandbox switches IMDS off for sessions.)")
        show(h.session("ssh", "bob", SHOW % h.moto.url))
        say("5. dave runs `sudo -i`: the admin rule matches the invoking user (dave), not root.")
        show(h.session("sudo-i", "dave", SHOW % h.moto.url))
        say("6. alice keeps a session open; root sees the grant; she logs out and the file is gone.")
        proc = subprocess.Popen(h.ssh_cmd("alice", 'echo "$AWS_SHARED_CREDENTIALS_FILE"; read x'),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        path = proc.stdout.readline().strip()
        show(run(["rolegate", "status"], check=False))
        print(f"  {path}: " + run(["stat", "-c", "%A %U on", path]).stdout.strip() + " "
              + run(["stat", "-f", "-c", "%T", path]).stdout.strip())
        peek = run(["setpriv", "--reuid", "bob", "--regid", "bob", "--init-groups", "cat", path], check=False)
        print(f"  bob tries to read it: {peek.stderr.strip()}")
        proc.stdin.write("\n")
        proc.stdin.close()
        proc.wait(30)
        for _ in range(100):
            if not os.path.exists(path):
                break
            time.sleep(0.05)
        print(f"  after logout: {path} {'still exists (unexpected!)' if os.path.exists(path) else 'is gone'}")
        say("7. The broker's log: one line per decision.")
        print(textwrap.indent(h.broker_log().strip(), "  "))
        say("Done. Everything above lived in a private mount namespace and is gone now.")
    finally:
        h.stop()


if __name__ == "__main__":
    main()
