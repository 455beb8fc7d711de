"""Load with real parts: moto, rolegated, the pam_python hook under pamtester and sshd, many at once.

Every loop here stops by itself, bounded in rounds and in time. No test asserts speed: the
bounds are generous "no hang" limits, because other work shares this machine. What each test
measured is printed (run with -s to see it).
"""

import collections
import configparser
import json
import os
import re
import select
import subprocess
import sys
import threading
import time

import pytest

from harness import ACCOUNT, PAM_SOCKET, RUNTIME_DIR, SOCKET, pamtester, sandbox_host, run

GRANTS_DIR = RUNTIME_DIR + "/grants"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/loader"
GROUP = "loaders"
FLOODER = "lflood"  # unprivileged, unmapped: only floods the user door
FLOOD_USERS = [f"la{i:02d}" for i in range(10)]  # logins during the flood
DENY_USER = "ladeny"  # the on_error=deny login during the flood (a fresh grant: it needs STS)
BURST_USERS = [f"lb{i:02d}" for i in range(10)]  # the pamtester burst
SSH_USERS = [f"lc{i:02d}" for i in range(20)]  # the ssh storm
LOAD_CONFIG = f"""
version: 1
region: us-east-1
sts_timeout: 5
reap_interval: 2s
roles:
  - match: {{group: {GROUP}}}
    role: {ROLE}
"""
SERVICE = "rolegate-load"  # pamtester's PAM service: the hook, then a reporter of the PAM environment
SERVICE_DENY = "rolegate-load-deny"
# A storm of ssh logins opens hundreds of unauthenticated connections at once; sshd's default
# (10:30:100) would drop most of them before they reach PAM.
SSHD_EXTRA = "MaxStartups 400:30:500\n"
FLOOD_LIMIT = 60  # seconds a flooder runs at most if nobody stops it
NO_HANG = 180  # seconds any one batch of logins may take before we call it a hang

# Each flooder: one unprivileged process reconnecting in rounds of BATCH connections, each
# sending a ping (mode ping) or a malformed frame (mode garbage), reading every reply, until its
# stdin closes, its time is up or it has done its rounds. Prints STARTED after its first round
# and a JSON count of replies by code at the end.
FLOODER_CODE = r"""
import json, os, select, socket, struct, sys, time
path, mode = sys.argv[1], sys.argv[2]
seconds, max_rounds, batch = float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
ping = json.dumps({"v": 2, "action": "ping"}).encode()
frames = {"ping": [struct.pack(">I", len(ping)) + ping],
          "garbage": [b"\x00\x00\x00\x05hello", struct.pack(">I", 10) + b"{", b"\xff\xff\xff\xff",
                      b"\x00\x00\x00\x00", b"\x00\x00"]}[mode]
counts, rounds, n = {}, 0, 0
def bump(key):
    counts[key] = counts.get(key, 0) + 1
def read(s, k):
    out = b""
    while len(out) < k:
        chunk = s.recv(k - len(out))
        if not chunk:
            break
        out += chunk
    return out
stop_at = time.monotonic() + seconds
while rounds < max_rounds and time.monotonic() < stop_at:
    if select.select([sys.stdin], [], [], 0)[0]:
        break  # stdin closed: the test is done with us
    socks = []
    for _ in range(batch):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        try:
            s.connect(path)
            s.sendall(frames[n % len(frames)])
            n += 1
            if mode == "garbage":
                s.shutdown(socket.SHUT_WR)
            socks.append(s)
        except OSError as err:
            bump("connect:" + type(err).__name__)
            s.close()
    for s in socks:
        try:
            header = read(s, 4)
            if len(header) < 4:
                bump("closed")
            else:
                reply = json.loads(read(s, struct.unpack(">I", header)[0]))
                bump("ok" if reply.get("ok") else reply.get("code", "?"))
        except (OSError, ValueError) as err:
            bump("read:" + type(err).__name__)
        finally:
            s.close()
    rounds += 1
    if rounds == 1:
        print("STARTED", flush=True)
counts["rounds"] = rounds
print(json.dumps(counts), flush=True)
"""


