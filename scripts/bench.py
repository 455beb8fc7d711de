"""The measurements behind scripts/bench; runs inside scripts/sandbox.

Tables, all from one run on this machine, so ratios compare like with like:
  hook     pamtester open+close: pam_permit, an empty pam_python hook, and rolegate's cases,
           each as a ratio to the empty hook (the floor: starting pam_python's interpreter); pamtester
           runs in sshd's environment (harness.pamtester), so it embeds the interpreter sshd would
  burst    c simultaneous opens on the PAM door: granted/total, p50, p99, broker CPU per open
  scale    open/close/env with n live sessions: p50, p99, broker RSS, journal bytes per change
  refresh  a refresh pass of N grants: time, and its ratio to the floor the rate allows (N ÷ rate), STS calls,
           a login's p99 during the pass
  profiles a user with 1, 5 and 20 named profiles: login time ÷ empty hook and STS calls at login,
           then the STS calls and time of each profile's first use and of a second use
  ssh      `ssh alice@127.0.0.1 true` against a real sshd (as the tests start it), its PAM stack with no
           hook line, with an empty pam_python hook in its place, and with rolegate (warm), in paired
           rounds taken in turn: each as a ratio to no hook, and the ms it adds

    sudo scripts/bench [--rounds N] [--only hook,burst,scale,refresh,profiles,ssh] [--grants N,N] [--profiles N,N]
           [--timings]   the broker's own timings of each PAM door request (scripts/bench_timings.py), printed
                         after the hook table: where a warm open's and a close's time goes
"""

import argparse
import glob
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from harness import ACCOUNT, PAM_SOCKET, RUNTIME_DIR, SOCKET, SSHD_PATH, make_host, pamtester, run  # noqa: E402

from pam_rolegate.hookside import client, protocol  # noqa: E402

EMPTY_HOOK = """
def pam_sm_open_session(pamh, flags, argv):
    return pamh.PAM_SUCCESS
def pam_sm_close_session(pamh, flags, argv):
    return pamh.PAM_SUCCESS
"""

# The refresh pass's pool and rate; N grants at REFRESH_RATE per second take at least N / REFRESH_RATE
# seconds (the pass's floor, which its table compares against).
REFRESH_WORKERS, REFRESH_RATE = 8, 100

CONFIG = f"""
version: 1
region: us-east-1
sts_timeout: 3
reap_interval: 30s
session:
  duration: 900
  refresh_before: {{refresh_before}}
  linger: {{linger}}
refresh: {{{{workers: {REFRESH_WORKERS}, rate: {REFRESH_RATE}}}}}
roles:
  - match: {{{{user: [alice, carol, dave]}}}}
    role: arn:aws:iam::{ACCOUNT}:role/alice-role
  - match: {{{{group: benchers}}}}
    role: arn:aws:iam::{ACCOUNT}:role/bench
"""


def config(refresh_before=600, linger="15m"):
    return CONFIG.format(refresh_before=refresh_before, linger=linger)


def pct(samples, p):
    s = sorted(samples)
    return s[min(len(s) - 1, int(p / 100 * len(s)))] if s else float("nan")


def broker_cpu_ms(pid):
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def broker_rss_mb(pid):
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def journal_bytes():
    try:
        return os.path.getsize(os.path.join(RUNTIME_DIR, "state", "journal"))
    except OSError:
        return 0


def add_bench_users(h, prefix, n):
    """n users in group `benchers`, written straight into the sandbox's passwd/group (useradd is slow)."""
    if run(["getent", "group", "benchers"], check=False).returncode != 0:
        run(["groupadd", "-g", "4000", "benchers"])
    entries = [line.split(":") for line in open("/etc/passwd")]
    existing = {e[0] for e in entries}
    uid = max([20000] + [int(e[2]) for e in entries if len(e) > 2 and e[2].isdigit() and int(e[2]) < 60000]) + 1
    with open("/etc/passwd", "a") as fh:
        for i in range(n):
            name = f"{prefix}{i}"
            if name not in existing:
                fh.write(f"{name}:x:{uid}:4000::/nonexistent:/usr/sbin/nologin\n")
                uid += 1
    return [f"{prefix}{i}" for i in range(n)]


