"""Hostile and heavy callers with real parts: a user fuzzing the user door, a host with 2,000 grants
and 10,000 sessions, an STS that answers garbage, and a runtime_dir below a user's planted link."""

import base64
import http.server
import json
import os
import random
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import ACCOUNT, PAM_SOCKET, ROLEGATED, SOCKET, pamtester, sandbox_host, run
from pam_rolegate.hookside import client, protocol
from pam_rolegate.errors import ProtocolError

CONFIG = f"""
version: 1
region: us-east-1
sts_timeout: 2
reap_interval: 2s
session:
  duration: 1h
  refresh_before: 20m
roles:
  - match: {{group: fleet}}
    role: arn:aws:iam::{ACCOUNT}:role/fleet
  - match: {{group: developers}}
    role: arn:aws:iam::{ACCOUNT}:role/developer
"""
FUZZER = "mallory"  # unmapped: no request of hers can succeed by accident


@pytest.fixture(scope="module")
def host():
    with sandbox_host() as h:
        h.add_user(FUZZER)
        h.add_user("carol", groups=("developers",))
        h.add_user("dora", groups=("developers",))
        h.write_config(CONFIG)
        h.hook = h.install_pam()
        h.start_broker()
        yield h


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


class Sleepers:
    """Long-running processes whose pids hold sessions (the reaper ends sessions of dead pids)."""

    def __init__(self, n):
        self.procs = [subprocess.Popen(["sleep", "3600"]) for _ in range(n)]
        self.pids = [p.pid for p in self.procs]

    def stop(self):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait(10)


def open_session(user, pid, timeout=30.0, service="sshd"):
    return client.call(protocol.OpenSession(user=user, service=service, pid=pid), path=PAM_SOCKET, timeout=timeout)


# -- 1. fuzzing the user door -----------------------------------------------------------------------

ACTIONS = sorted(protocol.REQUESTS)
# A valid value for each declared field, as raw JSON text.
VALID_RAW = {"user": '"carol"', "service": '"sshd"', "pid": "1", "ruser": '"carol"', "rhost": '"10.0.0.1"',
             "tty": '"pts/1"', "budget_ms": "2500", "session": '"0123456789abcdef"', "grant": '"1000-carol-0123"',
             "profile": '"admin"', "reason": '"INC-1 restart"', "seconds": "900", "id": '"0123456789ab"',
             "answer": '"123456"'}
REQUIRED = {a: [f for f, (_kind, req) in protocol.REQUESTS[a].FIELDS.items() if req] for a in ACTIONS}
# Every JSON type, edge and abuse, as raw JSON text (so lone surrogates and NUL escapes stay as sent).
RAW_VALUES = [
    "0", "1", "-1", "2", "3", "2147483647", "2147483648", "-2147483649", "9223372036854775808",
    "1" * 5000,  # past CPython's int-from-text digit limit
    "-" + "9" * 400, "1.5", "2.0", "-0.0", "1e2", "1e999", "-1e999", "1e-400", "NaN", "Infinity", "-Infinity",
    '""', '"x"', '"ping"', '"status"', '"open_session"', '"carol"', '"root"', '"../../etc/passwd"',
    json.dumps("a" * 1025), json.dumps("é" * 3000), '"\\u0000"', '"a\\u0000b"', '"\\ud800"', '"\\udfff"',
    '"x\\udc80y"', '"\\ud83d"', '"\\ud83d\\ude00"', '"\\u202e\\ufeff"', '"\\n\\r\\t"',
    "[]", '[1,"a",null,true,{}]', "{}", '{"a":{"b":[{"c":null}]}}', '{"v":2,"action":"ping"}',
    "null", "true", "false",
    "[" * 64 + "]" * 64, '{"a":' * 64 + "1" + "}" * 64, "[" * 20000 + "]" * 20000,
]
EXTRA_FIELDS = ["user", "uid", "zz", ""]
OTHER_ACTIONS = ["nope", "", "PING", "Ping", "ping ", "open-session", "credentials\u0000", "statu", "shutdown"]


def _body(pairs):
    return ("{" + ",".join(f"{json.dumps(k)}:{raw}" for k, raw in pairs) + "}").encode("utf-8", "surrogatepass")


def _pairs(action):
    base = [("v", "2"), ("action", json.dumps(action))]
    return base + [(f, VALID_RAW[f]) for f in REQUIRED.get(action, [])]


