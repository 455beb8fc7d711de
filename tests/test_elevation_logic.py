"""The elevation coordinator's rules, fast: a scripted PAM conversation and a registry stand-in.
tests/test_elevate.py runs the same behaviour with real PAM, sshd and the stand-in STS."""

import threading
import time
import types

import pytest

from pam_rolegate.backends import pamauth
from pam_rolegate.core import elevation as el
from pam_rolegate.hookside import protocol
from pam_rolegate.rules import config
from test_registry import DecisionLog as Log

RULE = config.Rule(index=1, line=1, match=config.Match(), role="arn:aws:iam::123456789012:role/admin",
                   profile="admin", elevate=config.Elevate())
APPROVED_RULE = config.Rule(index=2, line=2, match=config.Match(), role="arn:aws:iam::123456789012:role/prod",
                            profile="prod", elevate=config.Elevate(approvers="root"))


class Registry:
    """What the coordinator asks of the registry: a login grant of `alice` (uid 1000), its rules."""

    def __init__(self, rules=(RULE, APPROVED_RULE)):
        self.grant = types.SimpleNamespace(id="view-1", principal="alice", principal_uid=1000, target_uid=1000)
        self.rules = {r.profile: r for r in rules}
        self.elevated = []

    def view(self, key, uid):
        return self.grant if key == self.grant.id and uid in (0, self.grant.target_uid) else None

    def on_demand_rule(self, view, profile):
        return self.rules.get(profile), None, 0

    def elevate(self, view_key, uid, profile, reason, seconds, rid, approved_by=None, expected=None):
        rule = self.rules.get(profile)
        if rule is None or expected is not None and (rule.role, rule.elevate) != (expected.role, expected.elevate):
            return None
        self.elevated.append((profile, reason, seconds, approved_by))
        return types.SimpleNamespace(until=time.time() + seconds)


def scripted(password="right"):
    """A PAM stack that asks one hidden question and says yes to `password`."""
    def authenticate(user, converse):
        answer = converse("echo_off", "Password: ")
        if answer != password:
            time.sleep(0.05)
            raise pamauth.Refused(7, "Authentication failure")
    return authenticate