def call(request, path=PAM_SOCKET, timeout=10.0):
    return client.call(request, path=path, timeout=timeout)


def timed_open(user, pid):
    start = time.perf_counter()
    reply = call(protocol.OpenSession(user=user, service="sshd", pid=pid, budget_ms=3000))
    return (time.perf_counter() - start) * 1000, reply


class Holder:
    """Long-lived processes whose pids hold bench sessions (the reaper ends sessions of dead pids)."""

    def __init__(self, n=8):
        self.procs = [subprocess.Popen(["sleep", "3600"]) for _ in range(n)]
        self.pids = [p.pid for p in self.procs]

    def stop(self):
        for p in self.procs:
            p.kill()
            p.wait()


# -- hook --------------------------------------------------------------------------------------------


def pamtester_ms(service, user):
    start = time.perf_counter()
    pamtester(service, user, check=True)
    return (time.perf_counter() - start) * 1000


def interleaved(h, cases, rounds):
    """Each case once per round, in turn, so the machine's drift touches every case alike.
    Returns (label, samples, AssumeRole calls) per case."""
    samples = {label: [] for label, _s, _u in cases}
    calls = dict.fromkeys(samples, 0)
    for _ in range(rounds):
        for label, service, user in cases:
            before = h.moto.assume_role_calls()
            samples[label].append(pamtester_ms(service, user))
            calls[label] += h.moto.assume_role_calls() - before
    return [(label, samples[label], calls[label]) for label, _s, _u in cases]


def bench_stacks(h, hook):
    """PAM services rg-none (pam_permit), rg-empty (an empty pam_python hook), rg-hook (rolegate)."""
    empty = os.path.join(h.workdir, "empty_hook.py")
    with open(empty, "w") as fh:
        fh.write(EMPTY_HOOK)
    for name, module in (("rg-empty", empty), ("rg-hook", hook)):
        with open(f"/etc/pam.d/{name}", "w") as fh:
            fh.write(f"session required pam_python.so {module}\n")
    with open("/etc/pam.d/rg-none", "w") as fh:
        fh.write("session required pam_permit.so\n")


def hook_table(h, hook, rounds):
    bench_stacks(h, hook)
    floor = ("empty pam_python hook", "rg-empty", "alice")
    # Another session of alice's grant stays open, so her logins are warm. Grants are per (account,
    # person, service): it is a session of the same service, rg-hook, opened as the hook would.
    holder = subprocess.Popen(["sleep", "600"], start_new_session=True)
    held = call(protocol.OpenSession(user="alice", service="rg-hook", pid=holder.pid))
    assert held.get("granted"), f"the holder session got no grant: {held}"
    rows = interleaved(h, [("pam_permit only (pamtester itself)", "rg-none", "alice"), floor,
                           ("rolegate, unmapped user", "rg-hook", "bob"),
                           ("rolegate, warm (another session holds the grant)", "rg-hook", "alice"),
                           ("rolegate, repeated logins, no other session (linger)", "rg-hook", "carol")], rounds)
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait(10)
    h.write_config(config(linger=0))
    h.broker.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    cold = interleaved(h, [floor, ("rolegate, cold: linger 0, an AssumeRole each", "rg-hook", "dave")], rounds)
    h.write_config(config())
    h.broker.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    print(f"\nHook: PAM open_session+close_session through pamtester, {rounds} rounds each, cases taken in "
          f"turn, pamtester in sshd's environment (PATH {SSHD_PATH})\n(ms; ÷empty: median over the empty "
          f"hook's median in the same rounds; min÷: the same for minimums, which a busy machine disturbs least)\n")
    print(f"{'case':54} {'median':>7} {'p90':>7} {'min':>7} {'÷empty':>7} {'min÷':>6} {'STS':>5}")
    for group in (rows, cold[1:]):
        floor_samples = (rows if group is rows else cold)[1 if group is rows else 0][1]
        base, base_min = statistics.median(floor_samples), min(floor_samples)
        for label, samples, calls in group:
            print(f"{label:54} {statistics.median(samples):7.1f} {pct(samples, 90):7.1f} {min(samples):7.1f} "
                  f"{statistics.median(samples) / base:7.2f} {min(samples) / base_min:6.2f} {calls:5d}")


