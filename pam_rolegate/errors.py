"""The error hierarchy: every failure rolegate reports is a RolegateError with a message a user can act on."""


class RolegateError(Exception):
    """Base class. str(err) is the whole user-facing message, including what to do."""


class ConfigError(RolegateError):
    """A configuration mistake, located as FILE:LINE:COL (1-based) when the file is known."""

    def __init__(self, message, path=None, line=None, column=None):
        self.message = message
        self.path = path
        self.line = line
        self.column = column
        super().__init__(self.located())

    def located(self):
        if self.path is None:
            return self.message
        if self.line is None:
            return f"{self.path}: {self.message}"
        return f"{self.path}:{self.line}:{self.column}: {self.message}"


class StsError(RolegateError):
    """STS (or the gatekeeper credentials behind it) did not give us credentials."""

    code = "sts_failed"


class SourceCredentialsError(StsError):
    """The gatekeeper credentials (instance profile, profile, keyring) could not be obtained."""

    code = "source_unavailable"


class AccessDenied(StsError):
    """STS refused: the gatekeeper may not assume the role, or the role does not trust it."""

    code = "access_denied"


class Throttled(StsError):
    """STS kept throttling us until the time budget ran out."""

    code = "throttled"


class StsUnavailable(StsError):
    """STS did not answer (connection refused, timeout, 5xx, a reply that is not STS's) within the time budget."""

    code = "sts_unavailable"


class InvalidRequest(StsError):
    """What we would send breaks an STS limit (session name, tags, policy ARNs)."""

    code = "invalid_request"


class ParameterError(RolegateError):
    """A Parameter Store parameter (fleet rules) could not be read. `code` is AWS's error code
    (ParameterNotFound, AccessDeniedException, ThrottlingException, …) or rolegate's own
    (unreachable, source_unavailable, bad_reply)."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


class StoreError(RolegateError):
    """The runtime directory or a credential file is not safe to use."""


class ProtocolError(RolegateError):
    """A frame on the broker socket was malformed, too large or of an unknown version.

    `code` is the protocol error code a reply to it carries (see protocol.py)."""

    code = "bad_request"

    def __init__(self, message, code=None):
        super().__init__(message)
        if code is not None:
            self.code = code


class BrokerUnavailable(RolegateError):
    """The broker could not be reached, or is not who it must be (root)."""
