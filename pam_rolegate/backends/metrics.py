"""The broker's Prometheus metrics, written as a node_exporter textfile (`metrics_file`) every
`metrics_interval`: login decisions, AssumeRole latency and errors, grants and sessions, refresh
failures, the HTTP doors' requests, and the fleet rules' fetches, version and age.

Counters are fed by observers the broker hands to the decision log (log.Log.observer) and to the
STS engine (sts.StsEngine.observer); gauges and the doors' counts are read when the file is
written. The file is written under a temporary name and renamed over the old one, so a scrape never
sees half of it. Nothing here holds a secret: the file is world-readable (0644).
"""

import os
import tempfile
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .. import errors

try:
    from prometheus_client import disable_created_metrics
except ImportError:  # prometheus-client < 0.17 (Debian 12 ships 0.16): the same process-wide switch,
    # before it had a public name; 0.17's disable_created_metrics sets exactly this flag.
    def disable_created_metrics():
        import prometheus_client.metrics

        prometheus_client.metrics._use_created = False

ELEVATION_OUTCOMES = ("granted", "denied", "failed")
LOGIN_RESULTS = {"granted": "granted", "denied": "denied", "failed": "failed"}
RULES_OUTCOMES = ("changed", "unchanged", "invalid", "error")  # of one fetch of the fleet rules
STS_CODES = tuple(sorted({cls.code for cls in (errors.StsError, *errors.StsError.__subclasses__())}))
# STS answers in tens of milliseconds, retries stretch a call towards sts_timeout (at most 60 s).
STS_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
# PAM service names come from root's PAM stacks, so they are few; a label per name past this many
# would only grow the file (and Prometheus's series) without telling anyone more.
MAX_SERVICES = 64
OTHER_SERVICE = "other"
FILE_MODE = 0o644  # scraped by node_exporter's user; holds counts only
ERROR_LOG_EVERY = 60.0  # seconds between two log lines about a file that cannot be written


class _Live:
    """A collector of what is read at collection time: grants, sessions and the doors' counts."""

    def __init__(self, counts, doors, rules):
        self.counts = counts  # () -> registry.counts()
        self.doors = doors  # () -> [(name, {outcome: requests})]
        self.rules = rules  # () -> (version, fetched) of the fleet rules in force, or None

    def collect(self):
        counts = self.counts()
        grants = GaugeMetricFamily("rolegate_grants", "Grants held by the broker, by state: live (sessions use "
                                   "them) or lingering (kept in memory after their last session).", labels=["state"])
        grants.add_metric(["live"], counts["grants"])
        grants.add_metric(["lingering"], counts["lingering"])
        yield grants
        yield GaugeMetricFamily("rolegate_sessions", "Sessions the broker tracks.", value=counts["sessions"])
        requests = CounterMetricFamily("rolegate_door_requests", "Requests to the broker's HTTP doors (imds: "
                                       "imds.mode emulate, container: delivery container), by outcome.",
                                       labels=["door", "outcome"])
        for door, outcomes in self.doors():
            for outcome, n in sorted(dict(outcomes).items()):
                requests.add_metric([door, outcome], n)
        yield requests
        rules = self.rules()
        if rules is not None:
            version, fetched = rules
            yield GaugeMetricFamily("rolegate_rules_version", "Parameter Store version of the fleet rules in "
                                    "force (rules_from).", value=version)
            yield GaugeMetricFamily("rolegate_rules_fetched_timestamp_seconds", "When the fleet rules in force "
                                    "were last read from (or confirmed by) Parameter Store, in Unix time; "
                                    "it stops moving while the store cannot be read.", value=fetched)


