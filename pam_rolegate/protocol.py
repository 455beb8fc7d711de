"""The broker's wire protocol: the one definition that the hook, the CLI and the broker share.

Standard library only (the PAM hook imports it inside sshd). Nothing else encodes or decodes.

Grammar
-------
A connection carries one request and one reply, each one FRAME:

    FRAME   = LENGTH BODY
    LENGTH  = 4-byte unsigned big-endian byte count of BODY, 1 .. MAX_FRAME
    BODY    = UTF-8 JSON object

    request = {"v": VERSION, "action": ACTION, FIELD...}
    reply   = {"v": VERSION, "ok": true, FIELD...}
            | {"v": VERSION, "ok": false, "code": ERROR_CODE, "message": TEXT}

Actions and their fields (? = optional). The broker takes the caller's uid and pid from
SO_PEERCRED, never from the message; actions marked [root] are refused to other callers.

    ping                                        -> version, pid
    open_session  [root]  user, service, pid, ruser?, rhost?, tty?, budget_ms?
                                                -> granted, session?, role?, env, reason
    close_session [root]  session?, pid?        -> released (count of sessions closed)
    env                                         -> granted, role?, grant?, env, reason, runtime_dir
    credentials   grant?                        -> Version, AccessKeyId, SecretAccessKey,
                                                   SessionToken, Expiration (credential_process)
    status                                      -> grants (list of objects)

`env` and `credentials` always concern the caller's own account; without `grant` they use
the caller's own grant as service "shell" (PAM-less shells: SSM Session Manager, su -l).

Version history
---------------
1  2026-11-28  first version: ping, open_session, close_session, env, credentials, status.
"""

import dataclasses
import json
import struct
from dataclasses import dataclass, field, fields
from typing import Dict, Optional, Tuple

from .errors import ProtocolError

VERSION = 1
MAX_FRAME = 64 * 1024
_LENGTH = struct.Struct(">I")

# Error codes a reply may carry.
E_BAD_REQUEST = "bad_request"
E_UNSUPPORTED_VERSION = "unsupported_version"
E_UNKNOWN_ACTION = "unknown_action"
E_FORBIDDEN = "forbidden"
E_UNKNOWN_USER = "unknown_user"
E_NO_GRANT = "no_grant"
E_STS_FAILED = "sts_failed"
E_STORE_FAILED = "store_failed"
E_BUSY = "busy"
E_INTERNAL = "internal"


# -- records -------------------------------------------------------------------------------------
# Each request record names its action; its fields are the JSON fields. Types are checked on
# decode, so a handler never sees a list where it expects a name.


@dataclass(frozen=True)
class Ping:
    ACTION = "ping"


@dataclass(frozen=True)
class OpenSession:
    ACTION = "open_session"
    user: str
    service: str
    pid: int
    ruser: Optional[str] = None
    rhost: Optional[str] = None
    tty: Optional[str] = None
    budget_ms: Optional[int] = None  # what is left of the hook's time budget


@dataclass(frozen=True)
class CloseSession:
    ACTION = "close_session"
    session: Optional[str] = None
    pid: Optional[int] = None


@dataclass(frozen=True)
class Env:
    ACTION = "env"


@dataclass(frozen=True)
class GetCredentials:
    ACTION = "credentials"
    grant: Optional[str] = None


@dataclass(frozen=True)
class Status:
    ACTION = "status"


REQUESTS = {cls.ACTION: cls for cls in (Ping, OpenSession, CloseSession, Env, GetCredentials, Status)}
_TYPES = {str: str, int: int, Optional[str]: str, Optional[int]: int}


@dataclass(frozen=True)
class Reply:
    """A successful reply: `data` holds the action's fields."""

    data: Dict[str, object] = field(default_factory=dict)

    def get(self, key, default=None):
        return self.data.get(key, default)


@dataclass(frozen=True)
class ErrorReply:
    code: str
    message: str


# -- codec ---------------------------------------------------------------------------------------


def _frame(obj):
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
    return _LENGTH.pack(len(body)) + body


def encode_request(req):
    obj = {"v": VERSION, "action": req.ACTION}
    for f in fields(req):
        value = getattr(req, f.name)
        if value is not None:
            obj[f.name] = value
    return _frame(obj)


def encode_reply(reply):
    if isinstance(reply, ErrorReply):
        return _frame({"v": VERSION, "ok": False, "code": reply.code, "message": reply.message})
    return _frame(dict(reply.data, v=VERSION, ok=True))


def body_length(header):
    """The body length a 4-byte header announces; raises ProtocolError when out of bounds."""
    if len(header) != _LENGTH.size:
        raise ProtocolError("connection closed inside a frame header")
    (n,) = _LENGTH.unpack(header)
    if not 1 <= n <= MAX_FRAME:
        raise ProtocolError(f"frame length {n} is outside 1..{MAX_FRAME}")
    return n


def _load(body):
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError("frame body is not UTF-8 JSON (or nests too deep)") from None
    if not isinstance(obj, dict):
        raise ProtocolError("frame body is not a JSON object")
    if obj.get("v") != VERSION:
        raise ProtocolError(f"protocol version {obj.get('v')!r} is not supported (this side speaks {VERSION})")
    return obj


def decode_request(body):
    """Body bytes -> request record. Raises ProtocolError (with the reason) on anything malformed."""
    obj = _load(body)
    cls = REQUESTS.get(obj.get("action"))
    if cls is None:
        raise ProtocolError(f"unknown action {obj.get('action')!r}")
    kw = {}
    known = {f.name: f for f in fields(cls)}
    for key, value in obj.items():
        if key in ("v", "action"):
            continue
        f = known.get(key)
        if f is None:
            raise ProtocolError(f"{cls.ACTION}: unknown field {key!r}")
        want = _TYPES[f.type]
        if value is not None and (not isinstance(value, want) or isinstance(value, bool)):
            raise ProtocolError(f"{cls.ACTION}: field {key!r} must be {want.__name__}")
        if isinstance(value, str) and ("\0" in value or len(value) > 1024):
            raise ProtocolError(f"{cls.ACTION}: field {key!r} is not a reasonable string")
        kw[key] = value
    missing = [n for n, f in known.items() if n not in kw and f.default is dataclasses.MISSING]
    if missing:
        raise ProtocolError(f"{cls.ACTION}: missing field {missing[0]!r}")
    return cls(**kw)


def decode_reply(body):
    obj = _load(body)
    if obj.get("ok") is True:
        return Reply({k: v for k, v in obj.items() if k not in ("v", "ok")})
    if obj.get("ok") is False:
        return ErrorReply(str(obj.get("code", E_INTERNAL)), str(obj.get("message", "")))
    raise ProtocolError("reply has no 'ok' field")


# -- session environment -------------------------------------------------------------------------

# Static keys inherited from elsewhere would shadow rolegate's file (botocore reads the
# environment first), so a session never keeps them.
STATIC_KEY_VARS: Tuple[str, ...] = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                                    "AWS_SECURITY_TOKEN")
# Variables rolegate itself sets; unset when they point into runtime_dir but no grant is live.
POINTER_VARS: Tuple[str, ...] = ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")
