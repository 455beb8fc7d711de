"""Lifecycle with real parts: refresh before expiry, process delivery across rotations, STS outages,
reaping of killed sessions, broker SIGKILL + restart, SIGHUP reload.

Time is short by configuration, not by sleeping an hour: 900 s credentials with refresh_before
890 s are renewed about every 10 s.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import types

import pytest

from conftest import start_moto
from harness import ACCOUNT, CONFIG_PATH, PAM_SOCKET, RUNTIME_DIR, Held, Shell, sandbox_host, run, wait_gone

FAST = f"""
version: 1
region: us-east-1
sts_timeout: 2
reap_interval: 2s
delivery: {{delivery}}
session:
  duration: 900
  refresh_before: 890
roles:
  - match: {{{{user: [alice, erin]}}}}
    role: arn:aws:iam::{ACCOUNT}:role/alice-role
  - match: {{{{user: carol}}}}
    role: arn:aws:iam::{ACCOUNT}:role/developer
"""


@pytest.fixture(scope="module")
def host():
    with sandbox_host() as h:
        for user in ("alice", "carol", "erin"):
            h.add_user(user)
        h.write_config(FAST.format(delivery="file"))
        h.install_pam()
        h.start_broker()
        h.start_sshd()
        yield h


def key_id(path):
    for line in open(path):
        if line.startswith("aws_access_key_id"):
            return line.split("=", 1)[1].strip()
    raise AssertionError(f"no access key in {path}")


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def whoami_with_file(host, path):
    code = ("from pam_rolegate.backends import sts\nimport configparser\n"
            f"c = configparser.ConfigParser(); c.read({path!r}); d = c['default']\n"
            "print(sts.caller_identity(sts.Credentials(d['aws_access_key_id'], d['aws_secret_access_key'], "
            "d['aws_session_token'], None), 'us-east-1')['Arn'])")
    return run([sys.executable, "-c", code], env=dict(os.environ, **host.env)).stdout.strip()


def status(host):
    return json.loads(run(["rolegate", "status", "--json"]).stdout)["grants"]


def test_lifecycle__file_is_rewritten_before_expiry_while_the_session_lives(host):
    held = Held(host, "alice")
    try:
        path = held.info["FILE"]
        keys = [key_id(path)]
        for _ in range(2):
            keys.append(wait_for(lambda: key_id(path) != keys[-1] and key_id(path), 30, "a refreshed key"))
            arn = whoami_with_file(host, path)
            assert arn.startswith(f"arn:aws:sts::{ACCOUNT}:assumed-role/alice-role/"), \
                f"credentials after rotation {len(keys) - 1} do not work: {arn}"
        assert len(set(keys)) == 3, f"expected three distinct keys over two rotations: {keys}"
        assert os.stat(path).st_mode & 0o777 == 0o600, "a rotation changed the file's mode"
    finally:
        held.release()
    assert wait_gone(path), "file outlived the session"


def test_lifecycle__sts_failure_during_refresh_keeps_the_valid_file_and_retries(host):
    held = Held(host, "carol")
    port = int(host.moto.url.rsplit(":", 1)[1])
    try:
        path = held.info["FILE"]
        before = open(path).read()
        mark = host.log_mark()
        host.moto.proc.terminate()
        host.moto.proc.wait(10)
        wait_for(lambda: host.log_since(mark).count("action=refresh") >= 2, 40, "two failed refresh attempts")
        assert open(path).read() == before, "a failed refresh changed or truncated the still-valid file"
        log = host.log_since(mark)
        assert "attempt=1" in log and "attempt=2" in log, f"retries were not logged once per attempt:\n{log}"
        host.moto = start_moto(port=port)
        wait_for(lambda: open(path).read() != before, 60, "a successful refresh after STS came back")
    finally:
        held.release()


def test_lifecycle__killed_pam_process_is_reaped(host):
    held = Held(host, "alice")
    path = held.info["FILE"]
    pam_pids = [s["pid"] for g in status(host) for s in g.get("session_list", []) if s["kind"] == "pam"]
    assert len(pam_pids) == 1, f"expected one PAM session, root's status shows {pam_pids}"
    start = time.monotonic()
    os.kill(pam_pids[0], signal.SIGKILL)  # sshd's privileged process: close_session never runs
    assert wait_gone(path, timeout=2 + 5), "the killed session's file was not reaped within reap_interval + 5 s"
    assert time.monotonic() - start < 7
    held.proc.kill()
    held.proc.wait(10)


# A process that logs in as the PAM hook does (open_session for its own pid), then sends its
# close_session without reading the reply, as the hook does at logout; "lose" sends a close that
# names no session (a close the broker never acts on). It prints the session id; "stay" keeps the
# process alive afterwards, so only the close can end the session.
HOOK_LIKE = """
import os, sys, time
from pam_rolegate.hookside import client, protocol
path, user, how = sys.argv[1:4]
reply = client.call(protocol.OpenSession(user=user, service="sshd", pid=os.getpid()), path=path)
assert reply.get("granted"), reply
sid = reply.get("session")
client.send(protocol.CloseSession(session="lost-" + sid if how == "lose" else sid), path=path)
print(sid, flush=True)
if how == "stay":
    time.sleep(60)