def _replace(pairs, key, raw):
    out = [(k, v) for k, v in pairs if k != key]
    return out + [(key, raw)]


def _framed(body):
    return len(body).to_bytes(4, "big") + body


def _succeeds(body):
    """True for a body the user door would answer ok:true for an unmapped user (not malformed at all)."""
    try:
        request = protocol.decode_request(body)
    except ProtocolError:
        return False
    return request.ACTION in (protocol.Ping.ACTION, protocol.Env.ACTION, protocol.Status.ACTION,
                              protocol.Approvals.ACTION)


def _random_json(rng, depth=0):
    pick = rng.randrange(9 if depth < 4 else 6)
    if pick == 0:
        return rng.choice(["0", "-1", "2", "1e308", "4294967296", "0.1", "-0"])
    if pick == 1:
        return rng.choice(["null", "true", "false"])
    if pick == 2:
        return json.dumps("".join(chr(rng.randrange(0x30000)) for _ in range(rng.randrange(8))))
    if pick == 3:
        return rng.choice(RAW_VALUES[:40])
    if pick == 4:
        return json.dumps(rng.choice(ACTIONS + OTHER_ACTIONS))
    if pick == 5:
        return '"' + "".join(rng.choice(["\\u0000", "\\ud800", "\\udbff\\udfff", "a", "\\\\", "\\/"])
                             for _ in range(rng.randrange(1, 6))) + '"'
    if pick in (6, 7):
        keys = ["v", "action"] + list(VALID_RAW) + EXTRA_FIELDS
        return "{" + ",".join(f"{json.dumps(rng.choice(keys))}:{_random_json(rng, depth + 1)}"
                              for _ in range(rng.randrange(4))) + "}"
    return "[" + ",".join(_random_json(rng, depth + 1) for _ in range(rng.randrange(4))) + "]"


