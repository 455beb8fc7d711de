"""names.py: any text becomes a valid, unique STS name; tag values are always valid; STS limits are enforced."""

import hashlib
import re
import string
import unicodedata

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pam_rolegate.rules import names
from pam_rolegate.errors import InvalidRequest, StsError

# AWS's own rule for RoleSessionName / SourceIdentity, with ASCII \w as STS means it.
STS_NAME_RE = re.compile(r"[\w+=,.@-]{2,64}", re.ASCII)
PLAIN = set(string.ascii_letters + string.digits + "_,.@-")  # copied through unchanged, per the docstring

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)))
LONG_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=60, max_size=2000)
ANY_TEXT = TEXT | LONG_TEXT
PLAIN_TEXT = st.text(alphabet=sorted(PLAIN), max_size=120)
EXAMPLES = settings(max_examples=200, deadline=None)


def reference_encoding(text):
    """The full, untruncated encoding the docstring describes (plain chars kept, others as =XX of UTF-8)."""
    return "".join(c if c in PLAIN else "".join("=%02X" % b for b in c.encode("utf-8")) for c in text)


def decode(name):
    """Invert sts_name for a name that was not hashed: drop '+' padding, turn =XX back into bytes."""
    body = name.rstrip("+")
    assert "+" not in body, f"an unhashed name may carry '+' only as trailing padding: {name!r}"
    out, i = bytearray(), 0
    while i < len(body):
        if body[i] == "=":
            out.append(int(body[i + 1:i + 3], 16))
            i += 3
        else:
            out += body[i].encode("ascii")
            i += 1
    return out.decode("utf-8")


def is_hashed(name):
    return len(name) == names.NAME_MAX and name[names.NAME_MAX - 17] == "+"


def tag_char_ok(ch):
    """AWS: Unicode letters, digits, whitespace (\\p{Z}) and _.:/=+-@."""
    return ch in "_.:/=+-@" or unicodedata.category(ch)[0] in ("L", "N", "Z")


# -- sts_name ----------------------------------------------------------------------------------


@EXAMPLES
@given(ANY_TEXT)
def test_names__sts_name_of_any_text_is_a_valid_sts_name(text):
    name = names.sts_name(text)
    assert names.is_sts_name(name), f"sts_name({text!r}) = {name!r} fails is_sts_name"
    assert STS_NAME_RE.fullmatch(name), f"sts_name({text!r}) = {name!r} fails STS's [\\w+=,.@-]{{2,64}}"
    assert not name.lower().startswith("aws:"), f"sts_name({text!r}) = {name!r} uses the reserved aws: prefix"


@EXAMPLES
@given(ANY_TEXT)
def test_names__sts_name_is_deterministic(text):
    assert names.sts_name(text) == names.sts_name(text), f"sts_name({text!r}) differs between two calls"


@EXAMPLES
@given(ANY_TEXT)
def test_names__sts_name_is_decodable_or_hashed(text):
    """One-to-one by construction: short results decode back to the text; long ones carry the text's hash."""
    name = names.sts_name(text)
    full = reference_encoding(text)
    if len(full) <= names.NAME_MAX:
        assert not is_hashed(name), f"sts_name({text!r}) = {name!r} was hashed although it fits"
        assert decode(name) == text, f"sts_name({text!r}) = {name!r} decodes to {decode(name)!r}"
    else:
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
        assert is_hashed(name), f"sts_name of a {len(full)}-char encoding should be hashed, got {name!r}"
        assert name[-16:] == digest, f"sts_name({text!r}) should end with the text's hash {digest}, got {name!r}"
        assert name[:names.NAME_MAX - 17] == full[:names.NAME_MAX - 17], \
            f"sts_name({text!r}) = {name!r} should keep the encoding's first 47 characters ({full[:47]!r})"


@EXAMPLES
@given(ANY_TEXT, ANY_TEXT)
def test_names__sts_name_is_one_to_one_over_pairs(a, b):
    assume(a != b)
    assert names.sts_name(a) != names.sts_name(b), f"{a!r} and {b!r} both map to {names.sts_name(a)!r}"


