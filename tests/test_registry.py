"""The grant registry with real parts: linger, recovery after a SIGKILL mid-burst, the refresh
pool's rate limit, SIGHUP revocation; and the pure pieces (token bucket, journal replay) alone.

Sessions are opened the way the PAM hook opens them: as root, on the PAM door, naming the pid of
a live process (here a `sleep` this test starts and later kills). The AWS stand-in is moto, and
every AssumeRole count comes from moto's own record.
"""

import dataclasses
import json
import os
import random
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness import ACCOUNT, PAM_SOCKET, RUNTIME_DIR, sandbox_host, run
from pam_rolegate.hookside import client, protocol
from pam_rolegate.errors import BrokerUnavailable

GRANTS_DIR = os.path.join(RUNTIME_DIR, "grants")
LINGER_USERS = ("lina", "linb", "linc")
HUP_USERS = ("hupa", "hupb")
BURST_USERS = tuple(f"burst{i}" for i in range(5))
RATE_USERS = tuple(f"rate{i:02d}" for i in range(40))
CALL_TIMEOUT = 30.0  # one PAM-door request; generous: other suites share these two cores


def config(users, *, duration=900, refresh_before=None, linger=None, refresh=None, sts_timeout=5):
    """A config giving each of `users` its own role, with the session/refresh settings given."""
    session = [f"  duration: {duration}"]
    if refresh_before is not None:
        session.append(f"  refresh_before: {refresh_before}")
    if linger is not None:
        session.append(f"  linger: {linger}")
    text = ["version: 1", "region: us-east-1", f"sts_timeout: {sts_timeout}", "reap_interval: 2s", "session:",
            *session]
    if refresh is not None:
        text += ["refresh:", f"  workers: {refresh[0]}", f"  rate: {refresh[1]}"]
    text.append("roles:")
    for user in users:
        text += [f"  - match: {{user: {user}}}", f"    role: arn:aws:iam::{ACCOUNT}:role/{user}-role"]
    return "\n".join(text) + "\n"


def add_account(name):
    """A plain account (no home, no ssh key): all the PAM door needs is NSS knowing it."""
    if run(["id", name], check=False).returncode != 0:
        run(["useradd", "-M", "-s", "/usr/sbin/nologin", name])


@pytest.fixture(scope="module")
def host():
    with sandbox_host() as h:
        for user in LINGER_USERS + HUP_USERS + BURST_USERS + RATE_USERS:
            add_account(user)
        h.write_config(config(LINGER_USERS))
        h.start_broker()
        yield h


class Sleepers:
    """Live processes whose pids stand for the processes that hold PAM sessions."""

    def __init__(self):
        self.procs = {}

    def start(self, n=1):
        started = [subprocess.Popen(["sleep", "3600"]) for _ in range(n)]
        for p in started:
            self.procs[p.pid] = p
        return [p.pid for p in started]

    def kill(self, pid):
        p = self.procs.pop(pid)
        p.kill()
        p.wait(10)  # no zombie left behind: the broker must see the process gone

    def kill_all(self):
        for pid in list(self.procs):
            self.kill(pid)


@pytest.fixture
def sleepers():
    s = Sleepers()
    yield s
    s.kill_all()


def restart(h, text):
    """Stop the broker, put `text` in force, start it again: each test begins with its own config."""
    h.stop_broker()
    h.write_config(text)
    h.start_broker()


def open_session(user, pid, timeout=CALL_TIMEOUT):
    return client.call(protocol.OpenSession(user=user, service="sshd", pid=pid), path=PAM_SOCKET, timeout=timeout)


def close_session(sid, timeout=CALL_TIMEOUT):
    return client.call(protocol.CloseSession(session=sid), path=PAM_SOCKET, timeout=timeout)


def login(user, pid):
    """Open a session that must be granted; returns (session id, credentials file)."""
    reply = open_session(user, pid)
    assert isinstance(reply, protocol.Reply) and reply.get("granted"), f"{user}'s login was not granted: {reply!r}"
    path = reply.get("env", {}).get("AWS_SHARED_CREDENTIALS_FILE")
    assert path, f"{user}'s granted login carries no credentials file: {reply!r}"
    return reply.get("session"), path


def logout(sid):
    reply = close_session(sid)
    assert isinstance(reply, protocol.Reply) and reply.get("released") == 1, \
        f"closing session {sid} did not release exactly it: {reply!r}"


def key_id(path):
    with open(path) as fh:
        for line in fh:
            if line.startswith("aws_access_key_id"):
                return line.split("=", 1)[1].strip()
    raise AssertionError(f"no access key in {path}")