def _mutate(rng, body):
    data = bytearray(body)
    for _ in range(rng.randrange(1, 5)):
        op = rng.randrange(5)
        at = rng.randrange(len(data) + 1)
        if op == 0 and data:
            data[min(at, len(data) - 1)] = rng.randrange(256)
        elif op == 1:
            data[at:at] = bytes([rng.choice([0, 0x80, 0xc0, 0xed, 0xff, ord('"'), ord("\\"), ord("{")])])
        elif op == 2 and data:
            del data[at:at + rng.randrange(1, 4)]
        elif op == 3:
            data[at:at] = rng.choice([b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80", b"\\ud800", b"\x00"])
        else:
            del data[at:]
    return bytes(data)


def fuzz_frames(seed=20261130, total=10500, actions=None):
    """(label, bytes to send, mode) for each connection; mode: full (then half-close and read),
    stall (send, then wait for the broker's deadline), abort (send, then close at once).
    `actions`: only these actions' fields and seeds (None: every action, and the framing cases)."""
    frames = []
    only = actions is not None

    def add(label, body, mode="full", raw=None):
        if raw is None and _succeeds(body):
            return
        frames.append((label, raw if raw is not None else _framed(body), mode))

    # Every value in every field (declared, envelope and undeclared) of every action, and each
    # required field left out.
    for action in (actions if only else ACTIONS + OTHER_ACTIONS):
        fields = ["v", "action"] + list(protocol.REQUESTS.get(action, protocol.Request).FIELDS) + EXTRA_FIELDS
        for field in fields:
            for raw in RAW_VALUES:
                add(f"{action}.{field}={raw[:20]}", _body(_replace(_pairs(action), field, raw)))
        for field in ["v", "action"] + REQUIRED.get(action, []):
            add(f"{action} without {field}", _body([p for p in _pairs(action) if p[0] != field]))
        add(f"{action} as sent", _body(_pairs(action)))  # the other door's actions: refused here
    # Bodies that are no JSON object, or no UTF-8.
    for label, body in [] if only else [
        ("not-json", b"hello"), ("empty-object-text", b" "), ("array", b"[]"), ("number", b"2"), ("string", b'"ping"'),
        ("null", b"null"), ("two-objects", b'{"v":2,"action":"status","x":1}{"v":2}'),
        ("trailing", b'{"v":2,"action":"env","user":"carol"}x'), ("open", b'{"v":2,"action":"env"'),
        ("raw-nul", b'{"v":2,"action":"env\x00"}'), ("raw-nul-outside", b'{"v":2,"action":"status"}\x00'),
        ("latin1", '{"v":2,"action":"credentials","grant":"\xe9"}'.encode("latin-1")),
        ("bad-utf8", b'{"v":2,"action":"credentials","grant":"\xff\xfe"}'),
        ("cesu-surrogate", b'{"v":2,"action":"credentials","grant":"\xed\xa0\x80"}'),
        ("overlong", b'{"v":2,"action":"credentials","grant":"\xc0\xaf"}'),
        ("beyond-unicode", b'{"v":2,"action":"credentials","grant":"\xf4\x90\x80\x80"}'),
        ("bom", b'\xef\xbb\xbf{"v":2,"action":"credentials"}'),
        ("utf16", '{"v":2,"action":"status"}'.encode("utf-16")),
        ("deep-array", b"[" * 65536), ("deep-object", b'{"a":' * 13000),
        ("dup-action", b'{"v":2,"action":"status","action":"open_session","user":"carol","service":"s","pid":1}'),
        ("dup-v", b'{"v":2,"action":"status","v":1}'),
        ("max-frame", b" " * (protocol.MAX_FRAME - 40) + b'{"v":2,"action":"status","x":1}'),
    ]:
        add(label, body)
    # Framing: lengths out of bounds, and connections closed inside a frame.
    for n in () if only else (0, protocol.MAX_FRAME + 1, 100_000, 2 ** 31, 2 ** 32 - 1):
        add(f"length {n}, header only", None, raw=n.to_bytes(4, "big"))
        add(f"length {n}, some body", None, raw=n.to_bytes(4, "big") + b'{"v":2,"action":"status"}')
    if not only:
        add("length > 64 KiB, whole body", None, raw=_framed(b" " * 65510 + b'{"v":2,"action":"status","x":1}'))
    for cut in () if only else (1, 2, 3):
        add(f"closed after {cut} header bytes", None, raw=b"\x00\x00\x00\x10"[:cut])
    for label, raw in [("closed mid-body", b"\x00\x00\x01\x00" + b'{"v":2,"action":"status"'),
                       ("closed before any body", b"\x00\x00\x00\x20"),
                       ("short length, longer body", b"\x00\x00\x00\x05" + b'{"v":2,"action":"credentials"}'),
                       ("two frames", _framed(b'{"v":2,"action":"credentials"}') + _framed(b'{"v":2,"action":"ping"}')),
                       ("nothing at all", b"")] if not only else []:
        add(label, None, raw=raw)
    for i in range(0 if only else 20):
        add(f"abort {i}", None, mode="abort", raw=b"\x00\x00\x10\x00" + b"{" * i)
    for i in range(0 if only else 3):
        add(f"stall {i}", None, mode="stall", raw=b"\x00\x00\x00\x64" + b'{"v":2,')
    # Random documents and mutated frames, seeded (a failure is reproducible), up to the total.
    rng = random.Random(seed)
    seeds = [_body(_pairs(a)) for a in (actions if only else ACTIONS)] + [f[1][4:] for f in frames[:2000:7]]
    while len(frames) < total:
        kind = rng.randrange(3)
        if kind == 0:
            add("random json", _random_json(rng).encode("utf-8", "surrogatepass"))
        elif kind == 1:
            add("mutated", _mutate(rng, rng.choice(seeds)))
        else:
            body = _mutate(rng, rng.choice(seeds))
            n = rng.choice([len(body), len(body) + 1, max(len(body) - 1, 0), rng.randrange(1 << 32)])
            add("mutated, wrong length", None, raw=n.to_bytes(4, "big") + body)
    return frames


FUZZ_CLIENT = r'''
import base64, json, socket, sys, threading, time

path = sys.argv[1]
frames = json.load(sys.stdin)
results = [None] * len(frames)
lock = threading.Lock()
todo = iter(range(len(frames)))


def reply_of(buf):
    if not buf:
        return {"kind": "eof"}
    if len(buf) < 4:
        return {"kind": "garbled", "why": "short header", "bytes": buf.hex()}
    n = int.from_bytes(buf[:4], "big")
    body = buf[4:4 + n]
    if len(body) != n:
        return {"kind": "garbled", "why": "short body", "n": n, "got": len(body)}
    try:
        obj = json.loads(body.decode("utf-8"))
    except ValueError as err:
        return {"kind": "garbled", "why": str(err)}
    return {"kind": "reply", "ok": obj.get("ok"), "v": obj.get("v"), "code": obj.get("code"),
            "message": str(obj.get("message"))[:200], "extra": len(buf) - 4 - n}


def one(label, data, mode):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    try:
        s.connect(path)
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before we finished sending: the reply is still there to read
        if mode == "abort":
            return {"kind": "aborted"}
        if mode != "stall":
            try:
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        buf = b""
        while len(buf) < (1 << 20):
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            buf += chunk
        return reply_of(buf)
    except Exception as err:
        return {"kind": "client-error", "why": f"{type(err).__name__}: {err}"}
    finally:
        s.close()


def worker():
    while True:
        with lock:
            i = next(todo, None)
        if i is None:
            return
        label, data, mode = frames[i]
        results[i] = one(label, base64.b64decode(data), mode)


start = time.monotonic()
threads = [threading.Thread(target=worker) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
json.dump({"seconds": time.monotonic() - start, "results": results}, sys.stdout)
'''

# Spot checks: the code a client can act on, for frames whose fault is plain.
EXPECTED_CODES = {
    "open_session as sent": protocol.E_UNKNOWN_ACTION,  # the PAM door's action, on the user door
    "close_session as sent": protocol.E_UNKNOWN_ACTION,
    "nope as sent": protocol.E_UNKNOWN_ACTION,
    "status.v=1": protocol.E_UNSUPPORTED_VERSION,
    "status.v=3": protocol.E_UNSUPPORTED_VERSION,
    "env.zz=0": protocol.E_BAD_REQUEST,
    "credentials.grant=0": protocol.E_BAD_REQUEST,
    "length 4294967295, header only": protocol.E_BAD_REQUEST,
    "closed after 2 header bytes": protocol.E_BAD_REQUEST,
    "closed mid-body": protocol.E_BAD_REQUEST,
    "credentials.grant=\"x\"": protocol.E_NO_GRANT,
}
ERROR_CODES = {protocol.E_BAD_REQUEST, protocol.E_UNSUPPORTED_VERSION, protocol.E_UNKNOWN_ACTION,
               protocol.E_FORBIDDEN, protocol.E_UNKNOWN_USER, protocol.E_NO_GRANT, protocol.E_BUSY,
               protocol.E_LIMITED}


def test_fuzz__ten_thousand_malformed_frames_get_refusals_and_leave_the_broker_whole(host):
    frames = fuzz_frames()
    assert len(frames) >= 10_000, f"the generator made only {len(frames)} frames"
    _fuzz_and_check(host, frames, check_labels=True)


def test_fuzz__ten_thousand_malformed_elevation_frames_leave_the_broker_whole(host):
    frames = fuzz_frames(seed=20261203, total=10_000, actions=[c.ACTION for c in protocol.ELEVATION_REQUESTS])
    assert len(frames) >= 10_000, f"the generator made only {len(frames)} frames"
    _fuzz_and_check(host, frames, check_labels=False)


def _fuzz_and_check(host, frames, check_labels):
    pid = host.broker.pid
    rss_before = rss_kib(pid)
    mark = host.log_mark()
    payload = json.dumps([(label, base64.b64encode(data).decode(), mode) for label, data, mode in frames])
    start = time.monotonic()
    done = run(["setpriv", "--reuid", FUZZER, "--regid", FUZZER, "--init-groups", sys.executable, "-c", FUZZ_CLIENT,
                SOCKET], input=payload, timeout=900, check=False)
    elapsed = time.monotonic() - start
    assert done.returncode == 0, f"the fuzzing client failed ({done.returncode}): {done.stderr[-3000:]}"
    results = json.loads(done.stdout)["results"]
    assert len(results) == len(frames), f"{len(results)} results for {len(frames)} frames"

    bad = []
    kinds = {}
    for (label, data, mode), got in zip(frames, results):
        kinds[got["kind"]] = kinds.get(got["kind"], 0) + 1
        if mode == "abort":
            ok = got["kind"] == "aborted"
        elif got["kind"] == "eof":
            ok = True  # a clean close is an answer too
        else:
            ok = (got["kind"] == "reply" and got["ok"] is False and got["v"] == protocol.VERSION
                  and got["code"] in ERROR_CODES and (got["extra"] == 0 or label == "two frames"))
        if mode == "stall" and ok:
            ok = got.get("message") == "frame not received in time"
        if not ok:
            bad.append((label, data[:80], got))
    assert not bad, f"{len(bad)} of {len(frames)} frames got no clean refusal, e.g.: {bad[:8]}"
    codes = {}
    for got in results:
        codes[got.get("code")] = codes.get(got.get("code"), 0) + 1
    by_label = {label: got for (label, _data, _mode), got in zip(frames, results)}
    for label, code in EXPECTED_CODES.items() if check_labels else ():
        assert by_label[label].get("code") == code, f"{label}: expected code {code}, got {by_label[label]}"
    assert kinds.get("reply", 0) > 9_000, f"too few frames got a reply frame (rest closed): {kinds}"

    assert host.broker.poll() is None and host.broker.pid == pid, "the broker died under the fuzzer"
    growth = rss_kib(pid) - rss_before
    print(f"\nfuzz: {len(frames)} frames in {elapsed:.1f}s, outcomes {kinds}, codes {codes}, "
          f"RSS growth {growth} KiB")
    assert growth < 20 * 1024, f"the broker's RSS grew by {growth} KiB under the fuzzer (limit 20 MiB)"
    log = host.log_since(mark)
    for bad_word in ("Traceback", "internal error", "pam door: ", "user door: "):  # the doors' catch-all
        assert bad_word not in log, f"the broker logged {bad_word!r} under the fuzzer:\n" \
                                    f"{log[max(log.find(bad_word) - 2000, 0):log.find(bad_word) + 2000]}"

    # And it still does its job: a root (PAM door) login gets credentials.
    sleeper = Sleepers(1)
    try:
        reply = open_session("carol", sleeper.pids[0])
        assert isinstance(reply, protocol.Reply) and reply.get("granted") is True, \
            f"after the fuzzing, carol's login got no grant: {reply}"
        path = reply.get("env", {}).get("AWS_SHARED_CREDENTIALS_FILE")
        assert path and os.path.exists(path), f"carol's credentials file is missing after the fuzzing: {reply}"
        closed = client.call(protocol.CloseSession(session=reply.get("session")), path=PAM_SOCKET, timeout=10)
        assert closed.get("released") == 1, f"closing carol's session released {closed}"
    finally:
        sleeper.stop()


# The property behind the door: whatever the bytes, decode_request raises ProtocolError or gives a request.
_scalar = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2 ** 70, max_value=2 ** 70),
                    st.floats(allow_nan=False),
                    st.text(st.one_of(st.characters(), st.characters(categories=["Cs", "Cc"])), max_size=30))
