"""Page tokens for the job list: the last row's position, signed for the tenant and filter.

A token is opaque to clients and cannot be forged or carried to another tenant or another
state filter: its HMAC is keyed by the operator's secret and the tenant.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from datetime import datetime

from service.errors import Problem


def make(*, secret: str, tenant: str, position: tuple[datetime, str], state: str | None) -> str:
    created, last_id = position
    payload = json.dumps([created.isoformat(), last_id, state]).encode()
    body = base64.urlsafe_b64encode(payload).decode().rstrip("=")
    return f"{body}.{_sign(secret, tenant, body)}"


def read(*, secret: str, tenant: str, token: str, state: str | None) -> tuple[datetime, str]:
    """The position a token holds, or a 400 for one this API did not issue for this list."""
    bad = Problem(400, "PAGE_TOKEN_INVALID", "page_token is not one this API issued for this list")
    body, _, signature = token.partition(".")
    # As bytes: compare_digest raises TypeError on a str with non-ASCII characters.
    if not hmac.compare_digest(signature.encode(), _sign(secret, tenant, body).encode()):
        raise bad
    try:
        created, last_id, token_state = json.loads(
            base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        )
        when = datetime.fromisoformat(created)
    except (ValueError, TypeError, binascii.Error) as exc:
        raise bad from exc
    if token_state != state:
        raise Problem(400, "PAGE_TOKEN_INVALID", "page_token was issued for another state filter")
    return when, str(last_id)


def _sign(secret: str, tenant: str, body: str) -> str:
    key = f"{secret}\n{tenant}".encode()
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()[:32]