"""


def hook_like(host, how):
    return subprocess.Popen([sys.executable, "-c", HOOK_LIKE, PAM_SOCKET, "erin", how], stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, **host.env))


def test_lifecycle__a_close_sent_without_waiting_is_still_acted_on(host):
    mark = host.log_mark()
    proc = hook_like(host, "stay")
    try:
        sid = proc.stdout.readline().strip()
        assert sid, "the hook-like process got no session"
        # The process lives on: only the close it sent (and hung up on) can end its session.
        wait_for(lambda: f"released: session={sid}" in host.log_since(mark), 10,
                 f"the broker acting on the close of {sid} whose sender did not wait for the reply")
        assert proc.poll() is None, "the process ended before its close was acted on: the test proves nothing"
        assert f"reaped: session={sid}" not in host.log_since(mark), "the session was reaped, not closed"
    finally:
        proc.kill()
        proc.wait(10)


def test_lifecycle__a_lost_close_is_reaped_when_its_process_exits(host):
    mark = host.log_mark()
    proc = hook_like(host, "lose")
    sid = proc.stdout.readline().strip()
    assert sid, "the hook-like process got no session"
    proc.wait(10)
    # reap_interval is 2 s here; the pidfd reaps at once. 2 + 5 s is a no-hang bound, not a speed claim.
    wait_for(lambda: f"reaped: session={sid}" in host.log_since(mark), 2 + 5,
             f"the reaper ending session {sid} whose close was lost")
    assert f"released: session={sid}" not in host.log_since(mark), "a close naming no session released this one"


def test_lifecycle__reused_pid_does_not_keep_a_dead_session_alive():
    from pam_rolegate.hookside import procs
    me = os.getpid()
    started = procs.start_time(me)
    assert procs.alive(me, started), "this very process should count as alive"
    assert not procs.alive(me, started + 1), "a different start time (a reused pid) must count as dead"
    child = subprocess.Popen(["sleep", "30"])
    child_started = procs.start_time(child.pid)
    assert procs.alive(child.pid, child_started), "a running child should count as alive"
    child.kill()
    child.wait()
    assert not procs.alive(child.pid, child_started), "a killed (and reaped) child must count as dead"


def test_lifecycle__broker_sigkill_and_restart_keeps_sessions_and_drops_strays(host):
    held = Held(host, "alice")
    try:
        path = held.info["FILE"]
        host.stop_broker(signal.SIGKILL)
        stray = os.path.join(RUNTIME_DIR, "grants", "999-nobody-000000000000")
        os.makedirs(stray)
        open(os.path.join(stray, "credentials"), "w").close()
        mark = host.log_mark()
        host.start_broker()
        assert os.path.exists(path), "the restarted broker dropped a live session's file"
        assert not os.path.exists(stray), "a stray grant directory survived the broker's start"
        assert "recovered: sessions=1" in host.log_since(mark), f"recovery not logged:\n{host.log_since(mark)}"
        old = key_id(path)
        wait_for(lambda: key_id(path) != old, 30, "a refresh after restart")
    finally:
        held.release()
    assert wait_gone(path), "a close after the restart did not remove the file"


def test_lifecycle__sighup_reload_changes_rules_keeps_old_on_error_and_revokes(host):
    held = Held(host, "erin")
    path = held.info["FILE"]
    try:
        # A broken file: refused with FILE:LINE:COL, old rules stay.
        with open(CONFIG_PATH, "a") as fh:
            fh.write("rols: []\n")
        mark = host.log_mark()
        host.broker.send_signal(signal.SIGHUP)
        wait_for(lambda: "action=reload" in host.log_since(mark), 10, "the reload to be logged")
        assert f"{CONFIG_PATH}:" in host.log_since(mark) and "unknown key 'rols'" in host.log_since(mark), \
            f"a bad reload should log FILE:LINE:COL:\n{host.log_since(mark)}"
        assert os.path.exists(path), "a failed reload revoked a grant"
        # erin removed from the rules: her file goes by the next refresh; carol's role changes.
        new = FAST.format(delivery="file").replace("[alice, erin]", "[alice]").replace(
            "role/developer", "role/developer-v2")
        host.write_config(new)
        mark = host.log_mark()
        host.broker.send_signal(signal.SIGHUP)
        wait_for(lambda: "reloaded:" in host.log_since(mark), 10, "the reload")
        assert wait_gone(path, timeout=15), "erin's file survived her removal from the config"
        arn = Held(host, "carol")
        try:
            assert "assumed-role/developer-v2/" in arn.info["ARN"], f"new logins still get the old role: {arn.info}"
        finally:
            arn.release()
    finally:
        held.release()
        host.write_config(FAST.format(delivery="file"))
        host.broker.send_signal(signal.SIGHUP)


def test_lifecycle__a_reload_that_changes_delivery_keeps_the_running_one_until_a_restart(host):
    """The broker opened its doors at start: sessions must never be pointed at one that is not there
    (a container URI with no container door), so delivery waits for a restart, and the log says so."""
    try:
        host.write_config(FAST.format(delivery="container"))
        mark = host.log_mark()
        host.broker.send_signal(signal.SIGHUP)
        wait_for(lambda: "reloaded:" in host.log_since(mark), 10, "the reload")
        assert "delivery/container_port changes need a restart" in host.log_since(mark), \
            f"the reload should say delivery waits for a restart:\n{host.log_since(mark)}"
        held = Held(host, "carol")
        try:
            assert held.info["FILE"].startswith(RUNTIME_DIR), \
                f"a login after the reload should still get file delivery (no container door runs): {held.info}"
            assert "assumed-role/" in held.info["ARN"], f"its credentials file does not work: {held.info}"
        finally:
            held.release()
    finally:
        host.write_config(FAST.format(delivery="file"))
        host.broker.send_signal(signal.SIGHUP)


LONG_CLIENT = """
import boto3, time
sts = boto3.client("sts", region_name="us-east-1")
seen = []
deadline = time.time() + 60
while time.time() < deadline and len(set(seen)) < 3:
    sts.get_caller_identity()
    key = sts._request_signer._credentials.get_frozen_credentials().access_key
    if not seen or seen[-1] != key:
        seen.append(key)
    time.sleep(0.5)