_json_value = st.recursive(_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=20)
_field_names = st.sampled_from(["v", "action", "x", ""] + sorted(VALID_RAW))
_request_like = st.fixed_dictionaries(
    {"v": st.one_of(st.sampled_from([protocol.VERSION, float(protocol.VERSION), True, str(protocol.VERSION)]),
                    _json_value),
     "action": st.one_of(st.sampled_from(ACTIONS + OTHER_ACTIONS), _json_value)},
    optional={name: _json_value for name in VALID_RAW})


def _decodes_or_refuses(body):
    try:
        request = protocol.decode_request(body)
    except ProtocolError:
        return
    except Exception as err:  # anything else would escape the door's refusal path
        raise AssertionError(f"decode_request raised {type(err).__name__}: {err} on {body[:200]!r}") from None
    assert isinstance(request, protocol.Request), f"decode_request returned {request!r} for {body[:200]!r}"
    v = json.loads(body)["v"]
    assert type(v) is int and v == protocol.VERSION, f"decode_request accepted version {v!r}: {body[:200]!r}"


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=st.one_of(_request_like, _json_value, st.dictionaries(_field_names, _json_value, max_size=6)))
def test_fuzz__decode_request_raises_only_protocol_error_on_any_json(value):
    _decodes_or_refuses(json.dumps(value).encode("utf-8", "surrogatepass"))


