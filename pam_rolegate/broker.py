"""rolegated, assembled: the core (registry, records, lifecycle), the two socket doors, signals.

Assembly only. What a grant or session is lives in core/grants.py, the core's API in registry.py,
how changes survive a restart in records.py, refresh and reaping in lifecycle.py, the sockets in
doors/sockets.py.
"""

import dataclasses
import os
import resource
import select
import signal
import syslog
import threading
import time

from . import hostcheck
from .rules import config as config_mod
from .hookside import protocol
from .backends import sdnotify, store
from .backends.homefiles import HomeReader
from .doors.sockets import (ALWAYS_ADMITTED_POOL, MAX_CONNECTIONS, MAX_CONNECTIONS_PER_UID, MAX_SERVING_PER_UID,
                            MAX_USER_CONNECTIONS, MAX_WORKING_PER_UID, PAM_WORKERS, USER_WORKERS, Door, Handlers,
                            RefusalLog)
from .errors import ConfigError, RolegateError, StoreError
from .admin import exitcodes
from .backends.fleet import FleetRules
from .backends.firewall import door_ports
from .core.lifecycle import FD_RESERVE, Lifecycle
from .hookside.log import Log
from .backends.metrics import Metrics
from .core.records import Journal
from .core.elevation import Elevations
from .core.registry import Registry
from .backends.sts import StsEngine

PAM_DIR = os.path.dirname(protocol.PAM_SOCKET)


def door_descriptors(cfg):
    """Connections the doors this config opens may hold at once, all at their caps."""
    total = MAX_CONNECTIONS + MAX_USER_CONNECTIONS + ALWAYS_ADMITTED_POOL
    http_doors = len(door_ports(cfg))  # one loopback HTTP door per port the firewall shares out
    if http_doors:
        from .doors.web import HttpDoor

        total += HttpDoor.max_connections * http_doors
    return total


