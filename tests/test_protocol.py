"""The wire protocol's codec: the C JSON codec driven directly agrees with `json`, streams rejoin whole,
and requests are typed both ways. Pure logic; the real doors are exercised in the other modules."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pam_rolegate.hookside import protocol
from pam_rolegate.errors import ProtocolError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2 ** 63, max_value=2 ** 63) | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_protocol__codec_agrees_with_the_json_module(value):
    text = protocol.dumps(value)
    assert text.isascii(), f"encoded text must be ASCII (a reply can never fail to encode): {text!r}"
    assert json.loads(text) == value, f"json reads back something else from {text!r}"
    assert protocol.loads(json.dumps(value)) == value, f"protocol.loads misreads {json.dumps(value)!r}"


@pytest.mark.parametrize("text", ["", " ", "NaN", "Infinity", "-Infinity", "{} x", "[1,]", "{'a': 1}", "\"\x01\"",
                                  "[" * 100000])
def test_protocol__loads_refuses_what_is_not_exactly_one_json_value(text):
    with pytest.raises((ValueError, RecursionError)):
        protocol.loads(text)


def test_protocol__status_stream_rejoins_every_item_across_frames():
    grants = [{"grant": f"g{i}", "principal": "ü" * 40, "role": "arn:aws:iam::123456789012:role/x"} for i in range(2000)]
    sessions = [{"id": f"s{i}", "grant": f"g{i % 2000}", "pid": i} for i in range(10000)]
    data = protocol.encode_reply(protocol.Stream({"delivery": "file"}, {"grants": grants, "sessions": sessions}))
    parts, offset = [], 0
    while offset < len(data):
        n = protocol.body_length(data[offset:offset + 4])
        assert n <= protocol.MAX_FRAME, f"a stream frame of {n} bytes exceeds the frame limit"
        reply, more = protocol.decode_reply(data[offset + 4:offset + 4 + n])
        parts.append(reply)
        offset += 4 + n
        assert more == (offset < len(data)), f"frame {len(parts)} says more={more} at offset {offset}/{len(data)}"
    assert len(parts) > 1, "10,000 sessions should not fit one frame; the test proves nothing"
    whole = protocol.join_replies(parts[0], parts[1:])
    assert whole.get("grants") == grants and whole.get("sessions") == sessions, "items were lost or reordered"
    assert whole.get("delivery") == "file", f"the head fields were lost: {whole.data.keys()}"


@pytest.mark.parametrize("body,why", [
    (b'{"v":2,"action":["open_session"]}', "unknown action"),
    (b'{"v":2,"action":{"a":1}}', "unknown action"),
    (b'{"v":2,"action":"credentials","grant":"\\ud800"}', "not a reasonable string"),
    (b'{"v":2,"action":"credentials","grant":"a\\u0000b"}', "not a reasonable string"),
    (b'{"v":2,"action":"open_session","user":"a","service":"s","pid":true}', "must be int"),
    (b'{"v":2,"action":"open_session","user":"a","service":"s","pid":1e3}', "must be int"),
    (b'{"v":2,"action":"open_session","user":"a","service":"s","pid":99999999999}', "out of range"),
    (b'{"v":2,"action":"open_session","user":"a","pid":1}', "missing field"),
    (b'{"v":2,"action":"ping","extra":1}', "unknown field"),
    (b'{"v":true,"action":"ping"}', "version"),
    (b'{"v":1,"action":"ping"}', "version"),
    (b'\xff\xfe', "not UTF-8 JSON"),
    (b'[1,2]', "not a JSON object"),
])
def test_protocol__malformed_requests_are_refused_with_the_reason(body, why):
    with pytest.raises(ProtocolError) as err:
        protocol.decode_request(body)
    assert why in str(err.value), f"{body!r}: expected a reason containing {why!r}, got {err.value}"
    protocol.encode_reply(protocol.ErrorReply(protocol.E_BAD_REQUEST, str(err.value)))  # the reply encodes


def test_protocol__requests_round_trip_and_type_check_on_construction():
    req = protocol.OpenSession(user="alice", service="sshd", pid=42, rhost="10.0.0.1", budget_ms=2500)
    assert protocol.decode_request(protocol.encode_request(req)[4:]) == req, "open_session did not round-trip"
    with pytest.raises(ProtocolError):
        protocol.OpenSession(user="alice", service="sshd", pid="42")