@settings(max_examples=600, deadline=None)
@given(body=st.one_of(st.binary(max_size=300),
                      st.binary(max_size=40).map(lambda b: b'{"v":2,"action":"credentials","grant":"' + b + b'"}')))
def test_fuzz__decode_request_raises_only_protocol_error_on_any_bytes(body):
    _decodes_or_refuses(body)


# -- 2. status at scale -------------------------------------------------------------------------------

FLEET = 2000
SESSIONS_PER_USER = 5
FLEET_GID = 70000
FLEET_UID0 = 70001


def _add_fleet():
    """2,000 users in group fleet, written straight into the sandbox's private /etc (no useradd loop)."""
    with open("/etc/group") as fh:
        groups = fh.read()
    if "\nfleet:" in "\n" + groups:
        return
    assert f":{FLEET_GID}:" not in groups, f"gid {FLEET_GID} is taken in /etc/group"
    with open("/etc/group", "a") as fh:
        fh.write(f"fleet:x:{FLEET_GID}:\n")
    with open("/etc/passwd", "a") as fh:
        for i in range(FLEET):
            fh.write(f"fleet{i:04d}:x:{FLEET_UID0 + i}:{FLEET_GID}::/nonexistent:/usr/sbin/nologin\n")


def _fleet_status_json(as_user=None):
    cmd = ["/usr/local/bin/rolegate", "status", "--json"]
    if as_user:
        cmd = ["setpriv", "--reuid", as_user, "--regid", "fleet", "--init-groups", "--reset-env"] + cmd
    done = run(cmd, timeout=120, check=False)
    assert done.returncode == 0, f"`rolegate status --json` as {as_user or 'root'} failed: {done.stderr[-2000:]}"
    return json.loads(done.stdout)