# -- the broker's own timings (--timings) -------------------------------------------------------------

TIMINGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_timings.py")


def start_timed_broker(h, out):
    """rolegated as h.start_broker starts it, but under scripts/bench_timings.py writing to `out`."""
    log = open(h.broker_log_path, "a")
    h.broker = subprocess.Popen([sys.executable, TIMINGS, out], stdout=log, stderr=log,
                                env=dict(os.environ, **h.env), start_new_session=True)
    log.close()
    h.wait_for_socket()


def timings_table(out, since=0):
    """Medians (µs) of each step of the PAM door's requests recorded in `out` from line `since` on."""
    import json

    time.sleep(1.0)  # the writer's last half-second batch
    with open(out) as fh:
        recs = [json.loads(line) for line in fh.readlines()[since:]]
    steps = [("accept→frame", "arrived", "framed"), ("frame→handler", "framed", "dispatch"),
             ("handler", "dispatch", "dispatched"), ("→loop", "dispatched", "send"),
             ("write+close", "send", "sent"), ("total", "arrived", "end")]
    inner = ["open", "env_for", "own_region", "close"]
    groups = {}
    for rec in recs:
        if rec.get("door") == "pam" and rec.get("action"):
            where = "on loop" if rec.get("on_loop") else "worker"
            groups.setdefault((rec["action"], (rec.get("user") or "-") + ", " + where), []).append(rec)
    print("\nThe broker's own timings of the PAM door's requests in the hook table (µs, medians; "
          "scripts/bench_timings.py)\n")
    print(f"{'request':30} {'n':>4} " + " ".join(f"{label:>12}" for label, _a, _b in steps)
          + " " + " ".join(f"{name:>10}" for name in inner))
    for (action, user), rs in sorted(groups.items()):
        cells = []
        for _label, a, b in steps:
            d = [(r[b] - r[a]) * 1e6 for r in rs if a in r and b in r]
            cells.append(f"{statistics.median(d):12.0f}" if d else f"{'-':>12}")
        for name in inner:
            d = [r[name] * 1e6 for r in rs if name in r]
            cells.append(f"{statistics.median(d):10.0f}" if d else f"{'-':>10}")
        print(f"{action + ' ' + user:30} {len(rs):4d} " + " ".join(cells))


def roundtrip_table(rounds):
    """The hook's two broker calls as the hook makes them, timed from this side: a warm open, then its
    close sent both ways in turn: waiting for the reply (client.call, before 2026-12-07) and not
    (client.send, the hook now)."""
    holder = subprocess.Popen(["sleep", "600"], start_new_session=True)
    opens, by_call, by_send = [], [], []
    try:
        for r in range(rounds * 2):
            start = time.perf_counter()
            reply = call(protocol.OpenSession(user="alice", service="rg-hook", pid=holder.pid, budget_ms=3000))
            opens.append((time.perf_counter() - start) * 1000)
            assert reply.get("granted"), f"a warm open was not granted: {reply}"
            close = protocol.CloseSession(session=reply.get("session"))
            start = time.perf_counter()
            if r % 2 and hasattr(client, "send"):  # a tree from before 2026-12-07 has only call()
                client.send(close, path=PAM_SOCKET)
                by_send.append((time.perf_counter() - start) * 1000)
            else:
                call(close)
                by_call.append((time.perf_counter() - start) * 1000)
            time.sleep(0.01)  # the close is acted on before the next open
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(10)
    print(f"\nThe hook's broker calls timed by the caller, {rounds * 2} warm opens (ms)\n")
    print(f"{'call':40} {'median':>7} {'p90':>7} {'min':>7}")
    for label, samples in (("open_session (warm)", opens), ("close_session, waiting for the reply", by_call),
                           ("close_session, sent without waiting", by_send)):
        if not samples:
            continue
        print(f"{label:40} {statistics.median(samples):7.2f} {pct(samples, 90):7.2f} {min(samples):7.2f}")


