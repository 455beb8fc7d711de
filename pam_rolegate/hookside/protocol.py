"""The broker's wire protocol: the one definition that the hook, the CLI and the broker share.

Standard library only, and only its cheapest parts: the PAM hook imports this inside sshd at
every login, so it uses neither `json` (which pulls in `re`) nor `dataclasses` or `typing` (which
pull in inspect, ast and tokenize). The JSON text codec is CPython's own C codec (`_json`),
driven directly; `json` itself is used only where `_json` is missing.

Grammar
-------
A connection carries one request FRAME and one reply, which is one FRAME or, for `status`, a
stream of FRAMEs:

    FRAME   = LENGTH BODY
    LENGTH  = 4-byte unsigned big-endian byte count of BODY, 1 .. MAX_FRAME
    BODY    = UTF-8 JSON object; strings hold no NUL and no lone surrogate

    request = {"v": VERSION, "action": ACTION, FIELD...}
    reply   = {"v": VERSION, "ok": true, FIELD..., "more"?: true}
            | {"v": VERSION, "ok": false, "code": ERROR_CODE, "message": TEXT}

A reply frame with "more": true is followed by another frame of the same reply; the reader joins
them by concatenating their list fields (the other fields come from the first frame).

The broker has two doors (sockets), and each serves only its own actions:

    PAM door   runtime_dir/pam/pam.sock, in a root-only (0700) directory: only root reaches it
    user door  runtime_dir/rolegated.sock, 0666: anyone; the caller is who SO_PEERCRED says

Actions and their fields (? = optional). The broker takes the caller's uid and pid from
SO_PEERCRED, never from the message.

    PAM door:
    ping                                        -> version, pid
    open_session  user, service, pid, ruser?, rhost?, tty?, budget_ms?
                                                -> granted, session?, grant?, role?, env, reason
    close_session session?, pid?                -> released (count of sessions closed)
    user door:
    ping                                        -> version, pid
    env                                         -> granted, role?, grant?, env, reason, runtime_dir
    credentials   grant?                        -> Version, AccessKeyId, SecretAccessKey,
                                                   SessionToken, Expiration (credential_process)
    status                                      -> grants, sessions (streamed), delivery

`env` and `credentials` always concern the caller's own account; without `grant` they use
the caller's own grant as service "shell" (PAM-less shells: SSM Session Manager, su -l).
`status` lists the caller's own grants (root: all, and every session); each session names its
grant, so a reply of any size streams.

An overloaded door answers `busy`: the client waits a little and asks again within its budget.

A sender may hang up without reading the reply: the PAM hook sends close_session and goes (its
logout then costs no round trip). The door still reads that frame and acts on it, and its reply
is lost with nobody waiting; a close the door turned away is made good by the reaper, which ends
the session once its process exits (pidfd) or at the next reap_interval sweep.

Version history
---------------
1  2026-11-28  first version: ping, open_session, close_session, env, credentials, status.
2  2026-11-30  two doors: open/close_session only on the root-only PAM door; `status` streams
               (grants without session lists, plus a `sessions` list naming their grants).
2  2026-12-07  the same wire: the hook no longer waits for close_session's reply (see above).
"""

try:  # CPython's C JSON codec, without the `re` import that `json` costs at every login
    import _json

    class _Context:
        strict = True
        object_hook = None
        object_pairs_hook = None
        parse_float = float
        parse_int = int
        memo = None

        @staticmethod
        def parse_constant(name):
            raise ValueError(f"{name} is not JSON")

    _scan = _json.make_scanner(_Context())
    _encode = _json.make_encoder(None, None, _json.encode_basestring_ascii, None, ":", ",", False, False, False)

    def dumps(obj):
        """obj -> ASCII JSON text (non-ASCII escaped, so a reply can never fail to encode)."""
        return "".join(_encode(obj, 0))

    def loads(text):
        """JSON text -> object; ValueError when it is not exactly one JSON value."""
        start = len(text) - len(text.lstrip(" \t\n\r"))
        try:
            obj, end = _scan(text, start)
        except StopIteration:
            raise ValueError("not JSON") from None
        if text[end:].strip(" \t\n\r"):
            raise ValueError("extra data after the JSON value")
        return obj
except ImportError:  # another Python: the ordinary module does the same job, a little slower
    import json as _stdjson

    def dumps(obj):
        return _stdjson.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False)

    def loads(text):
        return _stdjson.loads(text, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))

from ..errors import ProtocolError

VERSION = 2
MAX_FRAME = 64 * 1024
# One reply frame of a stream is filled up to this size, leaving room for the envelope.
STREAM_CHUNK = MAX_FRAME - 1024
# Strings longer than this are no user name, service, host or grant id.
MAX_STRING = 1024
PAM_SOCKET = "pam/pam.sock"  # relative to runtime_dir
USER_SOCKET = "rolegated.sock"