def _service_file(hook, options):
    return (f"# rolegate load tests: the hook, then what it put in the PAM environment\n"
            f"session required pam_python.so {hook} {options}\n"
            f"session optional pam_exec.so stdout quiet {REPORTER}\n")


REPORTER = "/usr/local/bin/rolegate-load-report"


@pytest.fixture(scope="module")
def host():
    with sandbox_host() as h:
        try:
            h.add_user(FLOODER)
            for user in FLOOD_USERS + [DENY_USER] + BURST_USERS + SSH_USERS:
                h.add_user(user, groups=(GROUP,))
            h.write_config(LOAD_CONFIG)
            # The ssh storm's 200 clients and their key exchanges run on this machine too, beside
            # the broker and the stand-in; on a real bastion they are elsewhere. So the sshd stack's
            # hook gets a wider budget than the 3 s default (the pamtester logins keep it): the
            # storm tests the doors (no refused connect, no lost reply), not this machine's speed.
            hook = h.install_pam(options="debug timeout=10")
            with open(REPORTER, "w") as fh:
                fh.write('#!/bin/sh\necho "REPORT type=$PAM_TYPE user=$PAM_USER file=${AWS_SHARED_CREDENTIALS_FILE:-}"\n')
            os.chmod(REPORTER, 0o755)
            for service, options in ((SERVICE, "debug"), (SERVICE_DENY, "debug on_error=deny")):
                with open(f"/etc/pam.d/{service}", "w") as fh:
                    fh.write(_service_file(hook, options))
            h.start_broker()
            h.start_sshd(extra_config=SSHD_EXTRA)
            yield h
        finally:
            for service in (SERVICE, SERVICE_DENY):
                if os.path.exists(f"/etc/pam.d/{service}"):
                    os.unlink(f"/etc/pam.d/{service}")


# -- helpers ------------------------------------------------------------------------------------