# -- ssh ---------------------------------------------------------------------------------------------


def pam_variants(hook, empty):
    """{variant: {pam file: text}}: the stacks as installed (rolegate), with the empty hook `empty` in
    the same line (the guard and options unchanged), and with pam_permit in that line (no interpreter)."""
    variants = {"rolegate": {}, "empty hook": {}, "no hook": {}}
    line = re.compile(r"pam_python\.so\s+" + re.escape(hook) + r"[^\n]*")
    for path in glob.glob("/etc/pam.d/*"):
        try:
            text = open(path).read()
        except (IsADirectoryError, UnicodeDecodeError):
            continue
        if hook not in text:
            continue
        variants["rolegate"][path] = text
        variants["empty hook"][path] = line.sub(lambda m: m.group(0).replace(hook, empty), text)
        variants["no hook"][path] = line.sub("pam_permit.so", text)
    return variants


def ssh_table(h, hook, rounds):
    """ssh logins with and without the hook, in paired rounds: each round runs every variant once, in
    an order that turns each round, so drift and the other helpers' load touch them alike."""
    h.start_sshd()
    empty = os.path.join(h.workdir, "empty_hook.py")
    with open(empty, "w") as fh:
        fh.write(EMPTY_HOOK)
    variants = pam_variants(hook, empty)
    assert variants["rolegate"], f"no PAM file carries the hook {hook}: is it installed?"
    names = list(variants)
    samples = {name: [] for name in names}
    cmd = h.ssh_cmd("alice", "true")

    def use(name):
        for path, text in variants[name].items():
            with open(path + ".bench", "w") as fh:
                fh.write(text)
            os.rename(path + ".bench", path)  # whole, at once: a login never reads half a stack

    try:
        for name in names:  # one unmeasured login each: host keys, caches, the grant
            use(name)
            run(cmd)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                use(name)
                start = time.perf_counter()
                done = run(cmd, check=False)
                took = (time.perf_counter() - start) * 1000
                if done.returncode != 0:
                    raise SystemExit(f"ssh with {name} failed: {done.stderr.strip()[-300:]}")
                samples[name].append(took)
    finally:
        use("rolegate")
    base, base_min = statistics.median(samples["no hook"]), min(samples["no hook"])
    print(f"\nssh: `ssh alice@127.0.0.1 true` against sshd on 127.0.0.1, {rounds} paired rounds (each variant once "
          f"per round, order turning); alice's grant warm (linger)\n(ms; ÷none: median over no hook's median; "
          f"min÷: the same for minimums; +ms: median minus no hook's median)\n")
    print(f"{'PAM stack':28} {'median':>7} {'p90':>7} {'min':>7} {'÷none':>7} {'min÷':>6} {'+ms':>6}")
    for name in ("no hook", "empty hook", "rolegate"):
        m = statistics.median(samples[name])
        print(f"{name:28} {m:7.1f} {pct(samples[name], 90):7.1f} {min(samples[name]):7.1f} {m / base:7.2f} "
              f"{min(samples[name]) / base_min:6.2f} {m - base:6.1f}")
    paired = [w - wo for w, wo in zip(samples["rolegate"], samples["empty hook"])]
    print(f"{'rolegate − empty hook, paired':28} median {statistics.median(paired):.1f} ms per login")


