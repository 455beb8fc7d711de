"""Fleet rules (`rules_from: ssm:/NAME`): the rules document fetched from Parameter Store, checked,
kept as the last good copy on disk, and polled for changes in a thread of the broker's own.

Never on a login's path: logins read the rules in force; this thread only replaces them, through
the broker's one path for new rules (Broker.apply_rules, which SIGHUP's reload shares). A broken
document never replaces good rules, and an unreachable store leaves the rules in force as they are.

The last good copy (rules_cache) is root's, 0600, in a root-only directory on disk, written
atomically and flushed; its first line says which parameter and version it holds and when it was
fetched, so it is never served for another parameter. It is only read when the parameter cannot be.
"""

import random
import re
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from ..rules import config as config_mod
from . import store, sts
from ..errors import ConfigError, ParameterError, StoreError

# A fleet must not hit Parameter Store in lockstep: each wait is drawn from this share of
# rules_poll (never longer, so a change is always picked up within rules_poll).
JITTER = (0.8, 1.0)
# While no rules are in force at all (nothing fetched, no last good copy), retry sooner than
# rules_poll: from this many seconds, doubling, up to rules_poll. Rules in force wait rules_poll.
NO_RULES_RETRY = 10
CACHE_HINT = "put rules_cache in a root-owned directory, such as /var/lib/rolegate"
# The region is part of the name: a same-named parameter of another region holds other rules.
_HEADER = "# rolegate: last good copy of {source} in {region} version {version}, fetched {fetched}\n"
_HEADER_RE = re.compile(r"# rolegate: last good copy of (\S+) in (\S+) version (\d+), fetched (\S+)\n")
_TIME = "%Y-%m-%dT%H:%M:%SZ"


@dataclass(frozen=True)
class Document:
    """A rules document and where it came from."""

    source: str  # rules_from, ssm:/NAME
    text: str
    version: int  # Parameter Store's version of the parameter
    fetched: float  # Unix time it was last read from (or confirmed by) Parameter Store
    where: str  # what errors are located against: ssm:/NAME, or the cache file

    def age(self, now):
        return max(now - self.fetched, 0)

    def rules_for(self, cfg):
        """`cfg` with this document's rules, checked against it (raises ConfigError located here)."""
        return config_mod.parse_rules(self.text, self.where, cfg)


def age_text(seconds):
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 2 * 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d"


# -- the store and the cache -----------------------------------------------------------------------


def fetch(cfg, engine, clock=time.time):
    """The parameter, read now with the gatekeeper credentials. Raises ParameterError."""
    text, version = sts.get_parameter(engine, cfg.rules_parameter, cfg.ssm_endpoint)
    return Document(cfg.rules_from, text, version, clock(), cfg.rules_from)


def write_cache(cfg, doc):
    header = _HEADER.format(source=doc.source, region=cfg.region, version=doc.version,
                            fetched=datetime.fromtimestamp(doc.fetched, timezone.utc).strftime(_TIME))
    store.write_private_file(cfg.rules_cache, (header + doc.text).encode("utf-8"), "rules_cache", CACHE_HINT)


def read_cache(cfg):
    """The last good copy of rules_from's parameter, or None when there is none.
    Raises StoreError for an unsafe file or one that holds something else."""
    data = store.read_private_file(cfg.rules_cache, "rules_cache", CACHE_HINT)
    if data is None:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise StoreError(f"{cfg.rules_cache} is not UTF-8 text; remove it, rolegated writes a new one") from None
    m = _HEADER_RE.match(text)
    if not m:
        raise StoreError(f"{cfg.rules_cache} is not a copy rolegated wrote (its first line is not rolegate's); "
                         f"remove it, rolegated writes a new one")
    if (m.group(1), m.group(2)) != (cfg.rules_from, cfg.region):
        raise StoreError(f"{cfg.rules_cache} holds the rules of {m.group(1)} in {m.group(2)}, "
                         f"not of {cfg.rules_from} in {cfg.region}")
    try:
        fetched = datetime.strptime(m.group(4), _TIME).replace(tzinfo=timezone.utc).timestamp()
    except ValueError:  # a hand-edited or damaged header must not keep the broker from starting
        raise StoreError(f"{cfg.rules_cache} has a damaged first line (fetch time {m.group(4)!r}); "
                         f"remove it, rolegated writes a new one") from None
    # The whole file is parsed, header included (a YAML comment), so errors name its own lines.
    return Document(cfg.rules_from, text, int(m.group(3)), fetched, cfg.rules_cache)


# -- the poller ------------------------------------------------------------------------------------