print(" ".join(seen))
"""


def test_lifecycle__process_delivery_long_running_client_follows_rotations(host):
    host.write_config(FAST.format(delivery="process"))
    host.stop_broker()
    host.start_broker()
    try:
        script = os.path.join(host.workdir, "long_client.py")
        with open(script, "w") as fh:
            fh.write(LONG_CLIENT)
        os.chmod(host.workdir, 0o755)
        os.chmod(script, 0o644)
        cmd = (f'echo "CREDENTIALS=$AWS_SHARED_CREDENTIALS_FILE"; echo "CONFIG=${{AWS_CONFIG_FILE:-}}"; '
               f'AWS_ENDPOINT_URL_STS={host.moto.url} {sys.executable} {script}')
        done = host.session("ssh", "alice", cmd, timeout=90)
        assert "CREDENTIALS=" + RUNTIME_DIR in done.stdout, \
            f"no AWS_SHARED_CREDENTIALS_FILE from process delivery: {done.stdout}"
        assert "CONFIG=\n" in done.stdout, f"process delivery set AWS_CONFIG_FILE (the user's own config is " \
                                           f"then out of use): {done.stdout}"
        keys = done.stdout.strip().splitlines()[-1].split()
        assert len(set(keys)) >= 3, f"one boto3 client should see 2 rotations; saw keys {keys}: {done.stderr}"
    finally:
        os.chmod(host.workdir, 0o700)
        host.write_config(FAST.format(delivery="file"))
        host.stop_broker()
        host.start_broker()


# 0.3.0, whose process delivery pointed AWS_CONFIG_FILE at a config file of its own (grants/ID/config).
PROCESS_CONFIG_RELEASE = "509d703"
WHOAMI = ("AWS_ENDPOINT_URL_STS=%s %s -c \"import boto3; print(boto3.client('sts').get_caller_identity()['Arn'])\" "
          "2>&1 | tail -n 1")


def test_lifecycle__a_process_session_begun_under_0_3_0_keeps_its_config_file_across_the_upgrade(host):
    """A session that 0.3.0's broker pointed at its own config file (AWS_CONFIG_FILE) keeps a valid
    file under the new broker, which takes over 0.3.0's records, until the session ends, through a
    move to another role too; a login after the upgrade gets the credentials file instead."""
    old_tree = os.path.join(host.workdir, "rolegate-0.3.0")
    os.makedirs(old_tree, exist_ok=True)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    archive = subprocess.run(["git", "-C", repo, "archive", PROCESS_CONFIG_RELEASE, "pam_rolegate"],
                             capture_output=True, check=False)
    assert archive.returncode == 0, f"commit {PROCESS_CONFIG_RELEASE} (rolegate 0.3.0) is missing from this " \
                                    f"clone; fetch the full history: {archive.stderr.decode()}"
    subprocess.run(["tar", "-x", "-C", old_tree], input=archive.stdout, check=True, timeout=60)
    whoami = WHOAMI % (host.moto.url, sys.executable)
    role = f"arn:aws:sts::{ACCOUNT}:assumed-role/%s/"
    saved = dict(host.env)
    shells = []
    try:
        host.write_config(FAST.format(delivery="process"))
        host.stop_broker()
        host.env["PYTHONPATH"] = old_tree  # the 0.3.0 broker, on this host's config and runtime_dir
        host.start_broker()
        before = Shell(host, "alice")
        shells.append(before)
        config_file = before.do("echo ${AWS_CONFIG_FILE:-}")
        assert config_file.startswith(RUNTIME_DIR) and config_file.endswith("/config"), \
            f"0.3.0's process delivery should point AWS_CONFIG_FILE at its own file: {config_file!r}"

        host.stop_broker()  # the upgrade: files and records stay
        host.env = dict(saved)
        mark = host.log_mark()
        host.start_broker()
        assert "recovered: sessions=1" in host.log_since(mark), \
            f"0.3.0's session was not taken over:\n{host.log_since(mark)}"
        after = Shell(host, "alice")  # the same grant (alice, sshd), before any refresh rewrote its files
        shells.append(after)
        pointers = after.do("echo \"${AWS_SHARED_CREDENTIALS_FILE:-}|${AWS_CONFIG_FILE:-}\"")
        assert pointers.startswith(RUNTIME_DIR) and pointers.endswith("/credentials|"), \
            f"a login after the upgrade should get the credentials file and no AWS_CONFIG_FILE: {pointers!r}"
        for shell, what in ((after, "a login after the upgrade"), (before, "the session begun under 0.3.0")):
            arn = shell.do(whoami)
            assert arn.startswith(role % "alice-role"), f"{what} has not alice's role after the upgrade: {arn}"

        # A move rewrites the grant's files: 0.3.0's config file must come back with them.
        host.write_config(FAST.format(delivery="process").replace("role/alice-role", "role/alice-moved"))
        host.broker.send_signal(signal.SIGHUP)
        seen = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (seen and seen[-1].startswith(role % "alice-moved")):
            time.sleep(0.2)
            seen.append(before.do(whoami))
        assert seen and seen[-1].startswith(role % "alice-moved"), \
            f"the session begun under 0.3.0 never reached its new role after a move: {seen[-3:]}\n" \
            f"{host.log_since(mark)[-3000:]}"
        arn = after.do(whoami)
        assert arn.startswith(role % "alice-moved"), f"the login after the upgrade was not moved: {arn}"
        for shell in shells:
            shell.close()
        shells = []
        assert wait_gone(config_file), "0.3.0's config file outlived the sessions of its grant"
    finally:
        for shell in shells:
            shell.close()
        host.env = saved
        host.write_config(FAST.format(delivery="file"))
        host.stop_broker()
        host.start_broker()


# -- the refresh pool alone, over a stand-in registry -----------------------------------------------


class AlwaysDue:
    """What lifecycle asks of the registry, for grants that are always due: counts refreshes."""

    def __init__(self, workers=2, rate=50.0):
        self.cfg = refresh_config(workers, rate)
        self.refreshed = threading.Event()

    def next_due(self, key):
        return 0.0

    def expire(self, key):
        return False

    def refresh(self, key):
        self.refreshed.set()


class ErrorLog:
    def __init__(self):
        self.errors = []

    def error(self, text):
        self.errors.append(text)


def refresh_config(workers, rate):
    """All of a config that lifecycle reads."""
    return types.SimpleNamespace(refresh=types.SimpleNamespace(workers=workers, rate=rate), reap_interval=2.0)


class RefusesOnce:
    """A pool whose first submit fails the way a pool shut down by a reload does."""

    def __init__(self, pool):
        self.pool = pool
        self.refused = False

    def submit(self, fn):
        if not self.refused:
            self.refused = True
            raise RuntimeError("cannot schedule new futures after shutdown")
        return self.pool.submit(fn)

    def shutdown(self, wait=True):
        self.pool.shutdown(wait=wait)


def test_lifecycle__a_refresh_the_pool_refused_is_logged_and_tried_again():
    # The scheduler read the pool just before a reload shut it down: that grant must still be
    # refreshed, not stay marked busy (and so skipped) for ever.
    from pam_rolegate.core.lifecycle import Lifecycle

    registry, log = AlwaysDue(), ErrorLog()
    life = Lifecycle(registry, None, log)
    life._pool = refusing = RefusesOnce(life._pool)
    life.grant_saved(types.SimpleNamespace(id="g1", next_refresh=0.0))
    life.start()
    try:
        assert registry.refreshed.wait(10), f"the refused refresh was never tried again; log: {log.errors}"
    finally:
        life.stop()
    assert refusing.refused, "the stand-in pool never refused: the test did not test the race"
    assert any("g1" in e and "again" in e for e in log.errors), f"the refused submit was not logged: {log.errors}"


def test_lifecycle__a_grant_made_due_while_its_refresh_runs_is_refreshed_again():
    # A reload's recheck makes a live grant due at once (its login moved to another role) while a
    # refresh of that grant is out: the scheduler skips the new entry as busy, so the worker must
    # put the grant's time back when it finishes, or the move would wait for the next refresh.
    from pam_rolegate.core.lifecycle import Lifecycle

    class DueOnceMore(AlwaysDue):
        def __init__(self):
            super().__init__()
            self.calls, self.due = 0, 0.0
            self.twice = threading.Event()

        def next_due(self, key):
            return self.due

        def refresh(self, key):
            self.calls += 1
            if self.calls == 1:
                life.grant_saved(types.SimpleNamespace(id=key, next_refresh=0.0))  # the reload, mid-refresh
                time.sleep(0.3)  # the scheduler meets that entry while this one is busy
            else:
                self.due = float("inf")
                self.twice.set()

    registry = DueOnceMore()
    life = Lifecycle(registry, None, ErrorLog())
    life.grant_saved(types.SimpleNamespace(id="g1", next_refresh=0.0))
    life.start()
    try:
        assert registry.twice.wait(10), f"the grant made due during its refresh was not refreshed again " \
                                        f"({registry.calls} refresh)"
    finally:
        life.stop()


def test_lifecycle__a_rules_change_leaves_the_refresh_pool_and_rate_alone():
    # configure() runs on every rules change (each fleet update). Rebuilding each time raced the
    # scheduler's submit and handed the rate limit a fresh burst; only refresh.* changes may.
    from pam_rolegate.core.lifecycle import Lifecycle

    life = Lifecycle(AlwaysDue(workers=2, rate=5.0), None, ErrorLog())
    try:
        pool, limit = life._pool, life._limit
        life.configure(refresh_config(2, 5.0))
        assert life._pool is pool, "new rules with the same refresh.workers rebuilt the refresh pool"
        assert life._limit is limit, "new rules with the same refresh.rate reset the rate limit"
        life.configure(refresh_config(2, 8.0))
        assert life._pool is pool and life._limit is not limit, "a new refresh.rate should change the rate only"
        life.configure(refresh_config(3, 8.0))
        assert life._pool is not pool, "a new refresh.workers did not resize the pool"
        assert life._pool._max_workers == 3, f"the new pool has {life._pool._max_workers} workers, not 3"
    finally:
        life.stop()


@pytest.mark.parametrize("delivery,imds,http_doors", [("file", "reject", 0), ("container", "emulate", 2)])
def test_lifecycle__session_watches_leave_every_doors_cap_of_descriptors_free(delivery, imds, http_doors):
    """A user who fills the doors must never take the descriptor a login's accept needs: the pidfd
    allowance is what is left after every door's cap and the broker's own reserve."""
    import resource

    from pam_rolegate import broker
    from pam_rolegate.core.lifecycle import FD_RESERVE, Lifecycle
    from pam_rolegate.doors import sockets
    from pam_rolegate.doors.web import HttpDoor

    cfg = types.SimpleNamespace(delivery=delivery, imds=types.SimpleNamespace(mode=imds, port=254), container_port=255,
                                refresh=types.SimpleNamespace(workers=1, rate=1.0), reap_interval=2.0)
    doors = broker.door_descriptors(cfg)
    assert doors == sockets.MAX_CONNECTIONS + sockets.MAX_USER_CONNECTIONS + sockets.ALWAYS_ADMITTED_POOL + \
        http_doors * HttpDoor.max_connections, \
        f"{delivery}/{imds}: the doors' caps add up to {doors}"
    registry = types.SimpleNamespace(cfg=cfg)
    life = Lifecycle(registry, None, ErrorLog(), reserve=doors + FD_RESERVE)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert life.watcher.limit == max(soft - doors - FD_RESERVE, 0), \
        f"the watches may use {life.watcher.limit} of {soft} descriptors, past what the doors may need ({doors})"


def test_lifecycle__a_descriptor_limit_too_small_for_the_doors_is_reported():
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    code = ("import resource, sys; from pam_rolegate import broker\n"
            "class Log:\n    def error(self, text): print(text)\n"
            "broker._raise_fd_limit(10 ** 9, Log())\n"  # more than any limit: cannot fit
            "print('soft', resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n")
    done = run([sys.executable, "-c", code], check=False)
    assert done.returncode == 0, f"_raise_fd_limit failed: {done.stderr}"
    assert "LimitNOFILE" in done.stdout, f"a limit too small for the doors was not reported: {done.stdout!r}"
    assert int(done.stdout.split("soft")[-1]) >= soft, f"the limit was lowered: {done.stdout!r} (was {soft})"