# Error codes a reply may carry.
E_BAD_REQUEST = "bad_request"
E_UNSUPPORTED_VERSION = "unsupported_version"
E_UNKNOWN_ACTION = "unknown_action"
E_FORBIDDEN = "forbidden"
E_UNKNOWN_USER = "unknown_user"
E_NO_GRANT = "no_grant"
E_STS_FAILED = "sts_failed"
E_STORE_FAILED = "store_failed"
E_BUSY = "busy"  # the broker's load: clients ask again until their deadline
E_LIMITED = "limited"  # a limit of the caller's own (failed elevations, requests under way): not asked again
E_INTERNAL = "internal"


# -- records -------------------------------------------------------------------------------------
# Each request record names its action; FIELDS maps field -> (type, required). Types are checked
# on decode and on construction, so a handler never sees a list where it expects a name.


class Request:
    ACTION = ""
    FIELDS = {}

    def __init__(self, **values):
        for name, (kind, required) in self.FIELDS.items():
            value = values.pop(name, None)
            if value is None:
                if required:
                    raise ProtocolError(f"{self.ACTION}: missing field {name!r}")
            else:
                _check_value(self.ACTION, name, value, kind)
            setattr(self, name, value)
        if values:
            raise ProtocolError(f"{self.ACTION}: unknown field {_show(next(iter(values)))}")

    def fields(self):
        return {name: getattr(self, name) for name in self.FIELDS if getattr(self, name) is not None}

    def __eq__(self, other):
        return type(self) is type(other) and self.fields() == other.fields()

    def __repr__(self):
        return f"{type(self).__name__}({self.fields()})"


class Ping(Request):
    ACTION = "ping"


class OpenSession(Request):
    ACTION = "open_session"
    FIELDS = {"user": (str, True), "service": (str, True), "pid": (int, True), "ruser": (str, False),
              "rhost": (str, False), "tty": (str, False),
              "budget_ms": (int, False)}  # what is left of the hook's time budget


class CloseSession(Request):
    ACTION = "close_session"
    FIELDS = {"session": (str, False), "pid": (int, False)}


class Env(Request):
    ACTION = "env"


class GetCredentials(Request):
    ACTION = "credentials"
    FIELDS = {"grant": (str, False), "profile": (str, False)}


class Status(Request):
    ACTION = "status"


# Elevation on demand (docs/profiles-and-elevation.md): start, then poll (answering PAM's prompts),
# cancel; approvers approve or deny; drop ends one early.
class Elevate(Request):
    ACTION = "elevate"
    FIELDS = {"grant": (str, False), "profile": (str, True), "reason": (str, False), "seconds": (int, False)}


class ElevationPoll(Request):
    ACTION = "elevation"
    FIELDS = {"id": (str, True), "answer": (str, False), "prompt": (int, False)}  # prompt: which one `answer` answers


class ElevationCancel(Request):
    ACTION = "elevation_cancel"
    FIELDS = {"id": (str, True)}


class Approve(Request):
    ACTION = "approve"
    FIELDS = {"id": (str, True)}


class Deny(Request):
    ACTION = "deny"
    FIELDS = {"id": (str, True)}


class Approvals(Request):
    ACTION = "approvals"


class Drop(Request):
    ACTION = "drop"
    FIELDS = {"grant": (str, False), "profile": (str, True)}


ELEVATION_REQUESTS = (Elevate, ElevationPoll, ElevationCancel, Approve, Deny, Approvals, Drop)
REQUESTS = {cls.ACTION: cls for cls in (Ping, OpenSession, CloseSession, Env, GetCredentials, Status)
            + ELEVATION_REQUESTS}
PAM_ACTIONS = frozenset({Ping.ACTION, OpenSession.ACTION, CloseSession.ACTION})
USER_ACTIONS = frozenset({Ping.ACTION, Env.ACTION, GetCredentials.ACTION, Status.ACTION}
                         | {cls.ACTION for cls in ELEVATION_REQUESTS})


class Reply:
    """A successful reply: `data` holds the action's fields."""

    def __init__(self, data=None):
        self.data = dict(data or {})

    def get(self, key, default=None):
        return self.data.get(key, default)

    def __repr__(self):
        return f"Reply({self.data})"


class Stream:
    """A successful reply too large for one frame: `head` fields once, `lists` split across frames."""

    def __init__(self, head, lists):
        self.head = dict(head)
        self.lists = dict(lists)


class ErrorReply:
    def __init__(self, code, message):
        self.code = code
        self.message = message

    def __eq__(self, other):
        return isinstance(other, ErrorReply) and (self.code, self.message) == (other.code, other.message)

    def __repr__(self):
        return f"ErrorReply({self.code!r}, {self.message!r})"


# -- codec ---------------------------------------------------------------------------------------