def test_status__two_thousand_grants_and_ten_thousand_sessions_all_listed(host):
    _add_fleet()
    users = [f"fleet{i:04d}" for i in range(FLEET)]
    sleepers = Sleepers(10)
    try:
        # Each user's first login assumes a role (2,000 AssumeRole calls); the other four reuse it.
        jobs = [(u, sleepers.pids[(i * SESSIONS_PER_USER + k) % len(sleepers.pids)])
                for k in range(SESSIONS_PER_USER) for i, u in enumerate(users)]
        start = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(lambda job: (job[0], open_session(*job, timeout=60)), jobs))
        opened = time.monotonic() - start
        refused = [(u, r) for u, r in replies if not (isinstance(r, protocol.Reply) and r.get("granted"))]
        assert not refused, f"{len(refused)} of {len(jobs)} fleet logins got no grant, e.g. {refused[:5]}"

        start = time.monotonic()
        whole = _fleet_status_json()
        cli_seconds = time.monotonic() - start
        fleet = [g for g in whole["grants"] if g["principal"].startswith("fleet")]
        assert len(fleet) == FLEET, f"`rolegate status --json` listed {len(fleet)} fleet grants, expected {FLEET}"
        assert sorted(g["principal"] for g in fleet) == users, "status lists a fleet user twice or misses one"
        listed = sum(len(g["session_list"]) for g in fleet)
        assert listed == FLEET * SESSIONS_PER_USER, f"status listed {listed} fleet sessions, expected {len(jobs)}"
        wrong = [g for g in fleet if g["sessions"] != SESSIONS_PER_USER or len(g["session_list"]) != SESSIONS_PER_USER]
        assert not wrong, f"{len(wrong)} grants do not show their 5 sessions, e.g. {wrong[:2]}"

        start = time.monotonic()
        reply = client.call(protocol.Status(), path=SOCKET, timeout=60)
        client_seconds = time.monotonic() - start
        ids = {g["grant"] for g in reply.get("grants") if g["principal"].startswith("fleet")}
        sessions = [s for s in reply.get("sessions") if s["grant"] in ids]
        assert len(ids) == FLEET and len(sessions) == FLEET * SESSIONS_PER_USER, \
            f"the client's status had {len(ids)} fleet grants and {len(sessions)} of their sessions"
        assert len({s["id"] for s in sessions}) == len(sessions), "the streamed status repeats a session"

        mine = _fleet_status_json(as_user="fleet0123")
        assert [g["principal"] for g in mine["grants"]] == ["fleet0123"], \
            f"fleet0123's status shows other users' grants: {[g['principal'] for g in mine['grants']][:10]}"
        assert mine["grants"][0]["sessions"] == SESSIONS_PER_USER and "session_list" not in mine["grants"][0], \
            f"a user's status should count their sessions but not list them: {mine['grants'][0]}"
        print(f"\nstatus: opened {len(jobs)} sessions in {opened:.1f}s; status --json {cli_seconds:.2f}s, "
              f"client {client_seconds:.2f}s, broker RSS {rss_kib(host.broker.pid) // 1024} MiB")
    finally:
        sleepers.stop()
    # The processes are gone: the reaper ends every session and releases every grant (its files
    # go; its credentials may linger in memory, which status shows as such).
    start = time.monotonic()
    deadline = start + 180
    left = None
    while time.monotonic() < deadline:
        reply = client.call(protocol.Status(), path=SOCKET, timeout=60)
        left = [g for g in reply.get("grants") if g["principal"].startswith("fleet") and g.get("state") != "lingering"]
        if not left:
            break
        time.sleep(1)
    assert not left, f"{len(left)} fleet grants outlived their sessions' processes by 180 s"
    print(f"status: the reaper released all {FLEET} grants {time.monotonic() - start:.1f}s after their processes ended")