# -- burst -------------------------------------------------------------------------------------------


def burst_table(h, holder, sizes):
    users = add_bench_users(h, "bu", 10)
    for u in users:  # warm every grant once: the burst measures the broker, not STS
        call(protocol.OpenSession(user=u, service="sshd", pid=holder.pids[0]))
    print("\nBurst: c simultaneous open_session calls on the PAM door (10 users, warm grants), then closes\n")
    print(f"{'c':>5} {'granted':>10} {'p50 ms':>8} {'p99 ms':>8} {'broker CPU ms/open':>20}")
    for c in sizes:
        barrier = threading.Barrier(c)
        results = []

        def one(i):
            barrier.wait()
            ms, reply = timed_open(users[i % len(users)], holder.pids[1 + i % (len(holder.pids) - 1)])
            return ms, reply

        cpu0 = broker_cpu_ms(h.broker.pid)
        with ThreadPoolExecutor(max_workers=c) as pool:
            results = list(pool.map(one, range(c)))
        cpu = broker_cpu_ms(h.broker.pid) - cpu0
        granted = [r for _ms, r in results if isinstance(r, protocol.Reply) and r.get("granted")]
        for r in granted:
            call(protocol.CloseSession(session=r.get("session")))
        times = [ms for ms, _r in results]
        print(f"{c:5d} {len(granted):5d}/{c:<4d} {pct(times, 50):8.1f} {pct(times, 99):8.1f} {cpu / c:20.2f}")


# -- scale -------------------------------------------------------------------------------------------

ENV_TIMER = """
import json, sys, time
from pam_rolegate.hookside import client, protocol
samples = []
for _ in range(int(sys.argv[1])):
    start = time.perf_counter()
    reply = client.call(protocol.Env(), path=sys.argv[2])
    samples.append((time.perf_counter() - start) * 1000)
    assert reply.get("granted"), reply
print(json.dumps(samples))
"""


def scale_table(h, holder, sizes, ops=200):
    import json

    users = add_bench_users(h, "su", 100)
    env_user = users[0]
    print(f"\nScale: {ops} operations at n live sessions (100 users; pids of {len(holder.pids)} processes)\n")
    print(f"{'n':>7} {'open p50':>9} {'p99':>7} {'close p50':>10} {'p99':>7} {'env p50':>8} {'p99':>7} "
          f"{'RSS MB':>8} {'journal B/change':>17}")
    live = 0
    for n in sizes:
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda i: call(protocol.OpenSession(user=users[i % 100], service="sshd",
                                                                pid=holder.pids[i % len(holder.pids)])),
                          range(live, n)))
        live = n
        opens, closes = [], []
        j0 = journal_bytes()
        for i in range(ops):
            ms, reply = timed_open(users[i % 100], holder.pids[i % len(holder.pids)])
            opens.append(ms)
            start = time.perf_counter()
            call(protocol.CloseSession(session=reply.get("session")))
            closes.append((time.perf_counter() - start) * 1000)
        grew = journal_bytes() - j0
        done = run(["setpriv", "--reuid", env_user, "--regid", "benchers", "--clear-groups", sys.executable, "-c",
                    ENV_TIMER, str(ops), SOCKET], check=False)
        envs = json.loads(done.stdout) if done.returncode == 0 else []
        per_change = f"{grew / (2 * ops):.0f}" if grew > 0 else "(compacted)"
        print(f"{n:7d} {pct(opens, 50):9.2f} {pct(opens, 99):7.2f} {pct(closes, 50):10.2f} {pct(closes, 99):7.2f} "
              f"{pct(envs, 50):8.2f} {pct(envs, 99):7.2f} {broker_rss_mb(h.broker.pid):8.1f} {per_change:>17}")
        if done.returncode != 0:
            print(f"   env timing failed: {done.stderr.strip()[-300:]}")
    for pid in holder.pids:
        call(protocol.CloseSession(pid=pid))