class Login:
    """One pamtester open_session+close_session, started now; `finish()` collects what it saw."""

    def __init__(self, user, service=SERVICE):
        self.user = user
        self.started = time.monotonic()
        self.proc = pamtester(service, user, popen=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.rc = self.out = self.err = None
        self.seconds = None

    def finish(self, deadline):
        try:
            self.out, self.err = self.proc.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.out, self.err = self.proc.communicate(timeout=10)
            self.err += "\n(killed: no answer before the test's bound)"
        self.rc = self.proc.returncode
        self.seconds = time.monotonic() - self.started
        return self

    def opened(self):
        """The hook's `opened:` fields (its debug line), or {} when it logged none."""
        for line in self.err.splitlines():
            _, sep, rest = line.partition("opened: ")
            if sep:
                return dict(f.split("=", 1) for f in rest.split() if "=" in f)
        return {}

    def file(self):
        """AWS_SHARED_CREDENTIALS_FILE as the PAM stack after the hook saw it at open."""
        for line in self.out.splitlines():
            if line.startswith("REPORT type=open_session"):
                return line.partition(" file=")[2]
        return None

    def granted(self):
        return self.rc == 0 and self.opened().get("granted") == "True" and bool(self.file())

    def describe(self):
        return f"{self.user}: rc={self.rc} {self.seconds:.1f}s stdout={self.out.strip()!r} stderr={self.err.strip()!r}"


def logins(users, count, service=SERVICE):
    """`count` pamtester logins started together, round-robin over `users`; waits for all."""
    started = [Login(users[i % len(users)], service) for i in range(count)]
    deadline = time.monotonic() + NO_HANG
    return [login.finish(deadline) for login in started]


def summary(done):
    secs = sorted(l.seconds for l in done)
    hook_ms = sorted(int(l.opened().get("ms", -1)) for l in done)
    return (f"{sum(l.granted() for l in done)}/{len(done)} granted; wall s min/median/max "
            f"{secs[0]:.2f}/{secs[len(secs) // 2]:.2f}/{secs[-1]:.2f}; hook ms median/max "
            f"{hook_ms[len(hook_ms) // 2]}/{hook_ms[-1]}")


def _close_stdin(proc, last=None):
    """Write `last` (if any) and close the child's stdin: its signal to finish."""
    try:
        if last:
            proc.stdin.write(last)
        proc.stdin.close()
    except OSError:
        pass  # it is gone already
    proc.stdin = None  # so communicate() does not flush the closed pipe


def _collect(proc, deadline):
    """(stdout, stderr) of a child told to finish; killed if it has not by `deadline`."""
    try:
        return proc.communicate(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate(timeout=10)


class Flood:
    """`procs` unprivileged processes hammering the user door until stopped (or FLOOD_LIMIT)."""

    def __init__(self, user, procs=8, batch=16, max_rounds=100000):
        self.procs = []
        for i in range(procs):
            mode = "ping" if i % 2 == 0 else "garbage"
            cmd = ["setpriv", "--reuid", user, "--regid", user, "--init-groups", sys.executable, "-c", FLOODER_CODE,
                   SOCKET, mode, str(FLOOD_LIMIT), str(max_rounds), str(batch)]
            self.procs.append((mode, subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                      stderr=subprocess.PIPE, text=True)))

    def wait_started(self, timeout=30):
        deadline = time.monotonic() + timeout
        for mode, proc in self.procs:
            fd = proc.stdout.fileno()
            ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
            line = proc.stdout.readline().strip() if ready else ""
            assert line == "STARTED", f"a {mode} flooder did not get going: {line!r} {proc.poll()}"

    def running(self):
        return [proc.poll() is None for _, proc in self.procs]

    def stop(self):
        """Tell every flooder to stop; returns [(mode, counts)]."""
        results = []
        for mode, proc in self.procs:
            _close_stdin(proc)
        for mode, proc in self.procs:
            out, err = _collect(proc, time.monotonic() + 30)
            last = out.strip().splitlines()[-1] if out.strip() else "{}"
            try:
                results.append((mode, json.loads(last)))
            except ValueError:
                results.append((mode, {"unreadable": last, "stderr": err[-500:]}))
        return results


# -- 1: the user door flooded, the PAM door still serves every login ------------------------------------


def test_fairness__logins_get_credentials_while_a_user_floods_the_user_door(host):
    before = host.moto.assume_role_calls()
    flood = Flood(FLOODER)
    try:
        flood.wait_started()
        start = time.monotonic()
        done = logins(FLOOD_USERS, 50)
        elapsed = time.monotonic() - start
        deny = Login(DENY_USER, SERVICE_DENY).finish(time.monotonic() + NO_HANG)
        still_flooding = flood.running()
    finally:
        counts = flood.stop()
    print(f"\n[flood] 50 logins in {elapsed:.1f}s: {summary(done)}; deny login {deny.seconds:.2f}s "
          f"rc={deny.rc}; flooders: {counts}")
    assert all(still_flooding), f"a flooder stopped before the logins ended, so they did not meet the flood: {counts}"
    answered = sum(c.get("ok", 0) + c.get("bad_request", 0) + c.get("busy", 0) for _, c in counts)
    assert answered > 0, f"the flood got no answers at all, so it tested nothing: {counts}"
    missing = [l.describe() for l in done if not l.granted()]
    assert not missing, f"{len(missing)} of 50 logins during the flood got no credentials:\n" + "\n".join(missing)
    assert deny.granted(), f"an on_error=deny login failed during the flood: {deny.describe()}"
    calls = host.moto.assume_role_calls() - before
    assert calls == len(FLOOD_USERS) + 1, f"{calls} AssumeRole calls for {len(FLOOD_USERS) + 1} grants"
    assert host.broker.poll() is None, f"the broker died under the flood:\n{host.broker_log()[-3000:]}"


# -- 2: a burst of logins, one STS call per grant ---------------------------------------------------------


def test_burst__100_pamtester_logins_over_10_users_all_granted_one_sts_call_each(host):
    before = host.moto.assume_role_calls()
    start = time.monotonic()
    done = logins(BURST_USERS, 100)
    elapsed = time.monotonic() - start
    calls = host.moto.assume_role_calls() - before
    print(f"\n[burst] 100 logins in {elapsed:.1f}s: {summary(done)}; AssumeRole calls {calls}")
    missing = [l.describe() for l in done if not l.granted()]
    assert not missing, f"{len(missing)} of 100 logins got no credentials:\n" + "\n".join(missing)
    assert calls == len(BURST_USERS), \
        f"{calls} AssumeRole calls for {len(BURST_USERS)} grants: single flight should make it one each"
    files = {l.user: l.file() for l in done}
    assert len(set(files.values())) == len(BURST_USERS), f"expected one file per user, got {files}"


# -- 3: a storm of ssh sessions, and nobody ever reads half a file ------------------------------------------


def _parse_credentials(text):
    """The default profile of a credentials file's text, or raise why it is not a whole one."""
    ini = configparser.ConfigParser()
    ini.read_string(text)
    section = ini["default"]
    for key in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token"):
        if not section.get(key):
            raise ValueError(f"no {key}")
    return section


class FileReader(threading.Thread):
    """Reads every credentials file under the grants folder, over and over, until stopped."""

    def __init__(self, max_rounds=200000, max_seconds=NO_HANG + 120):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.max_rounds, self.max_seconds = max_rounds, max_seconds
        self.parsed = self.vanished = self.rounds = 0
        self.torn = []

    def run(self):
        end = time.monotonic() + self.max_seconds
        while not self.stop.is_set() and self.rounds < self.max_rounds and time.monotonic() < end:
            self.rounds += 1
            try:
                names = os.listdir(GRANTS_DIR)
            except FileNotFoundError:
                names = []
            for name in names:
                try:
                    with open(os.path.join(GRANTS_DIR, name, "credentials")) as fh:
                        text = fh.read()
                except FileNotFoundError:
                    self.vanished += 1
                    continue
                try:
                    _parse_credentials(text)
                    self.parsed += 1
                except (configparser.Error, KeyError, ValueError) as err:
                    self.torn.append((name, repr(err), text[:200]))
            time.sleep(0.001)


SSH_SCRIPT = ('F="${AWS_SHARED_CREDENTIALS_FILE:-}"; echo "FILE=$F"; echo BEGIN; '
              '[ -n "$F" ] && cat "$F"; echo END; echo READY; read _ignored')


class SshSession:
    """An ssh session that reports its credentials file and its content, then waits for release."""

    def __init__(self, host, user):
        self.user = user
        self.started = time.monotonic()
        self.proc = subprocess.Popen(host.ssh_cmd(user, SSH_SCRIPT), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.out = b""
        self.ready_after = None

    def fileno(self):
        return self.proc.stdout.fileno()

    def feed(self):
        """Take what ssh printed; False once it printed READY or ended."""
        chunk = os.read(self.fileno(), 65536)
        self.out += chunk
        if b"READY\n" in self.out:
            self.ready_after = time.monotonic() - self.started
            return False
        return bool(chunk)

    def report(self):
        text = self.out.decode(errors="replace")
        file = next((l[5:] for l in text.splitlines() if l.startswith("FILE=")), None)
        body = text.partition("BEGIN\n")[2].partition("END\n")[0]
        return file, body

    def release(self, deadline):
        _close_stdin(self.proc, b"\n")
        _, err = _collect(self.proc, deadline)
        return err.decode(errors="replace")


def _hook_lines(text):
    """(ms of each `opened:` line, count of `failed:` lines) the hook logged (sshd keeps its stderr)."""
    ms, failed = [], 0
    for line in text.splitlines():
        if "rolegate-pam" in line and "opened: " in line:
            ms += [int(f[3:]) for f in line.split() if f.startswith("ms=")]
        elif "rolegate-pam" in line and "failed: " in line:
            failed += 1
    return sorted(ms), failed


def _why(sshd_text, broker_text, limit=12):
    """What the hook and the broker said about logins that went wrong, most frequent first: a
    failure message must say why, not only how many."""
    seen = collections.Counter()
    for source, text in (("hook", sshd_text), ("broker", broker_text)):
        for line in text.splitlines():
            if ("failed: " in line or "granted=False" in line or "refused" in line) and (
                    source == "broker" or "rolegate-pam" in line):
                # the same reason for different users and pids counts once
                event = re.search(r"(failed|opened|refused)\b.*", line)
                said = event.group(0) if event else line
                seen[source + ": " + re.sub(r"\b(user|pid|session|ms|grant)=\S+", r"\1=…", said)] += 1
    return "\n".join(f"  {n}× {said[:300]}" for said, n in seen.most_common(limit)) or "  (no failed line in either log)"


def test_storm__200_concurrent_ssh_sessions_over_20_users_all_get_whole_credentials(host):
    before = host.moto.assume_role_calls()
    sshd_mark = len(host.sshd_log())
    broker_mark = host.log_mark()
    reader = FileReader()
    reader.start()
    sessions = []
    try:
        start = time.monotonic()
        sessions = [SshSession(host, SSH_USERS[i % len(SSH_USERS)]) for i in range(200)]
        waiting = {s.fileno(): s for s in sessions}
        deadline = time.monotonic() + NO_HANG
        while waiting and time.monotonic() < deadline:  # ends when all reported or at the bound
            ready, _, _ = select.select(list(waiting), [], [], max(deadline - time.monotonic(), 0))
            for fd in ready:
                if not waiting[fd].feed():
                    del waiting[fd]
        all_up = time.monotonic() - start
        calls = host.moto.assume_role_calls() - before
    finally:
        release_by = time.monotonic() + NO_HANG
        errors = {s.user: s.release(release_by) for s in sessions}
        reader.stop.set()
        reader.join(30)
    results = []
    for s in sessions:
        file, body = s.report()
        try:
            key = _parse_credentials(body)["aws_access_key_id"]
        except (configparser.Error, KeyError, ValueError) as err:
            key = f"unparsable ({err!r})"
        results.append((s, file, key))
    good = [r for r in results if r[1] and r[1].startswith(GRANTS_DIR + "/") and r[2].startswith("ASIA")]
    ready = sorted(s.ready_after for s in sessions if s.ready_after is not None)
    sshd_text = host.sshd_log()[sshd_mark:]
    hook_ms, hook_failed = _hook_lines(sshd_text)
    summary = (f"\n[storm] {len(good)}/200 sessions with credentials; all up after {all_up:.1f}s; ready s "
          f"median/max {ready[len(ready) // 2] if ready else -1:.1f}/{ready[-1] if ready else -1:.1f}; "
          f"hook ms median/max {hook_ms[len(hook_ms) // 2] if hook_ms else -1}/{hook_ms[-1] if hook_ms else -1} "
          f"({len(hook_ms)} opened, {hook_failed} failed lines); AssumeRole calls {calls}; "
          f"reader rounds {reader.rounds} parsed {reader.parsed} "
          f"vanished {reader.vanished} torn {len(reader.torn)}")
    print(summary)
    bad = [f"{s.user}: file={file!r} key={key!r} out={s.out[-300:]!r} err={errors[s.user][-300:]!r}"
           for s, file, key in results if (s, file, key) not in good]
    assert not bad, (f"{len(bad)} of 200 ssh sessions got no usable credentials:{summary}\nwhy:\n"
                     f"{_why(sshd_text, host.log_since(broker_mark))}\n" + "\n".join(bad[:10]))
    assert calls == len(SSH_USERS), f"{calls} AssumeRole calls for {len(SSH_USERS)} grants (want one each)"
    assert reader.parsed > 0, "the reader never saw a credentials file, so it proved nothing"
    assert not reader.torn, f"the reader saw {len(reader.torn)} incomplete credentials files: {reader.torn[:5]}"


# -- 4: a thousand pings at once -----------------------------------------------------------------------


# Send n pings at once (a barrier releases n threads together) through the project's client;
# returns outcome counts. Run in this process for root, and as source in a subprocess for a user.
PING_MANY = r"""
import threading
from pam_rolegate import client, protocol
from pam_rolegate.errors import BrokerUnavailable

def ping_many(path, n, timeout):
    results = []
    gate = threading.Barrier(n, timeout=60)
    def one():
        try:
            gate.wait()
        except threading.BrokenBarrierError:
            pass
        try:
            reply = client.call(protocol.Ping(), path=path, timeout=timeout)
            results.append(type(reply).__name__ + ":" + str(getattr(reply, "code", "")))
        except BrokerUnavailable as err:
            results.append("unavailable:" + str(err))
    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    counts = {}
    for r in list(results):
        counts[r] = counts.get(r, 0) + 1
    return {"answered": counts.get("Reply:", 0), "outcomes": counts, "finished": len(results)}
"""
PINGS = 1000
# Each ping's deadline. Not the hook's 3 s: 1000 answers inside 3 s would be a speed claim, and this
# shared 2-CPU machine (load averages of 10-30 from other work) answers one uid's 1000 in 1.5-3 s.
# What this asserts is that none is lost: before the fixes, pings died of EPIPE on `busy`, and one
# uid's pings trickled through the worker gate at ~10-20/s, so even this bound would not save them.
PING_TIMEOUT = 30.0


def _pings(path, user=None):
    """PINGS pings at once: in this process as root, or in a subprocess as `user`."""
    start = time.monotonic()
    if user is None:
        space = {}
        exec(PING_MANY, space)
        return space["ping_many"](path, PINGS, PING_TIMEOUT), time.monotonic() - start
    code = PING_MANY + f"\nimport json\nprint(json.dumps(ping_many({path!r}, {PINGS}, {PING_TIMEOUT})))\n"
    done = run(["setpriv", "--reuid", user, "--regid", user, "--init-groups", sys.executable, "-c", code],
               timeout=NO_HANG, check=False)
    try:
        return json.loads(done.stdout.strip().splitlines()[-1]), time.monotonic() - start
    except (ValueError, IndexError):
        raise AssertionError(f"the ping run as {user} printed no result: rc={done.returncode} {done.stdout} "
                             f"{done.stderr}") from None


@pytest.mark.parametrize("door,path,user",
                         [("user", SOCKET, FLOODER), ("user", SOCKET, None), ("pam", PAM_SOCKET, None)],
                         ids=["user-door-as-user", "user-door-as-root", "pam-door-as-root"])
def test_capacity__1000_simultaneous_pings_are_all_answered(host, door, path, user):
    got, elapsed = _pings(path, user)
    print(f"\n[pings] {door} door as {user or 'root'}: {got['answered']}/{PINGS} answered in {elapsed:.1f}s "
          f"{got['outcomes'] if got['answered'] < PINGS else ''}")
    assert got["finished"] == PINGS, f"only {got['finished']} of {PINGS} ping threads finished: {got}"
    assert got["answered"] == PINGS, \
        f"{PINGS - got['answered']} of {PINGS} pings on the {door} door as {user or 'root'} went unanswered: " \
        f"{got['outcomes']}"
