"""STS's limits on names and tags, template rendering, and the encodings that make any user name fit them.

Pure and standard-library only. The limits are AWS's (AssumeRole API reference):
RoleSessionName and SourceIdentity are 2-64 characters of [A-Za-z0-9_+=,.@-]; a session tag key
is 1-128 and a value 0-256 characters of Unicode letters, digits, spaces and _.:/=+-@; at most
50 session tags and 10 policy ARNs; ExternalId 2-1224 characters of [A-Za-z0-9_+=,.@:/-].
"""

import hashlib
import re
import string
import unicodedata

from ..errors import InvalidRequest

NAME_MIN, NAME_MAX = 2, 64
TAG_KEY_MAX, TAG_VALUE_MAX, TAGS_MAX = 128, 256, 50
POLICY_ARNS_MAX = 10
EXTERNAL_ID_RE = re.compile(r"[A-Za-z0-9_+=,.@:/-]{2,1224}")
DURATION_MIN, DURATION_MAX = 900, 12 * 3600

PLACEHOLDERS = ("principal", "user", "service", "hostname", "instance_id", "rhost")

# Characters copied through unchanged. '=' and '+' are left out on purpose: '=' starts an escape
# and '+' marks padding or a hash suffix, which keeps the encoding one-to-one (two different
# Linux users never share a SourceIdentity, which CloudTrail attributes actions to).
_PLAIN = frozenset(string.ascii_letters + string.digits + "_,.@-")
_TAG_EXTRA = frozenset("_.:/=+-@")


def template_fields(template):
    """The placeholder names a template uses; raises ValueError for a malformed template."""
    fields = []
    for _literal, field, spec, conversion in string.Formatter().parse(template):
        if field is None:
            continue
        if spec or conversion:
            raise ValueError(f"placeholder {{{field}}} may not carry a format spec or conversion")
        fields.append(field)
    return fields


def check_template(template):
    """None when the template is usable, else the reason (for config validation)."""
    try:
        fields = template_fields(template)
    except ValueError as err:
        return str(err)
    unknown = [f for f in fields if f not in PLACEHOLDERS]
    if unknown:
        allowed = ", ".join("{%s}" % p for p in PLACEHOLDERS)
        return f"unknown placeholder {{{unknown[0]}}}; allowed: {allowed}"
    return None


def render(template, values):
    """Fill a validated template; missing values render as empty strings."""
    return template.format_map({p: values.get(p) or "" for p in PLACEHOLDERS})


def sts_name(text):
    """Encode any text as a valid RoleSessionName / SourceIdentity, one-to-one.

    Plain characters pass; any other character becomes '=' and the hex of its UTF-8 bytes;
    a result shorter than 2 is padded with '+'; a result longer than 64 keeps its first 47
    characters, then '+' and 16 hex digits of the SHA-256 of the original text.
    """
    out = []
    for ch in text:
        if ch in _PLAIN:
            out.append(ch)
        else:
            out.append("".join("=%02X" % b for b in ch.encode("utf-8", "surrogatepass")))
    name = "".join(out)
    if len(name) > NAME_MAX:
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        name = name[: NAME_MAX - 17] + "+" + digest
    if name.lower().startswith("aws:"):  # reserved prefix; ':' is never plain, so unreachable
        name = "=" + name
    return name.ljust(NAME_MIN, "+")


def is_sts_name(name):
    return NAME_MIN <= len(name) <= NAME_MAX and all(c in _PLAIN or c in "+=" for c in name)


def _tag_char_ok(ch):
    return ch in _TAG_EXTRA or unicodedata.category(ch)[0] in "LZN"


def tag_key_problem(key):
    """None when `key` is a valid session tag key, else why not."""
    if not 1 <= len(key) <= TAG_KEY_MAX:
        return f"tag key must be 1-{TAG_KEY_MAX} characters"
    if key.lower().startswith("aws:"):
        return "tag keys may not start with 'aws:' (reserved by AWS)"
    bad = [c for c in key if not _tag_char_ok(c)]
    if bad:
        return f"tag key has character {bad[0]!r}; allowed: letters, digits, spaces and _.:/=+-@"
    return None


# What an elevation's AssumeRole adds to session.tags (docs/profiles-and-elevation.md); reserved there.
ELEVATED_TAG = "rolegate:elevated"
REASON_TAG = "rolegate:reason"


def reason_problem(text):
    """None when `text` travels whole as a session tag value (an elevation's reason), else why not:
    nothing is cut or replaced, so CloudTrail keeps exactly what the person wrote."""
    if not text.strip():
        return "the reason is empty"
    if len(text) > TAG_VALUE_MAX:
        return f"the reason has {len(text)} characters; a session tag value holds at most {TAG_VALUE_MAX}"
    bad = [c for c in text if not _tag_char_ok(c)]
    if bad:
        return (f"the reason has character {bad[0]!r}, which a session tag value cannot hold; "
                f"allowed: letters, digits, spaces and _ . : / = + - @")
    return None


def tag_value(text):
    """Make a rendered tag value valid: disallowed characters become '_', then cut to 256."""
    return "".join(c if _tag_char_ok(c) else "_" for c in text)[:TAG_VALUE_MAX]


def check_request(session_name, source_identity, tags, policy_arns, external_id):
    """Raise InvalidRequest when an AssumeRole request would break an STS limit.

    moto accepts what real STS refuses, so this is where the limits are enforced.
    """
    for label, value in (("RoleSessionName", session_name), ("SourceIdentity", source_identity)):
        if value is not None and not is_sts_name(value):
            raise InvalidRequest(f"{label} {value!r} breaks STS's rule: 2-64 of [A-Za-z0-9_+=,.@-]")
    if len(tags) > TAGS_MAX:
        raise InvalidRequest(f"{len(tags)} session tags; STS allows at most {TAGS_MAX}")
    for key, value in tags.items():
        problem = tag_key_problem(key)
        if problem:
            raise InvalidRequest(f"session tag {key!r}: {problem}")
        if len(value) > TAG_VALUE_MAX or value != tag_value(value):
            raise InvalidRequest(f"session tag {key!r}: value is not a valid STS tag value")
    if len(policy_arns) > POLICY_ARNS_MAX:
        raise InvalidRequest(f"{len(policy_arns)} policy ARNs; STS allows at most {POLICY_ARNS_MAX}")
    if external_id is not None and not EXTERNAL_ID_RE.fullmatch(external_id):
        raise InvalidRequest("external_id must be 2-1224 of [A-Za-z0-9_+=,.@:/-]")