# -- refresh -----------------------------------------------------------------------------------------


def refresh_table(h, holder, counts):
    print(f"\nRefresh pass: N grants made due at once (a SIGHUP that lengthens refresh_before); refresh.workers "
          f"{REFRESH_WORKERS}, rate {REFRESH_RATE}/s. floor: N ÷ rate, the least time the rate allows; ÷floor: the "
          f"pass over it; 1st s: from the SIGHUP to the first refresh\n")
    print(f"{'N':>6} {'pass s':>8} {'floor s':>8} {'÷floor':>7} {'1st s':>6} {'refreshed':>10} {'STS calls':>10} "
          f"{'login p50 ms':>13} {'login p99 ms':>13} {'broker CPU s':>11} {'moto CPU s':>9}")
    for n in counts:
        h.write_config(config(refresh_before=300))
        h.broker.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        users = add_bench_users(h, f"r{n}x", n)
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(lambda u: call(protocol.OpenSession(user=u, service="sshd", pid=holder.pids[0]),
                                         timeout=30), users))
        # Credentials of 900 s refreshed 890 s before expiry are due 10 s after they were issued:
        # once every grant is that old, the SIGHUP below makes all of them due at once.
        time.sleep(11)
        before = h.moto.assume_role_calls()
        stop = threading.Event()
        logins = []

        def login_loop():
            while not stop.is_set() and len(logins) < 100000:
                ms, reply = timed_open("alice", holder.pids[1])
                logins.append(ms)
                call(protocol.CloseSession(session=reply.get("session")))
                time.sleep(0.02)

        t = threading.Thread(target=login_loop)
        t.start()
        mark = h.log_mark()
        cpu0, moto0 = broker_cpu_ms(h.broker.pid), broker_cpu_ms(h.moto.proc.pid)
        start = time.monotonic()
        h.write_config(config(refresh_before=890))
        h.broker.send_signal(signal.SIGHUP)
        deadline = start + max(120, n / 10)
        done, first = 0, float("nan")
        while time.monotonic() < deadline:  # counted in the broker's log: polling moto would slow it
            done = h.log_since(mark).count("refreshed: ")
            if done and first != first:
                first = time.monotonic() - start
            if done >= n:
                break
            time.sleep(0.1)
        elapsed = time.monotonic() - start
        cpu, moto_cpu = broker_cpu_ms(h.broker.pid) - cpu0, broker_cpu_ms(h.moto.proc.pid) - moto0
        stop.set()
        t.join()
        calls = h.moto.assume_role_calls() - before
        call(protocol.CloseSession(pid=holder.pids[0]))
        floor = n / REFRESH_RATE
        print(f"{n:6d} {elapsed:8.1f} {floor:8.1f} {elapsed / floor:7.2f} {first:6.1f} {done:10d} {calls:10d} "
              f"{pct(logins, 50):13.2f} {pct(logins, 99):13.2f} {cpu / 1000:11.1f} {moto_cpu / 1000:9.1f}")
    h.write_config(config())
    h.broker.send_signal(signal.SIGHUP)


# -- profiles ----------------------------------------------------------------------------------------


def profiles_config(counts, linger):
    """CONFIG plus, for each n in counts, user pfN with a default role and n named profiles."""
    text = config(linger=linger)
    for n in counts:
        text += f"  - match: {{user: pf{n}}}\n    role: arn:aws:iam::{ACCOUNT}:role/pf-default\n"
        for i in range(n):
            text += f"  - match: {{user: pf{n}}}\n    profile: p{i}\n    role: arn:aws:iam::{ACCOUNT}:role/pf-{i}\n"
    return text


def as_user(user, argv):
    start = time.perf_counter()
    done = run(["setpriv", "--reuid", user, "--regid", user, "--init-groups"] + argv, check=False)
    return (time.perf_counter() - start) * 1000, done