# -- 3. an STS that answers garbage ----------------------------------------------------------------

# The least refresh interval config allows (MIN_REFRESH_INTERVAL, 10 s): a grant is due soon after login.
STS_CONFIG = CONFIG.replace("refresh_before: 20m", "refresh_before: 890s").replace("duration: 1h", "duration: 15m")


class StsSwitch:
    """The broker's STS endpoint, switched by the test: forward to moto, or answer a canned reply."""

    def __init__(self, upstream):
        self.upstream = upstream
        self.answer = None  # None: forward; else (status, content type, body)
        self.hits = []  # what each request got: "forward" or the canned status
        switch = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                answer = switch.answer
                switch.hits.append("forward" if answer is None else answer[0])
                if answer is None:
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() not in ("host", "content-length", "connection")}
                    req = urllib.request.Request(switch.upstream + self.path, data=body, headers=headers,
                                                 method="POST")
                    try:
                        with urllib.request.urlopen(req, timeout=10) as resp:
                            answer = (resp.status, resp.headers.get("Content-Type", "text/xml"), resp.read())
                    except urllib.error.HTTPError as err:
                        answer = (err.code, err.headers.get("Content-Type", "text/xml"), err.read())
                status, content_type, data = answer
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


PLAIN_500 = (500, "text/plain", b"Internal proxy error")
GARBAGE_200 = (200, "text/xml", b"garbage<<")


def _pam_login(host, user):
    """One PAM session through the real hook (pamtester, timeout 3 s): (exit code, stderr, seconds)."""
    with open("/etc/pam.d/rghostile", "w") as fh:
        fh.write(f"session required pam_python.so {host.hook} debug timeout=3\n")
    start = time.monotonic()
    done = pamtester("rghostile", user)
    return done.returncode, done.stderr, time.monotonic() - start