class Broker:
    """The core and its doors, built from one config; `start()` recovers and opens the doors."""

    def __init__(self, cfg, engine=None, log=None, store_mount=True):
        self.cfg = cfg
        self.log = log or Log("rolegated")
        self.store = store.CredentialStore(cfg.runtime_dir, mount=store_mount)
        self.journal = Journal(self.store, self.log)
        self.registry = Registry(cfg, engine or StsEngine.from_config(cfg), self.store, self.log)
        refusals = RefusalLog(self.log)
        self.homes = HomeReader()
        self.elevations = Elevations(self.registry, self.log)
        handlers = Handlers(self.registry, refusals, homes=self.homes, log=self.log, elevations=self.elevations)
        self.pam_door = Door("pam", os.path.join(cfg.runtime_dir, protocol.PAM_SOCKET), handlers.pam(),
                             PAM_WORKERS, self.log, refusals, mode=0o600, on_loop=handlers.pam_on_loop())
        self.user_door = Door("user", os.path.join(cfg.runtime_dir, protocol.USER_SOCKET), handlers.user(),
                              USER_WORKERS, self.log, refusals, per_uid_connections=MAX_CONNECTIONS_PER_UID,
                              per_uid_serving=MAX_SERVING_PER_UID, per_uid_working=MAX_WORKING_PER_UID,
                              max_connections=MAX_USER_CONNECTIONS)
        self.imds_door = self.container_door = None
        if cfg.delivery == "container":
            from .doors.container import ContainerDoor

            self.container_door = ContainerDoor(self.registry, self.log, refusals)
        if cfg.imds.mode == "emulate":
            from .doors.imds import ImdsDoor, metadata_fetcher

            self.imds_door = ImdsDoor(self.registry, self.log, refusals,
                                      metadata=metadata_fetcher(self.registry.engine))
        # The session watches (a pidfd each) get the descriptors the doors can never need: a user
        # who fills a door must not take the one a login's accept needs, and sessions past that
        # allowance are polled instead.
        self.lifecycle = Lifecycle(self.registry, self.journal, self.log,
                                   reserve=door_descriptors(cfg) + FD_RESERVE)
        self.registry.listeners = [self.journal, self.lifecycle]
        self.fleet = None  # rules_from's poller, made below (the metrics read it)
        self.metrics = Metrics(self.registry.counts, self._door_counts, self.log, rules=self._rules_state)
        self.log.observer = self.metrics.observe
        self.registry.engine.observer = self.metrics.sts_observed
        # One change of config or rules at a time: SIGHUP's reload and the fleet rules' thread.
        self._lock = threading.Lock()
        self.fleet = self._fleet(cfg) if cfg.rules_from else None

    def _fleet(self, cfg):
        fleet = FleetRules(cfg, None, self.apply_rules, self.log, observer=self.metrics.rules_fetched)
        # A reload that changes region, source or endpoints reads its parameter with the engine of
        # the new config, not the running one (which would ask another region, as another identity).
        fleet.engine = lambda: self._engine_for(fleet.cfg)
        return fleet

    def _engine_for(self, cfg):
        """The STS engine for `cfg`: the running one while region, source, budget and endpoint stay."""
        engine, old = self.registry.engine, self.cfg
        if (cfg.region, cfg.source, cfg.sts_timeout, cfg.sts_endpoint) == \
                (old.region, old.source, old.sts_timeout, old.sts_endpoint):
            return engine
        fresh = StsEngine.from_config(cfg, client_factory=engine.client_factory, clock=engine.clock)
        fresh.observer = self.metrics.sts_observed
        return fresh

    def _rules_state(self):
        """(version, fetched) of the fleet rules in force, None without rules_from or rules (metrics)."""
        fleet = self.fleet
        doc = fleet.current if fleet is not None else None
        return None if doc is None else (doc.version, doc.fetched)

    def _door_counts(self):
        return [(door.name, door.counts) for door in (self.imds_door, self.container_door) if door is not None]

    def recover(self):
        """Take over what a previous broker left: live sessions kept, dead ones reaped, strays removed."""
        grants, sessions = self.journal.load()
        kept, reaped = self.registry.restore(grants, sessions)
        self.journal.start(self.registry)
        if grants or sessions:
            self.log.decision("recovered", sessions=kept, reaped=reaped, grants=self.registry.counts()["grants"])

    def start(self):
        self.store.prepare()
        self.store.private_dir(PAM_DIR)
        if self.fleet is not None:  # the rules before any session is recovered or served
            cfg, doc = self.fleet.first(self.cfg)
            if doc is not None:  # else no rules, as built, and first() said why
                with self._lock:
                    self._put_in_force(cfg, **self._rules_fields(doc))
                    self.fleet.accept(doc)
        self.recover()
        self.lifecycle.start()
        self.metrics.configure(self.cfg)
        self.pam_door.start()
        self.user_door.start()
        for door in (self.imds_door, self.container_door):
            if door is not None:
                door.start()
        if self.fleet is not None:
            self.fleet.start()

    @staticmethod
    def _rules_fields(doc):
        return {"source": doc.where, "version": doc.version}

    def apply_rules(self, fleet, doc):
        """Put a fleet rules document in force through the same path as a reload; ConfigError when
        it does not hold valid rules for the config in force (nothing changes then)."""
        with self._lock:
            if fleet is not self.fleet:
                return  # a reload replaced that parameter meanwhile
            cfg = doc.rules_for(self.cfg)
            self._put_in_force(cfg, **self._rules_fields(doc))
            fleet.accept(doc)

    def reload(self, path):
        """SIGHUP: reread the config (and fetch the fleet rules at once); a bad file, or fleet rules
        that do not fit it, leave the running config in force."""
        with self._lock:
            old_fleet = self.fleet
            done = self._reload(path)
        if old_fleet is not None and old_fleet is not self.fleet:
            old_fleet.stop()  # outside the lock: its thread may be waiting for it
        if done and self.fleet is not None:
            self.fleet.start()
            if self.fleet is old_fleet:
                self.fleet.poke()
        return done

    def _reload(self, path):
        try:
            cfg = config_mod.load(path)
            hostcheck.check_paths(cfg)  # what a start would refuse, a reload refuses too (check-config's check)
        except ConfigError as err:
            self.log.decision("failed", action="reload", reason=str(err), kept="previous config")
            return False
        old = self.cfg
        runtime_changed = cfg.runtime_dir != old.runtime_dir
        if runtime_changed:
            cfg = dataclasses.replace(cfg, runtime_dir=old.runtime_dir)
        # The doors this broker opened at start stay as they are until a restart, and so does what
        # sessions are told to use: a session must never be pointed at a door that is not there.
        delivery_changed = (cfg.delivery, cfg.container_port) != (old.delivery, old.container_port)
        if delivery_changed:
            cfg = dataclasses.replace(cfg, delivery=old.delivery, container_port=old.container_port)
        fleet, doc = self.fleet, None
        try:
            if cfg.rules_from is None:
                fleet = None
            elif fleet is not None and fleet.source == cfg.rules_from:
                cfg = fleet.rules_for(cfg)
                doc = fleet.current
            else:
                fleet = self._fleet(cfg)
                cfg, doc = fleet.first(cfg, kept_if_none="previous config")
                if doc is None:
                    return False
        except ConfigError as err:
            self.log.decision("failed", action="reload", reason=f"the rules in force do not fit the new config: "
                                                                f"{err}", kept="previous config")
            return False
        restart = [what for what, changed in (("runtime_dir", runtime_changed),
                                              ("imds.mode/port", (cfg.imds.mode, cfg.imds.port) != (old.imds.mode, old.imds.port)),
                                              ("delivery/container_port", delivery_changed)) if changed]
        self._put_in_force(cfg, path=path, rules_from=cfg.rules_from,
                           note=f"{', '.join(restart)} changes need a restart" if restart else None)
        if fleet is not None:
            fleet.configure(cfg)
            fleet.accept(doc)
        self.fleet = fleet
        return True

    def _put_in_force(self, cfg, **fields):
        """The one path a new config or new rules take (SIGHUP, fleet rules): the core reconfigured,
        grants the rules no longer give revoked, one `reloaded` line. Called with the lock held."""
        engine = self._engine_for(cfg)
        self.cfg = cfg
        self.registry.reconfigure(cfg, engine)
        self.lifecycle.configure(cfg)
        self.metrics.configure(cfg)
        revoked = self.registry.recheck()
        note = fields.pop("note", None)
        self.log.decision("reloaded", **fields, rules=len(cfg.roles), revoked=revoked, note=note)

    def warm_up(self, budget=None, sleep=time.sleep):
        """Pay before READY=1 what the first login would otherwise pay (the gatekeeper's keys, the STS
        client, the instance id its session tags use), retrying until `budget` seconds are spent: a
        host whose network comes late still gets a warm broker, one with none still becomes ready.
        True when done; else the first login pays the rest, and the log says why."""
        budget = WARM_UP_SECONDS if budget is None else budget
        deadline, last = time.monotonic() + budget, None
        while True:
            left = deadline - time.monotonic()
            try:
                self.registry.engine.warm(max(min(left, WARM_UP_TRY_SECONDS), 0.1))
                _ = self.registry.host  # cached once the instance id is known
                return True
            except RolegateError as err:
                last = err
            except Exception as err:  # botocore's own (a missing region...): said below, never fatal
                last = f"{type(err).__name__}: {err}"
            if deadline - time.monotonic() <= WARM_UP_PAUSE:
                break
            sleep(WARM_UP_PAUSE)
        self.log.emit(f"warm-up: the gatekeeper's keys or the STS client are not ready after {budget:g}s ({last}); "
                      f"ready anyway: the first login fetches them itself. Check `rolegate doctor`", syslog.LOG_WARNING)
        return False

    def stop(self):
        if self.fleet is not None:
            self.fleet.stop()
        self.pam_door.stop()
        self.homes.close()
        self.user_door.stop()
        for door in (self.imds_door, self.container_door):
            if door is not None:
                door.stop()
        self.lifecycle.stop()
        self.metrics.stop()
        self.journal.close()


