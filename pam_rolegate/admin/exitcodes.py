"""The exit codes of `rolegate` and `rolegated`: the one table (docs/commands.md and rolegate(8) list it).

A script tells a "no" (1) from a mistake in its own arguments (2), a broker that is not there (3)
and a failure worth retrying or reporting (4). `elevate -- CMD` follows env(1): CMD's own code
passes through, so rolegate's own failures there take codes no ordinary command returns.
Kept import-light: `rolegate env` runs in every login shell.
"""

OK = 0  # the command did what was asked (a valid config, a mapped login, credentials, ...)
NEGATIVE = 1  # a negative answer: no rule maps the login, the config is invalid, a doctor check
#               FAILed, not elevated, no profiles, no such user
USAGE = 2  # bad arguments (argparse's own code for them)
BROKER_UNREACHABLE = 3  # the broker could not be reached: no socket, refused, timed out, too busy
FAILED = 4  # an operation failed: AWS/STS error, permission denied or needs root, an I/O error
ELEVATE_FAILED = 125  # `elevate -- CMD`: rolegate itself failed before CMD ran (as env(1))
CMD_NOT_EXECUTABLE = 126  # `elevate -- CMD`: CMD was found but could not be run (as env(1))
CMD_NOT_FOUND = 127  # `elevate -- CMD`: CMD was not found (as env(1))
SIGNAL_BASE = 128  # `elevate -- CMD`: a CMD killed by signal N exits 128+N, as the shell reports it
INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as the shell reports a command it interrupted
# Standard output was closed under us (`rolegate policy | head -1`): quietly, with the code a
# program killed by SIGPIPE gets (128 + 13), so `set -o pipefail` sees what it sees for cat(1).
BROKEN_PIPE = 141

# What a refusal from the broker (the protocol's error codes, hookside/protocol.py) means here.
BROKER_REFUSAL = {
    "no_grant": NEGATIVE,  # you hold no grant (or no such request or profile of yours)
    "unknown_user": NEGATIVE,  # NSS does not know the caller
    "bad_request": USAGE,  # the broker refused the request's arguments (a missing --reason, --for out of range)
    "forbidden": FAILED,  # permission denied
    "limited": FAILED,  # a limit of the caller's own (back-off after failed elevations): later
    "busy": BROKER_UNREACHABLE,  # the broker stayed too busy to answer within the deadline
    "sts_failed": FAILED,
    "store_failed": FAILED,
    "internal": FAILED,
    "unknown_action": FAILED,  # a broker older than this command
    "unsupported_version": FAILED,
}


def of_error(err):
    """The exit code for an error a command did not handle itself."""
    from ..errors import BrokerUnavailable, ConfigError

    if isinstance(err, BrokerUnavailable):
        return BROKER_UNREACHABLE
    code = getattr(err, "refusal", None)  # deps.BrokerRefused: the broker answered with an error code
    if code is not None:
        return BROKER_REFUSAL.get(code, FAILED)
    if isinstance(err, ConfigError):
        return NEGATIVE  # the config is invalid
    return FAILED  # StsError, ParameterError, StoreError, InstallError, OSError, ...


# The table as --help's epilog, rolegate(8) and docs/commands.md give it: (code, meaning).
TABLE = (
    (OK, "OK"),
    (NEGATIVE, "a negative answer: no rule maps the login, the config is invalid, a doctor check FAILed, "
               "not elevated, no profiles"),
    (USAGE, "usage error (bad arguments)"),
    (BROKER_UNREACHABLE, "the broker could not be reached (no socket, refused, timed out)"),
    (FAILED, "an operation failed: an AWS/STS error, permission denied or needs root, an I/O error"),
    (ELEVATE_FAILED, "elevate -- CMD: rolegate itself failed before CMD ran (otherwise CMD's own exit code)"),
    (CMD_NOT_EXECUTABLE, "elevate -- CMD: CMD was found but is not executable"),
    (CMD_NOT_FOUND, "elevate -- CMD: CMD was not found"),
    (INTERRUPTED, "interrupted (Ctrl-C)"),
    (BROKEN_PIPE, "standard output was closed early (as for a program SIGPIPE ends)"),
)
# The first five, in a word each, for --help.
SHORT = ((OK, "ok"), (NEGATIVE, "no"), (USAGE, "usage"), (BROKER_UNREACHABLE, "broker unreachable"),
         (FAILED, "failed"))