class FleetRules:
    """One rules_from parameter: what is in force from it, and the thread that polls it.

    `engine()` gives the broker's current StsEngine (its gatekeeper credentials, region and
    budget); `apply(fleet, doc)` puts a document's rules in force or raises ConfigError.
    """

    def __init__(self, cfg, engine, apply, log, observer=None, clock=time.time, rng=random.uniform):
        self.cfg = cfg
        self.engine = engine
        self.apply = apply
        self.log = log
        # observer(outcome) after each fetch: changed, unchanged, invalid or error (the metrics).
        self.observer = observer
        self.clock = clock
        self.rng = rng
        self.current = None  # the Document in force (set by accept(), under the broker's lock)
        self.failures = 0  # fetches failed in a row
        # (rules_cache, version, fetched) the copy on disk holds, as this broker last wrote it: the
        # copy is written only for a document from the store it does not hold yet, so nothing
        # else (a reload, a refused fetch) rewrites it. The lock: the poller and a reload both keep.
        self._kept = None
        self._keep_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = None

    @property
    def source(self):
        return self.cfg.rules_from

    def _observe(self, outcome):
        if self.observer is not None:
            try:
                self.observer(outcome)
            except Exception:
                pass

    def _failed(self, reason, code, kept):
        self.log.decision("failed", action="rules", source=self.source, code=code, reason=reason, kept=kept)

    # -- choosing the first rules (start, or a reload that names another parameter) -----------------

    def first(self, cfg, kept_if_none=None):
        """The rules to start with: the parameter's, else the last good copy, else none.

        Returns (cfg with those rules, the Document or None); logs why when it is not the
        parameter's (`kept_if_none` says what stays in force when nothing can serve). Nothing is
        put in force here; the caller does, then calls accept().
        """
        try:
            doc = fetch(cfg, self.engine(), self.clock)
            new = doc.rules_for(cfg)
            self._observe("changed")
            return new, doc
        except ParameterError as err:
            self._observe("error")
            self.failures += 1
            reason, code = str(err), err.code
        except ConfigError as err:
            self._observe("invalid")
            reason, code = str(err), "invalid"
        try:
            cached = read_cache(cfg)
            if cached is not None:
                new = cached.rules_for(cfg)
                age = age_text(cached.age(self.clock()))
                self._failed(reason, code, f"the last good copy {cfg.rules_cache} (version {cached.version}, "
                                           f"fetched {age} ago) serves until the parameter can be read")
                return new, cached
            problem = f"there is no last good copy at {cfg.rules_cache} either"
        except (StoreError, ConfigError, OSError) as err:
            problem = f"the last good copy cannot serve: {err}"
        self._failed(reason, code, kept_if_none or (
            f"no rules: nobody gets a role until {self.source} can be read ({problem}); check that the "
            f"parameter exists in {cfg.region}, that the gatekeeper may read it (rolegate policy), and that "
            f"SSM is reachable (rolegate doctor)"))
        return replace(cfg, roles=()), None

    def rules_for(self, cfg):
        """A reloaded config with the rules in force now, checked against it (raises ConfigError)."""
        doc = self.current
        if doc is None:
            return replace(cfg, roles=())
        return doc.rules_for(cfg)

    def accept(self, doc):
        """`doc`'s rules are now in force (called under the broker's lock); keep a fresh one on disk."""
        with self._keep_lock:
            self.current = doc
            self._keep(doc)

    def _confirm(self, seen, doc):
        """The poll found the text of `seen` (in force when it looked) again, as `doc`: `doc` stands for
        it now, unless another document was put in force meanwhile (a SIGHUP's fetch), which it
        must not push back."""
        with self._keep_lock:
            if self.current is not seen:
                return
            self.current = doc
            self._keep(doc)

    def _keep(self, doc):
        """The last good copy follows `doc` (a document from the store now in force or confirmed):
        written when its version or fetch time is not what the copy holds, else left untouched.
        Called with _keep_lock held, which orders it with what is put in force."""
        if doc is None or doc.where != doc.source:
            return  # nothing, or the cache itself
        held = (self.cfg.rules_cache, doc.version, doc.fetched)
        if held == self._kept:
            return
        try:
            write_cache(self.cfg, doc)
            self._kept = held
        except (StoreError, OSError) as err:
            self.log.decision("failed", action="rules-cache", source=self.source, reason=str(err),
                              kept="the rules in force; the copy on disk is older")

    # -- polling -------------------------------------------------------------------------------------

    def poll_once(self):
        """Fetch; when the document changed and is valid, put it in force. Never raises."""
        try:
            doc = fetch(self.cfg, self.engine(), self.clock)
        except ParameterError as err:
            self.failures += 1
            self._observe("error")
            self._failed(str(err), err.code, "previous rules" if self.current else "no rules")
            return "error"
        was_failing, self.failures = self.failures, 0
        current = self.current
        if current is not None and current.text == doc.text:  # a new version of the same text changes nothing
            self._observe("unchanged")
            # Confirmed now (and from the store, if the copy on disk was serving); a new version of
            # the same text: the copy says so (version, fetch time).
            self._confirm(current, doc)
            if was_failing:
                self.log.decision("reloaded", source=self.source, version=doc.version,
                                  note="the parameter is readable again; rules unchanged")
            return "unchanged"
        try:
            self.apply(self, doc)
        except ConfigError as err:
            self._observe("invalid")
            self._failed(str(err), "invalid", "previous rules" if current else "no rules")
            return "invalid"
        self._observe("changed")
        return "changed"

    def next_wait(self):
        poll = self.cfg.rules_poll
        if self.current is None and self.failures:
            poll = min(poll, NO_RULES_RETRY * 2 ** (self.failures - 1))
        return poll * self.rng(*JITTER)

    def _run(self):
        while not self._stop.is_set():
            self._wake.wait(self.next_wait())
            if self._stop.is_set():
                break
            self._wake.clear()
            try:
                self.poll_once()
            except Exception as err:  # a bug here must not end polling for the broker's lifetime
                self.log.error(f"fleet rules: {type(err).__name__}: {err}")

    def configure(self, cfg):
        """A reloaded config that names the same parameter (poll, cache, endpoint may differ)."""
        self.cfg = cfg

    def start(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fleet-rules", daemon=True)
            self._thread.start()

    def poke(self):
        """Fetch now (SIGHUP)."""
        self._wake.set()

    def stop(self):
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.cfg.sts_timeout + 5)
            self._thread = None