@st.composite
def near_pairs(draw):
    """Two different texts that differ in one place: the hard case for an encoding that loses information."""
    a = draw(ANY_TEXT | PLAIN_TEXT)
    pos = draw(st.integers(0, len(a)))
    ch = draw(st.characters(blacklist_categories=("Cs",)) | st.sampled_from("+=3D_-.@ "))
    edit = draw(st.sampled_from(["insert", "replace", "delete"]))
    if edit == "insert" or not a:
        b = a[:pos] + ch + a[pos:]
    elif edit == "replace":
        pos = min(pos, len(a) - 1)
        b = a[:pos] + ch + a[pos + 1:]
    else:
        pos = min(pos, len(a) - 1)
        b = a[:pos] + a[pos + 1:]
    return a, b


@EXAMPLES
@given(near_pairs())
def test_names__sts_name_is_one_to_one_for_texts_differing_in_one_place(pair):
    a, b = pair
    assume(a != b)
    assert names.sts_name(a) != names.sts_name(b), f"{a!r} and {b!r} both map to {names.sts_name(a)!r}"


PREFIX = "p" * 60
COLLISION_CANDIDATES = [
    ("a", "a+"), ("a", "a=2B"), ("a=", "a=3D"), ("=", "=3D"), ("", "+"), ("", "++"), ("+", "++"),
    ("ab", "a b"), ("a b", "a_b"), ("a b", "a=20b"), ("\u00e9", "e\u0301"), ("\u00e9", "=C3=A9"),
    (PREFIX + "a" * 10, PREFIX + "b" * 10), (PREFIX + "aaaa", PREFIX + "aaab"),  # 64 vs 64, unhashed
    ("x" * 64, "x" * 65), ("x" * 65, "x" * 66), (PREFIX + "\u00e9", PREFIX + "e\u0301"),
    ("x" * 47 + "+" + "0" * 16, "x" * 80),
]


@pytest.mark.parametrize("a, b", COLLISION_CANDIDATES)
def test_names__sts_name_separates_lookalike_texts(a, b):
    na, nb = names.sts_name(a), names.sts_name(b)
    assert na != nb, f"{a!r} and {b!r} both map to {na!r}"
    assert names.is_sts_name(na) and names.is_sts_name(nb), f"invalid name among {na!r}, {nb!r}"


@pytest.mark.parametrize("plain", ["alice", "bob.smith", "svc_backup", "j-doe", "ops@example.com",
                                   "alice@host-1.example.com", "a,b", "ab", "x" * 64])
def test_names__plain_names_pass_through_unchanged(plain):
    assert names.sts_name(plain) == plain, f"plain name {plain!r} became {names.sts_name(plain)!r}"


@EXAMPLES
@given(PLAIN_TEXT.filter(lambda t: 2 <= len(t) <= 64))
def test_names__any_plain_text_of_valid_length_passes_through(plain):
    assert names.sts_name(plain) == plain, f"plain name {plain!r} became {names.sts_name(plain)!r}"


@pytest.mark.parametrize("text, expected", [
    ("", "++"), ("a", "a+"), ("+", "=2B"), ("=", "=3D"), ("a b", "a=20b"), ("\u00e9", "=C3=A9"),
    ("aws:admin", "aws=3Aadmin"), ("domain\\alice", "domain=5Calice"),
])
def test_names__sts_name_examples(text, expected):
    assert names.sts_name(text) == expected, f"sts_name({text!r}) should be {expected!r}, got {names.sts_name(text)!r}"


def test_names__long_name_is_cut_to_64_with_a_hash():
    text = "x" * 65
    name = names.sts_name(text)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    assert name == "x" * 47 + "+" + digest, f"65 x's should become 47 x's + '+' + hash, got {name!r}"


@pytest.mark.parametrize("name, ok", [
    ("ab", True), ("a" * 64, True), ("a+", True), ("=3D", True), ("a", False), ("", False), ("a" * 65, False),
    ("a b", False), ("a:b", False), ("\u00e9\u00e9", False), ("a/b", False),
])
def test_names__is_sts_name_follows_the_sts_rule(name, ok):
    assert names.is_sts_name(name) is ok, f"is_sts_name({name!r}) should be {ok}"
    assert bool(STS_NAME_RE.fullmatch(name)) is ok, f"test oracle disagrees for {name!r}"


# -- tags --------------------------------------------------------------------------------------


