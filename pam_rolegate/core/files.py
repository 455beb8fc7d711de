"""What a grant's files say: the credentials file's sections, the pointer a session is given, its env.

A login grant's files carry its default profile (keys, or a credential_process under `process`
delivery, or nothing under `container`, whose token file the endpoint asks for) and a section per
named profile and per elevation in force, each a credential_process that asks the broker. The
writes themselves are the store's (backends/store.py: atomic, owned by the target user).
"""

import dataclasses

from ..backends import store
from ..errors import StoreError
from ..hookside.protocol import CONTAINER_TOKEN_VAR, CONTAINER_URI_VAR
from .grants import CONTAINER_PATH


class GrantFiles:
    def __init__(self, index, credential_store, log, rolegate_cmd):
        self.index = index
        self.store = credential_store
        self.log = log
        self.rolegate_cmd = rolegate_cmd

    def pointer(self, grant):
        """(variable, path) through which a session finds this grant, by delivery. Never
        AWS_CONFIG_FILE: the user's own config (profiles, region, output, chains) stays in use."""
        if self.index.cfg.delivery == "container":
            return CONTAINER_TOKEN_VAR, self.store.path(grant.id, store.TOKEN)
        return "AWS_SHARED_CREDENTIALS_FILE", self.store.path(grant.id, store.CREDENTIALS)

    def container_uri(self, grant):
        return f"http://127.0.0.1:{self.index.cfg.container_port}{CONTAINER_PATH}{grant.id}"

    def env_for(self, grant):
        cfg = self.index.cfg
        var, path = self.pointer(grant)
        env = {"AWS_REGION": cfg.region, "AWS_DEFAULT_REGION": cfg.region, var: path}
        if cfg.delivery == "container":
            env[CONTAINER_URI_VAR] = self.container_uri(grant)
            # The named profiles' sections: a credentials file with no [default], so the default
            # still comes from the endpoint. Set whether or not the rules name profiles now, so
            # ones a reload adds reach this session too.
            env["AWS_SHARED_CREDENTIALS_FILE"] = self.store.path(grant.id, store.CREDENTIALS)
        return env

    def command(self, grant):
        """The credential_process that fetches this grant's default profile."""
        return f"{self.rolegate_cmd} credentials --grant {grant.id}"

    def _named_commands(self, grant):
        return [(name, f"{self.command(grant)} --profile {name}") for name, _role in grant.profiles]

    def write(self, grant):
        cfg = self.index.cfg
        named = self._named_commands(grant)
        if cfg.delivery == "container":
            self.store.write(grant.id, store.TOKEN, grant.token.encode(), grant.target_uid, grant.target_gid)
            self.store.write(grant.id, store.CREDENTIALS, store.credentials_ini(None, named),
                             grant.target_uid, grant.target_gid)
        elif cfg.delivery == "process":
            self.store.write(grant.id, store.CREDENTIALS, store.credentials_ini(None, named, self.command(grant)),
                             grant.target_uid, grant.target_gid)
        else:
            self.store.write(grant.id, store.CREDENTIALS, store.credentials_ini(grant.credentials, named),
                             grant.target_uid, grant.target_gid)
        if grant.legacy_config:
            self.store.write(grant.id, store.AWS_CONFIG,
                             store.process_config_ini(cfg.region, self.command(grant), named),
                             grant.target_uid, grant.target_gid)

    def remove(self, key):
        try:
            self.store.remove(key)
        except OSError as err:
            self.log.error(f"could not remove grant {key}: {err}")

    # -- the sections a login grant's files name -------------------------------------------------

    def sections(self, key, named):
        """The sections grant `key`'s files carry: the rules' named profiles, then its elevations."""
        with self.index.lock:
            elevated = tuple((p, e.role) for p, e in self.index.elevated.get(key, {}).items() if p not in dict(named))
        return tuple(named) + elevated

    def renamed(self, grant, profiles):
        """`grant` naming `profiles` in its files from now on (the rules changed its named profiles;
        its role stands). Lock held; the files are rewritten now when it has any."""
        grant = dataclasses.replace(grant, profiles=profiles)
        self.index.put_grant(grant)
        if self.index.by_grant.get(grant.id) and grant.id not in self.index.lingering:
            self.write(grant)
        return grant

    def unname(self, view_key, ended):
        """Take the sections of profiles `ended` out of login grant `view_key`'s files (lock held).
        Best effort: on a full tmpfs the stale section's command is refused by the broker anyway."""
        view = self.index.grants.get(view_key)
        if view is None or not ended & set(dict(view.profiles)):
            return
        try:
            self.renamed(view, tuple(p for p in view.profiles if p[0] not in ended))
        except (OSError, StoreError) as err:
            self.log.error(f"could not rewrite grant {view_key}'s files: {err}")