def profiles_table(h, hook, holder, counts, rounds):
    bench_stacks(h, hook)
    for n in counts:
        h.add_user(f"pf{n}")
    # Logins with linger 0: each one assumes its default role anew, as the first login of a day does.
    h.write_config(profiles_config(counts, linger=0))
    h.broker.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    rows = interleaved(h, [("empty", "rg-empty", "alice")] + [(n, "rg-hook", f"pf{n}") for n in counts], rounds)
    base = statistics.median(rows[0][1])
    print(f"\nNamed profiles: a login of a user with N named profiles (pamtester, sshd's PATH, linger 0 so "
          f"every login assumes the default role; {rounds} rounds in turn with the empty hook, median "
          f"{base:.1f} ms), then each profile's first use and a second use through `rolegate credentials "
          f"--profile` as the user (what credential_process runs)\n")
    print(f"{'N':>4} {'login ms':>9} {'÷empty':>7} {'STS/login':>10} {'STS/login if eager':>19} "
          f"{'first use ms':>13} {'STS/first use':>14} {'2nd use ms':>11} {'STS/2nd use':>12}")
    for n, samples, calls in rows[1:]:
        reply = call(protocol.OpenSession(user=f"pf{n}", service="sshd", pid=holder.pids[2]))
        grant = reply.get("grant")
        first, second, first_calls, second_calls = [], [], 0, 0
        for i in range(n):
            for bucket in (first, second):
                before = h.moto.assume_role_calls()
                ms, done = as_user(f"pf{n}", ["rolegate", "credentials", "--grant", grant, "--profile", f"p{i}"])
                if done.returncode != 0:
                    raise SystemExit(f"profile p{i} of pf{n} failed: {done.stderr}")
                bucket.append(ms)
                if bucket is first:
                    first_calls += h.moto.assume_role_calls() - before
                else:
                    second_calls += h.moto.assume_role_calls() - before
        call(protocol.CloseSession(session=reply.get("session")))
        print(f"{n:4d} {statistics.median(samples):9.1f} {statistics.median(samples) / base:7.2f} "
              f"{calls / rounds:10.2f} {1 + n:19d} {statistics.median(first):13.1f} {first_calls / n:14.2f} "
              f"{statistics.median(second):11.1f} {second_calls / n:12.2f}")
    h.write_config(config())
    h.broker.send_signal(signal.SIGHUP)
    time.sleep(1.0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--only", default="hook,burst,scale,refresh,profiles,ssh")
    p.add_argument("--timings", action="store_true", help="the broker's own timings of each PAM door request")
    p.add_argument("--profiles", default="1,5,20")
    p.add_argument("--bursts", default="8,32,128,512")
    p.add_argument("--sessions", default="10,100,1000,10000")
    p.add_argument("--grants", default="500,2000")
    args = p.parse_args()
    only = set(args.only.split(","))
    h = make_host()
    holder = Holder()
    try:
        h.install_commands()
        h.start_moto()
        for user in ("alice", "bob", "carol", "dave"):
            h.add_user(user)
        h.write_config(config())
        hook = h.install_pam()
        out = os.path.join(h.workdir, "timings.jsonl")
        if args.timings:
            start_timed_broker(h, out)
        else:
            h.start_broker()
        if "hook" in only:
            hook_table(h, hook, args.rounds)
            if args.timings:
                timings_table(out)
                roundtrip_table(args.rounds)
        if "burst" in only:
            burst_table(h, holder, [int(c) for c in args.bursts.split(",")])
        if "scale" in only:
            scale_table(h, holder, [int(n) for n in args.sessions.split(",")])
        if "refresh" in only:
            refresh_table(h, holder, [int(n) for n in args.grants.split(",")])
        if "profiles" in only:
            profiles_table(h, hook, holder, [int(n) for n in args.profiles.split(",")], args.rounds)
        if "ssh" in only:
            ssh_table(h, hook, args.rounds)
    finally:
        holder.stop()
        h.stop()


if __name__ == "__main__":
    main()
