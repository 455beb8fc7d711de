"""Elevation on demand: a person asks for an on-demand profile with a reason, proves who they are
through the `rolegate` PAM stack (every prompt relayed to their terminal over the user door),
waits for an approver where the rule wants one, and only then does STS get called.

Nothing here blocks a door: the user door's handlers start a request, hand an answer over, or
read what happened since, and return at once; the CLI polls. The PAM conversation runs on a
thread of the request's own, bounded per uid and in all, and each of its waits has a deadline,
so a person who never answers, or floods requests, holds their own slots and nobody else's.
"""

import collections
import pwd
import queue
import secrets
import threading
import time

from ..errors import StsError
from ..hookside import protocol
from ..rules import config as config_mod, mapping, names

PROMPT_TIMEOUT = 60.0  # a prompt unanswered this long ends the attempt (not counted as a failure)
AUTH_DEADLINE = 180.0  # the whole PAM conversation
APPROVAL_WAIT = 300.0  # how long a request waits for an approver
MAX_PER_UID = 2  # requests under way per uid; more are refused at once
MAX_UNDER_WAY = 64  # in all: one thread each while it authenticates or waits for approval
KEEP_DONE = 120.0  # a finished request's outcome stays readable this long (the CLI's last poll)
MAX_EVENTS = 64  # messages kept for a request between polls; a chattier stack loses the oldest
FAILURE_BACKOFF_MAX = 300  # after n failures in a row a uid waits min(2**(n+1), this) seconds: 4, 8, 16...
NO_REASON = "none given"  # the reason tag of an elevation whose rule makes the reason optional


class Refusal(Exception):
    """A request refused before it began (or a poll of one that is not the caller's): `code` is
    the protocol's error code; `fields` what the door's `denied: action=elevate` line names beside
    the caller (the login's principal, the role, when to retry), as far as the refusal knew them."""

    def __init__(self, code, message, **fields):
        self.code = code
        self.fields = {k: v for k, v in fields.items() if v is not None}
        super().__init__(message)


class Request:
    def __init__(self, uid, view, profile, rule, reason, seconds, now):
        self.id = secrets.token_hex(6)
        self.uid = uid
        self.view = view  # the login grant (grants.Grant) it elevates
        self.principal = view.principal
        self.principal_uid = view.principal_uid
        self.rule = rule  # as decided at the start: STS is called only if the rules in force still say so
        self.profile = profile
        self.role = rule.role
        self.approvers = rule.elevate.approvers
        self.reason = reason
        self.seconds = seconds
        self.created = now
        self.state = "authenticating"  # prompt, awaiting-approval, assuming, granted, denied, failed
        self.events = collections.deque(maxlen=MAX_EVENTS)
        self.answers = queue.Queue(maxsize=1)
        self.approval = threading.Event()
        self.cancelled = False
        self.prompt = 0  # the number of the prompt waiting (answers name it: no answer meets another prompt)
        self.answered = 0  # answers handed to PAM: a failure after one counts, cancelled or not
        self.approved_by = None
        self.denied_by = None
        self.verdict = None  # PAM's: "success" or its reason
        self.message = None  # the outcome, for the person
        self.until = None
        self.finished = None

    def details(self):
        return {"id": self.id, "principal": self.principal, "profile": self.profile, "role": self.role,
                "reason": self.reason, "seconds": self.seconds, "state": self.state,
                "approvers": self.approvers}