def _show(value):
    """A value from a hostile frame as safe text for a message: ASCII, short, no surrogates."""
    text = ascii(value)
    return text if len(text) <= 64 else text[:61] + "..."


def _check_string(text):
    """Refuse NULs and lone surrogates (which no UTF-8 frame can carry honestly)."""
    if "\0" in text or len(text) > MAX_STRING:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_value(action, name, value, kind):
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProtocolError(f"{action}: field {name!r} must be {kind.__name__}")
    if kind is str and not _check_string(value):
        raise ProtocolError(f"{action}: field {name!r} is not a reasonable string")
    if kind is int and not -2 ** 31 <= value < 2 ** 31:
        raise ProtocolError(f"{action}: field {name!r} is out of range")


def _frame(obj):
    body = dumps(obj).encode("ascii")
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
    return len(body).to_bytes(4, "big") + body


def encode_request(req):
    return _frame(dict(req.fields(), v=VERSION, action=req.ACTION))


def encode_reply(reply):
    """A reply record -> the bytes of its frame(s)."""
    if isinstance(reply, ErrorReply):
        return _frame({"v": VERSION, "ok": False, "code": reply.code, "message": reply.message})
    if isinstance(reply, Stream):
        return b"".join(_stream_frames(reply))
    return _frame(dict(reply.data, v=VERSION, ok=True))


def _stream_frames(stream):
    """Frames of at most STREAM_CHUNK bytes; the head in the first, list items packed in order."""
    frame = dict(stream.head, v=VERSION, ok=True, **{k: [] for k in stream.lists})
    size = len(dumps(frame))
    for key, items in stream.lists.items():
        for item in items:
            n = len(dumps(item)) + 1
            if n + 64 > STREAM_CHUNK:
                raise ProtocolError(f"one {key} entry of {n} bytes cannot fit a frame")
            if size + n > STREAM_CHUNK:
                frame["more"] = True
                yield _frame(frame)
                frame = {"v": VERSION, "ok": True, **{k: [] for k in stream.lists}}
                size = len(dumps(frame))
            frame[key].append(item)
            size += n
    yield _frame(frame)


def body_length(header):
    """The body length a 4-byte header announces; raises ProtocolError when out of bounds."""
    if len(header) != 4:
        raise ProtocolError("connection closed inside a frame header")
    n = int.from_bytes(header, "big")
    if not 1 <= n <= MAX_FRAME:
        raise ProtocolError(f"frame length {n} is outside 1..{MAX_FRAME}")
    return n


def _load(body):
    try:
        obj = loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError("frame body is not UTF-8 JSON (or nests too deep)") from None
    if not isinstance(obj, dict):
        raise ProtocolError("frame body is not a JSON object")
    v = obj.get("v")
    if type(v) is not int or v != VERSION:  # 2.0 and true are no version 2
        raise ProtocolError(f"protocol version {_show(v)} is not supported (this side speaks {VERSION})",
                            code=E_UNSUPPORTED_VERSION)
    return obj


def decode_request(body):
    """Body bytes -> request record. Raises ProtocolError (with the reason) on anything malformed."""
    obj = _load(body)
    action = obj.pop("action", None)
    cls = REQUESTS.get(action) if isinstance(action, str) else None
    if cls is None:
        raise ProtocolError(f"unknown action {_show(action)}", code=E_UNKNOWN_ACTION)
    obj.pop("v")
    for key in obj:
        if key not in cls.FIELDS:
            raise ProtocolError(f"{cls.ACTION}: unknown field {_show(key)}")
    return cls(**obj)


def decode_reply(body):
    """Body bytes -> (Reply or ErrorReply, more): `more` says another frame of it follows."""
    obj = _load(body)
    if obj.get("ok") is True:
        more = obj.pop("more", False) is True
        return Reply({k: v for k, v in obj.items() if k not in ("v", "ok")}), more
    if obj.get("ok") is False:
        return ErrorReply(str(obj.get("code", E_INTERNAL)), str(obj.get("message", ""))), False
    raise ProtocolError("reply has no 'ok' field")


def join_replies(first, rest):
    """One reply from a stream's frames: list fields concatenated, other fields from the first."""
    data = dict(first.data)
    for part in rest:
        for key, value in part.data.items():
            if isinstance(value, list) and isinstance(data.get(key), list):
                data[key] = data[key] + value
    return Reply(data)


# -- session environment -------------------------------------------------------------------------

# Static keys inherited from elsewhere would shadow rolegate's file (botocore reads the
# environment first), so a session never keeps them.
STATIC_KEY_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
# Variables rolegate itself sets; unset when they point into runtime_dir but no grant is live.
CONTAINER_TOKEN_VAR = "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"
POINTER_VARS = ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", CONTAINER_TOKEN_VAR)
# Set beside the token file (delivery container), and unset with it.
CONTAINER_URI_VAR = "AWS_CONTAINER_CREDENTIALS_FULL_URI"
