"""Authenticating a person through a PAM stack, with every message of its conversation relayed.

The broker (root) runs the `rolegate` PAM service for an elevation: pam_authenticate, then
pam_acct_mgmt, as the person (the grant's principal). Each message the stack sends — a hidden
prompt (a password), a visible one (a TOTP code), an info or error line — goes to `converse`, which
relays it to the person's terminal and returns their answer (or None to give up).

Why pamela and not python-pam: python-pam's conversation answers only the first hidden prompt, with
the one password it was given, voids every later prompt and never answers a visible one, and its
API has no way to put another conversation in its place; so a password followed by a TOTP code
cannot pass through it. pamela (one module, Debian's python3-pamela) exposes pam_start with a
conversation function of the caller's, which is all this needs.
"""

from ctypes import CDLL, POINTER, c_char_p, c_void_p, cast, memset, sizeof

import pamela

SERVICE = "rolegate"  # /etc/pam.d/rolegate, installed by `rolegate install` and the package
# Linux-PAM's own styles (security/_pam_types.h)
PROMPT_ECHO_OFF, PROMPT_ECHO_ON, ERROR_MSG, TEXT_INFO = 1, 2, 3, 4
STYLES = {PROMPT_ECHO_OFF: "echo_off", PROMPT_ECHO_ON: "echo_on", ERROR_MSG: "error", TEXT_INFO: "info"}
PAM_SUCCESS, PAM_BUF_ERR, PAM_CONV_ERR = 0, 5, 19
_LIBC = CDLL(None)  # the process's own libc: the allocator pamela's calloc and strdup use
_LIBC.free.argtypes = [c_void_p]
_LIBC.free.restype = None
MAX_ANSWER = 512  # PAM_MAX_RESP_SIZE: no module reads more of an answer


class Refused(Exception):
    """The stack said no; `code` is PAM's, `reason` its text."""

    def __init__(self, code, reason):
        self.code = code
        self.reason = reason
        super().__init__(reason)


def authenticate(user, converse, service=SERVICE):
    """Run `service`'s auth and account stacks for `user`. converse(style, text) is called for each
    message (style one of STYLES' values) and returns the answer to a prompt, or None to end the
    conversation (PAM then fails it). Returns None when the stack says yes, raises Refused."""

    @pamela.CONV_FUNC
    def conv(n_messages, messages, p_response, _app_data):
        # The responses array and each answer are malloc'd and, on success, handed to the module,
        # which frees them (PAM's contract). On failure they are wiped and freed here, and the
        # module gets no array at all.
        addr = pamela.CALLOC(n_messages, sizeof(pamela.PamResponse))
        if not addr:
            return PAM_BUF_ERR
        responses = cast(addr, POINTER(pamela.PamResponse))
        filled, ok = [], False
        try:
            for i in range(n_messages):
                msg = messages[i].contents
                style = STYLES.get(msg.msg_style)
                text = (cast(msg.msg, c_char_p).value or b"").decode("utf-8", "replace")
                if style is None:
                    return PAM_CONV_ERR
                answer = converse(style, text)
                if style in ("echo_off", "echo_on"):
                    if answer is None:
                        return PAM_CONV_ERR
                    data = answer.encode("utf-8")[:MAX_ANSWER]
                    responses[i].resp = pamela.STRDUP(data)
                    responses[i].resp_retcode = 0
                    filled.append((i, len(data)))
            p_response[0] = responses
            ok = True
            return PAM_SUCCESS
        except Exception:  # a bug in the relay ends this conversation, never the broker
            return PAM_CONV_ERR
        finally:
            if not ok:
                for i, length in filled:
                    memset(responses[i].resp, 0, length)
                    _LIBC.free(cast(responses[i].resp, c_void_p))
                _LIBC.free(addr)
                p_response[0] = POINTER(pamela.PamResponse)()

    try:
        handle = pamela.pam_start(service, user, conv_func=conv)
    except pamela.PAMError as err:
        raise Refused(getattr(err, "errno", None), f"cannot start PAM service {service!r}: {err}") from None
    code = pamela.PAM_AUTHENTICATE(handle, 0)
    if code == PAM_SUCCESS:
        code = pamela.PAM_ACCT_MGMT(handle, 0)
    reason = pamela.pam_strerror(handle, code) if code != PAM_SUCCESS else None
    try:
        pamela.pam_end(handle, code)
    except pamela.PAMError:
        pass  # pam_end repeats the failure already in hand
    if code != PAM_SUCCESS:
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise Refused(code, str(reason or f"PAM error {code}"))
