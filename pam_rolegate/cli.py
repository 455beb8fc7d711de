"""The `rolegate` command: one run_<verb>(args, deps) per subcommand, flag wiring in `parser()`.

Imports of heavy modules (boto3 through sts, yaml through config) happen inside the verbs
that need them: `rolegate env` runs in every login shell and must start fast.
"""

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Mapping, TextIO

from .errors import ConfigError, RolegateError

EXIT_OK, EXIT_FAIL, EXIT_ERROR = 0, 1, 2


@dataclass(frozen=True)
class Deps:
    """What the verbs reach outside themselves; tests pass their own."""

    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)
    engine_factory: Callable = None  # config -> sts.StsEngine; None means the real one

    def say(self, text=""):
        print(text, file=self.out)

    def warn(self, text):
        print(f"rolegate: {text}", file=self.err)


def _load_config(args, deps):
    from . import config

    return config.load(config.config_path(getattr(args, "config", None), deps.environ))


def _engine(cfg, deps):
    if deps.engine_factory is not None:
        return deps.engine_factory(cfg)
    from . import sts

    return sts.StsEngine.from_config(cfg)


# -- verbs -------------------------------------------------------------------------------------


def run_check_config(args, deps):
    from . import config

    path = args.path or config.config_path(args.config, deps.environ)
    try:
        cfg = config.load(path)
    except ConfigError as err:
        deps.say(str(err))
        return EXIT_FAIL
    deps.say(f"{path}: OK ({len(cfg.roles)} rule{'s' if len(cfg.roles) != 1 else ''}, "
             f"source {cfg.source}, delivery {cfg.delivery}, region {cfg.region})")
    return EXIT_OK


def run_check_user(args, deps):
    from . import mapping

    cfg = _load_config(args, deps)
    facts = mapping.LoginFacts(user=args.target or args.user, service=args.service,
                               ruser=args.ruser if args.ruser else (args.user if args.target else None))
    try:
        ident = mapping.resolve(facts)
    except mapping.UnknownUser as err:
        deps.warn(f"{err}; check the name, or whether NSS (LDAP/SSSD) is reachable")
        return EXIT_ERROR
    decision = mapping.decide(cfg, ident)
    for line in mapping.explain(decision):
        deps.say(line)
    if decision.rule is None:
        return EXIT_FAIL
    from . import sts

    engine = _engine(cfg, deps) if args.assume else None
    host = engine.host_facts() if engine else sts.HostFacts(__import__("socket").gethostname())
    request = sts.build_request(cfg, decision.rule, ident, host=host)
    deps.say(f"session:   {request.session_name}")
    deps.say(f"source id: {request.source_identity}")
    deps.say(f"duration:  {request.duration}s")
    if not args.assume:
        return EXIT_OK
    creds = engine.assume(request)
    who = sts.caller_identity(creds, cfg.region)
    deps.say(f"assumed:   {who['Arn']}")
    deps.say(f"key:       {creds.masked_key}, expires {creds.expiration:%Y-%m-%dT%H:%M:%SZ}")
    return EXIT_OK


def policy_documents(cfg, gatekeeper_arn):
    """The gatekeeper's permission policy and each target role's trust policy, as dicts."""
    actions = ["sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity"]
    roles = sorted({r.role for r in cfg.roles})
    gatekeeper = {"Version": "2012-10-17", "Statement": [
        {"Sid": "RolegateAssumeMappedRoles", "Effect": "Allow", "Action": actions, "Resource": roles}]}
    trust = {}
    for role in roles:
        statements = []
        for ext in sorted({r.external_id for r in cfg.roles if r.role == role}, key=lambda e: e or ""):
            # Require a SourceIdentity, so every session of this role names its Linux user.
            cond = {"StringLike": {"sts:SourceIdentity": "*"}}
            if ext:
                cond["StringEquals"] = {"sts:ExternalId": ext}
            statements.append({"Sid": "TrustRolegateGatekeeper", "Effect": "Allow",
                               "Principal": {"AWS": gatekeeper_arn}, "Action": actions, "Condition": cond})
        trust[role] = {"Version": "2012-10-17", "Statement": statements}
    return {"gatekeeper_policy": gatekeeper, "trust_policies": trust}


def run_policy(args, deps):
    cfg = _load_config(args, deps)
    docs = policy_documents(cfg, args.gatekeeper)
    deps.say(json.dumps(docs, indent=2))
    return EXIT_OK


# -- wiring --------------------------------------------------------------------------------------


def parser():
    p = argparse.ArgumentParser(prog="rolegate", description="Per-user IAM roles for shared Linux hosts.")
    p.add_argument("--config", help="config file (default: $ROLEGATE_CONFIG or /etc/rolegate/rolegate.yaml)")
    sub = p.add_subparsers(dest="verb", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("check-config", help="validate a config file")
    s.add_argument("path", nargs="?")
    s.set_defaults(run=run_check_config)

    s = sub.add_parser("check-user", help="which rule and role a login would get, and why")
    s.add_argument("user", help="the user logging in (for sudo/su: the invoking user)")
    s.add_argument("--service", default="sshd", help="PAM service (default sshd)")
    s.add_argument("--ruser", help="PAM_RUSER: the invoking user, for sudo/su services")
    s.add_argument("--target", help="the account the session runs as (default: USER)")
    s.add_argument("--assume", action="store_true", help="really call AssumeRole and GetCallerIdentity")
    s.set_defaults(run=run_check_user)

    s = sub.add_parser("policy", help="IAM policies the config needs, as JSON")
    s.add_argument("--gatekeeper", default="arn:aws:iam::ACCOUNT_ID:role/GATEKEEPER_ROLE",
                   help="the gatekeeper (instance) role's ARN, for the trust policies")
    s.set_defaults(run=run_policy)
    return p


def main(argv=None, deps=None):
    deps = deps or Deps()
    args = parser().parse_args(argv)
    try:
        return args.run(args, deps)
    except RolegateError as err:
        deps.warn(str(err))
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def daemon_main(argv=None):
    """`rolegated`: the broker in the foreground (same as `rolegate daemon`)."""
    return main(["daemon"] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