def _wait_for_log(host, mark, words, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in host.log_since(mark).splitlines():
            if all(w in line for w in words):
                return line
        time.sleep(0.2)
    return None


@pytest.fixture
def sts_switch(host):
    switch = StsSwitch(host.moto.url)
    saved = dict(host.env)
    host.stop_broker()
    host.write_config(STS_CONFIG)
    host.env["AWS_ENDPOINT_URL_STS"] = switch.url  # gatekeeper credentials still come from moto's IMDS
    host.start_broker()
    try:
        yield switch
    finally:
        host.stop_broker()
        host.env = saved
        host.write_config(CONFIG)
        host.start_broker()
        switch.close()


@pytest.mark.parametrize("answer", [PLAIN_500, GARBAGE_200], ids=["plain-text-500", "garbage-200"])
def test_sts__unreadable_replies_fail_logins_open_within_the_budget(host, sts_switch, answer):
    sts_switch.answer = answer
    mark = host.log_mark()
    code, stderr, seconds = _pam_login(host, "carol")
    assert code == 0, f"with STS answering {answer[0]}, carol's PAM session failed ({code}): {stderr}"
    assert 'result="session opened without credentials"' in stderr, \
        f"the hook should open carol's session without credentials and say so:\n{stderr}"
    assert seconds < 3 + 4, f"the login took {seconds:.1f}s against a broken STS (hook timeout 3 s)"
    assert any(h == answer[0] for h in sts_switch.hits), f"the STS stand-in was never asked: {sts_switch.hits}"
    line = _wait_for_log(host, mark, ("failed:", "principal=carol", "code=sts_unavailable"), 5)
    assert line, f"the broker logged no `failed: ... code=sts_unavailable` line:\n{host.log_since(mark)}"
    print(f"\nsts {answer[0]}: login failed open in {seconds:.2f}s; {len(sts_switch.hits)} STS requests")


def _key_in(path):
    with open(path) as fh:
        return next(l.split("=", 1)[1].strip() for l in fh if l.startswith("aws_access_key_id"))


def test_sts__a_valid_grant_keeps_being_served_while_sts_answers_garbage(host, sts_switch):
    sleeper = Sleepers(1)
    try:
        # The service _pam_login's logins use: sessions of one grant are one (account, person, service).
        held = open_session("dora", sleeper.pids[0], service="rghostile")
        assert isinstance(held, protocol.Reply) and held.get("granted"), f"dora got no grant while STS worked: {held}"
        path = held.get("env")["AWS_SHARED_CREDENTIALS_FILE"]
        mark = host.log_mark()
        sts_switch.answer = GARBAGE_200
        # With refresh_before 890 s of a 15 m session the grant is due within 10 s: the refresher
        # meets the garbage, and the old credentials (still ~15 minutes valid) must stay.
        line = _wait_for_log(host, mark, ("failed:", f"grant={held.get('grant')}", "action=refresh",
                                          "code=sts_unavailable"), 30)
        assert line, f"the refresher never met the broken STS:\n{host.log_since(mark)}"
        key = _key_in(path)
        asked = len(sts_switch.hits)
        code, stderr, seconds = _pam_login(host, "dora")
        assert code == 0 and "granted=True" in stderr, \
            f"a new login of dora's still-valid grant got no credentials while STS fails ({code}):\n{stderr}"
        assert seconds < 3 + 4, f"the login took {seconds:.1f}s"
        assert os.path.exists(path) and _key_in(path) == key, "dora's credentials file changed or vanished"
        assert GARBAGE_200[0] in sts_switch.hits, f"the stand-in never served garbage: {sts_switch.hits}"
        print(f"\nsts: stale-but-valid grant served in {seconds:.2f}s; STS asked {len(sts_switch.hits) - asked} "
              f"times during that login")
        client.call(protocol.CloseSession(session=held.get("session")), path=PAM_SOCKET, timeout=10)
    finally:
        sleeper.stop()


# -- 4. a runtime_dir below a planted link ------------------------------------------------------------


@pytest.mark.parametrize("layout", ["link-ancestor", "link-runtime-dir", "user-ancestor"])
def test_store__runtime_dir_below_a_user_planted_path_is_refused(host, layout):
    base = f"/run/rg-planted-{layout}"
    target = f"/home/{FUZZER}/planted-{layout}"
    os.makedirs(base, exist_ok=True)
    os.chmod(base, 0o755)
    os.makedirs(target, exist_ok=True)
    run(["chown", f"{FUZZER}:", target])
    if layout == "link-ancestor":
        os.symlink(target, f"{base}/link")
        runtime_dir, culprit = f"{base}/link/rolegate", f"{base}/link"
    elif layout == "link-runtime-dir":
        os.symlink(target, f"{base}/link")
        runtime_dir, culprit = f"{base}/link", f"{base}/link"
    else:
        os.chown(base, int(run(["id", "-u", FUZZER]).stdout), 0)
        runtime_dir, culprit = f"{base}/rolegate", base
    config = os.path.join(host.workdir, f"planted-{layout}.yaml")
    with open(config, "w") as fh:
        fh.write(CONFIG.replace("version: 1", f"version: 1\nruntime_dir: {runtime_dir}"))
    start = time.monotonic()
    done = run([ROLEGATED], timeout=60, check=False, env=dict(os.environ, ROLEGATE_CONFIG=config, **host.env))
    seconds = time.monotonic() - start
    assert done.returncode != 0, f"rolegated started with runtime_dir {runtime_dir} ({layout}):\n{done.stderr}"
    assert seconds < 30, f"rolegated took {seconds:.1f}s to refuse"
    assert "not starting" in done.stderr and culprit in done.stderr, \
        f"rolegated's refusal should name {culprit}:\n{done.stderr}"
    print(f"\nplanted {layout}: refused in {seconds:.2f}s: {done.stderr.strip().splitlines()[-1]}")
    planted = [os.path.join(d, n) for d, dirs, files in os.walk(target) for n in dirs + files]
    assert planted == [], f"rolegated wrote into the user's directory {target}: {planted}"
    if layout == "user-ancestor":
        assert os.listdir(base) == [], f"rolegated created {os.listdir(base)} in the user-owned {base}"