def wait_for(predicate, timeout, what, interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def status():
    """Root's `rolegate status --json`: every live grant with its session_list."""
    return json.loads(run(["rolegate", "status", "--json"], timeout=120).stdout)["grants"]


# -- linger ----------------------------------------------------------------------------------------


def test_linger__next_login_within_linger_reuses_the_credentials_without_sts(host, sleepers):
    restart(host, config(LINGER_USERS))  # linger unset: the default 15 minutes
    pid, = sleepers.start()
    calls = host.moto.assume_role_calls()
    sid, path = login("lina", pid)
    first_key = key_id(path)
    logout(sid)
    assert not os.path.exists(path), "the credentials file outlived the grant's last session (linger keeps memory only)"
    assert [g.get("state") for g in status() if g["principal"] == "lina"] == ["lingering"], \
        "a lingering grant is not shown as lingering (with no files) by `rolegate status`"
    sid, path2 = login("lina", pid)
    assert path2 == path, f"the second login got another file: {path2} != {path}"
    assert os.path.exists(path), "the second login did not write the credentials file back"
    assert key_id(path) == first_key, "the second login got new keys instead of the lingering ones"
    logout(sid)
    assert not os.path.exists(path), "the file outlived the second logout"
    used = host.moto.assume_role_calls() - calls
    assert used == 1, f"two sequential logins within the linger cost {used} AssumeRole calls, expected 1"


def test_linger__login_after_linger_ended_costs_a_new_assume_role(host, sleepers):
    # `2s` passes config validation: session.linger accepts any duration from 0 up.
    restart(host, config(LINGER_USERS, linger="2s"))
    pid, = sleepers.start()
    calls = host.moto.assume_role_calls()
    sid, path = login("linb", pid)
    first_key = key_id(path)
    mark = host.log_mark()
    logout(sid)
    assert not os.path.exists(path), "the credentials file outlived the logout"
    wait_for(lambda: "linger ended" in host.log_since(mark), 20, "the 2 s linger to end (logged `linger ended`)")
    sid, path = login("linb", pid)
    assert key_id(path) != first_key, "a login after the linger ended got the old keys"
    logout(sid)
    used = host.moto.assume_role_calls() - calls
    assert used == 2, f"a login, 2 s linger, a login: {used} AssumeRole calls, expected 2"


def test_linger__zero_linger_costs_an_assume_role_per_login(host, sleepers):
    restart(host, config(LINGER_USERS, linger=0))
    pid, = sleepers.start()
    calls = host.moto.assume_role_calls()
    keys = []
    for _ in range(3):
        sid, path = login("linc", pid)
        keys.append(key_id(path))
        logout(sid)
        assert not os.path.exists(path), "the credentials file outlived the logout"
    used = host.moto.assume_role_calls() - calls
    assert used == 3, f"three sequential logins with linger 0 cost {used} AssumeRole calls, expected 3"
    assert len(set(keys)) == 3, f"linger 0 still handed out the same keys twice: {keys}"


# -- recovery after SIGKILL in the middle of a burst ------------------------------------------------

INITIAL_SESSIONS = 1000
SESSIONS_PER_PID = 4  # pids are shared: a process may hold several sessions (close by pid ends all)
BURST_THREADS = 8
KILL_AFTER_ACKS = 200  # acknowledged burst requests before the SIGKILL
KILLED_WHILE_DOWN = 20  # session processes that die while no broker runs


class Burst:
    """What the broker acknowledged, and what was in flight (no reply) when it was killed."""

    def __init__(self, opened, pids):
        self.lock = threading.Lock()
        self.opened = dict(opened)  # sid -> pid: acknowledged opens (granted)
        self.closable = list(opened)
        self.closed = set()  # acknowledged closes (released 1)
        self.open_in_doubt = []  # pids of opens without a reply
        self.close_in_doubt = set()  # sids of closes without a reply
        self.errors = []  # replies that were neither success nor the broker's death
        self.pids = pids
        self.acks = 0
        self.stop = threading.Event()

    def one(self, rng):
        with self.lock:
            sid = self.closable.pop(rng.randrange(len(self.closable))) if self.closable and rng.random() < 0.5 else None
        if sid is not None:
            try:
                reply = close_session(sid)
            except BrokerUnavailable:
                with self.lock:
                    self.close_in_doubt.add(sid)
                return
            with self.lock:
                if isinstance(reply, protocol.Reply) and reply.get("released") == 1:
                    self.closed.add(sid)
                    self.acks += 1
                else:
                    self.errors.append(("close", sid, reply))
            return
        user, pid = rng.choice(BURST_USERS), rng.choice(self.pids)
        try:
            reply = open_session(user, pid)
        except BrokerUnavailable:
            with self.lock:
                self.open_in_doubt.append(pid)
            return
        with self.lock:
            if isinstance(reply, protocol.Reply) and reply.get("granted"):
                self.opened[reply.get("session")] = pid
                self.closable.append(reply.get("session"))
                self.acks += 1
            else:
                self.errors.append(("open", user, reply))

    def worker(self, seed):
        rng = random.Random(seed)
        while not self.stop.is_set():
            self.one(rng)


def test_recovery__sigkill_mid_burst_restart_keeps_exactly_the_live_sessions(host, sleepers):
    restart(host, config(BURST_USERS))
    pids = sleepers.start(INITIAL_SESSIONS // SESSIONS_PER_PID + 50)
    base = pids[:INITIAL_SESSIONS // SESSIONS_PER_PID]
    jobs = [(BURST_USERS[i % len(BURST_USERS)], base[i // SESSIONS_PER_PID]) for i in range(INITIAL_SESSIONS)]
    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda job: (job[1], open_session(*job)), jobs))
    fill_s = time.monotonic() - t0
    refused = [r for _pid, r in replies if not (isinstance(r, protocol.Reply) and r.get("granted"))]
    assert not refused, f"{len(refused)} of {INITIAL_SESSIONS} opens were not granted, e.g. {refused[:3]}"
    burst = Burst({r.get("session"): pid for pid, r in replies}, pids)
    assert len(burst.opened) == INITIAL_SESSIONS, "session ids repeat across opens"

    threads = [threading.Thread(target=burst.worker, args=(seed,)) for seed in range(BURST_THREADS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    wait_for(lambda: burst.acks >= KILL_AFTER_ACKS, 120, f"{KILL_AFTER_ACKS} acknowledged burst requests")
    os.kill(host.broker.pid, signal.SIGKILL)  # mid-burst: requests are in flight on 8 threads
    burst_s = time.monotonic() - t0
    host.broker.wait(15)
    burst.stop.set()
    for t in threads:
        t.join(CALL_TIMEOUT + 10)
    assert not any(t.is_alive() for t in threads), "a burst thread did not finish after the broker died"
    assert not burst.errors, f"the live broker refused burst requests: {burst.errors[:5]}"

    # While no broker runs, some session processes end: nobody can close their sessions.
    killed = set(random.Random(7).sample(pids, KILLED_WHILE_DOWN))
    for pid in killed:
        sleepers.kill(pid)

    mark = host.log_mark()
    t0 = time.monotonic()
    host.start_broker()
    restart_s = time.monotonic() - t0
    grants = status()
    found = {s["id"]: s["pid"] for g in grants for s in g.get("session_list", [])}

    alive = {sid: pid for sid, pid in burst.opened.items() if pid not in killed}
    must_live = {sid for sid in alive if sid not in burst.closed and sid not in burst.close_in_doubt}
    must_be_gone = burst.closed | {sid for sid, pid in burst.opened.items() if pid in killed}
    missing = must_live - found.keys()
    assert not missing, f"{len(missing)} acknowledged, unclosed sessions of live processes were lost, " \
                        f"e.g. {sorted(missing)[:5]}"
    moved = {sid for sid in must_live if found[sid] != burst.opened[sid]}
    assert not moved, f"recovered sessions name other processes than they were opened for: {sorted(moved)[:5]}"
    resurrected = must_be_gone & found.keys()
    assert not resurrected, f"{len(resurrected)} closed or dead sessions came back after the restart, " \
                            f"e.g. {sorted(resurrected)[:5]}"
    unknown = {sid: pid for sid, pid in found.items() if sid not in burst.opened}
    in_doubt_pids = set(burst.open_in_doubt) - killed
    assert len(unknown) <= len(burst.open_in_doubt), \
        f"{len(unknown)} sessions nobody was told about, but only {len(burst.open_in_doubt)} opens were in flight"
    assert set(unknown.values()) <= in_doubt_pids, \
        f"sessions nobody was told about hold pids no in-flight open named: {set(unknown.values()) - in_doubt_pids}"
    dead = [pid for pid in found.values() if pid not in sleepers.procs]
    assert not dead, f"sessions of processes that died while the broker was down survived: {dead[:5]}"
    assert f"recovered: sessions={len(found)} " in host.log_since(mark), \
        f"the recovery line does not count the {len(found)} kept sessions:\n{host.log_since(mark)[-2000:]}"

    live_grants = {g["grant"] for g in grants}
    assert all(g["sessions"] > 0 for g in grants), "a grant without sessions is live after the restart"
    on_disk = set(os.listdir(GRANTS_DIR))
    assert on_disk == live_grants, f"grant directories {sorted(on_disk - live_grants)} have no live grant, " \
                                   f"or live grants {sorted(live_grants - on_disk)} have no directory"
    print(f"\nrecovery: filled {INITIAL_SESSIONS} in {fill_s:.1f}s; burst acks={burst.acks} in {burst_s:.1f}s "
          f"(opened {len(burst.opened) - INITIAL_SESSIONS}, closed {len(burst.closed)}); in doubt: "
          f"opens {len(burst.open_in_doubt)}, closes {len(burst.close_in_doubt)}; restart {restart_s:.1f}s; "
          f"kept {len(found)} (unknown {len(unknown)}, closes in doubt kept "
          f"{len(burst.close_in_doubt & found.keys())})")


# -- recovery after SIGKILL during a journal compaction ---------------------------------------------

JOURNAL_NEW = os.path.join(RUNTIME_DIR, "state", "journal.new")  # exists only while a compaction writes
COMPACTION_SESSIONS = 1000  # the live state compacted: its rewrite takes long enough to be caught
COMPACTION_ROUNDS = 6  # churn-until-compaction rounds at most (each kills the broker once)
COMPACTION_HITS = 2  # kills inside the window wanted; the test stops early once it has them
ROUND_TIMEOUT = 120  # seconds of churn for one compaction (records.COMPACT_MIN of journal lines)


def _check_recovery(host, burst, mark):
    """After a SIGKILL and restart: every acknowledged, unclosed session back, none that was closed,
    no session nobody asked for beyond the opens in flight, no grant without sessions or files."""
    grants = status()
    found = {s["id"]: s["pid"] for g in grants for s in g.get("session_list", [])}
    must_live = {sid for sid in burst.opened if sid not in burst.closed and sid not in burst.close_in_doubt}
    missing = must_live - found.keys()
    assert not missing, f"{len(missing)} acknowledged, unclosed sessions were lost, e.g. {sorted(missing)[:5]}"
    resurrected = burst.closed & found.keys()
    assert not resurrected, f"{len(resurrected)} acknowledged closes came back, e.g. {sorted(resurrected)[:5]}"
    unknown = {sid: pid for sid, pid in found.items() if sid not in burst.opened}
    assert len(unknown) <= len(burst.open_in_doubt) and set(unknown.values()) <= set(burst.open_in_doubt), \
        f"{len(unknown)} sessions nobody was told about, but only {len(burst.open_in_doubt)} opens were in flight"
    live_grants = {g["grant"] for g in grants}
    assert all(g["sessions"] > 0 for g in grants), "a grant without sessions is live after the restart"
    on_disk = set(os.listdir(GRANTS_DIR))
    assert on_disk == live_grants, f"stray grant directories {sorted(on_disk - live_grants)}, or live grants " \
                                   f"{sorted(live_grants - on_disk)} without one"
    assert f"recovered: sessions={len(found)} " in host.log_since(mark), \
        f"the recovery line does not count the {len(found)} kept sessions:\n{host.log_since(mark)[-2000:]}"
    return found


def test_recovery__sigkill_during_compaction_restart_keeps_exactly_the_acknowledged_sessions(host, sleepers):
    """The journal is rewritten once COMPACT_MIN bytes of changes piled up past the live state. A
    churn of opens and closes drives it there; the moment journal.new appears (the compaction is
    writing) the broker is SIGKILLed. journal.new still there after its death proves the kill
    landed inside the window; each restart must recover exactly the acknowledged sessions."""
    import sys

    restart(host, config(BURST_USERS))
    pids = sleepers.start(COMPACTION_SESSIONS // SESSIONS_PER_PID + 20)
    jobs = [(BURST_USERS[i % len(BURST_USERS)], pids[i // SESSIONS_PER_PID]) for i in range(COMPACTION_SESSIONS)]
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda job: (job[1], open_session(*job)), jobs))
    assert all(isinstance(r, protocol.Reply) and r.get("granted") for _pid, r in replies), "the fill was refused"
    live = {r.get("session"): pid for pid, r in replies}
    switch = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)  # the watcher below must not wait 5 ms for the churn threads' GIL
    hits, rounds, took = 0, [], []
    try:
        while hits < COMPACTION_HITS and len(rounds) < COMPACTION_ROUNDS:
            assert not os.path.exists(JOURNAL_NEW), "the restarted broker left journal.new behind"
            burst = Burst(live, pids)
            threads = [threading.Thread(target=burst.worker, args=(seed + 10 * len(rounds),))
                       for seed in range(BURST_THREADS)]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            seen = False
            while time.monotonic() - t0 < ROUND_TIMEOUT:
                if os.path.exists(JOURNAL_NEW):
                    os.kill(host.broker.pid, signal.SIGKILL)
                    seen = True
                    break
                time.sleep(0.0002)
            if not seen:
                os.kill(host.broker.pid, signal.SIGKILL)
            host.broker.wait(15)
            burst.stop.set()
            for t in threads:
                t.join(CALL_TIMEOUT + 10)
            assert not any(t.is_alive() for t in threads), "a churn thread did not finish after the broker died"
            assert not burst.errors, f"the live broker refused churn requests: {burst.errors[:5]}"
            assert seen, f"no compaction began within {ROUND_TIMEOUT}s of churn ({burst.acks} acknowledged requests)"
            hit = os.path.exists(JOURNAL_NEW)
            hits += hit
            rounds.append("in the window" if hit else "just after the rename")
            took.append(time.monotonic() - t0)
            mark = host.log_mark()
            host.start_broker()
            live = _check_recovery(host, burst, mark)
    finally:
        sys.setswitchinterval(switch)
    print(f"\ncompaction kills: {len(rounds)} rounds ({', '.join(rounds)}); churn to each compaction "
          f"{', '.join(f'{t:.1f}s' for t in took)}; {len(live)} sessions live at the end")
    assert hits, f"no SIGKILL landed inside a compaction in {len(rounds)} rounds: {rounds}"


# -- the refresh pool's rate limit ------------------------------------------------------------------

RATE, WORKERS = 5, 4


def test_refresh__pool_keeps_to_its_rate_and_refreshes_every_grant(host, sleepers):
    # 900 s credentials refreshed 890 s before expiry: each grant is due ~10 s after its login.
    restart(host, config(RATE_USERS, duration=900, refresh_before=890, refresh=(WORKERS, RATE)))
    pids = sleepers.start(len(RATE_USERS))
    before = host.moto.assume_role_calls()
    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        logins = list(pool.map(login, RATE_USERS, pids))
    login_s = time.monotonic() - t0
    t_start = time.monotonic()
    start = host.moto.assume_role_calls()
    assert start - before == len(RATE_USERS), \
        f"{len(RATE_USERS)} first logins cost {start - before} AssumeRole calls (a refresh ran early, or a login " \
        f"was not counted); logins took {login_s:.1f}s"
    keys = {path: key_id(path) for _sid, path in logins}

    # Each sample is (time before asking moto, its count, time after): moto counted at some moment
    # between the two, so the calls between samples i and j fell within tj_after - ti_before.
    samples = [(t_start, start, time.monotonic())]
    deadline = time.monotonic() + 90
    refreshed = set()
    while time.monotonic() < deadline and len(refreshed) < len(keys):
        time.sleep(0.15)
        asked = time.monotonic()
        samples.append((asked, host.moto.assume_role_calls(), time.monotonic()))
        refreshed |= {p for p, k in keys.items() if p not in refreshed and os.path.exists(p) and key_id(p) != k}
    assert len(refreshed) == len(keys), \
        f"only {len(refreshed)} of {len(keys)} grants were refreshed within 90 s"
    assert samples[-1][1] - start >= len(keys), f"moto saw {samples[-1][1] - start} refreshes for {len(keys)} grants"

    worst, at = 0, None
    for i, (ti, ci, _) in enumerate(samples):
        for _, cj, tj in samples[i + 1:]:
            if tj - ti > 1.0:
                break
            if cj - ci > worst:
                worst, at = cj - ci, round(ti - samples[0][0], 1)
    first = next(t for _, c, t in samples if c > start)
    last = next(t for _, c, t in samples if c >= start + len(keys))
    print(f"\nrefresh: {len(keys)} logins in {login_s:.1f}s; the pass of {len(keys)} refreshes took "
          f"{last - first:.1f}s; worst 1 s window {worst} calls (at +{at}s); {len(samples)} samples")
    assert worst <= RATE + WORKERS, \
        f"{worst} AssumeRole calls within 1 s at +{at}s; refresh.rate {RATE} allows {RATE} + a burst of {WORKERS}"


def test_refresh__a_reload_that_makes_grants_due_refreshes_them_at_once(host, sleepers):
    # Keys issued more than the least refresh interval (10 s) ago, made due by a reload that
    # lengthens refresh_before, are due at the reload: 0.3.0 counted the interval from the reload
    # and held every grant back 10 s more (a 500-grant pass took 15 s where the rate allows 5).
    users = RATE_USERS[:3]
    restart(host, config(users, duration=900, refresh_before=300))
    pids = sleepers.start(len(users))
    logins = [login(u, pid) for u, pid in zip(users, pids)]
    keys = {path: key_id(path) for _sid, path in logins}
    time.sleep(11)  # every key is now older than the least refresh interval, and 890 s from expiry
    host.write_config(config(users, duration=900, refresh_before=890))
    mark = host.log_mark()
    host.broker.send_signal(signal.SIGHUP)
    wait_for(lambda: "reloaded:" in host.log_since(mark), 10, "the reload to be logged")
    # Right after the reload each grant is being refreshed or is done: still on its old key, it
    # must be due now. Never due later with its old key (that was the 10 s hold).
    now = time.time()
    from datetime import datetime, timezone

    listed = [g for g in status() if g["principal"] in users]
    assert len(listed) == len(users), f"status lists {len(listed)} of the {len(users)} live grants: {listed}"
    for grant in listed:
        path = grant["path"]
        due = datetime.strptime(grant["next_refresh"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
        if path in keys and os.path.exists(path) and key_id(path) == keys[path]:
            assert due <= now + 1, f"{grant['principal']}'s grant, due by the new refresh_before, was " \
                                   f"scheduled {due - now:.0f}s after the reload instead of at once"
    wait_for(lambda: all(os.path.exists(p) and key_id(p) != k for p, k in keys.items()), 60,
             "every grant to be refreshed after the reload", interval=0.2)


def test_registry__a_reload_counts_the_least_refresh_interval_from_the_keys_issue(tmp_path):
    from pam_rolegate.rules.config import MIN_REFRESH_INTERVAL

    reg, clock, engine, _store = make_registry(tmp_path, "0")
    opened = reg.open(root_login(), "pam", os.getpid(), None)
    issued = clock.now
    longer = dataclasses.replace(reg.cfg, session=dataclasses.replace(reg.cfg.session, refresh_before=890))
    clock.now += 1  # new keys: the interval still holds them back, counted from their issue
    reg.reconfigure(longer, engine)
    due = reg.next_due(opened.grant.id)
    assert due == issued + MIN_REFRESH_INTERVAL, \
        f"keys 1 s old made due by a reload are due at +{due - issued:g}s, expected +{MIN_REFRESH_INTERVAL}s"
    clock.now += 30  # old keys: due at the reload, not the interval after it
    reg.reconfigure(dataclasses.replace(longer, session=dataclasses.replace(longer.session, refresh_before=880)),
                    engine)
    due = reg.next_due(opened.grant.id)
    assert due == clock.now, f"keys 31 s old made due by a reload are due {due - clock.now:g}s after it, not at once"


# -- SIGHUP revocation ----------------------------------------------------------------------------


def test_reload__unmapping_a_user_removes_live_files_at_once_and_drops_lingering_credentials(host, sleepers):
    a, b = HUP_USERS
    restart(host, config(HUP_USERS + LINGER_USERS))
    pid_a, pid_b = sleepers.start(2)
    _sid_a, path_a = login(a, pid_a)
    sid_b, path_b = login(b, pid_b)
    logout(sid_b)  # b's credentials now linger in memory, without files
    calls = host.moto.assume_role_calls()

    host.write_config(config(LINGER_USERS))
    mark = host.log_mark()
    t0 = time.monotonic()
    host.broker.send_signal(signal.SIGHUP)
    wait_for(lambda: not os.path.exists(path_a), 5, f"{a}'s credentials file to go after the SIGHUP", interval=0.05)
    gone_s = time.monotonic() - t0
    wait_for(lambda: "reloaded:" in host.log_since(mark), 10, "the reload to be logged")
    log = host.log_since(mark)
    released = [line for line in log.splitlines() if line.split(": ", 1)[-1].startswith("released:")
                and "no longer map" in line]
    assert any(f"principal={a}" in line for line in released), f"{a}'s revocation was not logged:\n{log}"
    assert any(f"principal={b}" in line for line in released), \
        f"{b}'s lingering grant was not released on the reload:\n{log}"
    assert "revoked=2" in log, f"the reload should count two revoked grants:\n{log}"
    assert not [g for g in status() if g["principal"] == a], f"{a}'s revoked grant is still listed"

    host.write_config(config(HUP_USERS + LINGER_USERS))
    mark = host.log_mark()
    host.broker.send_signal(signal.SIGHUP)
    wait_for(lambda: "reloaded:" in host.log_since(mark), 10, "the second reload to be logged")
    sid_b, _path = login(b, pid_b)
    logout(sid_b)
    used = host.moto.assume_role_calls() - calls
    assert used == 1, f"{b}'s login after being unmapped and mapped again cost {used} AssumeRole calls: " \
                      f"expected 1 (its lingering credentials must have been dropped, not reused)"
    print(f"\nreload: {a}'s file gone {gone_s:.2f}s after SIGHUP")


# -- pure pieces, no processes ---------------------------------------------------------------------


class FakeClock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def test_ratelimit__burst_then_rate_never_more_than_burst_plus_rate_per_second():
    from pam_rolegate.core.lifecycle import RateLimit

    clock = FakeClock()
    limit = RateLimit(5, burst=4, clock=clock)
    assert [limit.wait_time() for _ in range(4)] == [0.0] * 4, "a full bucket should give its burst at once"
    wait = limit.wait_time()
    assert wait == pytest.approx(0.2), f"after the burst the next token should be 1/rate away, not {wait}"
    # Take tokens as fast as they come for 10 s: 4 + 5 * 10 in all, never more than 4 + 5 in a second.
    taken = []
    for _ in range(10000):  # bounded: a wait too small to move the clock must not spin forever
        if clock.now >= 1010.0:
            break
        wait = limit.wait_time()
        if wait == 0:
            taken.append(clock.now)
        else:
            clock.now += max(wait, 1e-6)
    assert len(taken) <= 5 * 10 + 1, f"{len(taken)} tokens in 10 s at rate 5 after the burst"
    worst = max(sum(1 for t in taken if s <= t < s + 1.0) for s in taken)
    assert worst <= 5 + 1, f"{worst} tokens within 1 s once the burst was spent"
    clock.now += 100
    waits = [limit.wait_time() for _ in range(5)]
    assert waits[:4] == [0.0] * 4 and waits[4] > 0, f"an idle bucket should refill to its burst of 4, no more: {waits}"


class FakeStore:
    def __init__(self, journal):
        self.files = {"journal": journal}

    def read_state(self, name):
        return self.files.get(name)


class ListLog:
    def __init__(self):
        self.errors = []

    def error(self, text):
        self.errors.append(text)


def test_records__replay_skips_a_torn_last_line_silently_and_reports_a_bad_middle_line():
    from pam_rolegate.core.records import Journal, _line
    from pam_rolegate.core.grants import Session

    def s(sid):
        return {"s": dataclasses.asdict(Session(id=sid, grant_id="g1", kind="pam", pid=1, started=5,
                                                service="sshd", opened_at=1.0))}

    whole = _line(s("a")) + _line(s("b")) + _line({"e": "a"})
    torn = _line(s("c"))[:-20]  # a SIGKILL in the middle of the last write
    log = ListLog()
    grants, sessions = Journal(FakeStore(whole + torn), log).load()
    assert set(sessions) == {"b"}, f"replay should keep b only (a closed, c torn): {sorted(sessions)}"
    assert not log.errors, f"a torn last line is the normal trace of a crash, not worth an error: {log.errors}"

    log = ListLog()
    _grants, sessions = Journal(FakeStore(_line(s("a")) + b"{not json\n" + _line(s("b"))), log).load()
    assert set(sessions) == {"a", "b"}, f"a bad middle line must cost only itself: {sorted(sessions)}"
    assert len(log.errors) == 1 and "line 2" in log.errors[0], f"a bad middle line should be reported: {log.errors}"


class FakeEngine:
    """STS stand-in for registry unit tests: counts AssumeRole calls, hands out numbered keys."""

    def __init__(self, clock):
        self.clock = clock
        self.calls = 0

    def assume(self, request, budget=None):
        from datetime import datetime, timezone

        from pam_rolegate.backends.sts import Credentials

        self.calls += 1
        expiry = datetime.fromtimestamp(int(self.clock()) + request.duration, timezone.utc)
        return Credentials(f"ASIAFAKE{self.calls:012d}", "secret", "token", expiry)

    def host_facts(self):
        from pam_rolegate.backends.sts import HostFacts

        return HostFacts("testhost", "i-0123456789abcdef0")


class MemoryStore:
    """The credential store's API, in memory: which grants have files now."""

    def __init__(self):
        self.files = {}  # grant id -> what was last written for it
        self.names = set()  # (grant id, file name) there now
        self.writes = []  # every grant id written, in order: a file that came and went still counts

    def path(self, grant_id, name="credentials"):
        return f"/run/rolegate/grants/{grant_id}/{name}"

    def write(self, grant_id, name, content, uid, gid):
        self.files[grant_id] = content
        self.names.add((grant_id, name))
        self.writes.append(grant_id)

    def has(self, grant_id, name):
        return (grant_id, name) in self.names

    def remove(self, grant_id):
        self.names = {n for n in self.names if n[0] != grant_id}
        return self.files.pop(grant_id, None) is not None

    def grant_ids(self):
        return list(self.files)


class DecisionLog:
    def __init__(self):
        self.lines = []

    def decision(self, event, **fields):
        self.lines.append((event, fields))

    def error(self, text):
        self.lines.append(("error", {"text": text}))


def root_config(tmp_path, linger, match="{user: root}", role="root-role", extra=""):
    """A config whose first rule gives root's logins matching `match` a role; `extra`: more rules."""
    from pam_rolegate.rules import config as config_mod

    path = tmp_path / "rolegate.yaml"
    path.write_text(f"version: 1\nregion: us-east-1\nsource: profile:test\nsession:\n  duration: 900\n"
                    f"  linger: {linger}\nroles:\n  - match: {match}\n"
                    f"    role: arn:aws:iam::{ACCOUNT}:role/{role}\n{extra}")
    return config_mod.load(str(path))


def make_registry(tmp_path, linger, listeners=(), engine_type=FakeEngine):
    """A real Registry over fakes: a rule for root (NSS always knows it), a fake clock and STS."""
    from pam_rolegate.core.registry import Registry

    clock = FakeClock(2_000_000_000.0)
    engine, store = engine_type(clock), MemoryStore()
    reg = Registry(root_config(tmp_path, linger), engine, store, DecisionLog(), clock=clock, listeners=listeners)
    return reg, clock, engine, store


def root_login():
    from pam_rolegate.rules import mapping

    return mapping.LoginFacts(user="root", service="sshd")


def test_registry__linger_never_outlasts_the_grants_refresh_time(tmp_path):
    from pam_rolegate.core.grants import Listener

    seen = []

    class Watch(Listener):
        def grant_lingering(self, grant, until):
            seen.append((grant.next_refresh, until))

    reg, clock, engine, store = make_registry(tmp_path, "1h", listeners=[Watch()])
    opened = reg.open(root_login(), "pam", os.getpid(), None)
    reg.close(session_id=opened.session.id)
    assert len(seen) == 1, f"the released grant should linger once: {seen}"
    next_refresh, until = seen[0]
    assert until <= next_refresh, f"a 1 h linger ran past the grant's refresh time: {until} > {next_refresh}"
    assert not store.files, "a lingering grant kept its files"
    clock.now = until + 1
    assert reg.expire(opened.grant.id), "the linger did not end at its time"
    reg.open(root_login(), "pam", os.getpid(), None)
    assert engine.calls == 2, f"a login after the linger ended cost {engine.calls - 1} AssumeRole calls, expected 1"


def test_registry__linger_ending_during_a_login_that_revives_the_grant_keeps_its_files(tmp_path):
    # The lifecycle thread ends the linger (expire) just after the login found the lingering
    # grant fresh and before it took the session: the login must still end up with a grant and
    # its file, not with a session on a forgotten grant.
    reg, clock, engine, store = make_registry(tmp_path, "60")
    first = reg.open(root_login(), "pam", os.getpid(), None)
    reg.close(session_id=first.session.id)
    key = first.grant.id
    obtain = reg._obtain

    def obtain_then_linger_ends(*args, **kwargs):
        grant = obtain(*args, **kwargs)
        clock.now += 61
        reg.expire(key)  # what lifecycle's thread may do at this instant
        return grant

    reg._obtain = obtain_then_linger_ends
    second = reg.open(root_login(), "pam", os.getpid(), None)
    assert second.granted, "the second login was not granted"
    grants, sessions, _lingering = reg.snapshot()
    assert [g.id for g in grants] == [key], f"the login's grant is not live after the linger ended mid-login: {grants}"
    assert [s.id for s in sessions] == [second.session.id], f"the login's session is not listed: {sessions}"
    assert key in store.files, "the revived grant's credentials file was not written"


def test_registry__a_reload_that_unmaps_a_login_under_way_leaves_it_no_credentials(tmp_path):
    # SIGHUP's recheck revokes the grant while a second login of it is between finding the
    # credentials and taking its session: that login must not keep the revoked grant's file.
    reg, clock, engine, store = make_registry(tmp_path, "60")
    first = reg.open(root_login(), "pam", os.getpid(), None)
    key = first.grant.id
    obtain = reg._obtain

    def obtain_then_revoked(*args, **kwargs):
        grant = obtain(*args, **kwargs)
        reg.revoke(key, "the rules no longer map this login to this role")  # what the reload does now
        return grant

    reg._obtain = obtain_then_revoked
    second = reg.open(root_login(), "pam", os.getpid(), None)
    assert not second.granted, "a login unmapped while under way was still granted"
    assert key not in store.files, "the revoked grant's credentials file outlived the revocation"
    grants, sessions, _lingering = reg.snapshot()
    assert not grants and not sessions, f"the revoked grant or a session on it is still live: {grants} {sessions}"
    assert reg.counts()["lingering"] == 0, "the revoked grant lingers"


class BlockingEngine(FakeEngine):
    """FakeEngine whose next AssumeRole, once asked for, stays out until the test releases it."""

    def __init__(self, clock):
        super().__init__(clock)
        self.entered = threading.Event()
        self.release = threading.Event()
        self._block = False

    def block_next(self):
        self._block = True

    def assume(self, request, budget=None):
        if self._block:
            self._block = False
            self.entered.set()
            assert self.release.wait(10), "the test never released the STS call it held"
        return super().assume(request, budget)


def reload_without_root(reg, tmp_path, match="{user: nobody-else}", **kw):
    """What the broker does when new rules come into force (SIGHUP, fleet): returns recheck's count."""
    reg.reconfigure(root_config(tmp_path, "1h", match=match, **kw), reg.engine)
    return reg.recheck()


def denied_midway(reg):
    return [f for event, f in reg.log.lines if event == "denied" and "rules changed" in f.get("reason", "")]


@pytest.mark.parametrize("entry", ["login", "imds"])
def test_registry__rules_removed_while_the_first_sts_call_is_out_keep_nothing(tmp_path, entry):
    # The rule is decided under the old rules and the grant's first AssumeRole is still out when
    # the reload removes the rule: recheck has no grant to visit yet, so the credentials that come
    # back must give no session, no file, nothing in memory.
    reg, _clock, engine, store = make_registry(tmp_path, "1h", engine_type=BlockingEngine)
    engine.block_next()
    with ThreadPoolExecutor(1) as pool:
        if entry == "login":
            result = pool.submit(reg.open, root_login(), "pam", os.getpid(), None)
        else:
            result = pool.submit(reg.background, root_login(), 0)
        assert engine.entered.wait(10), f"the {entry} never reached STS"
        assert reload_without_root(reg, tmp_path) == 0, "recheck found a grant while its first STS call was out"
        engine.release.set()
        result = result.result(10)
    if entry == "login":
        assert not result.granted, "a login whose rule a reload removed mid-STS-call was granted"
    else:
        assert result is None, "an IMDS request whose rule a reload removed mid-STS-call got credentials"
    assert not store.writes, f"credentials of a removed rule were written: {store.writes}"
    assert reg.snapshot() == ([], [], set()), f"the removed rule's grant is kept: {reg.snapshot()}"
    assert denied_midway(reg), f"no `denied` line says the rules changed during it: {reg.log.lines}"


def test_registry__a_refresh_answered_after_a_reload_revoked_its_grant_brings_nothing_back(tmp_path):
    reg, clock, engine, store = make_registry(tmp_path, "1h", engine_type=BlockingEngine)
    opened = reg.open(root_login(), "pam", os.getpid(), None)
    key = opened.grant.id
    store.writes.clear()
    clock.now = opened.grant.next_refresh
    engine.block_next()
    with ThreadPoolExecutor(1) as pool:
        refreshed = pool.submit(reg.refresh, key)
        assert engine.entered.wait(10), "the refresh never reached STS"
        assert reload_without_root(reg, tmp_path) == 1, "the reload did not revoke the grant under refresh"
        assert key not in store.files, "the revoked grant's file stayed while its refresh was out"
        assert reg.live_grant(key) is None, "the revoked grant is still served while its refresh is out"
        engine.release.set()
        assert refreshed.result(10) is None, "the refresh of a revoked grant returned a grant"
    assert not store.writes, "the refresh that came back after the revocation wrote the grant's file again"
    assert reg.snapshot() == ([], [], set()), f"the revoked grant came back: {reg.snapshot()}"
    assert not [f for event, f in reg.log.lines if event == "refreshed"], "a revoked grant was logged refreshed"
    assert reload_without_root(reg, tmp_path) == 0, "a second reload found the revoked grant again"


def test_registry__a_login_the_new_rules_still_map_is_granted_though_the_sts_call_it_shared_was_not(tmp_path):
    # Two sshd logins of root share one grant: the first asks STS for root-role; the reload then
    # gives root's sshd logins other-role, and the second login, decided under the new rules,
    # waits on the first one's call. The first is refused, the second asks STS itself for its
    # own role and is granted, at the same location.
    reg, _clock, engine, store = make_registry(tmp_path, "1h", engine_type=BlockingEngine)
    engine.block_next()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(reg.open, root_login(), "pam", os.getpid(), None)
        assert engine.entered.wait(10), "the first login never reached STS"
        reload_without_root(reg, tmp_path, match="{user: root}", role="other-role")
        second = pool.submit(reg.open, root_login(), "pam", os.getpid(), None)
        wait_for(lambda: sum(reg._pending.values()) == 2, 10, "the second login to join the grant's STS call")
        time.sleep(0.2)  # from its hold to waiting on the first call: no lock or I/O between
        engine.release.set()
        first, second = first.result(10), second.result(10)
    assert not first.granted, "the first login was granted though the reload took its role while STS answered"
    assert second.granted, f"the second login, which the new rules map, was refused: {second.reason}"
    assert second.grant.role.endswith("/other-role"), f"the second login got {second.grant.role}"
    assert list(store.files) == [second.grant.id], f"one grant's file expected: {store.files}"
    assert engine.calls == 2, f"the second login should have asked STS itself once: {engine.calls} calls in all"


def profiles_extra(*pairs):
    """Rules for root giving named profiles: (name, role) pairs."""
    return "".join(f"  - match: {{user: root}}\n    profile: {name}\n    role: arn:aws:iam::{ACCOUNT}:role/{role}\n"
                   for name, role in pairs)


def make_profiles_registry(tmp_path, *pairs, linger="1h"):
    from pam_rolegate.core.registry import Registry

    clock = FakeClock(2_000_000_000.0)
    engine, store = FakeEngine(clock), MemoryStore()
    cfg = root_config(tmp_path, linger, extra=profiles_extra(*pairs))
    reg = Registry(cfg, engine, store, DecisionLog(), clock=clock, rolegate_cmd="/usr/bin/rolegate")
    return reg, clock, engine, store


def test_registry__named_profiles_are_named_in_the_files_and_assumed_on_first_use_only(tmp_path):
    reg, _clock, engine, store = make_profiles_registry(tmp_path, ("deploy", "deploy-role"), ("data", "data-role"))
    opened = reg.open(root_login(), "pam", os.getpid(), None)
    assert engine.calls == 1, f"a login with two named profiles made {engine.calls} AssumeRole calls, not 1"
    assert opened.grant.profiles == ((("deploy", f"arn:aws:iam::{ACCOUNT}:role/deploy-role"),
                                      ("data", f"arn:aws:iam::{ACCOUNT}:role/data-role"))), opened.grant.profiles
    text = store.files[opened.grant.id].decode()
    for name in ("deploy", "data"):
        line = f"[{name}]\ncredential_process = /usr/bin/rolegate credentials --grant {opened.grant.id} --profile {name}"
        assert line in text, f"the credentials file lacks profile {name}'s section:\n{text}"
    assert text.index("[default]") < text.index("[deploy]"), f"default should come first:\n{text}"
    deploy = reg.named(opened.grant.id, "deploy", 0, 60)
    assert deploy is not None and deploy.role.endswith("/deploy-role"), f"deploy gave {deploy}"
    again = reg.named(opened.grant.id, "deploy", 0, 60)
    assert again.credentials == deploy.credentials and engine.calls == 2, \
        f"a second use of deploy should reuse its keys: {engine.calls} calls in all"
    assert deploy.id not in store.files, "a named profile's keys were written to a file"
    assert reg.named(opened.grant.id, "nope", 0, 60) is None, "a profile the rules do not give was handed out"
    assert reg.named(opened.grant.id, "data", 4242, 60) is None, "another uid got root's named profile"
    assert engine.calls == 2, f"refused asks must not call STS: {engine.calls} calls in all"


def test_registry__a_reload_that_moves_a_live_login_to_another_role_keeps_its_location(tmp_path):
    reg, clock, engine, store = make_registry(tmp_path, "1h")
    opened = reg.open(root_login(), "pam", os.getpid(), None)
    key, old_file = opened.grant.id, store.files[opened.grant.id]
    assert reload_without_root(reg, tmp_path, match="{user: root}", role="other-role") == 0, \
        "a move must not count as a revocation"
    assert key not in store.files, "the old role's file stayed after the reload moved the login"
    assert reg.live_grant(key) is None, "the old role is still served while the move is under way"
    assert reg.next_due(key) <= clock(), "the moved grant is not due at once"
    moved = reg.refresh(key)
    assert moved is not None and moved.id == key and moved.role.endswith("/other-role"), f"moved to {moved}"
    assert store.files.get(key) not in (None, old_file), "the new role's file is not at the same location"
    _grants, sessions, _lingering = reg.snapshot()
    assert [s.id for s in sessions] == [opened.session.id], f"the live session was lost in the move: {sessions}"
    assert [f for event, f in reg.log.lines if event == "moved" and f.get("grant") == key], \
        f"no `moved` line: {reg.log.lines}"


def test_registry__a_move_whose_new_role_fails_keeps_the_sessions_and_never_the_old_role(tmp_path):
    from pam_rolegate.errors import StsError

    reg, clock, engine, store = make_registry(tmp_path, "1h")
    opened = reg.open(root_login(), "pam", os.getpid(), None)
    key = opened.grant.id
    reload_without_root(reg, tmp_path, match="{user: root}", role="other-role")
    real = engine.assume

    def refuse(request, budget=None):
        raise StsError("AccessDenied: not allowed", "access_denied")
    engine.assume = refuse
    assert reg.refresh(key) is None, "a failed move returned a grant"
    assert key not in store.files and reg.live_grant(key) is None, "the old role came back after a failed move"
    assert [s.id for s in reg.snapshot()[1]] == [opened.session.id], "a failed move ended the session"
    failed = [f for event, f in reg.log.lines if event == "failed" and f.get("action") == "move"]
    assert failed and failed[-1]["role"].endswith("/other-role"), f"no `failed: action=move` line: {reg.log.lines}"
    # A login under the new rules meanwhile is refused the old role too, and gets the new one.
    engine.assume = real
    clock.now = reg.next_due(key)
    moved = reg.refresh(key)
    assert moved is not None and moved.role.endswith("/other-role") and key in store.files, \
        f"the retried move did not land: {moved}"
    assert reg.live_grant(key) is not None, "the moved grant is not served once its new role arrived"


def test_registry__a_login_under_the_new_rules_finishes_a_move_and_the_pending_refresh_agrees(tmp_path):
    reg, _clock, engine, store = make_registry(tmp_path, "1h")
    opened = reg.open(root_login(), "pam", os.getpid(), None)
    key = opened.grant.id
    reload_without_root(reg, tmp_path, match="{user: root}", role="other-role")
    second = reg.open(root_login(), "pam", os.getpid(), None)
    assert second.granted and second.grant.id == key and second.grant.role.endswith("/other-role"), second
    assert reg.live_grant(key) is not None, "the move finished by a login is not served"
    calls = engine.calls
    again = reg.refresh(key)  # lifecycle's due-now entry from the reload
    assert again.role.endswith("/other-role") and key in store.files, f"the refresh undid the move: {again}"
    assert engine.calls == calls + 1, "the refresh should re-assume the new role once"


def test_registry__a_reload_that_moves_a_login_while_its_refresh_writes_never_leaves_the_old_role(tmp_path):
    # The refresh checked the rules (role A), then the reload moved the login to B while the
    # refresh wrote A's file, outside the lock: A's file must be taken back, and the refresh end
    # on B at the same location.
    reg, clock, engine, store = make_registry(tmp_path, "1h")
    opened = reg.open(root_login(), "pam", os.getpid(), None)
    key = opened.grant.id
    real_write, fired = store.write, []

    def write_then_reload(grant_id, name, content, uid, gid):
        real_write(grant_id, name, content, uid, gid)
        if not fired:
            fired.append(content)
            reload_without_root(reg, tmp_path, match="{user: root}", role="other-role")
    store.write = write_then_reload
    clock.now = opened.grant.next_refresh
    new = reg.refresh(key)
    assert fired, "the reload never ran during the refresh's write: the test did not test the race"
    assert new is not None and new.role.endswith("/other-role"), f"the refresh ended on {new}"
    assert store.files.get(key) not in (None, fired[0]), "the old role's file was left in place"
    assert reg.live_grant(key).role.endswith("/other-role"), "the door would serve another role than the rules'"
    assert [s.id for s in reg.snapshot()[1]] == [opened.session.id], "the session was lost"


def test_registry__named_profiles_need_a_login_with_sessions(tmp_path):
    reg, _clock, engine, _store = make_profiles_registry(tmp_path, ("deploy", "deploy-role"))
    imds = reg.background(mapping_facts("root", "imds"), 60)
    assert imds is not None
    assert reg.named(imds.id, "deploy", 0, 60) is None, "a memory-only grant served as a view for a named profile"


def mapping_facts(user, service):
    from pam_rolegate.rules import mapping

    return mapping.LoginFacts(user=user, service=service)


def test_registry__a_reload_that_adds_a_named_profile_rewrites_live_files_without_sts(tmp_path):
    reg, _clock, engine, store = make_profiles_registry(tmp_path, ("deploy", "deploy-role"))
    opened = reg.open(root_login(), "pam", os.getpid(), None)
    reg.reconfigure(root_config(tmp_path, "1h", extra=profiles_extra(("deploy", "deploy-role"), ("data", "data-role"))),
                    reg.engine)
    assert reg.recheck() == 0, "adding a profile revoked something"
    text = store.files[opened.grant.id].decode()
    assert "[data]" in text and "[deploy]" in text, f"the live file does not name the new profile:\n{text}"
    assert engine.calls == 1, f"renaming profiles called STS: {engine.calls}"
    held = reg.named(opened.grant.id, "deploy", 0, 60)
    reg.reconfigure(root_config(tmp_path, "1h", extra=profiles_extra(("data", "data-role"))), reg.engine)
    assert reg.recheck() == 1, "the dropped profile's held keys were not revoked"
    assert "[deploy]" not in store.files[opened.grant.id].decode(), "a dropped profile is still named"
    assert held.id not in {g.id for g in reg.snapshot()[0]}, "a dropped profile's keys are still held"
    assert reg.named(opened.grant.id, "deploy", 0, 60) is None, "a dropped profile is still handed out"


def test_refresh__reload_while_every_worker_is_busy_does_not_stop_refreshing(host, sleepers):
    # STS hangs (moto stopped), so both refresh workers sit in calls and the scheduler waits for a
    # free one; a SIGHUP then rebuilds the pool. Once STS answers again every grant must still be
    # refreshed: the pool's rebuild must not strand the scheduler or lose the busy workers' slots.
    users = RATE_USERS[:8]
    # sts_timeout 20, not 5: the hung calls must still be in flight when the SIGHUP lands at +11.5 s,
    # and with 5 a refresh due at +9 s failed at +14 s, a margin a loaded machine could eat.
    text = config(users, duration=900, refresh_before=890, refresh=(2, RATE), sts_timeout=20)
    restart(host, text)
    pids = sleepers.start(len(users))
    with ThreadPoolExecutor(8) as pool:
        logins = list(pool.map(login, users, pids))
    t0 = time.monotonic()
    keys = {path: key_id(path) for _sid, path in logins}
    host.moto.proc.send_signal(signal.SIGSTOP)
    try:
        # Refreshes fall due ~9-10 s after the logins and then hang for sts_timeout (20 s).
        time.sleep(max(0.0, t0 + 11.5 - time.monotonic()))
        mark = host.log_mark()
        host.broker.send_signal(signal.SIGHUP)
        wait_for(lambda: "reloaded:" in host.log_since(mark), 10, "the reload to be logged")
        busy = host.log_since(mark).count("action=refresh")
    finally:
        host.moto.proc.send_signal(signal.SIGCONT)
    assert busy == 0, "the refreshes had failed before the reload; the test did not catch the workers busy"
    refreshed = wait_for(lambda: all(key_id(p) != k for p, k in keys.items()), 90,
                         "every grant to be refreshed after the reload", interval=0.5)
    assert refreshed, "unreachable"


# -- elevation on demand (registry part; tests/test_elevate.py runs it with real PAM and sshd) -----

ON_DEMAND = (f"  - match: {{user: root}}\n    profile: admin\n    role: arn:aws:iam::{ACCOUNT}:role/admin\n"
             f"    elevate: {{max: 30m}}\n")


def make_elevation_registry(tmp_path):
    from pam_rolegate.core.registry import Registry

    clock = FakeClock(2_000_000_000.0)
    engine, store = FakeEngine(clock), MemoryStore()
    reg = Registry(root_config(tmp_path, "1h", extra=ON_DEMAND), engine, store, DecisionLog(), clock=clock,
                   rolegate_cmd="/usr/bin/rolegate")
    return reg, clock, engine, store


def test_registry__an_on_demand_profile_is_never_served_without_an_elevation(tmp_path):
    reg, _clock, engine, store = make_elevation_registry(tmp_path)
    opened = reg.open(root_login(), "pam", os.getpid(), None)
    assert "[admin]" not in store.files[opened.grant.id].decode(), "an on-demand profile is named at login"
    assert reg.named(opened.grant.id, "admin", 0, 60) is None, "credential_process got an on-demand profile"
    assert engine.calls == 1, f"asking for an on-demand profile called STS: {engine.calls}"


def test_registry__an_elevation_is_named_in_the_files_until_it_expires_and_carries_its_reason(tmp_path):
    reg, clock, engine, store = make_elevation_registry(tmp_path)
    opened = reg.open(root_login(), "pam", os.getpid(), None)
    key = opened.grant.id
    captured = []
    real = engine.assume
    engine.assume = lambda request, budget=None: captured.append(request) or real(request, budget)
    elevation = reg.elevate(key, 0, "admin", "INC-1 restart", 900, "e1")
    assert elevation is not None and elevation.role.endswith("/admin"), elevation
    assert captured and dict(captured[0].tags).get("rolegate:reason") == "INC-1 restart" \
        and dict(captured[0].tags).get("rolegate:elevated") == "true" and captured[0].duration == 900, captured
    assert "[admin]" in store.files[key].decode(), "the elevated profile is not named in the session's file"
    served = reg.named(key, "admin", 0, 60)
    assert served is not None and served.id == elevation.grant_id, "the elevation is not what credential_process gets"
    assert reg.named(key, "admin", 4242, 60) is None, "another uid got root's elevation"
    clock.now = elevation.until + 1
    assert reg.expire(elevation.grant_id), "the elevation did not expire at its time"
    assert "[admin]" not in store.files[key].decode(), "an expired elevation is still named in the file"
    assert reg.named(key, "admin", 0, 60) is None, "an expired elevation is still served"
    assert [f for e, f in reg.log.lines if e == "expired" and f.get("profile") == "admin"], "no `expired:` line"


def test_registry__an_elevation_ends_with_drop_with_the_last_session_and_with_its_rule(tmp_path):
    reg, _clock, _engine, store = make_elevation_registry(tmp_path)
    opened = reg.open(root_login(), "pam", os.getpid(), None)
    key = opened.grant.id
    reg.elevate(key, 0, "admin", "one", 900, "e1")
    assert reg.drop(key, 4242, "admin") is None, "another uid dropped root's elevation"
    assert reg.drop(key, 0, "admin") is not None and reg.named(key, "admin", 0, 60) is None, "drop did not end it"
    reg.elevate(key, 0, "admin", "two", 900, "e2")
    reg.close(session_id=opened.session.id)
    assert reg.elevations() == [], "an elevation outlived its login's last session"
    assert [f for e, f in reg.log.lines if e == "dropped" and "last session" in f.get("reason", "")], reg.log.lines
    again = reg.open(root_login(), "pam", os.getpid(), None)
    reg.elevate(again.grant.id, 0, "admin", "three", 900, "e3")
    reg.reconfigure(root_config(tmp_path, "1h"), reg.engine)  # the on-demand rule is gone
    reg.recheck()
    assert reg.elevations() == [] and reg.named(again.grant.id, "admin", 0, 60) is None, \
        "an elevation survived the removal of its rule"
    assert "[admin]" not in store.files[again.grant.id].decode(), "the removed elevation is still named"


def test_registry__a_grant_of_0_3_0s_process_delivery_keeps_its_config_file_until_its_sessions_end(tmp_path):
    from pam_rolegate.core.registry import Registry

    reg, clock, engine, store = make_registry(tmp_path, "1h")
    reg.cfg = dataclasses.replace(reg.cfg, delivery="process")
    opened = reg.open(root_login(), "pam", os.getpid(), None)
    key = opened.grant.id
    env = reg.env_for(opened.grant)
    assert "AWS_CONFIG_FILE" not in env and env.get("AWS_SHARED_CREDENTIALS_FILE") == store.path(key), \
        f"process delivery should point at the credentials file and leave AWS_CONFIG_FILE alone: {env}"
    assert b"credential_process = /" in store.files[key], f"no credential_process in the file: {store.files[key]}"
    grants, sessions = reg.consistent(lambda g, s: (g, s))
    store.names = {(key, "config")}  # as 0.3.0 left the grant: its config file, no credentials file
    again = Registry(reg.cfg, engine, store, DecisionLog(), clock=clock, rolegate_cmd="/usr/bin/rolegate")
    kept, _reaped = again.restore(grants, sessions)
    assert kept == 1, "the live session should be kept across the upgrade"
    assert store.has(key, "config") and store.has(key, "credentials"), \
        f"after the upgrade the grant should have 0.3.0's config file and the credentials file: {store.names}"
    assert f"credential_process = /usr/bin/rolegate credentials --grant {key}\n".encode() in store.files[key], \
        f"0.3.0's config file was not rewritten with its command: {store.files[key]}"
    assert "AWS_CONFIG_FILE" not in again.env_for(again.live_grant(key)), "a login after the upgrade got AWS_CONFIG_FILE"
    again.close(session_id=opened.session.id)
    assert not store.names, f"the grant's files outlived its last session: {store.names}"
    revived = again.open(root_login(), "pam", os.getpid(), None)
    assert revived.granted and store.names == {(key, "credentials")}, \
        f"a login after 0.3.0's sessions ended should get the credentials file only: {store.names}"


def test_registry__a_restart_forgets_elevations_and_their_sections(tmp_path):
    from pam_rolegate.core.registry import Registry

    reg, clock, engine, store = make_elevation_registry(tmp_path)
    opened = reg.open(root_login(), "pam", os.getpid(), None)
    reg.elevate(opened.grant.id, 0, "admin", "INC-1", 900, "e1")
    grants, sessions = reg.consistent(lambda g, s: (g, s))
    assert "[admin]" in store.files[opened.grant.id].decode()
    again = Registry(reg.cfg, engine, store, DecisionLog(), clock=clock, rolegate_cmd="/usr/bin/rolegate")
    kept, _reaped = again.restore(grants, sessions)
    assert kept == 1, "the live session should be kept across the restart"
    assert again.elevations() == [] and again.named(opened.grant.id, "admin", 0, 60) is None, \
        "an elevation survived the restart"
    assert "[admin]" not in store.files[opened.grant.id].decode(), "the restarted broker left the ended section"