class Elevations:
    def __init__(self, registry, log, authenticate=None, clock=time.monotonic):
        self.registry = registry
        self.log = log
        self.authenticate = authenticate  # None: backends.pamauth's, loaded at the first elevation
        self.clock = clock
        self._lock = threading.Lock()
        self._requests = {}  # id -> Request (under way, and finished ones for KEEP_DONE)
        self._under_way = collections.Counter()  # uid -> requests not finished
        self._failures = {}  # principal -> (failures in a row, when the last one was)

    # -- the user door's API -----------------------------------------------------------------------

    def start(self, uid, view_key, profile, reason, seconds):
        """Begin an elevation of login grant `view_key`'s on-demand profile `profile`. Returns the
        first reply (id, state, events); raises Refusal."""
        view = self.registry.view(view_key, uid)
        if view is None:
            raise Refusal(protocol.E_NO_GRANT, f"no live login grant {view_key} for uid {uid}; log in again")
        who = {"principal": view.principal}
        if uid not in (0, view.principal_uid):
            # A session running as a shared account (sudo -u svc) belongs to its principal: another
            # person who can act as svc must not make the broker run PAM for them.
            raise Refusal(protocol.E_FORBIDDEN, f"only {view.principal} (or root) may elevate that login; "
                                                f"elevate from a session of your own", **who)
        rule, _ident, _decided = self.registry.on_demand_rule(view, profile)
        if rule is None:
            raise Refusal(protocol.E_FORBIDDEN, f"the rules give your login no on-demand profile {profile!r} "
                                                f"(`rolegate check-user YOUR_NAME` lists the ones you may elevate to)",
                          **who)
        who["role"] = rule.role
        reason = (reason or "").strip()
        if not reason and rule.elevate.reason == "required":
            raise Refusal(protocol.E_BAD_REQUEST, f"profile {profile} needs a reason: rolegate elevate {profile} "
                                                  f"--reason TEXT", **who)
        if reason:
            problem = names.reason_problem(reason)
            if problem:
                raise Refusal(protocol.E_BAD_REQUEST, f"{problem}; nothing was asked of STS", **who)
        seconds = rule.elevate.max if seconds is None else seconds
        if not config_mod.ELEVATE_MIN <= seconds <= rule.elevate.max:
            raise Refusal(protocol.E_BAD_REQUEST, f"--for must be between {config_mod.ELEVATE_MIN // 60}m and "
                                                  f"{rule.elevate.max // 60}m for profile {profile}", **who)
        now = self.clock()
        with self._lock:
            self._forget_finished(now)
            wait = self._backoff_left(view.principal, now)
            if wait > 0:
                raise Refusal(protocol.E_LIMITED, f"too many failed elevations in a row; try again in {wait:.0f}s",
                              retry_in=f"{wait:.0f}s", **who)
            if self._under_way[uid] >= MAX_PER_UID:
                raise Refusal(protocol.E_LIMITED, f"you have {self._under_way[uid]} elevations under way already "
                                                  f"(at most {MAX_PER_UID}); finish or cancel one", **who)
            if sum(self._under_way.values()) >= MAX_UNDER_WAY:
                raise Refusal(protocol.E_LIMITED, "the broker has too many elevations under way; try again shortly",
                              **who)
            if any(r.finished is None and r.view.id == view.id and r.profile == profile
                   for r in self._requests.values()):
                raise Refusal(protocol.E_LIMITED, f"an elevation to {profile} of this login is under way already",
                              **who)
            request = Request(uid, view, profile, rule, reason or NO_REASON, seconds, now)
            self._requests[request.id] = request
            self._under_way[uid] += 1
        try:
            threading.Thread(target=self._run, args=(request,), name=f"elevate-{request.id}", daemon=True).start()
        except RuntimeError as err:  # no thread to be had: give the slot back
            self._finish(request, "failed", f"cannot start: {err}")
        return self._reply(request)

    def poll(self, uid, request_id, answer=None, cancel=False, prompt=None):
        """What happened to request `request_id` since the last poll; `answer` answers prompt number
        `prompt` (the one waiting); `cancel` ends it. Only its own uid may."""
        with self._lock:
            request = self._requests.get(request_id)
        if request is None or request.uid != uid:
            raise Refusal(protocol.E_NO_GRANT, f"no elevation request {request_id} of yours")
        if cancel:
            request.cancelled = True
            request.approval.set()
            self._offer(request, None)
        elif answer is not None:
            if request.state != "prompt" or (prompt is not None and prompt != request.prompt):
                raise Refusal(protocol.E_BAD_REQUEST, "no question is waiting for that answer")
            if not self._offer(request, (request.prompt, answer)):
                raise Refusal(protocol.E_BAD_REQUEST, "an answer is already on its way")
        return self._reply(request)

    def approve(self, uid, request_id, deny=False):
        """Approve (or deny) a request waiting for a member of its approvers group other than the
        person who asked. Returns its details."""
        name, groups = self._who(uid)
        with self._lock:
            request = self._requests.get(request_id)
        if request is None or not self._may_approve(request, name, groups):
            raise Refusal(protocol.E_FORBIDDEN, f"no elevation request {request_id} that you may approve "
                                                f"(members of its approvers group, not the person asking)")
        if request.state != "awaiting-approval":
            raise Refusal(protocol.E_BAD_REQUEST, f"request {request_id} is {request.state}, not waiting for approval")
        if deny:
            request.denied_by = name[1]
        else:
            request.approved_by = name[1]
        request.approval.set()
        return request.details()

    def pending_for(self, uid):
        """Requests waiting for an approval `uid` may give."""
        name, groups = self._who(uid)
        with self._lock:
            requests = list(self._requests.values())
        return [r.details() for r in requests if r.state == "awaiting-approval" and self._may_approve(r, name, groups)]

    # -- one request -----------------------------------------------------------------------------

    def _run(self, request):
        deadline = self.clock() + AUTH_DEADLINE
        try:
            from ..backends import pamauth  # pamela loads libpam: only a broker that elevates needs it

            authenticate = self.authenticate or pamauth.authenticate

            def converse(style, text):
                if request.cancelled:
                    return None
                if style not in ("echo_off", "echo_on"):
                    request.events.append({"kind": style, "text": text})
                    return None
                while True:  # an answer left over from an earlier prompt is never this one's
                    try:
                        request.answers.get_nowait()
                    except queue.Empty:
                        break
                request.prompt += 1
                request.events.append({"kind": style, "text": text, "prompt": request.prompt})
                request.state = "prompt"
                while True:
                    try:
                        got = request.answers.get(timeout=max(min(PROMPT_TIMEOUT, deadline - self.clock()), 0))
                    except queue.Empty:
                        request.cancelled = True
                        request.message = f"no answer within {PROMPT_TIMEOUT:g}s"
                        return None
                    if got is None:  # cancelled
                        return None
                    number, answer = got
                    if number == request.prompt:
                        break
                request.state = "authenticating"
                request.answered += 1
                return answer

            try:
                authenticate(request.principal, converse)
                request.verdict = "success"
            except pamauth.Refused as err:
                request.verdict = err.reason
                # A failure after an answer counts, cancelled or not: a guess then a cancel must not
                # escape the back-off. One that never got an answer (unanswered, cancelled) does not.
                counted = request.answered > 0
                message = f"authentication failed: {err.reason}" if counted else request.message or "cancelled"
                self._finish(request, "denied", message, counted=counted)
                return
            if request.cancelled:
                self._finish(request, "denied", "cancelled")
                return
            if request.approvers:
                request.state = "awaiting-approval"
                if not request.approval.wait(APPROVAL_WAIT) or request.cancelled:
                    message = "cancelled" if request.cancelled else f"nobody approved it within {APPROVAL_WAIT:g}s"
                    self._finish(request, "denied", message, counted=False)
                    return
                if request.denied_by:
                    self._finish(request, "denied", f"denied by {request.denied_by}", counted=False)
                    return
            if request.cancelled:
                self._finish(request, "denied", "cancelled")
                return
            request.state = "assuming"
            try:
                elevation = self.registry.elevate(request.view.id, request.uid, request.profile, request.reason,
                                                  request.seconds, request.id, approved_by=request.approved_by,
                                                  expected=request.rule)
            except StsError as err:
                self._finish(request, "failed", f"STS refused the role: {getattr(err, 'code', '')}: {err}")
                return
            if elevation is None:
                self._finish(request, "failed", "your session ended or the rules changed; nothing was granted")
                return
            request.until = elevation.until
            self.log.decision("elevated", principal=request.principal, profile=request.profile, role=request.role,
                              reason=request.reason, until=_iso(elevation.until), elevation=request.id,
                              pam=request.verdict, approved_by=request.approved_by, seconds=request.seconds)
            self._finish(request, "granted", f"{request.profile} is {request.role} until {_iso(elevation.until)}")
        except Exception as err:  # a bug ends this request, never the broker
            self.log.error(f"elevation {request.id}: {type(err).__name__}: {err}")
            if request.finished is None:
                self._finish(request, "failed", f"internal error: {type(err).__name__}")

    def _finish(self, request, state, message, counted=False):
        now = self.clock()
        with self._lock:
            request.state, request.message, request.finished = state, message, now
            self._under_way[request.uid] -= 1
            if self._under_way[request.uid] <= 0:
                del self._under_way[request.uid]
            if state == "granted":
                self._failures.pop(request.principal, None)
            elif counted:
                count, _last = self._failures.get(request.principal, (0, 0.0))
                self._failures[request.principal] = (count + 1, now)
            retry_in = self._backoff_left(request.principal, now)
        if state != "granted":
            self.log.decision("denied" if state == "denied" else "failed", action="elevate",
                              principal=request.principal, profile=request.profile, role=request.role,
                              reason=message, pam=request.verdict, elevation=request.id,
                              retry_in=f"{retry_in:.0f}s" if retry_in > 0 else None)

    # -- helpers ---------------------------------------------------------------------------------

    @staticmethod
    def _offer(request, answer):
        try:
            request.answers.put_nowait(answer)
            return True
        except queue.Full:
            return False

    def _reply(self, request):
        events = []
        while request.events and len(events) < MAX_EVENTS:
            events.append(request.events.popleft())
        reply = request.details()
        reply.update(events=events, message=request.message, prompt=request.prompt if request.state == "prompt" else None,
                     until=_iso(request.until) if request.until else None)
        return reply

    def _backoff_left(self, principal, now):
        count, last = self._failures.get(principal, (0, 0.0))
        return 0 if not count else last + min(2 ** (count + 1), FAILURE_BACKOFF_MAX) - now

    def _forget_finished(self, now):
        for rid in [r for r, q in self._requests.items() if q.finished is not None and now - q.finished > KEEP_DONE]:
            del self._requests[rid]

    @staticmethod
    def _who(uid):
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            return None, ()
        return (uid, pw.pw_name), mapping.user_groups(pw.pw_name, pw.pw_gid)

    @staticmethod
    def _may_approve(request, who, groups):
        """A member of the approvers group who is not the requester, by uid as well as by name (one
        person may have several names for one uid, through NSS)."""
        if not request.approvers or who is None:
            return False
        uid, name = who
        return uid not in (request.uid, request.principal_uid) and name != request.principal \
            and request.approvers in groups


def _iso(epoch):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
