"""Pure: does an AWS config file's text name a region for a profile — read as botocore reads it.

The one place the rule "whose region wins" is decided (docs/sessions.md "Whose region wins"): the broker asks
it for `default` at a PAM login (`ssh host CMD` included), `rolegate env` and `rolegate region` ask
it for the profile a login shell selects. Standard library only.

botocore's rules, followed exactly (configloader.raw_config_parse and build_profile_map, botocore
1.29 to 1.44; the AWS CLI v1 and v2 and boto3 share them): the file is read by configparser's
RawConfigParser (comments are whole lines starting with `#` or `;`, keys are case-insensitive,
`=` or `:` separate, an indented line continues the value above it, so `s3 =` followed by an
indented `region = x` is a nested setting, not the profile's region; a `[DEFAULT]` section's keys
apply to every section); `[default]` and `[profile default]` both mean the default profile (the
later one in the file wins); any other profile needs the `profile ` prefix (`[NAME]` alone is not a
profile in the config file); `[sso-session …]` and `[services …]` sections are not profiles. A file
botocore would refuse (a duplicate section or key, a line that is neither) names no region here:
the SDKs then fail on the file whatever the environment says, and rolegate keeps its region.
"""

import configparser
import functools
import re
import shlex

DEFAULT_PROFILE = "default"
# botocore reads AWS_DEFAULT_PROFILE before AWS_PROFILE (configprovider: 'profile'); the JS SDK
# and CLI v2 read AWS_PROFILE only. Set both to one name, or only AWS_PROFILE, and they all agree.
PROFILE_VARS = ("AWS_DEFAULT_PROFILE", "AWS_PROFILE")
REGION_VARS = ("AWS_REGION", "AWS_DEFAULT_REGION")
CONFIG_FILE_VAR = "AWS_CONFIG_FILE"


def profile_in_use(environ):
    """The profile an SDK started with `environ` uses (botocore's order), `default` when none is set."""
    for var in PROFILE_VARS:
        if environ.get(var):
            return environ[var]
    return DEFAULT_PROFILE


def _profiles(parser):
    """{profile name: section name} as botocore's build_profile_map builds it (later sections win)."""
    found = {}
    for section in parser.sections():
        if section.startswith("profile"):
            try:
                parts = shlex.split(section)
            except ValueError:
                continue
            if len(parts) == 2:
                found[parts[1]] = section
        elif section == DEFAULT_PROFILE:
            found[DEFAULT_PROFILE] = section
    return found


# configparser's option pattern backtracks over a run of whitespace inside a line once for every
# character before it: a 60 KB line of spaces took 13 s here, holding the GIL (every thread of the
# broker) for all of it. Runs inside a line are cut to this length before parsing, which makes the
# cost linear and changes nothing a real file means (no region, profile name or key holds 8
# blanks in a row); leading indentation, which decides what continues what, is left alone.
BLANK_RUN = 8
_LONG_BLANKS = re.compile(r"(?<=\S)([^\S\n]{%d})[^\S\n]+" % BLANK_RUN)


# Pure, so its answers can be kept: the broker asks about the same few files at every login (~0.1 ms
# of configparser each). Bounded: 64 texts of at most 64 KiB (homefiles.MAX_CONFIG_BYTES) each.
@functools.lru_cache(maxsize=64)
def profile_region(text, profile=DEFAULT_PROFILE):
    """The region `text` (an AWS config file's contents) names for `profile`, or None."""
    parser = configparser.RawConfigParser()
    try:
        parser.read_string(_LONG_BLANKS.sub(r"\1", text))
    except configparser.Error:
        return None
    section = _profiles(parser).get(profile)
    if section is None or not parser.has_option(section, "region"):
        return None
    value = parser.get(section, "region")
    # An empty value, or a nested block (`region =` then indented lines), is no region an SDK can use.
    if not value or value.startswith("\n"):
        return None
    return value


def names_region(text, profile=DEFAULT_PROFILE):
    return profile_region(text, profile) is not None