@EXAMPLES
@given(ANY_TEXT)
def test_names__tag_value_output_always_passes_tag_rules(text):
    value = names.tag_value(text)
    assert len(value) <= names.TAG_VALUE_MAX, f"tag_value({text!r}) is {len(value)} characters"
    bad = [c for c in value if not tag_char_ok(c)]
    assert not bad, f"tag_value({text!r}) = {value!r} keeps disallowed characters {bad!r}"
    assert names.tag_value(value) == value, f"tag_value is not idempotent on {value!r}"
    try:
        names.check_request(None, None, {"k": value}, [], None)
    except InvalidRequest as err:
        raise AssertionError(f"check_request refused tag_value({text!r}) = {value!r}: {err}")


@EXAMPLES
@given(ANY_TEXT)
def test_names__tag_value_keeps_length_and_valid_characters(text):
    value = names.tag_value(text)
    assert len(value) == min(len(text), names.TAG_VALUE_MAX), \
        f"tag_value should replace characters one for one and cut at 256, got {len(value)} from {len(text)}"
    for original, kept in zip(text, value):
        expected = original if tag_char_ok(original) else "_"
        assert kept == expected, f"tag_value turned {original!r} into {kept!r}, expected {expected!r}"


@pytest.mark.parametrize("text, expected", [
    ("host-1.example.com", "host-1.example.com"), ("a b", "a b"), ("a*b", "a_b"), ("tab\there", "tab_here"),
    ("caf\u00e9 \u65e5\u672c", "caf\u00e9 \u65e5\u672c"), ("", ""), ("x" * 300, "x" * 256), ("k=v/+@:", "k=v/+@:"),
])
def test_names__tag_value_examples(text, expected):
    assert names.tag_value(text) == expected, f"tag_value({text!r}) should be {expected!r}, got {names.tag_value(text)!r}"


@pytest.mark.parametrize("key, fragment", [
    ("aws:x", "aws:"), ("AWS:Project", "aws:"), ("Aws:x", "aws:"), ("k" * 129, "1-128"), ("", "1-128"),
    ("a*b", "'*'"), ("a\nb", "'\\n'"), ("a#b", "'#'"), ("a,b", "','"),
])
def test_names__tag_key_problem_catches_bad_keys(key, fragment):
    problem = names.tag_key_problem(key)
    assert problem is not None, f"tag_key_problem({key!r}) should find a problem"
    assert fragment in problem, f"tag_key_problem({key!r}) should mention {fragment!r}, said {problem!r}"


@pytest.mark.parametrize("key", ["host", "k" * 128, "team:name", "a b", "x_y.z/w=v+u-t@s", "\u00e9quipe", "awsx", "aws"])
def test_names__tag_key_problem_accepts_good_keys(key):
    assert names.tag_key_problem(key) is None, f"tag_key_problem({key!r}) refused a valid key: {names.tag_key_problem(key)}"


# -- check_request -----------------------------------------------------------------------------

GOOD = dict(session_name="alice@host", source_identity="alice", tags={"host": "h"}, policy_arns=[], external_id=None)


def request(**changes):
    return names.check_request(**{**GOOD, **changes})


def test_names__check_request_accepts_a_good_request_and_the_limits():
    try:
        request()
        request(tags={f"t{i}": "v" for i in range(50)})
        request(policy_arns=[f"arn:aws:iam::aws:policy/P{i}" for i in range(10)])
        request(external_id="ab")
        request(external_id="a" * 1224)
        request(external_id="Ab0_+=,.@:/-")
        request(session_name=None, source_identity=None, tags={})
        request(tags={"k": "", "k" * 128: "v" * 256})
    except InvalidRequest as err:
        raise AssertionError(f"check_request refused a request within STS's limits: {err}")


