"""Bearer API keys: random, shown once, stored as sha256, each bound to one tenant."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.db import utcnow
from service.models import ApiKey

KEY_PREFIX = "ak_"


@dataclass(frozen=True)
class Principal:
    tenant: str
    key_id: str


@dataclass(frozen=True)
class IssuedKey:
    id: str
    tenant: str
    secret: str  # shown once, never stored


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def valid_tenant(name: str) -> bool:
    return 0 < len(name) <= 64 and all(c.isalnum() or c in "-_." for c in name)


def create_key(session: Session, tenant: str) -> IssuedKey:
    if not valid_tenant(tenant):
        raise ValueError("tenant names are 1-64 letters, digits, '-', '_' or '.'")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key_id = "key_" + secrets.token_hex(12)
    session.add(ApiKey(id=key_id, tenant=tenant, key_sha256=_digest(secret), prefix=secret[:10]))
    return IssuedKey(key_id, tenant, secret)


def revoke_key(session: Session, key_id: str) -> bool:
    done = session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.revoke_time.is_(None))
        .values(revoke_time=utcnow())
    )
    return bool(done.rowcount)  # type: ignore[attr-defined]


def authenticate(session: Session, secret: str) -> Principal | None:
    """The digest lookup is an index probe; comparing digests leaks nothing about the key."""
    if not secret.startswith(KEY_PREFIX) or len(secret) > 128:
        return None
    row = session.execute(
        select(ApiKey).where(ApiKey.key_sha256 == _digest(secret))
    ).scalar_one_or_none()
    if row is None or row.revoke_time is not None:
        return None
    return Principal(row.tenant, row.id)


def list_keys(session: Session, tenant: str | None = None) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.create_time)
    if tenant:
        query = query.where(ApiKey.tenant == tenant)
    return list(session.execute(query).scalars())
