"""The measurements behind scripts/bench; runs inside scripts/sandbox."""

import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from harness import make_host, run  # noqa: E402

EMPTY_HOOK = """
def pam_sm_open_session(pamh, flags, argv):
    return pamh.PAM_SUCCESS
def pam_sm_close_session(pamh, flags, argv):
    return pamh.PAM_SUCCESS
"""


def time_pamtester(service, user, rounds):
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        run(["pamtester", service, user, "open_session", "close_session"])
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    h = make_host()
    try:
        h.install_commands()
        h.start_moto()
        h.add_user("alice")
        h.add_user("bob")
        h.write_config()
        hook = h.install_pam()
        h.start_broker()
        empty = os.path.join(h.workdir, "empty_hook.py")
        with open(empty, "w") as fh:
            fh.write(EMPTY_HOOK)
        for name, module in (("rg-empty", empty), ("rg-hook", hook)):
            with open(f"/etc/pam.d/{name}", "w") as fh:
                fh.write(f"session required pam_python.so {module}\n")
        with open("/etc/pam.d/rg-none", "w") as fh:
            fh.write("session required pam_permit.so\n")
        rows = [("pam_permit only (pamtester itself)", time_pamtester("rg-none", "alice", rounds)),
                ("empty pam_python hook", time_pamtester("rg-empty", "alice", rounds)),
                ("rolegate, unmapped user (no STS)", time_pamtester("rg-hook", "bob", rounds))]
        calls0 = h.moto.assume_role_calls()
        rows.append(("rolegate, cache miss (AssumeRole)", time_pamtester("rg-hook", "alice", rounds)))
        misses = h.moto.assume_role_calls() - calls0
        # Hold the grant with a PAM-less shell session so every login below is a cache hit.
        holder = subprocess.Popen(["setpriv", "--reuid", "alice", "--regid", "alice", "--init-groups", "sh", "-c",
                                   'eval "$(rolegate env)"; sleep 600'], start_new_session=True)
        time.sleep(1.5)
        calls1 = h.moto.assume_role_calls()
        rows.append(("rolegate, cache hit (live grant)", time_pamtester("rg-hook", "alice", rounds)))
        hits_calls = h.moto.assume_role_calls() - calls1
        os.killpg(holder.pid, 9)  # the shell and its sleep, so nothing keeps our stdout open
        holder.wait(10)
        print(f"\nPAM open_session+close_session through pamtester, {rounds} rounds each (ms)\n")
        print(f"{'case':38} {'median':>8} {'p90':>8} {'min':>8}")
        for name, s in rows:
            s = sorted(s)
            print(f"{name:38} {statistics.median(s):8.1f} {s[int(0.9 * (len(s) - 1))]:8.1f} {s[0]:8.1f}")
        print(f"\nAssumeRole calls: {misses} for {rounds} cache misses, {hits_calls} for {rounds} cache hits")
    finally:
        h.stop()


if __name__ == "__main__":
    main()