# The warm-up before READY=1: systemd holds logins (systemd-user-sessions.service) until then, so
# its bound is what a host whose IMDS or STS does not answer waits at boot before logins open.
# 20 s covers a late network's DHCP and a slow first TLS handshake; each try gets at most
# WARM_UP_TRY_SECONDS (the IMDS calls' own 2 s cap is inside it), then a pause before the next.
WARM_UP_SECONDS = 20
WARM_UP_TRY_SECONDS = 5
WARM_UP_PAUSE = 1.0

# Sessions whose processes the broker watches through a pidfd each (past this they are polled
# every reap_interval): well above the 10,000 live sessions a busy bastion holds.
WATCHED_SESSIONS = 65536


def _raise_fd_limit(doors, log):
    """Take enough descriptors for every door at its cap, our own files, and WATCHED_SESSIONS
    pidfds: raised past the hard limit where root may (up to fs.nr_open), else to the hard limit,
    saying so when the doors' caps do not fit (then sessions are polled, never a door starved)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = doors + FD_RESERVE + WATCHED_SESSIONS
    try:
        with open("/proc/sys/fs/nr_open") as fh:
            want = min(want, int(fh.read()))
    except (OSError, ValueError):
        pass
    for limit in (max(want, hard), hard):
        if limit <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
            break
        except (ValueError, OSError):
            continue
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < doors + FD_RESERVE:
        log.error(f"only {soft} file descriptors: the doors may hold {doors} connections at once; "
                  "sessions will be polled rather than watched; raise LimitNOFILE in rolegated.service")


def serve(config_path, engine=None, log=None, ready=None):
    """Run the broker until SIGTERM/SIGINT; SIGHUP reloads. Returns an exit status."""
    log = log or Log("rolegated")
    try:
        cfg = config_mod.load(config_path)
        # check-config's filesystem checks, located in the file; start() walks again as it creates.
        hostcheck.check_paths(cfg)
    except ConfigError as err:
        log.error(f"not starting: {err}")
        return exitcodes.NEGATIVE  # the config is invalid
    _raise_fd_limit(door_descriptors(cfg), log)
    broker = Broker(cfg, engine=engine, log=log)
    # Signals are caught before start(): it may wait on Parameter Store for up to the STS budget,
    # and a SIGHUP's default action there (exit, which systemd does not count as a failure to
    # restart after) would leave the host without a broker. They are acted on once it serves.
    reload_requested = threading.Event()
    stop_requested = threading.Event()
    signal.signal(signal.SIGHUP, lambda *a: reload_requested.set())
    signal.signal(signal.SIGTERM, lambda *a: stop_requested.set())
    signal.signal(signal.SIGINT, lambda *a: stop_requested.set())
    # Every signal also writes a byte here (at C level, no lock taken in a handler), so the loop
    # below acts on a SIGHUP at once rather than at its next half-second look: a reload that makes
    # grants due starts their refresh pass without that wait.
    woken, wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake, warn_on_full_buffer=False)
    try:
        broker.start()
    except (StoreError, OSError) as err:
        log.error(f"not starting: {err}")
        broker.stop()
        return exitcodes.FAILED  # the runtime directory, a socket or the rules cache could not be set up
    log.decision("started", socket=broker.user_door.path, pam_socket=broker.pam_door.path, pid=os.getpid(),
                 rules=len(broker.cfg.roles), rules_from=cfg.rules_from, delivery=cfg.delivery, source=str(cfg.source))
    # The doors already listen (a login that comes now waits for the same keys); the warm-up runs
    # beside the signal loop so a SIGTERM is not held up by it. READY=1 once it is over.
    sdnotify.status("warming up: fetching the gatekeeper's keys, building the STS client")
    warming = threading.Thread(target=broker.warm_up, name="warm-up", daemon=True)
    warming.start()
    told_ready = False
    while not stop_requested.is_set():
        if not told_ready and not warming.is_alive():
            sdnotify.ready(f"serving {broker.user_door.path}")
            told_ready = True
            if ready is not None:
                ready()
        select.select([woken], [], [], 0.05 if not told_ready else 0.5)
        try:
            while os.read(woken, 512):
                pass
        except BlockingIOError:
            pass  # drained
        if reload_requested.is_set():
            reload_requested.clear()
            if told_ready:  # before READY=1 systemd still counts the start, not a reload
                sdnotify.reloading()
            broker.reload(config_path)
            if told_ready:
                sdnotify.ready(f"serving {broker.user_door.path}")
    signal.set_wakeup_fd(-1)
    os.close(woken)
    os.close(wake)
    # Sessions outlive the broker: files and records stay, so a restarted broker picks them up.
    sdnotify.stopping()
    broker.stop()
    log.decision("stopped", pid=os.getpid(), grants=broker.registry.counts()["grants"], note="files kept for restart")
    return 0