def wait_state(coord, uid, rid, states, timeout=5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = coord.poll(uid, rid)
        if reply["state"] in states:
            return reply
        time.sleep(0.01)
    raise AssertionError(f"request {rid} never reached {states}: {coord.poll(uid, rid)}")


def prompt_of(coord, rid):
    reply = wait_state(coord, 1000, rid, ("prompt",))
    return reply["prompt"]


def test_elevation__a_wrong_answer_then_a_cancel_still_counts_as_a_failure():
    coord = el.Elevations(Registry(), Log(), authenticate=scripted())
    first = coord.start(1000, "view-1", "admin", "INC-1", None)
    coord.poll(1000, first["id"], answer="guess", prompt=prompt_of(coord, first["id"]))
    coord.poll(1000, first["id"], cancel=True)  # at once, while PAM still weighs the guess
    wait_state(coord, 1000, first["id"], ("denied",))
    with pytest.raises(el.Refusal) as refused:
        coord.start(1000, "view-1", "admin", "INC-1", None)
    assert refused.value.code == protocol.E_LIMITED and "try again in" in str(refused.value), \
        "a guess followed by a cancel escaped the back-off"


def test_elevation__a_cancel_before_any_answer_is_no_failure_and_frees_the_slot():
    coord = el.Elevations(Registry(), Log(), authenticate=scripted())
    first = coord.start(1000, "view-1", "admin", "INC-1", None)
    prompt_of(coord, first["id"])
    coord.poll(1000, first["id"], cancel=True)
    assert wait_state(coord, 1000, first["id"], ("denied",))["message"] == "cancelled"
    second = coord.start(1000, "view-1", "admin", "INC-2", None)  # no back-off, a slot free
    coord.poll(1000, second["id"], answer="right", prompt=prompt_of(coord, second["id"]))
    assert wait_state(coord, 1000, second["id"], ("granted",))["state"] == "granted"


def test_elevation__an_answer_for_another_prompt_is_refused():
    coord = el.Elevations(Registry(), Log(), authenticate=scripted())
    rid = coord.start(1000, "view-1", "admin", "INC-1", None)["id"]
    number = prompt_of(coord, rid)
    with pytest.raises(el.Refusal):
        coord.poll(1000, rid, answer="right", prompt=number + 1)
    coord.poll(1000, rid, cancel=True)


def test_elevation__only_the_requesters_uid_may_read_answer_or_cancel():
    coord = el.Elevations(Registry(), Log(), authenticate=scripted())
    rid = coord.start(1000, "view-1", "admin", "INC-1", None)["id"]
    for kw in ({}, {"answer": "right", "prompt": 1}, {"cancel": True}):
        with pytest.raises(el.Refusal) as refused:
            coord.poll(1001, rid, **kw)
        assert refused.value.code == protocol.E_NO_GRANT, kw
    coord.poll(1000, rid, cancel=True)


def test_elevation__another_person_on_a_shared_account_cannot_make_the_broker_ask_pam_for_alice():
    registry = Registry()
    registry.grant.target_uid = 2000  # alice's `sudo -u svc` session: it runs as svc (uid 2000)
    coord = el.Elevations(registry, Log(), authenticate=scripted())
    with pytest.raises(el.Refusal) as refused:
        coord.start(2000, "view-1", "admin", "INC-1", None)
    assert refused.value.code == protocol.E_FORBIDDEN and "alice" in str(refused.value), refused.value


def test_elevation__refusals_before_pam_carry_what_the_denied_line_names():
    """The door writes one `denied: action=elevate` line per refusal from Refusal.fields (tested
    with the real broker in test_elevate_refusals.py): the login's person, the role once a rule is
    known, when to retry inside the back-off."""
    registry = Registry()
    coord = el.Elevations(registry, Log(), authenticate=scripted())
    cases = [("not the person", 2000, "admin", "INC-1", None, {"principal": "alice"}),
             ("no such profile", 1000, "nosuch", "INC-1", None, {"principal": "alice"}),
             ("no reason", 1000, "admin", "", None, {"principal": "alice", "role": RULE.role}),
             ("--for too long", 1000, "admin", "INC-1", 7200, {"principal": "alice", "role": RULE.role})]
    for what, uid, profile, reason, seconds, fields in cases:
        registry.grant.target_uid = uid  # 2000: alice's `sudo -u svc` session
        with pytest.raises(el.Refusal) as refused:
            coord.start(uid, "view-1", profile, reason, seconds)
        assert refused.value.fields == fields, f"{what}: the refusal should name {fields}, got {refused.value.fields}"
    registry.grant.target_uid = 1000
    rid = coord.start(1000, "view-1", "admin", "INC-1", None)["id"]
    coord.poll(1000, rid, answer="wrong", prompt=prompt_of(coord, rid))
    wait_state(coord, 1000, rid, ("denied",))
    with pytest.raises(el.Refusal) as refused:
        coord.start(1000, "view-1", "admin", "INC-1", None)
    assert refused.value.fields.get("retry_in", "").endswith("s"), \
        f"a retry inside the back-off should say when to retry: {refused.value.fields}"


def test_elevation__a_second_request_for_the_same_profile_waits_its_turn():
    coord = el.Elevations(Registry(), Log(), authenticate=scripted())
    rid = coord.start(1000, "view-1", "admin", "INC-1", None)["id"]
    with pytest.raises(el.Refusal) as refused:
        coord.start(1000, "view-1", "admin", "INC-2", None)
    assert refused.value.code == protocol.E_LIMITED, refused.value
    coord.poll(1000, rid, cancel=True)


def awaiting_approval(registry):
    """alice's request for `prod`, past PAM, waiting for an approver: (coordinator, request id)."""
    coord = el.Elevations(registry, Log(), authenticate=scripted())
    rid = coord.start(1000, "view-1", "prod", "CHG-1", None)["id"]
    coord.poll(1000, rid, answer="right", prompt=prompt_of(coord, rid))
    wait_state(coord, 1000, rid, ("awaiting-approval",))
    return coord, rid


def test_elevation__the_requester_cannot_approve_even_under_another_name(monkeypatch):
    registry = Registry()
    coord, rid = awaiting_approval(registry)
    # uid 1000 named "alice2" by NSS, in the approvers group: still the requester.
    monkeypatch.setattr(el.Elevations, "_who", staticmethod(lambda uid: ((uid, "alice2"), ("root",))))
    with pytest.raises(el.Refusal):
        coord.approve(1000, rid)
    assert registry.elevated == [], "STS was called on the requester's own approval"
    monkeypatch.setattr(el.Elevations, "_who", staticmethod(lambda uid: ((uid, "carol"), ("root",))))
    coord.approve(1002, rid)
    assert wait_state(coord, 1000, rid, ("granted",))["state"] == "granted"
    assert registry.elevated == [("prod", "CHG-1", 1800, "carol")], registry.elevated


def test_elevation__a_rules_change_while_waiting_for_approval_grants_nothing(monkeypatch):
    registry = Registry()
    coord, rid = awaiting_approval(registry)
    registry.rules["prod"] = APPROVED_RULE.__class__(**{**APPROVED_RULE.__dict__,
                                                       "elevate": config.Elevate(approvers="root", max=900)})
    monkeypatch.setattr(el.Elevations, "_who", staticmethod(lambda uid: ((uid, "carol"), ("root",))))
    coord.approve(1002, rid)
    reply = wait_state(coord, 1000, rid, ("failed",))
    assert registry.elevated == [] and "rules changed" in reply["message"], reply


def test_elevation__a_uid_holds_two_requests_at_most_and_the_rest_are_refused_at_once():
    registry = Registry(rules=(RULE, APPROVED_RULE, config.Rule(
        index=3, line=3, match=config.Match(), role="arn:aws:iam::123456789012:role/x", profile="x",
        elevate=config.Elevate())))
    coord = el.Elevations(registry, Log(), authenticate=scripted())
    held = [coord.start(1000, "view-1", p, "r", None)["id"] for p in ("admin", "prod")]
    start = time.monotonic()
    with pytest.raises(el.Refusal) as refused:
        coord.start(1000, "view-1", "x", "r", None)
    assert refused.value.code == protocol.E_LIMITED and time.monotonic() - start < 1.0, refused.value
    for rid in held:
        coord.poll(1000, rid, cancel=True)
    assert threading.active_count() < 50