@pytest.mark.parametrize("changes, fragment", [
    (dict(tags={f"t{i}": "v" for i in range(51)}), "51 session tags"),
    (dict(policy_arns=[f"arn:aws:iam::aws:policy/P{i}" for i in range(11)]), "11 policy ARNs"),
    (dict(external_id="x"), "external_id"),
    (dict(external_id=""), "external_id"),
    (dict(external_id="has space"), "external_id"),
    (dict(external_id="\u00e9t\u00e9"), "external_id"),
    (dict(external_id="a" * 1225), "external_id"),
    (dict(external_id="ab\n"), "external_id"),
    (dict(session_name="a"), "RoleSessionName"),
    (dict(session_name="a b"), "RoleSessionName"),
    (dict(session_name="x" * 65), "RoleSessionName"),
    (dict(source_identity="alice:x"), "SourceIdentity"),
    (dict(tags={"aws:x": "v"}), "aws:"),
    (dict(tags={"k" * 129: "v"}), "1-128"),
    (dict(tags={"k": "a*b"}), "not a valid STS tag value"),
    (dict(tags={"k": "v" * 257}), "not a valid STS tag value"),
])
def test_names__check_request_raises_invalid_request(changes, fragment):
    with pytest.raises(InvalidRequest) as info:
        request(**changes)
    assert fragment in str(info.value), f"expected {fragment!r} in {str(info.value)!r}"
    assert isinstance(info.value, StsError) and info.value.code == "invalid_request", \
        f"InvalidRequest should be an StsError with code invalid_request, got {info.value.code!r}"


@EXAMPLES
@given(ANY_TEXT, ANY_TEXT)
def test_names__check_request_accepts_whatever_the_encoders_produce(principal, host):
    try:
        names.check_request(names.sts_name(f"{principal}@{host}"), names.sts_name(principal),
                            {"host": names.tag_value(host), "who": names.tag_value(principal)}, [], None)
    except InvalidRequest as err:
        raise AssertionError(f"check_request refused encoded values for {principal!r}/{host!r}: {err}")


# -- templates ---------------------------------------------------------------------------------


@pytest.mark.parametrize("template, fields", [
    ("{principal}@{hostname}", ["principal", "hostname"]), ("{principal}", ["principal"]), ("static", []),
    ("", []), ("{{principal}}", []), ("{user}-{user}", ["user", "user"]), ("{nope}", ["nope"]),
    ("{principal:}", ["principal"]), ("{}", [""]), ("{0}", ["0"]),
    ("{service}/{instance_id}/{rhost}", ["service", "instance_id", "rhost"]),
])
def test_names__template_fields_lists_placeholders(template, fields):
    got = names.template_fields(template)
    assert got == fields, f"template_fields({template!r}) should be {fields}, got {got}"


@pytest.mark.parametrize("template", ["{principal:>10}", "{principal!r}", "{principal!s:5}", "{hostname:.5}",
                                      "{", "}", "{principal", "{principal!}"])
def test_names__template_fields_refuses_malformed_templates(template):
    with pytest.raises(ValueError):
        names.template_fields(template)


@pytest.mark.parametrize("template", ["{principal}@{hostname}", "{principal}", "{user}-{service}-{rhost}",
                                      "{instance_id}", "static", "", "{{literal}}"])
def test_names__check_template_accepts_known_placeholders(template):
    assert names.check_template(template) is None, \
        f"check_template({template!r}) refused a good template: {names.check_template(template)}"


@pytest.mark.parametrize("template, fragment", [
    ("{nope}", "unknown placeholder {nope}"), ("{principal}@{host}", "unknown placeholder {host}"),
    ("{}", "unknown placeholder {}"), ("{0}", "unknown placeholder {0}"),
    ("{principal.upper}", "unknown placeholder {principal.upper}"), ("{principal[0]}", "unknown placeholder"),
    ("{principal:>10}", "format spec"), ("{principal!r}", "format spec or conversion"), ("{principal", "expected '}'"),
])
def test_names__check_template_explains_the_problem(template, fragment):
    problem = names.check_template(template)
    assert problem is not None, f"check_template({template!r}) should refuse it"
    assert fragment in problem, f"check_template({template!r}) should mention {fragment!r}, said {problem!r}"


def test_names__check_template_lists_the_allowed_placeholders():
    problem = names.check_template("{nope}")
    for p in names.PLACEHOLDERS:
        assert "{%s}" % p in problem, f"the message should list {{{p}}}: {problem!r}"


def test_names__render_fills_known_placeholders_and_blanks_missing_ones():
    got = names.render("{principal}@{hostname}/{rhost}", {"principal": "alice", "hostname": "h1", "rhost": None})
    assert got == "alice@h1/", f"render should fill values and blank missing ones, got {got!r}"