class Metrics:
    """The metrics of one broker, in a registry of their own (never prometheus_client's global one)."""

    def __init__(self, counts, doors=lambda: (), log=None, clock=time.monotonic, rules=lambda: None):
        # The *_created series double the file and say only when the broker started; the switch
        # is prometheus_client's, process-wide, and the broker is its only user.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        self.log = log
        self.clock = clock
        self.logins = Counter("rolegate_logins", "Login decisions by PAM service (shell: su -l and SSM shells; "
                              "imds: new IMDS keys) and result.", ["service", "result"], registry=self.registry)
        self.sts_seconds = Histogram("rolegate_sts_seconds", "Time of one AssumeRole, its retries included.",
                                     buckets=STS_BUCKETS, registry=self.registry)
        self.sts_errors = Counter("rolegate_sts_errors", "AssumeRole calls that failed, by error code.", ["code"],
                                  registry=self.registry)
        for code in STS_CODES:
            self.sts_errors.labels(code=code)
        self.refresh_failures = Counter("rolegate_refresh_failures", "Refreshes of a grant's credentials that "
                                        "failed (each is retried with backoff).", registry=self.registry)
        self.rules_fetches = Counter("rolegate_rules_fetches", "Fetches of the fleet rules (rules_from) by outcome: "
                                     "changed (new rules in force), unchanged, invalid (refused, the rules in "
                                     "force stay), error (the store could not be read).", ["outcome"],
                                     registry=self.registry)
        self.elevations = Counter("rolegate_elevations", "Elevation requests (rolegate elevate) by outcome: "
                                  "granted, denied (refused before PAM, PAM said no, a prompt went unanswered, "
                                  "no approval, or cancelled), failed (STS refused, or the session ended first).",
                                  ["outcome"],
                                  registry=self.registry)
        for outcome in ELEVATION_OUTCOMES:
            self.elevations.labels(outcome=outcome)
        self.registry.register(_Live(counts, doors, rules))
        self._services = set()
        self._rules_seen = False
        self._lock = threading.Lock()
        self._last_error_log = None
        self._thread = None
        self._stop = threading.Event()
        self.path = None
        self.interval = 15

    # -- observers ------------------------------------------------------------------------------

    def observe(self, event, fields):
        """log.Log's observer: one decision -> the counters it feeds. Decisions a RefusalLog left out
        of the log (rate-limited) come here too, so every refused elevation is counted."""
        if event == "failed" and fields.get("action") == "refresh":
            self.refresh_failures.inc()
            return
        if event == "elevated" or fields.get("action") == "elevate":
            outcome = "granted" if event == "elevated" else event
            if outcome in ELEVATION_OUTCOMES:
                self.elevations.labels(outcome=outcome).inc()
            return
        result = LOGIN_RESULTS.get(event)
        if result is None or "service" not in fields or "action" in fields:
            return  # not a login decision (a door, a reload, a release)
        self.logins.labels(service=self._service(fields["service"]), result=result).inc()

    def _service(self, service):
        service = str(service) if service else "unknown"
        with self._lock:
            if service in self._services:
                return service
            if len(self._services) >= MAX_SERVICES:
                return OTHER_SERVICE
            self._services.add(service)
            return service

    def sts_observed(self, seconds, error):
        """sts.StsEngine's observer: one AssumeRole (retries included) took `seconds`."""
        self.sts_seconds.observe(seconds)
        if error is not None:
            self.sts_errors.labels(code=getattr(error, "code", "internal_error")).inc()

    def rules_fetched(self, outcome):
        """fleet.FleetRules's observer: one fetch of the fleet rules ended with `outcome`."""
        if not self._rules_seen:  # every outcome shown from the first fetch on (none without rules_from)
            self._rules_seen = True
            for name in RULES_OUTCOMES:
                self.rules_fetches.labels(outcome=name)
        self.rules_fetches.labels(outcome=outcome).inc()

    # -- the file -------------------------------------------------------------------------------

    def configure(self, cfg):
        """Take metrics_file and metrics_interval from a (re)loaded config; start writing if asked."""
        self.path, self.interval = cfg.metrics_file, cfg.metrics_interval
        if self.path is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)
            self._thread.start()

    def write(self):
        """Write the file now, atomically: a temporary file renamed over it. Never raises."""
        path = self.path
        if path is None:
            return False
        try:
            _write_atomically(path, generate_latest(self.registry))
            return True
        except Exception as err:  # a full disk or a missing directory must never stop the broker
            now = self.clock()
            if self.log is not None and (self._last_error_log is None or now - self._last_error_log >= ERROR_LOG_EVERY):
                self._last_error_log = now
                self.log.error(f"metrics: cannot write {path}: {type(err).__name__}: {err}")
            return False

    def _run(self):
        while not self._stop.wait(self.interval):
            self.write()

    def stop(self):
        """Stop the writer and write the file one last time."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        self.write()


def _write_atomically(path, data):
    """`data` at `path`, 0644, replacing the old file in one rename.

    Not prometheus_client's write_to_textfile: it opens the predictable name PATH.PID.TID, following
    a symlink there, and the textfile directory usually belongs to node_exporter's user, who could
    plant one and have root overwrite any file. mkstemp creates a fresh name with O_EXCL (a planted
    link is never followed), and the file has its final mode before it is renamed into view.
    """
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".rolegate-metrics-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), FILE_MODE)
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
