"""Decision logging: one line per decision, stable wording, to syslog (authpriv) or else stderr.

Standard library only (the PAM hook uses it). Lines read `EVENT: key=value ...`; values with
spaces are JSON-quoted. Callers pass masked key ids only; nothing here ever sees a secret.
"""

import os
import sys
import syslog

import _socket

try:  # the C string encoder alone: `json` would import `re` inside sshd
    from _json import encode_basestring as _quote
except ImportError:
    from json import dumps as _quote

# The decisions rolegate logs; tests and admins' alerts match on these words.
EVENTS = ("granted", "denied", "refreshed", "released", "reaped", "failed", "reloaded", "started",
          "stopped", "skipped", "recovered", "refused", "moved", "elevated", "dropped", "expired")
DEV_LOG = "/dev/log"


def _value(v):
    text = str(v)
    # split() breaks at exactly the characters isspace() names, in C: a loop over the characters
    # made each decision line (two per login) cost the broker ~7 µs instead of ~2.5.
    if text.split(None, 1) != [text] or '"' in text or "=" in text:
        return _quote(text)
    return text


def line(event, **fields):
    return f"{event}: " + " ".join(f"{k}={_value(v)}" for k, v in fields.items() if v is not None)


class Log:
    """Writes to syslog's authpriv facility when a syslog socket exists, else to stderr.

    Datagrams go to /dev/log directly rather than through libc's openlog(): the hook runs
    inside sshd and sudo, whose own syslog ident and facility we must not change.
    """

    def __init__(self, ident, stream=None, use_syslog=None, observer=None):
        self.ident = ident
        # observer(event, fields) sees every decision after it is logged (the broker's metrics);
        # its own trouble never turns a decision into a failure.
        self.observer = observer
        self.stream = stream or sys.stderr
        self.use_syslog = os.path.exists(DEV_LOG) if use_syslog is None else use_syslog

    def _syslog(self, text, priority):
        msg = f"<{syslog.LOG_AUTHPRIV | priority}>{self.ident}[{os.getpid()}]: {text}".encode("utf-8", "replace")
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
        try:
            s.settimeout(0.5)
            s.connect(DEV_LOG)
            s.send(msg)
            return True
        except OSError:
            return False
        finally:
            s.close()

    def emit(self, text, priority=syslog.LOG_INFO):
        if self.use_syslog and self._syslog(text, priority):
            return
        try:
            self.stream.write(f"{self.ident}[{os.getpid()}]: {text}\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must not turn a log line into a failure

    def decision(self, event, **fields):
        assert event in EVENTS, event
        priority = syslog.LOG_WARNING if event in ("denied", "failed", "refused") else syslog.LOG_INFO
        self.emit(line(event, **fields), priority)
        if self.observer is not None:
            try:
                self.observer(event, fields)
            except Exception:
                pass

    def error(self, text):
        self.emit(text, syslog.LOG_ERR)
