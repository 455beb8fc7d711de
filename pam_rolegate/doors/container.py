"""The container-credentials door (`delivery: container`): the endpoint that
AWS_CONTAINER_CREDENTIALS_FULL_URI names, on 127.0.0.1:`container_port`.

Every SDK reads these two variables in its default chain and refreshes from the endpoint on its
own as keys near expiry, and none of them touches the user's ~/.aws/config. A caller must both
send the grant's token (the `Authorization` header, read by the SDK from
AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE, a 0600 file of the grant's user) and be, by the kernel's
word, the grant's user (or root): a leaked token alone is useless to another account.

    GET /rolegate/credentials/GRANT  ->  {AccessKeyId, SecretAccessKey, Token, Expiration, RoleArn}
"""

import hmac
import json

from .web import HttpDoor, text
from ..core.grants import CONTAINER_PATH, iso


class ContainerDoor(HttpDoor):
    name = "container"

    def __init__(self, registry, log, refusals, port=None):
        super().__init__(log, refusals, port or registry.cfg.container_port)
        self.registry = registry

    def routes(self, app):
        app.router.add_get(CONTAINER_PATH + "{grant}", self.credentials)

    async def credentials(self, request):
        uid, key = request["uid"], request.match_info["grant"]
        token = request.headers.get("Authorization", "")
        grant = self.registry.live_grant(key)
        # One answer for "no such grant", "not yours" and "wrong token": nothing to probe with.
        if grant is None or uid not in (0, grant.target_uid) or not grant.token \
                or not hmac.compare_digest(token.encode(), grant.token.encode()):
            self.count("refused")
            if grant is not None:
                self.refusals.refused(uid, None, door="container", grant=key, reason="not this grant's user or token")
            return text("no live grant for this caller; log in again", 403)
        grant = await self.work(uid, self.registry.credentials, key)
        if grant is None:  # revoked or moved to another role meanwhile: not what was looked up above
            self.count("refused")
            return text("no live grant for this caller; log in again", 403)
        c = grant.credentials
        self.count("credentials")
        return text(json.dumps({"AccessKeyId": c.access_key_id, "SecretAccessKey": c.secret_access_key,
                                "Token": c.session_token, "Expiration": iso(c.expiration), "RoleArn": grant.role}))
